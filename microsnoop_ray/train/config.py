"""The training recipe as one typed configuration: the ``train`` command's flags and config files,
the Ray Train workers and the checkpoints all read :class:`TrainConfig`.

Kept apart from the loop, without torch, so that the command line builds its parser and checks a
recipe without loading the network's libraries.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

from ..config import check_options, option

#: MSE over all pixels (the paper) or the masked ones only
LOSSES = ("all", "masked")
#: shallow skip connections while pretraining: kept (the paper), dropped, or noised
SKIPS = ("keep", "drop", "noise")
#: autocast dtype on a GPU (float16 trains with a gradient scaler)
AMP_DTYPES = ("float16", "bfloat16")
#: how the learning rate scales with the batch size, relative to the paper's 16
LR_RULES = ("none", "linear", "sqrt")


@dataclasses.dataclass
class TrainConfig:
    """Every value of the recipe (docs/METHOD.md section 2 by default).

    ``sources`` is a list of mappings for :func:`~microsnoop_ray.train.data.build_pool`.
    ``stop_epoch`` ends a budgeted run early while keeping the schedule of ``nepoch``.
    """

    sources: list = option([], "pretraining sources (build_pool mappings)", flag=None)
    name: str = option("microsnoop-pretrain", "run name: a folder under storage_path")
    storage_path: str = option("runs", "where runs, checkpoints and logs go")
    input_size: int = option(224, "side of the training crops")
    patch_size: int = option(16, "side of the masked patches")
    mask_ratio: float = option(0.25, "share of patches zeroed")
    loss: str = option("all", "MSE over all pixels (paper) or the masked ones", LOSSES)
    skips: str = option("keep", "shallow skip connections while pretraining (inference is unchanged)", SKIPS)
    amp_dtype: str = option("float16", "autocast dtype on a GPU (float16 with a gradient scaler)", AMP_DTYPES)
    lr_rule: str = option("none", "scale --lr with the batch size relative to 16", LR_RULES)
    batch_size: int = option(16, "images per step")
    lr: float = option(1e-3, "base learning rate (paper: 1e-3 at batch 16)")
    weight_decay: float = option(0.01, "AdamW weight decay", flag=None)
    warmup: int = option(40, "warm-up epochs (paper: 40 of 1,000)")
    nepoch: int = option(1000, "epochs of the schedule")
    epoch_size: int = option(12000, "images sampled per epoch")
    stop_epoch: int | None = option(None, "end a budgeted run early, keeping the schedule of nepoch")
    scale_range: tuple = option((0.5, 1.5), "random scaling of the crops", flag=None)
    seed: int = option(0, "random seed", flag=None)
    init: str | None = option(None, "start from these weights (fine-tuning); cellpose:PATH converts a Cellpose 3 "
                                    "or scellseg file")
    num_workers: int = option(1, "Ray Train workers (with --ray)", flag="--workers")
    use_gpu: bool = option(False, "train on GPU(s)", flag="--gpu")
    amp: bool = option(True, "mixed precision on a GPU", flag=None)
    channels_last: bool = option(True, "channels-last memory format", flag=None)
    threads: int | None = option(None, "torch threads")
    loader_workers: int = option(0, "processes that augment batches (0: in the training process)")
    notes: str = option("", "stored in the model card", flag=None)
    output: str | None = option(None, "where to write the final weights")
    half: bool = option(True, "store the final weights in fp16", flag=None)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any]) -> "TrainConfig":
        check_options(cls, d, "training")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        for name, choices in (("loss", LOSSES), ("skips", SKIPS), ("amp_dtype", AMP_DTYPES), ("lr_rule", LR_RULES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not self.sources:
            raise ValueError("no pretraining sources given")
        if self.name != os.path.basename(self.name) or self.name in ("", ".", ".."):
            raise ValueError(f"run name {self.name!r} must be a plain folder name")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["scale_range"] = list(self.scale_range)
        return d

    @property
    def base_lr(self) -> float:
        """``lr`` scaled to the batch size by ``lr_rule``, relative to the paper's batch 16."""
        ratio = self.batch_size / 16.0
        return self.lr * {"none": 1.0, "linear": ratio, "sqrt": ratio ** 0.5}[self.lr_rule]

    @property
    def last_epoch(self) -> int:
        return self.nepoch if self.stop_epoch is None else min(self.stop_epoch, self.nepoch)

    def run_dir(self) -> Path:
        return Path(self.storage_path).expanduser().resolve() / self.name
