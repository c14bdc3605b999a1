"""Magnitude pruning: the smallest weights of every linear and convolution layer set to zero
(ranked over all of them, or within each), then optionally fine-tuning with the zeros kept."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InputError
from ..objective import Objective
from ..training import fit
from .base import Attack
from .finetune import attacker_data, victim_lr

__all__ = ["PruneAttack", "ATTACK", "prunable"]


def prunable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors pruning ranks: the weight of every linear and convolution layer (nn.Linear,
    and nn.Conv1d, 2d, 3d and their transposes; no biases, no BatchNorm), by module name. (Conv2d
    alone had left a Conv1d's weights whole, and the sparsity reported was not reached.)"""
    return {name: m.weight for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(m.weight, torch.Tensor)}


def _count(rate: float, n: int) -> int:
    """How many of n weights a rate zeroes: at least rate * n (rounding off float noise)."""
    return min(n, math.ceil(round(rate * n, 6)))


def _smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """A keep-mask of `values`' shape, False at the k entries of smallest magnitude."""
    keep = torch.ones(values.numel(), dtype=torch.bool, device=values.device)
    if k:
        keep[torch.topk(values.detach().abs().flatten(), k, largest=False).indices] = False
    return keep.view_as(values)


def masks(weights: dict[str, torch.Tensor], rate: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks zeroing the share `rate` of the weights: the smallest over all tensors
    together (scope "global") or within each tensor ("layer")."""
    if scope == "layer":
        return {name: _smallest(w, _count(rate, w.numel())) for name, w in weights.items()}
    flat = torch.cat([w.detach().flatten() for w in weights.values()])
    keep = _smallest(flat, _count(rate, flat.numel())).split([w.numel() for w in weights.values()])
    return {name: k.view_as(w) for (name, w), k in zip(weights.items(), keep, strict=True)}


class KeepPruned(Objective):
    """Sparse fine-tuning: the pruned weights are set to zero again after every step."""

    def __init__(self, keep: dict[str, torch.Tensor]):
        self.keep = keep
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def setup(self, model):
        modules = dict(model.named_modules())
        self.pairs = [(modules[name].weight, k.to(modules[name].weight.device)) for name, k in self.keep.items()]

    def teardown(self):
        self.pairs = []

    def after_step(self, model, step):
        with torch.no_grad():
            for weight, keep in self.pairs:
                weight.mul_(keep)


class PruneAttack(Attack):
    name = "prune"

    def run(self, model, ctx):
        rate = float(ctx.option("rate", 0.5))
        scope = ctx.option("scope", "global")
        epochs = int(ctx.option("finetune_epochs", 0))
        lr = float(ctx.option("lr", victim_lr(ctx)))
        optimizer = ctx.option("optimizer", "adam")
        fraction = float(ctx.option("data_fraction", 1.0))
        idle = [f"--{k.replace('_', '-')}" for k in ("lr", "optimizer", "data_fraction")
                if ctx.options.get(k) is not None]
        if idle and not epochs:  # (they had been reported, and recorded, as what the attack used)
            raise InputError(f"{', '.join(idle)} set{'s' if len(idle) == 1 else ''} how prune fine-tunes, and "
                             "it fine-tunes only with --finetune-epochs: give it, or leave them out")

        weights = prunable(model)
        if not weights:
            raise InputError("the model has no linear or convolution layer to prune: use another attack "
                             "(noise, quantize)")
        keep = masks(weights, rate, scope)
        with torch.no_grad():
            for name, w in weights.items():
                w.mul_(keep[name])
        if epochs:
            x, y = attacker_data(ctx, fraction)
            fit(model, x, y, ctx.training(epochs=epochs, lr=lr, description=self.name, optimizer=optimizer),
                objectives=[KeepPruned(keep)], progress=ctx.progress)
        weights = prunable(model)
        total = sum(w.numel() for w in weights.values())
        zeros = sum(int((w == 0).sum()) for w in weights.values())
        return model, {"rate": rate, "scope": scope, "finetune_epochs": epochs, "lr": lr,
                       "optimizer": optimizer, "data_fraction": fraction,
                       "sparsity": zeros / total if total else 0.0}


ATTACK = PruneAttack
