"""The interface every watermark scheme implements, and the registry."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    from torch import nn

    from ..data import Dataset

__all__ = ["Scheme", "register_scheme", "get_scheme", "list_schemes", "Keys"]

Keys = tuple[dict, dict[str, np.ndarray]]  # (params, arrays): JSON-able secrets, array secrets
_REGISTRY: dict[str, type[Scheme]] = {}


class Scheme:
    """One watermark method. Keys live in the bundle as (params, arrays)."""

    name: str = ""

    def keygen(
        self, model: nn.Module, info, data: Dataset, options: dict[str, Any], rng: np.random.Generator
    ) -> Keys:
        raise NotImplementedError

    def objective(self, model: nn.Module, data: Dataset, keys: Keys):
        """The training.Objective that keeps this watermark in place while training."""
        raise NotImplementedError

    def embed(self, model: nn.Module, info, data: Dataset, keys: Keys, cfg, progress,
              also: tuple = ()) -> Keys:
        """Train `model` in place (with `also`: objectives of watermarks already embedded,
        which must survive); return the final keys, with "embed_history" in the params."""
        from ..training import fit

        objectives = [self.objective(model, data, keys), *also]
        history = fit(model, data.x_train, data.y_train, cfg, objectives, progress)
        params, arrays = keys
        return {**params, "embed_history": history}, arrays

    def extract(self, model: nn.Module, keys: Keys, alpha: float) -> dict:
        """White-box read-out from a torch model."""
        raise NotImplementedError

    def extract_onnx(self, model, keys: Keys, alpha: float) -> dict:
        """White-box read-out from an ONNX model (deepsigns_cli.runtime.OnnxModel)."""
        raise NotImplementedError

    def verify(self, model, keys: Keys, alpha: float) -> dict:
        """Black-box decision from an OnnxModel's outputs alone."""
        raise NotImplementedError


def register_scheme(name: str):
    def wrap(cls):
        from . import BLACKBOX  # the one place that says which schemes `verify` can use

        if name not in BLACKBOX:
            raise RuntimeError(f"scheme '{name}' must be listed in deepsigns_cli.schemes.BLACKBOX")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def get_scheme(name: str) -> Scheme:
    if name not in _REGISTRY:
        try:
            importlib.import_module(f"deepsigns_cli.schemes.{name}")
        except ModuleNotFoundError:
            pass
    if name not in _REGISTRY:
        raise InputError(f"unknown scheme '{name}': use one of {', '.join(list_schemes())}")
    return _REGISTRY[name]()


def list_schemes() -> list[str]:
    from . import SCHEME_NAMES

    return list(SCHEME_NAMES)
