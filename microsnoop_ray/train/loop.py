"""The pretraining loop: one plain process (CPU or one GPU) or a Ray Train ``TorchTrainer``.

Both paths run the same :func:`train_worker`: build the pool, resume from the last
checkpoint of the run (``storage_path/name/checkpoints``), train epoch after epoch
with the schedule of :func:`~microsnoop_ray.train.masking.learning_rate`, checkpoint
every epoch, and finally write the weights with a model card.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ..model.load import ModelCard, load_model, save_model
from ..model.unet import MicrosnoopUNet
from .config import TrainConfig
from .data import Pool, batch_stream, build_pool
from .masking import learning_rate, mask_patches

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "microsnoop-ray/train-1"


def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                        mode: str = "all") -> torch.Tensor:
    """MSE over all pixels (``all``, the paper) or over the masked pixels only (``masked``)."""
    if mode == "all":
        return F.mse_loss(pred.float(), target.float())
    sq = (pred.float() - target.float()) ** 2
    m = mask.to(sq.dtype)
    return (sq * m).sum() / m.sum().clamp_min(1.0)


def train_step(model, optimizer, targets: torch.Tensor, cfg: TrainConfig, scaler=None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """One optimisation step on a batch of targets (n, 1, s, s); returns the loss (a detached scalar tensor,
    left on the device so that a GPU is not synchronised after every step)."""
    masked, mask = mask_patches(targets, cfg.patch_size, cfg.mask_ratio, generator)
    optimizer.zero_grad(set_to_none=True)
    use_amp = cfg.amp and targets.device.type == "cuda"
    dtype = torch.bfloat16 if cfg.amp_dtype == "bfloat16" else torch.float16
    with torch.autocast(device_type=targets.device.type, dtype=dtype, enabled=use_amp):
        pred = model(masked, skips=cfg.skips) if cfg.skips != "keep" else model(masked)
    loss = reconstruction_loss(pred, targets, mask, cfg.loss)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()


def _checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    found = [p for p in folder.glob("epoch-*.pt") if re.fullmatch(r"epoch-\d{4,}\.pt", p.name)]
    return sorted(found, key=lambda p: int(p.stem.split("-")[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete per-epoch checkpoint of a run, or None."""
    found = _checkpoints(Path(run_dir))
    return found[-1] if found else None


def _atomic_save(obj, path: Path) -> None:
    from ..io.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def train_worker(cfg: TrainConfig, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                 wrap: Callable | None = None, report: Callable[[dict, Path | None], None] | None = None,
                 resume_from: Path | None = None, pool: Pool | None = None) -> dict:
    """The training loop of one worker (rank 0 writes checkpoints and the weights).

    Parameters
    ----------
    wrap : callable, optional
        ``model -> model`` for data parallelism (Ray Train's ``prepare_model``).
    report : callable, optional
        ``report(metrics, checkpoint_path_or_None)`` after every epoch.
    resume_from : Path, optional
        A checkpoint file; by default the run's latest checkpoint, if any.
    pool : Pool, optional
        An already built pool of ``cfg.sources`` (a study of several recipes builds it once).

    Returns
    -------
    dict
        The run's history and, on rank 0, the written weights' model card.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = device or torch.device("cpu")
    torch.manual_seed(cfg.seed + rank)
    run_dir = cfg.run_dir()
    pool = pool if pool is not None else build_pool(cfg.sources)
    model, fmt = _start_model(cfg, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # bf16 has float32's range: no gradient scaler
    scaler = torch.amp.GradScaler("cuda") if (cfg.amp and device.type == "cuda" and cfg.amp_dtype == "float16") \
        else None
    run = _resume(resume_from or latest_checkpoint(run_dir), model, optimizer, scaler, cfg.name)
    if wrap is not None:
        model = wrap(model)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    stream = batch_stream(pool, cfg.batch_size, cfg.input_size, seed=cfg.seed * 1000003 + rank * 7919 + run["epoch"],
                          scale_range=cfg.scale_range, workers=cfg.loader_workers, pin_memory=device.type == "cuda")
    gen = torch.Generator().manual_seed(cfg.seed * 31 + rank + 1000 * run["epoch"])
    steps = max(1, max(cfg.batch_size, cfg.epoch_size // world_size) // cfg.batch_size)
    for epoch in range(run["epoch"], cfg.last_epoch):
        lr = learning_rate(epoch, cfg.base_lr, cfg.warmup, cfg.nepoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        losses = [train_step(model, optimizer, batch.to(device, non_blocking=True).contiguous(memory_format=fmt),
                             cfg, scaler, gen) for batch, _kind in itertools.islice(stream, steps)]
        metrics = _epoch_done(run, epoch, lr, losses, time.perf_counter() - t0, cfg.batch_size, world_size)
        ckpt = _checkpoint(run_dir, epoch, _unwrap(model), optimizer, scaler, run, cfg) if rank == 0 else None
        if report is not None:
            report(metrics, ckpt)
    result = {"history": run["history"], "images_seen": run["images_seen"], "seconds": run["seconds"]}
    if rank == 0:
        runner = "Ray Train TorchTrainer (jobs/pretrain.py or train --ray)" if wrap is not None else \
            "microsnoop-ray train (one process)"
        result["model_card"] = write_weights(_unwrap(model), cfg, pool.summary(), run["history"], run["images_seen"],
                                             run["seconds"], device, runner).to_dict()
    return result


def _epoch_done(run: dict, epoch: int, lr: float, losses: list, seconds: float, batch_size: int,
                world_size: int) -> dict:
    """The epoch's metrics, added to the run's history and counts (and logged)."""
    run["images_seen"] += len(losses) * batch_size * world_size
    run["seconds"] += seconds
    metrics = {"epoch": epoch, "lr": lr, "loss": float(torch.stack(losses).mean()), "images_seen": run["images_seen"],
               "seconds": round(run["seconds"], 1), "images_per_s": round(len(losses) * batch_size / seconds, 2)}
    run["history"].append(metrics)
    log.info("epoch %d lr %.2e loss %.5f (%.1f img/s)", epoch, lr, metrics["loss"], metrics["images_per_s"])
    return metrics


def _start_model(cfg: TrainConfig, device: torch.device) -> tuple[MicrosnoopUNet, torch.memory_format]:
    """The network to train (from ``cfg.init`` or fresh), on ``device`` in training mode, and its memory format."""
    if cfg.init:
        model = load_model(cfg.init)
        if not getattr(model, "has_decoder", True):
            log.warning("--init %s has no complete decoder: the missing layers start from their initial values",
                        cfg.init)
    else:
        model = MicrosnoopUNet()
    model.to(device).train()
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    return model, fmt


def _resume(checkpoint: Path | None, model, optimizer, scaler, name: str) -> dict:
    """The run's state (next epoch, history, images seen, seconds), from ``checkpoint`` when there is one
    (model, optimizer and scaler are loaded from it)."""
    if checkpoint is None:
        return {"epoch": 0, "history": [], "images_seen": 0, "seconds": 0.0}
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{checkpoint}: not a microsnoop-ray training checkpoint")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    log.info("resuming %s from epoch %d (%s)", name, int(state["epoch"]) + 1, checkpoint)
    return {"epoch": int(state["epoch"]) + 1, "history": json.loads(state["history"]),
            "images_seen": int(state["images_seen"]), "seconds": float(state["seconds"])}


def _checkpoint(run_dir: Path, epoch: int, model, optimizer, scaler, run: dict, cfg: TrainConfig) -> Path:
    """Write the epoch's checkpoint (atomically) and keep only the last two."""
    ckpt = run_dir / "checkpoints" / f"epoch-{epoch:04d}.pt"
    _atomic_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "scaler": scaler.state_dict() if scaler else {}, "epoch": epoch,
                  "history": json.dumps(run["history"]), "images_seen": run["images_seen"],
                  "seconds": run["seconds"], "config": json.dumps(cfg.to_dict())}, ckpt)
    for old in _checkpoints(run_dir)[:-2]:
        old.unlink(missing_ok=True)
    return ckpt


def write_weights(model: MicrosnoopUNet, cfg: TrainConfig, pool_summary: dict, history: list, images_seen: int,
                  seconds: float, device: torch.device, runner: str = "microsnoop-ray train") -> ModelCard:
    """Write the trained weights (fp16 by default) with a model card describing the run."""
    out = Path(cfg.output) if cfg.output else cfg.run_dir() / "microsnoop_pretrained.pt"
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    losses = [h["loss"] for h in history]
    card = ModelCard(
        model_id=f"microsnoop-ray-{cfg.name}-{{hash}}",
        weights_sha256="",
        training_data=", ".join(f"{k} ({v['planes']} planes)" for k, v in pool_summary.items()),
        epochs=float(len(history)), images_seen=int(images_seen), mask_ratio=cfg.mask_ratio,
        input_size=cfg.input_size, source=f"microsnoop-ray pretraining: {runner}",
        notes=(f"{len(history)} epochs of {cfg.epoch_size} images (schedule of {cfg.nepoch}, warm-up {cfg.warmup}); "
               f"{seconds / 3600:.2f} h on {hardware} x {cfg.num_workers} worker(s)"
               + (f". {cfg.notes}" if cfg.notes else "")),
        extra={"config": cfg.to_dict(), "hardware": hardware, "train_seconds": round(seconds, 1),
               "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
               "loss_curve": [round(x, 5) for x in losses], "pool": pool_summary},
    )
    model.eval()
    return save_model(model, out, card, half=cfg.half)


def train_local(cfg: TrainConfig, pool: Pool | None = None) -> dict:
    """The plain single-process path (CPU, or one GPU when ``use_gpu``) without Ray."""
    device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    if cfg.use_gpu and device.type != "cuda":
        raise RuntimeError("use_gpu was asked for but torch sees no CUDA device")
    return train_worker(cfg, device=device, pool=pool)


def _ray_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_mapping(config)
    ctx = ray.train.get_context()
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            found = sorted(Path(d).glob("epoch-*.pt"))
            if found:
                local = Path(tempfile.mkdtemp()) / found[-1].name
                local.write_bytes(found[-1].read_bytes())
                resume = local

    def report(metrics: dict, path: Path | None) -> None:
        if path is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            os.link(path, Path(tmp) / path.name) if os.stat(path).st_dev == os.stat(tmp).st_dev else \
                Path(tmp, path.name).write_bytes(path.read_bytes())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    train_worker(cfg, rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                 device=ray.train.torch.get_device(), wrap=ray.train.torch.prepare_model, report=report,
                 resume_from=resume)


def train_with_ray(cfg: TrainConfig) -> dict:
    """Run :func:`train_worker` on ``cfg.num_workers`` Ray Train workers (data-parallel DDP).

    Restarting with the same ``name`` and ``storage_path`` resumes from the run's last
    checkpoint (the per-epoch files every run writes, so it also works across Ray versions
    and after the whole cluster went down).
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_dir = cfg.run_dir()
    trainer = TorchTrainer(
        _ray_loop, train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.threads or 1}),
        run_config=RunConfig(name=cfg.name + "-ray", storage_path=str(run_dir.parent)),
    )
    result = trainer.fit()
    weights = Path(cfg.output) if cfg.output else run_dir / "microsnoop_pretrained.pt"
    card = torch.load(weights, map_location="cpu", weights_only=True)["model_card"] if weights.exists() else None
    hist_ckpt = latest_checkpoint(run_dir)
    history = json.loads(torch.load(hist_ckpt, map_location="cpu", weights_only=True)["history"]) if hist_ckpt else []
    return {"metrics": result.metrics, "model_card": card, "history": history}
