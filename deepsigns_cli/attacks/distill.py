"""Distillation: a fresh student trained on the victim's soft outputs over the attacker's data.

The student may be of another architecture than the victim: it carries its own ModelInfo as
`model.deepsigns_info`, which the caller saves with it in place of the victim's."""

from __future__ import annotations

import torch

from ..checkpoint import ModelInfo
from ..errors import InputError, one_line
from ..training import fit, predict, resolve_device
from ..zoo import build_model
from .base import Attack
from .finetune import attacker_data

__all__ = ["DistillAttack", "ATTACK"]


def _check_student(student, arch: str, sample, num_classes: int) -> None:
    """The student answers one sample with one score per class, or InputError."""
    try:
        with torch.no_grad():
            shape = tuple(student.eval()(torch.as_tensor(sample, dtype=torch.float32)).shape)
    except RuntimeError as exc:
        raise InputError(f"student '{arch}' cannot run on the data's samples ({one_line(exc)}): choose "
                         "another --student") from None
    if shape != (len(sample), num_classes):
        raise InputError(f"student '{arch}' answers with shape {list(shape)}, not one score per class "
                         f"({num_classes}): choose another --student")


class DistillAttack(Attack):
    name = "distill"

    def run(self, victim, ctx):
        epochs = int(ctx.option("epochs", 30))
        lr = float(ctx.option("lr", 1e-3))
        info = ctx.info
        student_arch = ctx.option("student", info.arch)
        # the victim's arguments only for the victim's own architecture
        student_kwargs = dict(info.arch_kwargs) if student_arch == info.arch else {}
        temperature = float(ctx.option("temperature", 1.0))
        fraction = float(ctx.option("data_fraction", 1.0))
        x, _ = attacker_data(ctx, fraction)

        # 1. a fresh student, its initial weights drawn from the seed (a bad --student fails first)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(ctx.rng.integers(2**31)))
            student = build_model(student_arch, student_kwargs, info.input_shape, info.num_classes)
        _check_student(student, student_arch, x[:1], info.num_classes)

        # 2. the victim's answers: probabilities at the temperature, on the attack's device
        home = next(iter(victim.parameters()), torch.empty(0)).device
        victim.to(resolve_device(ctx.device))
        try:
            logits = torch.from_numpy(predict(victim, x))
        finally:
            victim.to(home)
        targets = torch.softmax(logits / temperature, dim=1).numpy()

        # 3. the student trained on them
        fit(student, x, targets, ctx.training(epochs=epochs, lr=lr, description=self.name, loss="soft"),
            progress=ctx.progress)
        student.deepsigns_info = ModelInfo(student_arch, student_kwargs, info.input_shape,
                                           info.num_classes, lr, dict(info.extra))
        return student, {"epochs": epochs, "lr": lr, "student": student_arch,
                         "student_kwargs": student_kwargs, "temperature": temperature,
                         "data_fraction": fraction, "samples": int(len(x))}


ATTACK = DistillAttack
