"""The Microsnoop network and its checkpoints."""
from .unet import MicrosnoopUNet, Encoder, Decoder, count_parameters, EMBED_DIM, INPUT_SIZE
from .load import load_model, save_model, save_random_init, weights_hash, ModelCard, default_weights_path, mae_weights_path

__all__ = [
    "MicrosnoopUNet", "Encoder", "Decoder", "count_parameters", "EMBED_DIM", "INPUT_SIZE",
    "load_model", "save_model", "save_random_init", "weights_hash", "ModelCard", "default_weights_path", "mae_weights_path",
]
