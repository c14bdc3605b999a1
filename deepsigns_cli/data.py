"""Data sets: the built-in `digits` and user `.npz` files, as float32 arrays."""

from __future__ import annotations

import math
import tokenize
import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import DataError, one_line, shown

__all__ = ["Dataset", "load_data", "BUILTIN_DATASETS"]

BUILTIN_DATASETS = ("digits",)
_SPLIT_SEED = 20190413  # fixed: the train/test split never depends on --seed
_TEST_FRACTION = 0.25
# what a sample and a label may be, for data sets and model files alike (zoo.py checks models
# against the same limits): a file is data, and must never make us allocate gigabytes
MAX_INPUT_SIZE = 2**24  # features per sample (product of the sample shape)
MAX_INPUT_DIMS = 4  # dimensions per sample
MAX_CLASSES = 100_000


@dataclass(frozen=True)
class Dataset:
    """A classification data set, checked when loaded (see `load_data`).

    `num_classes` is one more than the largest label in either split: labels are class
    indices 0..num_classes-1, and at least two distinct classes occur. A class below the
    largest label may have no sample at all (labels 0, 1 and 5 give num_classes = 6, and
    classes 2-4 are empty): code that picks classes or computes per-class statistics must
    allow for classes without samples, and `check_fits` only promises that every label is a
    class of the model, not that every class of the model has data."""

    name: str
    x_train: np.ndarray  # float32, (n, *input_shape), finite
    y_train: np.ndarray  # int64, (n,), in [0, num_classes)
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


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip with members, an empty zip
_SPLITS = ("x_train", "y_train", "x_test", "y_test")
_FIX = "save with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...) (or x=..., y=...)"


def _npz(path: Path) -> Dataset:
    where = shown(path)
    try:
        exists, is_file = path.exists(), path.is_file()
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte
        raise DataError(f"data path {where} is not usable ({one_line(exc)}): give 'digits' or an "
                        ".npz file") from None
    if not exists:
        raise DataError(f"data file not found: {where}: give 'digits' or an existing .npz file")
    if not is_file:
        raise DataError(f"data {where} is not a file: give 'digits' or an .npz file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise DataError(f"cannot read {where} ({one_line(exc)}): check the file's permissions") from None
    if head.startswith(_NPY_MAGIC):
        raise DataError(f"{where} is a single .npy array, not an .npz archive: {_FIX}")
    if not head.startswith(_ZIP_MAGICS):
        raise DataError(f"cannot read {where} as .npz (it is not a zip archive of arrays): {_FIX}")
    try:
        # our own file object: numpy leaves its own open when the archive is refused
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as arrays:
            keys = set(arrays.files)
            if set(_SPLITS) <= keys:
                names = _SPLITS
            elif {"x", "y"} <= keys:
                names = ("x", "y")
            else:
                shown_keys = one_line(", ".join(sorted(keys)) or "no arrays", 120)
                raise DataError(
                    f"{where} holds {shown_keys}: an .npz needs x_train, y_train, x_test, y_test "
                    "(or x, y to split)"
                )
            loaded = {name: _member(arrays, name, where) for name in names}
    # zlib.error: a damaged compressed record; NotImplementedError: a compression zipfile lacks
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError) as exc:
        raise DataError(f"cannot read {where} as .npz ({one_line(exc, 160)}): {_FIX}") from None
    if names == ("x", "y"):
        x, y = _features(loaded["x"], "x", where), _labels(loaded["y"], "y", where)
        _same_length(x, y, "x", "y", where)
        xtr, ytr, xte, yte = _split(x, y)
        if len(xtr) == 0 or len(xte) == 0:
            raise DataError(
                f"{where}: x and y hold {len(x)} samples, too few to split into train and test: give "
                "more samples, or x_train, y_train, x_test, y_test"
            )
    else:
        xtr, xte = (_features(loaded[k], k, where) for k in ("x_train", "x_test"))
        ytr, yte = (_labels(loaded[k], k, where) for k in ("y_train", "y_test"))
        _same_length(xtr, ytr, "x_train", "y_train", where)
        _same_length(xte, yte, "x_test", "y_test", where)
        if xtr.shape[1:] != xte.shape[1:]:
            raise DataError(
                f"{where}: x_train has samples of shape {list(xtr.shape[1:])} and x_test of shape "
                f"{list(xte.shape[1:])}: give both splits samples of one shape"
            )
    present = np.union1d(np.unique(ytr), np.unique(yte))
    if len(present) < 2:
        raise DataError(
            f"{where}: the labels hold {len(present)} class, a classifier needs at least 2: give "
            "samples of two or more classes"
        )
    num_classes = int(present[-1]) + 1
    return Dataset(shown(path.stem), xtr, ytr, xte, yte, num_classes)


def _member(arrays, name: str, where: str) -> np.ndarray:
    """One array of an .npz, its header checked before its data is read: a header that claims
    terabytes, or a dtype we cannot use, costs nothing."""
    member = f"{name}.npy" if f"{name}.npy" in arrays.zip.namelist() else name
    with arrays.zip.open(member) as fh:
        try:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(fh)
            offset = fh.tell()
        # TokenError, SyntaxError: numpy parses the header as a Python literal
        except (ValueError, SyntaxError, tokenize.TokenError, RecursionError, EOFError) as exc:
            raise DataError(
                f"{where}: array {name} is not a numpy array ({one_line(exc, 120)}): {_FIX}"
            ) from None
    if name.startswith("x"):
        problem = _sample_problem(shape, name)
        if problem:
            raise DataError(f"{where}: {problem}")
    if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None:
        raise DataError(
            f"{where}: array {name} has {'object' if dtype.hasobject else 'structured'} dtype {dtype}: "
            "give a plain numeric array"
        )
    size = math.prod(shape) * dtype.itemsize
    if size > arrays.zip.getinfo(member).file_size - offset:
        raise DataError(
            f"{where}: array {name} claims shape {list(shape)} but the file holds less data (truncated "
            f"or damaged): {_FIX}"
        )
    try:
        return arrays[name]
    except MemoryError:
        raise DataError(
            f"{where}: array {name} of shape {list(shape)} does not fit in memory: give a smaller data set"
        ) from None


def _features(x: np.ndarray, name: str, where: str) -> np.ndarray:
    """Samples as float32, (n, *sample_shape), finite."""
    if x.dtype.kind not in "iuf":
        raise DataError(
            f"{where}: {name} holds {x.dtype} values: samples must be real numbers (integers or "
            f"floats); convert with {name}.astype(np.float32)"
        )
    problem = _sample_problem(x.shape, name)
    if problem:
        raise DataError(f"{where}: {problem}")
    if len(x) == 0:
        raise DataError(f"{where}: {name} is empty: give at least one sample in each split")
    with np.errstate(all="ignore"):  # values beyond float32 become inf, refused below
        x = x.astype(np.float32, copy=False)
    finite = np.isfinite(x)
    if not finite.all():
        bad = int(np.argwhere(~finite)[0][0])
        raise DataError(
            f"{where}: {name} holds NaN or infinite values (or values too large for float32), first "
            f"in sample {bad}: clean or drop those samples"
        )
    return x


def _sample_problem(shape: tuple[int, ...], name: str) -> str | None:
    """What is wrong with the shape of a samples array, or None."""
    if not 2 <= len(shape) <= 1 + MAX_INPUT_DIMS:
        return (f"{name} has shape {list(shape)}: it must be samples x features, with 1 to "
                f"{MAX_INPUT_DIMS} dimensions per sample (e.g. (n, 64) or (n, 1, 8, 8))")
    sample = shape[1:]
    if min(sample) < 1 or math.prod(sample) > MAX_INPUT_SIZE:
        return f"{name} has samples of shape {list(sample)}: each sample needs 1 to {MAX_INPUT_SIZE} features"
    return None


def _labels(y: np.ndarray, name: str, where: str) -> np.ndarray:
    """Class indices as int64, (n,), in [0, MAX_CLASSES)."""
    if y.dtype.kind not in "iu":
        hint = f"convert with {name}.astype(np.int64)" if y.dtype.kind == "f" else "give class indices 0, 1, 2..."
        raise DataError(f"{where}: {name} holds {y.dtype} values: labels must be integer class indices; {hint}")
    if y.ndim != 1:
        raise DataError(
            f"{where}: {name} has shape {list(y.shape)}: labels must be a 1-D array of class "
            f"indices (from one-hot labels, use {name}.argmax(1))"
        )
    if len(y) == 0:
        raise DataError(f"{where}: {name} is empty: give at least one sample in each split")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= MAX_CLASSES:
        raise DataError(
            f"{where}: {name} holds label {low if low < 0 else high}: labels must be class indices "
            f"from 0 to {MAX_CLASSES - 1}"
        )
    return y.astype(np.int64)


def _same_length(x: np.ndarray, y: np.ndarray, xname: str, yname: str, where: str) -> None:
    if len(x) != len(y):
        raise DataError(
            f"{where}: {xname} has {len(x)} samples but {yname} has {len(y)} labels: give one label "
            "per sample"
        )


def load_data(spec: str) -> Dataset:
    """`digits` or a path to an .npz file."""
    if spec in BUILTIN_DATASETS:
        return _digits()
    return _npz(Path(spec))
