"""The interface every attack implements: read a model, return the attacked one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from ..checkpoint import ModelInfo
    from ..data import Dataset
    from ..training import Progress

__all__ = ["Attack"]


class Attack:
    """One removal attack. Its registry row (`registry.ATTACKS[name]`) lists its options."""

    name: str = ""

    def run(self, model: nn.Module, info: ModelInfo, data: Dataset, options: dict[str, Any], *,
            rng: np.random.Generator, device: str, progress: Progress | None) -> tuple[nn.Module, dict]:
        """Attack `model` (in place or not); return the attacked model and the parameters used."""
        raise NotImplementedError
