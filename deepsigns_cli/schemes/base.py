"""The interface every watermark scheme implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..registry import load_scheme, scheme_entry
from ..results import SchemeKeys, SchemeResult

if TYPE_CHECKING:
    from torch import nn

    from ..checkpoint import ModelInfo
    from ..data import Dataset
    from ..objective import Objective
    from ..suspect import Suspect
    from ..training import Progress, TrainConfig

__all__ = ["Scheme", "get_scheme"]


class Scheme:
    """One watermark method. Its registry row (`registry.SCHEMES[name]`) says the rest."""

    name: str = ""

    @property
    def entry(self):
        return scheme_entry(self.name)

    def keygen(self, model: nn.Module, info: ModelInfo, data: Dataset, options: dict[str, Any],
               rng: np.random.Generator) -> SchemeKeys:
        raise NotImplementedError

    def objective(self, model: nn.Module, info: ModelInfo, data: Dataset, keys: SchemeKeys) -> Objective:
        """The training objective that puts (and keeps) this watermark in the model."""
        raise NotImplementedError

    def embed(self, model: nn.Module, info: ModelInfo, data: Dataset, keys: SchemeKeys,
              cfg: TrainConfig, progress: Progress | None,
              also: tuple[Objective, ...] = ()) -> tuple[SchemeKeys, dict]:
        """Train `model` in place (with `also`: objectives of watermarks already embedded,
        which must survive); return the final keys and the training history."""
        from ..training import fit

        objectives = [self.objective(model, info, data, keys), *also]
        history = fit(model, data.x_train, data.y_train, cfg, objectives, progress)
        return keys, history

    def warnings(self, keys: SchemeKeys) -> list[str]:
        """What keygen should tell the owner about these keys (none by default)."""
        return []

    def read(self, suspect: Suspect, keys: SchemeKeys) -> SchemeResult:
        """The evidence in a suspect (torch or ONNX); alpha is applied by results.decide."""
        raise NotImplementedError


def get_scheme(name: str) -> Scheme:
    return load_scheme(name)
