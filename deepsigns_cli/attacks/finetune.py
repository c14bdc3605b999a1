"""Fine-tuning on the attacker's data: the last layer or all layers, optionally re-initialising
the last layer first (the literature's FTLL, FTAL, RTLL and RTAL)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..checkpoint import DEFAULT_LR
from ..errors import InputError
from ..training import fit
from .base import Attack, AttackContext

__all__ = ["FinetuneAttack", "ATTACK", "attacker_data", "last_linear", "victim_lr"]


def attacker_data(ctx: AttackContext, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The share `fraction` of the training data the attacker holds: a random subset drawn
    with ctx.rng, with one sample of every class present in the data first, as far as the
    subset's size allows. All of it, in its own order, for a fraction of 1."""
    x, y = ctx.data.x_train, ctx.data.y_train
    if fraction >= 1.0:
        return x, y
    n = min(len(y), max(1, round(fraction * len(y))))
    order = ctx.rng.permutation(len(y))
    # the first place of each class in the random order: one random sample per class
    _, first = np.unique(y[order], return_index=True)
    firsts = order[np.sort(first)]  # the classes in a random order, so a cut takes random ones
    rest = order[~np.isin(order, firsts)]  # the others, in the same random order
    pick = np.concatenate([firsts, rest])[:n]
    return x[pick], y[pick]


def last_linear(model: nn.Module, example: torch.Tensor | None = None) -> tuple[str, nn.Linear]:
    """The nn.Linear the forward pass on `example` applies last (the classifier head); without
    an example, or where the pass applies none, the last in module order. By the pass: a model
    of `--arch` that registers its head before its hidden layers had had a hidden layer
    re-initialised and trained as its "last layer"."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise InputError("the model has no linear layer to take as its last layer: use --layers all "
                         "without --reinit-last")
    if example is not None:
        applied: list[int] = []
        hooks = [m.register_forward_hook(lambda m, i, o, at=at: applied.append(at)) for at, (_, m) in enumerate(found)]
        training = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(example.to(next(model.parameters()).device))
        finally:
            model.train(training)
            for hook in hooks:
                hook.remove()
        if applied:
            return found[applied[-1]]
    return found[-1]


def victim_lr(ctx: AttackContext) -> float:
    """The default --lr: the rate the victim's training ended with, from its checkpoint."""
    return float(ctx.info.lr) if ctx.info is not None else DEFAULT_LR


def _reinit(layer: nn.Module, seed: int) -> None:
    """The layer's own reset_parameters(), drawn from `seed` (the global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer.reset_parameters()


class FinetuneAttack(Attack):
    name = "finetune"

    def run(self, model, ctx):
        epochs = int(ctx.option("epochs", 30))
        lr = float(ctx.option("lr", victim_lr(ctx)))
        optimizer = ctx.option("optimizer", "adam")
        layers = ctx.option("layers", "all")
        reinit_last = bool(ctx.option("reinit_last", False))
        fraction = float(ctx.option("data_fraction", 1.0))
        x, y = attacker_data(ctx, fraction)

        if layers == "last" or reinit_last:
            head_name, head = last_linear(model, torch.as_tensor(np.asarray(x[:1], dtype=np.float32)))
        if reinit_last:
            _reinit(head, int(ctx.rng.integers(2**31)))
        # --layers last: only the head trains; every other tensor, buffers included (BatchNorm's
        # running statistics move in training mode), is put back as it was
        frozen: dict[nn.Parameter, bool] = {}
        kept: dict[str, torch.Tensor] = {}
        if layers == "last":
            own = {id(p) for p in head.parameters()}
            frozen = {p: p.requires_grad for p in model.parameters() if id(p) not in own}
            kept = {name: b.detach().clone() for name, b in model.named_buffers()
                    if not name.startswith(f"{head_name}.")}
        try:
            for p in frozen:
                p.requires_grad_(False)
            fit(model, x, y, ctx.training(epochs=epochs, lr=lr, description=self.name, optimizer=optimizer),
                progress=ctx.progress)
        finally:
            for p, flag in frozen.items():
                p.requires_grad_(flag)
            buffers = dict(model.named_buffers())
            with torch.no_grad():
                for name, value in kept.items():
                    buffers[name].copy_(value)
        return model, {"epochs": epochs, "lr": lr, "optimizer": optimizer, "layers": layers,
                       "reinit_last": reinit_last, "data_fraction": fraction, "samples": int(len(y))}


ATTACK = FinetuneAttack
