"""Checkpoints: the published format, plain state dicts, and ours with a model card.

Formats accepted by :func:`load_model` (always read with ``weights_only=True``):

* **published**: a dict whose key ``model`` holds the state dict (other keys such
  as ``optimizer``, ``checkpoint_epoch``, ``scaler`` are ignored); keys may carry
  a ``module.`` prefix (DistributedDataParallel).
* **plain**: the state dict itself.
* **cellpose**: ``cellpose:PATH``, a Cellpose 3 or scellseg weights file, converted by
  :func:`~microsnoop_ray.model.convert.cellpose_to_microsnoop` (first layer reduced to one
  channel, Cellpose's 3-output head left out); its model card says so.
* **microsnoop-ray**: ``{"format": "microsnoop-ray/1", "state_dict": ..., "model_card": {...}}``
  written by :func:`save_model`. Tensors may be stored in float16 to keep the file
  small; they are loaded as float32.

A state dict may hold the encoder alone (an embedding-only file); the decoder is
then left at its initial values and ``model.has_decoder`` is False.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import WeightsError
from .unet import MicrosnoopUNet

FORMAT = "microsnoop-ray/1"
CELLPOSE_PREFIX = "cellpose:"
_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


@dataclasses.dataclass
class ModelCard:
    """What a set of weights is, where it came from, and its hash.

    ``model_id`` names the network, its training data and a short hash of the
    weights (it is the ``<model_id>`` folder of the output layout).
    """

    model_id: str
    weights_sha256: str
    training_data: str = "unknown"
    epochs: float | None = None
    images_seen: int | None = None
    mask_ratio: float | None = None
    input_size: int | None = None
    source: str = ""
    notes: str = ""
    extra: dict = dataclasses.field(default_factory=dict)

    def to_dict(self, input_size: int | None = None) -> dict:
        """The card as a dict; with ``input_size``, its preprocessing contract is the one at that side
        (what a run that used it wrote)."""
        d = dataclasses.asdict(self)
        if input_size is not None:
            from .contract import preprocessing_contract

            d["extra"]["preprocessing"] = preprocessing_contract(input_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelCard":
        known = {f.name for f in dataclasses.fields(cls)}
        extra = {k: v for k, v in d.items() if k not in known}
        card = cls(**{k: v for k, v in d.items() if k in known})
        card.extra.update(extra)
        return card


def weights_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the float32 values of every tensor, keys in sorted order.

    Independent of the file's serialisation and of fp16/fp32 storage only in so
    far as the values are equal: a file stored in fp16 hashes its fp16-rounded
    values, which is what any user of that file computes with.
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        if not torch.is_tensor(t):
            continue
        h.update(key.encode())
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.to(torch.float32)
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def default_weights_path() -> Path | None:
    """Path of the default weights shipped in the package, or None if none are shipped.

    They are the encoder chosen by the weights study (``weights/MODEL_CARD.md``): embedding only.
    """
    p = _WEIGHTS_DIR / "microsnoop_default.pt"
    return p if p.exists() else None


def mae_weights_path() -> Path:
    """The package's MAE-pretrained full network (encoder and decoder): what ``reconstruct`` uses unless
    given other weights (the default weights have no decoder), and a start for fine-tuning."""
    return _WEIGHTS_DIR / "microsnoop-ray-gpu-224-0eb2f79e.pt"


def _strip_prefix(sd: Mapping[str, Any]) -> dict:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _trdata_from_name(name: str) -> str | None:
    m = re.search(r"trData-(.+?)_", name)
    return m.group(1) if m else None


def _read(path: Path) -> Any:
    if not path.exists():
        raise WeightsError(path, "weights file does not exist")
    if path.is_dir():
        raise WeightsError(path, "is a folder, not a weights file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, unsafe globals ...
        text = str(exc)
        if "Weights only load failed" in text:
            why = "torch.load(weights_only=True) refused it: not a tensor-only checkpoint"
        else:
            why = (text.strip().splitlines() or [type(exc).__name__])[0][:200]
        raise WeightsError(path, f"not a readable PyTorch checkpoint ({why})") from None


def load_model(path: str | os.PathLike | None = None, device: str | torch.device | None = None) -> MicrosnoopUNet:
    """Load Microsnoop weights into a :class:`MicrosnoopUNet` in eval mode.

    Parameters
    ----------
    path : str or path-like, optional
        A checkpoint in any of the module's formats. ``None`` loads the default
        weights shipped inside the package.
    device : str or torch.device, optional
        Where to put the model; CPU by default.

    Returns
    -------
    MicrosnoopUNet
        In eval mode, with attributes ``model_card`` (:class:`ModelCard`),
        ``has_decoder`` (bool) and ``weights_path`` (str).

    Raises
    ------
    WeightsError
        If the file is missing, unreadable, not a checkpoint, or its tensors do
        not fit the network; the message names the file and the problem.
    """
    if path is None:
        path = default_weights_path()
        if path is None:
            raise WeightsError(
                "<default weights>",
                "no default weights are shipped in this version of microsnoop-ray; "
                "pass a checkpoint with --weights (the published Microsnoop .pth file works unchanged, "
                "or train one with `microsnoop-ray train`)",
            )
    cellpose = str(path).startswith(CELLPOSE_PREFIX)
    path = Path(str(path)[len(CELLPOSE_PREFIX):]) if cellpose else Path(path)
    obj = _read(path)
    if cellpose:
        return _load_cellpose(obj, path, device)
    sd, card_dict, kind = _unpack(obj, path)
    model = MicrosnoopUNet()
    sd = _checked(_strip_prefix(sd), model.state_dict(), path)
    has_decoder = set(model.state_dict()) <= set(sd)
    model.load_state_dict(sd, strict=has_decoder)
    card = _card(weights_hash(sd), card_dict, kind, path)
    model.model_card = card
    model.has_decoder = has_decoder
    model.weights_path = str(path)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _unpack(obj: Any, path: Path) -> tuple[Mapping, dict | None, str]:
    """(state dict, stored model card or None, kind) of a checkpoint in one of the module's formats."""
    if not isinstance(obj, Mapping):
        raise WeightsError(path, f"holds a {type(obj).__name__}, not a checkpoint dict")
    if obj.get("format") == FORMAT:
        sd, card, kind = obj.get("state_dict"), obj.get("model_card"), "microsnoop-ray"
    elif "model" in obj and isinstance(obj["model"], Mapping):
        sd, card, kind = obj["model"], None, "published"
    elif obj and all(torch.is_tensor(v) for v in obj.values()):
        sd, card, kind = obj, None, "state_dict"
    else:
        keys = ", ".join(list(map(str, obj.keys()))[:5])
        raise WeightsError(path, f"not a Microsnoop checkpoint (top-level keys: {keys})")
    if not isinstance(sd, Mapping) or not sd:
        raise WeightsError(path, "checkpoint holds no state dict")
    return sd, card, kind


def _checked(sd: Mapping, expected: Mapping, path: Path) -> dict:
    """``sd`` as float tensors once every encoder tensor is there with its shape and nothing is foreign
    (the decoder may be absent: an encoder-only checkpoint embeds)."""
    enc_keys = {k for k in expected if k.startswith("encoder.")}
    unknown = sorted(set(sd) - set(expected))
    missing_enc = sorted(enc_keys - set(sd))
    if unknown or missing_enc:
        detail = []
        if missing_enc:
            detail.append(f"{len(missing_enc)} encoder tensors missing (e.g. {missing_enc[0]})")
        if unknown:
            detail.append(f"{len(unknown)} unexpected tensors (e.g. {unknown[0]})")
        raise WeightsError(path, "state dict does not fit the Microsnoop network: " + "; ".join(detail))
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise WeightsError(path, f"tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def _card(digest: str, stored: dict | None, kind: str, path: Path) -> ModelCard:
    """The stored model card (its hash checked against the weights), or one read off the file's name."""
    if stored:
        card = ModelCard.from_dict(stored)
        if card.weights_sha256 and card.weights_sha256 != digest:
            raise WeightsError(path, f"weights hash {digest[:12]} does not match its model card ({card.weights_sha256[:12]})")
        return card
    data = _trdata_from_name(path.name) or "unknown"
    card = ModelCard(model_id=f"microsnoop-{data}-{digest[:8]}", weights_sha256=digest, training_data=data,
                     source=f"{kind} checkpoint {path.name}")
    m = re.search(r"maskRatio-([0-9.]+?)_", path.name)
    card.mask_ratio = float(m.group(1)) if m else None
    m = re.search(r"inputSize-(\d+)", path.name)
    card.input_size = int(m.group(1)) if m else None
    return card


def _load_cellpose(obj: Any, path: Path, device) -> MicrosnoopUNet:
    from .convert import cellpose_to_microsnoop, split_fitting

    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise WeightsError(path, "cellpose: a Cellpose weights file is a plain state dict of tensors")
    try:
        sd = cellpose_to_microsnoop(obj)
    except (KeyError, ValueError) as exc:
        raise WeightsError(path, f"cellpose: {exc.args[0]}") from None
    model = MicrosnoopUNet()
    expected = model.state_dict()
    sd, left_out = split_fitting(sd, expected)
    for k, v in sd.items():
        if k not in expected or tuple(v.shape) != tuple(expected[k].shape):
            raise WeightsError(path, f"cellpose: tensor {k} {tuple(v.shape)} does not fit the Microsnoop network")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=False)
    digest = weights_hash(sd)
    model.model_card = ModelCard(
        model_id=f"cellpose-{path.name}-{digest[:8]}", weights_sha256=digest, training_data="Cellpose (its own)",
        input_size=224, source=f"Cellpose checkpoint {path.name}, converted by microsnoop_ray.model.convert",
        notes="Cellpose's segmentation network used unchanged as a Microsnoop encoder: first layer reduced from "
              "2 input channels to the first; "
              + (f"its decoder ({len(left_out)} tensors) does not fit the Microsnoop decoder and is left out "
                 "(embedding-only); " if left_out else "decoder trunk kept, ")
              + "Cellpose's 3-output head dropped (the reconstruction head is at its initial values). Preprocessing "
              "as every Microsnoop model: centred zero padding to 224, 1-99 percentile normalisation.",
        extra={"left_out": len(left_out)} if left_out else {})
    model.has_decoder = False
    model.weights_path = f"{CELLPOSE_PREFIX}{path}"
    model.eval()
    if device is not None:
        model.to(device)
    return model


def save_random_init(path: str | os.PathLike, seed: int = 0) -> Path:
    """A randomly initialised network (``torch.manual_seed(seed)``) in the microsnoop-ray format, its
    card saying so: for pipeline checks and as the baseline every trained encoder must beat."""
    torch.manual_seed(seed)
    save_model(MicrosnoopUNet(), path, ModelCard(
        model_id="microsnoop-UNTRAINED-{hash}", weights_sha256="", training_data="none (random initialisation)",
        epochs=0, notes="Randomly initialised network for a pipeline check only; its profiles carry no learned "
                        "biology."))
    return Path(path)


def save_model(model: MicrosnoopUNet, path: str | os.PathLike, card: ModelCard | Mapping | None = None,
               half: bool = False, encoder_only: bool = False) -> ModelCard:
    """Write ``model`` in the microsnoop-ray format with its model card.

    Parameters
    ----------
    half : bool
        Store floating tensors as float16 (about 13 MB for the full network).
    encoder_only : bool
        Keep only the encoder (enough for embeddings; about 5.6 MB in float16).

    Returns
    -------
    ModelCard
        The card written, with ``weights_sha256`` of the stored values.
    """
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if encoder_only:
        sd = {k: v for k, v in sd.items() if k.startswith("encoder.")}
    if half:
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    digest = weights_hash(sd)
    if card is None:
        card = ModelCard(model_id=f"microsnoop-unknown-{digest[:8]}", weights_sha256=digest)
    elif isinstance(card, Mapping):
        card = ModelCard.from_dict(card)
    card.weights_sha256 = digest
    if "{hash}" in card.model_id:
        card.model_id = card.model_id.replace("{hash}", digest[:8])
    payload = {"format": FORMAT, "state_dict": sd, "model_card": json.loads(json.dumps(card.to_dict()))}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return card
