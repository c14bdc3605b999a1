"""Data sets: the built-in `digits` and user `.npz` files, as float32 arrays."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = ["Dataset", "load_data", "BUILTIN_DATASETS"]

BUILTIN_DATASETS = ("digits",)
_SPLIT_SEED = 20190413  # fixed: the train/test split never depends on --seed
_TEST_FRACTION = 0.25


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # float32, (n, *input_shape)
    y_train: np.ndarray  # int64, (n,)
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def value_range(self) -> tuple[float, float]:
        return float(self.x_train.min()), float(self.x_train.max())

    def check_fits(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        """Raise DataError unless samples of this set can be fed to a model of that shape."""
        if tuple(input_shape) != self.input_shape:
            raise DataError(
                f"data '{self.name}' has samples of shape {list(self.input_shape)} but the model "
                f"expects {list(input_shape)}: use data with the model's input shape"
            )
        top = int(max(self.y_train.max(), self.y_test.max()))
        if top >= num_classes:
            raise DataError(
                f"data '{self.name}' has labels up to {top} but the model has "
                f"{num_classes} classes: use data with labels below {num_classes}"
            )


def _split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(x))
    n_test = int(round(len(x) * _TEST_FRACTION))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _digits() -> Dataset:
    with resources.files("deepsigns_cli.datasets").joinpath("digits.npz").open("rb") as fh:
        arrays = np.load(fh)
        x = (arrays["x"].astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
        y = arrays["y"].astype(np.int64)
    return Dataset("digits", *_split(x, y), num_classes=10)


def _npz(path: Path) -> Dataset:
    if not path.exists():
        raise DataError(f"data file not found: {path}: give 'digits' or an existing .npz file")
    try:
        arrays = np.load(path, allow_pickle=False)
        keys = set(arrays.files)
        if {"x_train", "y_train", "x_test", "y_test"} <= keys:
            parts = [arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")]
        elif {"x", "y"} <= keys:
            parts = list(_split(arrays["x"], arrays["y"]))
        else:
            raise DataError(
                f"{path} holds {sorted(keys)}: an .npz needs x_train, y_train, x_test, y_test "
                "(or x, y to split)"
            )
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as .npz ({exc}): give a numpy .npz file") from None
    xtr, ytr, xte, yte = parts
    for name, y in (("y_train", ytr), ("y_test", yte)):
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
            raise DataError(f"{path}: {name} must be a 1-D array of class indices >= 0")
    if len(xtr) != len(ytr) or len(xte) != len(yte) or len(xtr) == 0 or len(xte) == 0:
        raise DataError(f"{path}: x and y differ in length or a split is empty")
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(f"{path}: x_train and x_test have different sample shapes")
    num_classes = int(max(ytr.max(), yte.max())) + 1
    return Dataset(
        path.stem,
        xtr.astype(np.float32),
        ytr.astype(np.int64),
        xte.astype(np.float32),
        yte.astype(np.int64),
        num_classes,
    )


def load_data(spec: str) -> Dataset:
    """`digits` or a path to an .npz file."""
    if spec in BUILTIN_DATASETS:
        return _digits()
    return _npz(Path(spec))
