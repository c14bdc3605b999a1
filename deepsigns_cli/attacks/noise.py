"""Gaussian noise on every weight tensor, its spread relative to the tensor's own."""

from __future__ import annotations

import torch

from .base import Attack

__all__ = ["NoiseAttack", "ATTACK"]


class NoiseAttack(Attack):
    name = "noise"

    def run(self, model, ctx):
        sigma = float(ctx.option("sigma", 0.1))
        gen = torch.Generator().manual_seed(int(ctx.rng.integers(2**31)))
        with torch.no_grad():
            for p in model.parameters():
                spread = p.std() if p.numel() > 1 else p.abs()
                p.add_(torch.randn(p.shape, generator=gen) * sigma * spread)
        return model, {"sigma": sigma}


ATTACK = NoiseAttack
