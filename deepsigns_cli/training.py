"""The one training loop. Schemes add to it through Objectives; callers watch it through a callback."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import InputError
from .objective import Objective

__all__ = [
    "TrainConfig",
    "Objective",
    "fit",
    "evaluate",
    "predict",
    "resolve_device",
    "seed_everything",
    "Progress",
]

# progress(done, total, description): called after every optimisation step
Progress = Callable[[int, int, str], None]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked, but torch sees no GPU here: use --device auto or cpu")
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device '{device}': use auto, cpu or cuda")
    return torch.device(device)


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    description: str = "train"


def fit(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    cfg: TrainConfig,
    objectives: Sequence[Objective] = (),
    progress: Progress | None = None,
) -> dict:
    """Train in place with Adam; returns seconds per epoch and the epochs run."""
    device = resolve_device(cfg.device)
    rng = seed_everything(cfg.seed)
    model.to(device).train()
    for obj in objectives:
        obj.setup(model, device)
    params = list(model.parameters()) + [p for o in objectives for p in o.parameters()]
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    steps_per_epoch = max(1, int(np.ceil(len(x) / cfg.batch_size)))
    total, done, epoch_seconds = cfg.epochs * steps_per_epoch, 0, []
    try:
        for epoch in range(cfg.epochs):
            model.train()
            start = time.perf_counter()
            order = torch.as_tensor(rng.permutation(len(x)))
            for i in range(0, len(x), cfg.batch_size):
                # 1. the batch, with every objective's own samples mixed in after it
                idx = order[i : i + cfg.batch_size]
                parts, own, at = [(xt[idx], yt[idx])], [], len(idx)
                for obj in objectives:
                    extra = obj.extra_batch(rng)
                    n = 0 if extra is None else len(extra[0])
                    if n:
                        parts.append(extra)
                    own.append(slice(at, at + n))
                    at += n
                xb = torch.cat([p[0] for p in parts]).to(device, non_blocking=True)
                yb = torch.cat([p[1] for p in parts]).to(device, non_blocking=True)
                # 2. one forward pass: cross-entropy on the training batch, plus each term
                logits = model(xb)
                loss = nn.functional.cross_entropy(logits[: len(idx)], yb[: len(idx)])
                for obj, rows in zip(objectives, own, strict=True):
                    extra = obj.loss(logits, yb, rows)
                    if extra is not None:
                        loss = loss + extra
                # 3. step (centres and other extra tensors have their gradients zeroed too)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                done += 1
                if progress is not None:
                    progress(done, total, f"{cfg.description} epoch {epoch + 1}/{cfg.epochs}")
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_seconds.append(time.perf_counter() - start)
            model.eval()
            if any(obj.end_epoch(model, epoch) for obj in objectives):
                break
    finally:
        for obj in objectives:
            obj.teardown()
        model.eval()
    return {"epoch_seconds": epoch_seconds, "epochs": len(epoch_seconds), "lr": cfg.lr}


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Logits for x, in eval mode, on the model's device; returns numpy."""
    model.eval()
    device = next(model.parameters()).device
    outs = []
    for i in range(0, len(x), batch_size):
        xb = torch.as_tensor(x[i : i + batch_size], dtype=torch.float32, device=device)
        outs.append(model(xb).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy, in percent."""
    return float((predict(model, x).argmax(1) == y).mean() * 100.0)
