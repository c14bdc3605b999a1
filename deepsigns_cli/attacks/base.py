"""The interface every attack implements: read a model, return the attacked one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from ..checkpoint import ModelInfo
    from ..data import Dataset
    from ..training import Progress, TrainConfig

__all__ = ["Attack", "AttackContext"]


@dataclass
class AttackContext:
    """What an attack may use besides the victim itself."""

    info: ModelInfo | None  # the victim checkpoint's facts (None for an ONNX victim)
    data: Dataset  # the attacker's data (--data)
    options: dict[str, Any]  # the options given (checked against the registry row), None left out
    rng: np.random.Generator  # seeded by --seed
    seed: int
    device: str
    progress: Progress | None
    out_kind: str  # "checkpoint" or "onnx": what --out will hold
    # another file the attack writes (the attacker's bundle): (path, option, mode) -> its
    # temporary path, committed with --out only when everything succeeded
    add_output: Callable[..., Path]
    passphrase: Callable[[], str] | None = None  # for attacks that seal a bundle
    # how an attack that trains (a registry row with trains=True) trains: --batch-size, --workers, --precision
    batch_size: int = 64
    workers: int = 0
    precision: str = "fp32"
    output: str | None = None  # the ONNX victim's output to attack (--output; None: as the reader chooses)

    def option(self, key: str, default):
        value = self.options.get(key)
        return default if value is None else value

    def training(self, **settings) -> TrainConfig:
        """The training of an attack that trains: `settings` (epochs, lr, ...) with --seed,
        --device, --batch-size, --workers and --precision."""
        from ..training import TrainConfig

        return TrainConfig(seed=self.seed, device=self.device, batch_size=self.batch_size, workers=self.workers,
                           precision=self.precision, **settings)


class Attack:
    """One removal attack. Its registry row (`registry.ATTACKS[name]`) lists its options, what
    it takes (a torch model, or an ONNX ModelProto) and the kinds of --out it can write."""

    name: str = ""

    def run(self, victim: nn.Module | Any, ctx: AttackContext) -> tuple[nn.Module | Any, dict]:
        """Attack `victim` (in place or not); return the attacked model (an nn.Module, or an
        onnx.ModelProto) and the parameters used (defaults filled in)."""
        raise NotImplementedError
