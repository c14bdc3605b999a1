"""Data sets: the built-in `digits` and user `.npz` files as float32 arrays; image folders and
`package.module:factory` torch Datasets as `Samples`, decoded on demand.

A split's samples (`Dataset.x_train`, `x_test`) are a numpy float32 array or a `Samples`: both
give `len(x)`, `x.shape`, `x.ndim`, `x.dtype` and `x[int | slice | index array]` (a float32
array). Labels are always an int64 numpy array: they are known without decoding a sample.
Code that looks at a whole split at once (statistics, activations) takes a bounded subsample
(`bounded_rows`), so that memory does not grow with the data set.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import operator
import os
import re
import stat
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import (
    USER_CODE_FAILURES,
    DataError,
    DeepSignsError,
    InputError,
    load_factory,
    one_line,
    shown,
    user_failure,
)
from .fileio import folder_kept, refuse_the_report_file

__all__ = [
    "Dataset",
    "DataSpec",
    "Samples",
    "load_data",
    "reading",
    "check_preprocess",
    "bounded_rows",
    "take",
    "training_digest",
    "digest_number",
    "BUILTIN_DATASETS",
    "IMAGE_SUFFIXES",
    "STAT_ROWS",
]

BUILTIN_DATASETS = ("digits",)

_SPLIT_SEED = 20190413  # fixed: the train/test split never depends on --seed
_TEST_FRACTION = 0.25
# what a sample and a label may be, for data sets and model files alike (zoo.py checks models
# against the same limits): a file is data, and must never make us allocate gigabytes
MAX_INPUT_SIZE = 2**24  # features per sample (product of the sample shape)
MAX_INPUT_DIMS = 4  # dimensions per sample
MAX_CLASSES = 100_000
#: the most memory the arrays of an .npz may take in all once loaded (float32 samples, int64
#: labels): an .npz is held in memory whole, and a small compressed file can claim gigabytes of
#: zeros; larger data sets are image folders or factories, read as training goes
MAX_NPZ_BYTES = 2**31
#: the most rows a statistic over a whole split reads (class centres, value range, reference
#: activations): a fixed, seeded subsample of larger splits, all rows of smaller ones
STAT_ROWS = 4096
_STAT_SEED = 20260101  # fixed: the subsample never depends on --seed
_RANGE_ROWS = 512  # rows of a lazy split read for its value range

#: progress(done, total, description) of the passes over the data (`reading`)
_READING: ContextVar[Callable[[int, int, str], None] | None] = ContextVar("deepsigns_reading", default=None)


@contextlib.contextmanager
def reading(progress: Callable[[int, int, str], None] | None):
    """The passes over the data made while the block runs (an image folder's check of every
    file and its mean and std, the labels read from a Dataset's items, the digest of the
    training data) report to `progress`: on a large or slow data set each had been minutes
    without a word."""
    token = _READING.set(progress)
    try:
        yield
    finally:
        _READING.reset(token)


def _ticker(total: int, description: str) -> Callable[[int], None]:
    """tick(done) for a pass over `total` items: the progress of `reading` told every hundredth
    of the pass and at its end (nothing where none is set)."""
    progress = _READING.get()
    if progress is None or total <= 0:
        return lambda done: None
    step = -(-total // 100)  # (at most a hundred, and the end)

    def tick(done: int) -> None:
        if done % step == 0 or done == total:
            progress(done, total, description)

    return tick


@dataclass(frozen=True)
class DataSpec:
    """What --data names, with the options that go with it (`image_size`: --image-size, for
    image folders). Every command's `data` takes a DataSpec or the plain string."""

    source: str
    image_size: int | None = None

    def __str__(self) -> str:
        return self.source

    def __fspath__(self) -> str:  # an input path like any other (outputs never replace it)
        return self.source


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
    x_train: np.ndarray | Samples  # float32, (n, *input_shape), finite
    y_train: np.ndarray  # int64, (n,), in [0, num_classes)
    x_test: np.ndarray | Samples
    y_test: np.ndarray
    num_classes: int
    #: an image folder's preprocessing (image size, channels, mean, std, class names), recorded
    #: in the checkpoints `train` writes and reused for them; None for other data
    preprocess: dict | None = None
    #: where the data came from: "npz" (its x and y split at random, unless it gives the
    #: splits), "factory", or "" (the built-in set, an image folder)
    source: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    @cached_property
    def value_range(self) -> tuple[float, float]:
        """(min, max) of the training samples; of a fixed subsample for a lazy split."""
        x = self.x_train
        if not isinstance(x, Samples):
            return float(x.min()), float(x.max())
        low, high = math.inf, -math.inf
        for part in _chunks(x.subset(_subsample(len(x), _RANGE_ROWS))):
            low, high = min(low, float(part.min())), max(high, float(part.max()))
        return low, high

    @cached_property
    def digest(self) -> str:
        """`training_digest` of these data, taken once."""
        return training_digest(self)

    def check_trainable(self) -> None:
        """Raise DataError unless these data can make a model's classes (train): every class
        a test sample has, the training samples have too, and most classes below the largest
        label have training samples (a stray label, 99999 for 'unknown', had made a model of
        100,000 outputs, 206 MB, unsaid). Data for a model that exists (an attacker's, keygen's)
        may hold some of its classes only."""
        trained = np.unique(self.y_train)
        unseen = np.setdiff1d(np.unique(self.y_test), trained)
        if len(unseen):  # (as an image folder's test class that train/ lacks)
            listed = ", ".join(map(str, unseen[:5])) + (", ..." if len(unseen) > 5 else "")
            them = "them" if len(unseen) > 1 else "it"
            how = {"npz": f" (an .npz's x and y are split at random: give more samples of {them}, or the splits as "
                          "x_train, y_train, x_test, y_test)",
                   "factory": " (in the factory's train Dataset)"}.get(self.source, "")
            raise DataError(f"{self.name}: the test split holds class{'es' if len(unseen) > 1 else ''} {listed}, of "
                            f"which the training split holds no sample: no model learns a class it never saw; "
                            f"give {them} training samples{how}")
        if self.num_classes - len(trained) > len(trained):
            raise DataError(f"{self.name}: the largest label, {self.num_classes - 1}, makes {self.num_classes} "
                            f"classes, and the training split holds samples of {len(trained)} of them: labels "
                            "are class indices from 0, and a label that marks a sample as unknown is a class of "
                            "its own; give labels from 0 up")

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
_KINDS = "'digits', an existing .npz file, an image folder or package.module:factory"
_FIX = "save with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...) (or x=..., y=...)"


def _npz(path: Path) -> Dataset:
    where = shown(path)
    try:
        exists, is_file = path.exists(), path.is_file()
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte
        raise DataError(f"data path {where} is not usable ({one_line(exc)}): give {_KINDS}") from None
    if not exists:
        raise DataError(f"data file not found: {where}: give {_KINDS}")
    if not is_file:
        raise DataError(f"data {where} is not a file: give {_KINDS}")
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
        return _npz_dataset(path, _npz_arrays(path, where), where)
    except MemoryError:  # (each array is bounded, but the machine may have less to spare)
        raise DataError(f"{where} does not fit in this machine's memory as float32: give a smaller data set, "
                        "or an image folder or a package.module:factory, which are read as training goes") from None


def _npz_arrays(path: Path, where: str) -> dict[str, np.ndarray]:
    """The splits' arrays of an .npz (x_train, y_train, x_test, y_test, or x, y), as stored."""
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
            held = 0  # bytes the arrays take once loaded: every header is checked before any data is read
            for name in names:
                shape = _member_shape(arrays, name, where)
                held += math.prod(shape) * (4 if name.startswith("x") else 8)
                if held > MAX_NPZ_BYTES:
                    raise DataError(
                        f"{where}: with array {name} of shape {list(shape)} its arrays would take "
                        f"{held / 2**30:.1f} GiB in memory, more than an .npz may ({MAX_NPZ_BYTES / 2**30:.0f} GiB): "
                        "give a data set that large as an image folder or a package.module:factory, which are "
                        "read as training goes"
                    )
            return {name: arrays[name] for name in names}
    # zlib.error: a damaged compressed record; NotImplementedError: a compression zipfile lacks
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError) as exc:
        raise DataError(f"cannot read {where} as .npz ({one_line(exc, 160)}): {_FIX}") from None


def _npz_dataset(path: Path, loaded: dict[str, np.ndarray], where: str) -> Dataset:
    """The arrays checked and made a Dataset (x, y are split into train and test)."""
    if "x" in loaded:
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
    return _classified(path.stem, xtr, ytr, xte, yte, where, "npz")


def _member_shape(arrays, name: str, where: str) -> tuple[int, ...]:
    """The shape of one array of an .npz, from its header, checked before its data is read: a
    header that claims terabytes, or a dtype we cannot use, costs nothing."""
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
    return shape


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


def load_data(spec: str | DataSpec, *, preprocess: dict | None = None) -> Dataset:
    """`digits`, an .npz file, an image folder (DIR/train/<class>/*.png|jpg|jpeg and
    DIR/test/<class>/*) or a `package.module:factory` returning two torch Datasets (train,
    test); a factory is only ever named by the caller, never read from a file.

    `preprocess`: an image folder's preprocessing as a checkpoint recorded it (see
    `Dataset.preprocess`), reused as it is instead of computed; other data ignore it."""
    if not isinstance(spec, DataSpec):
        spec = DataSpec(str(spec))
    source, image_size = spec.source, spec.image_size
    kind = _kind(source)
    if image_size is not None:
        _check_image_size(image_size)
        if kind != "folder":
            raise InputError(f"--image-size applies to image folders, and --data {shown(source)} is not "
                             "one: leave --image-size out")
    if kind == "builtin":
        return _digits()
    if kind == "folder":
        return _image_folder(Path(source), image_size, preprocess)
    if kind == "factory":
        return _factory_data(source)
    return _npz(Path(source))


def _kind(source: str) -> str:
    """builtin, folder, factory or file (an .npz, or a path that is not there)."""
    if source in BUILTIN_DATASETS:
        return "builtin"
    try:
        path = Path(source)
        if path.is_dir():
            return "folder"
        exists = path.exists()
    except (OSError, ValueError):  # a name too long, a NUL byte: _npz says so
        return "file"
    if not exists and ":" in source:
        from .zoo import is_factory_name

        if is_factory_name(source):
            return "factory"
    return "file"


# ============================================================================ lazy samples


def _subsample(n: int, limit: int) -> np.ndarray:
    """Sorted indices of at most `limit` of n rows, drawn with a fixed seed (all rows when n <= limit)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(_STAT_SEED).choice(n, size=limit, replace=False))


def bounded_rows(n: int, limit: int = STAT_ROWS) -> slice | np.ndarray:
    """The rows of an n-row split that a whole-split statistic reads: all of them (a slice)
    when n <= limit, else a fixed, seeded subsample of `limit` sorted indices."""
    return slice(None) if n <= limit else _subsample(n, limit)


def take(x: np.ndarray | Samples, rows: slice | np.ndarray) -> np.ndarray | Samples:
    """x[rows] without decoding a lazy split (a `Samples` view); numpy indexing otherwise."""
    return x.subset(rows) if isinstance(x, Samples) else x[rows]


def digest_number(*parts) -> int:
    """A 128-bit number from a digest of `parts` (bytes, or arrays as they lie in memory): what
    a draw that nobody may choose is seeded with (api.make_keys, the output keys embed keeps)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for part in parts:
        digest.update(part if isinstance(part, bytes) else np.ascontiguousarray(part).tobytes())
    return int(digest.hexdigest(), 16)


def training_digest(data: Dataset) -> str:
    """A digest of the training split as the data give it: every label and every sample (an
    image folder's files as they are stored, with the preprocessing; the samples as decoded
    otherwise). keygen draws every key from it as well as from the seed (api.make_keys), and
    output keys are chosen by how they fare in training on these data, so embed must train on
    the data keygen drew them for (see schemes/output.py). One pass over the split, a bounded
    number of samples at a time."""
    import hashlib

    x = data.x_train
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.ascontiguousarray(data.y_train, np.int64).tobytes())
    digest.update(repr(tuple(int(d) for d in x.shape)).encode())
    source = getattr(x, "_source", None)
    tick = _ticker(len(x), "reading the training data")
    if isinstance(source, _ImageFiles):  # (the files: a decoder of another version may decode them a bit apart)
        digest.update(repr((source.size, source.channels, source.mean.ravel().tolist(),
                            source.std.ravel().tolist())).encode())
        for done, i in enumerate(range(len(source)) if x._index is None else x._index, 1):
            name = str(source.names[i])
            digest.update(f"{len(name)}:{name}".encode("utf-8", "surrogateescape"))
            path = os.path.join(source.root, name)
            try:
                with _image_file(path) as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
            except OSError as exc:
                raise DataError(f"cannot read {shown(path)} ({exc.strerror or exc}): check the folder's "
                                "permissions") from None
            digest.update(b"\0")
            tick(done)
        return digest.hexdigest()
    from .zoo import eval_rows

    done = 0
    for chunk in _chunks(x, eval_rows(x)):
        digest.update(np.ascontiguousarray(chunk, np.float32).tobytes())
        done += len(chunk)
        tick(done)
    return digest.hexdigest()


def _chunks(x, size: int = 64):
    for i in range(0, len(x), size):
        yield x[i : i + size]


class Samples:
    """A split's samples, decoded on demand: an array-like of float32 samples (n, *shape).

    Supports `len(x)`, `x.shape`, `x.ndim`, `x.dtype` and `x[key]` for an int (one sample), a
    slice, or a 1-D integer (or boolean) array or list (a float32 array of those rows, in that
    order). It holds paths and indices only, and opens files on access: it pickles and may be
    indexed from forked DataLoader workers. `np.asarray(x)` decodes the whole split; the
    library reads it in batches or through a bounded subsample (`bounded_rows`) instead."""

    dtype = np.dtype(np.float32)

    def __init__(self, source, sample_shape: tuple[int, ...], index: np.ndarray | None = None):
        self._source = source  # _ImageFiles or _DatasetItems: len() and sample(i)
        self._sample_shape = tuple(int(d) for d in sample_shape)
        self._index = index  # rows of the source this view shows (None: all)

    def __len__(self) -> int:
        return len(self._source) if self._index is None else len(self._index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self._sample_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self._sample_shape)

    def __repr__(self) -> str:
        return f"Samples({self._source.describe()}, shape={self.shape})"

    def _rows(self, key) -> np.ndarray:
        n = len(self)
        if isinstance(key, slice):
            return np.arange(*key.indices(n), dtype=np.int64)
        rows = np.asarray(key)
        if rows.dtype == bool:
            if rows.shape != (n,):
                raise IndexError(f"a boolean index of shape {rows.shape} for {n} samples")
            return np.flatnonzero(rows)
        if rows.size == 0:
            return np.zeros(0, np.int64)
        if rows.ndim != 1 or rows.dtype.kind not in "iu":
            raise IndexError("samples are indexed by an int, a slice or a 1-D array of integers")
        rows = rows.astype(np.int64)
        rows = np.where(rows < 0, rows + n, rows)
        if rows.min() < 0 or rows.max() >= n:
            raise IndexError(f"index out of range for {n} samples")
        return rows

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, np.ndarray) and key.ndim == 0 and key.dtype.kind in "iu":
            key = int(key)
        if isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
            i, n = operator.index(key), len(self)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for {n} samples")
            return self._load(np.array([i % n]))[0]
        return self._load(self._rows(key))

    def _load(self, rows: np.ndarray) -> np.ndarray:
        source_rows = rows if self._index is None else self._index[rows]
        out = np.empty((len(rows), *self._sample_shape), np.float32)
        # (a Dataset of the user's that changes the current folder as it is read: the command's
        # relative paths, read and written after it, had been taken in the folder it went to)
        with folder_kept() if isinstance(self._source, _DatasetItems) else contextlib.nullcontext():
            for j, i in enumerate(source_rows):
                out[j] = self._source.sample(int(i))
        return out

    def subset(self, key) -> Samples:
        """A lazy view of some rows (nothing is decoded)."""
        rows = self._rows(key)
        return Samples(self._source, self._sample_shape, rows if self._index is None else self._index[rows])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if copy is False:
            raise ValueError("a Samples split is decoded on demand: it cannot be viewed without a copy")
        x = self[:]
        return x if dtype is None else x.astype(dtype)


# ============================================================================ image folders

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: names of images in formats deepsigns does not decode: refused in a class folder (skipped, they
#: had trained the model on less, unsaid); files of other names (notes, .csv) are not images
OTHER_IMAGE_SUFFIXES = (".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".jpe", ".jp2", ".j2k", ".ppm",
                        ".pgm", ".pbm", ".pnm", ".heic", ".heif", ".avif", ".ico", ".tga", ".dng", ".raw")
# the only decoders Pillow may try, whatever a file's name: left to guess, it recognises an
# EPS file named x.png and runs Ghostscript (an external program) on the adversary's file
IMAGE_FORMATS = ("PNG", "JPEG")
_MEAN_STD_IMAGES = 512  # training images the per-channel mean and std are computed on
MIN_STD = 1e-5  # a channel's std below this is a constant channel's: recorded as 1 (centred, not scaled)
_MAX_RECORD = 60_000  # characters of the preprocessing record: a checkpoint field holds 64 KiB
_FOLDER_FIX = "an image folder holds DIR/train/<class>/*.png|jpg|jpeg and DIR/test/<class>/*"
_GRAYSCALE_MODES = ("1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
# grayscale modes wider than 8 bits, and the value of white in each (a 16-bit PNG opens as I;16
# or I): converted to 8-bit "L", Pillow clips them at 255, and every pixel above it turns white
_WIDE_MODES = {"I": 65535.0, "I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "F": 1.0}
#: the most pixels an image may declare: its header alone sets what decoding it takes (a 140 KB
#: PNG can claim 12000 x 12000), and Pillow only warns below 179 million
MAX_IMAGE_PIXELS = 2**25  # (a 32-megapixel photograph)
#: the largest image file read: MAX_IMAGE_PIXELS of 16-bit RGBA stored without compression take
#: 256 MiB; a file's declared size sets what reading it costs (a sparse file of 8 GiB that takes
#: 4 KB on disk had taken keygen's digest 38 s)
MAX_IMAGE_BYTES = 2**29


def _image_file(path: str):
    """The image file at `path`, open for reading: a regular file of at most MAX_IMAGE_BYTES,
    opened without waiting (a FIFO put in an image's place while a command runs had stopped
    it for good)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DataError(f"cannot read image {shown(path)} ({exc.strerror or exc}): check that it is still there, "
                        "and the folder's permissions") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"image {shown(path)} is no longer a regular file: the folder changed while the command "
                            "ran; leave it as it is until the command ends")
        if st.st_size > MAX_IMAGE_BYTES:
            raise DataError(f"image {shown(path)} is {st.st_size} bytes, more than the {MAX_IMAGE_BYTES} deepsigns "
                            "reads in one image: shrink or remove the file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def _opened_image(path: str, rows: bool = False) -> Iterator:
    """The image at `path` (`_image_file`) opened by Pillow, once what bounds its decoding is
    checked: a PNG's chunks walked before Pillow walks them (with `rows`, to be decoded: its
    image data checked to hold every row, in the same walk), then its pixels and a JPEG's scans
    (`_check_pixels`). Pillow's errors are the caller's to word."""
    image = _pil()
    with _image_file(path) as f:
        head = f.read(len(_PNG_SIGNATURE))
        if head == _PNG_SIGNATURE:
            _check_png(f, path, rows)
        f.seek(0)
        try:
            opened = image.open(f, formats=IMAGE_FORMATS)
        except image.DecompressionBombError as exc:  # (Pillow's limit, 2 x its MAX_IMAGE_PIXELS, is above ours)
            declared = re.search(r"\((\d+) pixels\)", str(exc))
            raise DataError(f"image {shown(path)} is of {declared[1] if declared else 'too many'} pixels, more than "
                            f"{MAX_IMAGE_PIXELS}: deepsigns refuses it rather than decode it; shrink or remove the "
                            "file") from None
        except image.UnidentifiedImageError:
            # (what Pillow says of a PNG or JPEG whose header is cut short too: not another format)
            kind = "PNG" if head == _PNG_SIGNATURE else "JPEG" if head.startswith(_JPEG_SIGNATURE) else None
            if kind is None:
                raise
            raise OSError(f"a {kind} file whose header is cut short or damaged") from None
        with opened as im:
            _check_pixels(im, path, f)
            yield im


def _check_image_size(size) -> int:
    from .defaults import LIMITS

    lo, hi = LIMITS["image_size"]
    if isinstance(size, bool) or not isinstance(size, int) or not lo <= size <= hi:
        raise InputError(f"--image-size must be a whole number from {lo} to {hi}, got {size!r}")
    return size


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading an image folder needs Pillow: pip install Pillow") from None
    return Image


def _unreadable(path: str, exc: BaseException) -> DataError:
    if type(exc).__name__ == "UnidentifiedImageError":  # (PIL's: no decoder of IMAGE_FORMATS takes it)
        return DataError(f"image {shown(path)} is not a PNG or JPEG file: deepsigns decodes no other format, "
                         "whatever the file's name, and fails rather than skip it; convert or remove the file")
    return DataError(f"cannot read image {shown(path)} ({one_line(exc, 120)}): deepsigns fails on an "
                     "unreadable image rather than skip it; repair or remove the file")


def _image_errors(image) -> tuple[type[BaseException], ...]:
    # OSError: not an image, truncated; SyntaxError, struct.error, ValueError, EOFError: damaged
    # headers as Pillow's decoders report them; DecompressionBombError: absurd pixel counts
    return (OSError, SyntaxError, ValueError, EOFError, struct.error, image.DecompressionBombError)


class _Names:
    """File names packed in two numpy arrays (their bytes, one after another, and where each
    starts), not a list of str: forked DataLoader workers share the arrays' pages instead of
    copying them through reference counts. Not a numpy array of str either, whose every entry
    takes 4 bytes a character of the longest: one name of 500 characters had made 20,000 names
    take 28 times their memory. Names that are not UTF-8 keep their bytes (surrogateescape)."""

    def __init__(self, names: list[str]):
        encoded = [name.encode("utf-8", "surrogateescape") for name in names]
        self.starts = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(b) for b in encoded], out=self.starts[1:])
        self.data = np.frombuffer(b"".join(encoded), np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, i: int) -> str:
        start, end = self.starts[i], self.starts[i + 1]
        return self.data[start:end].tobytes().decode("utf-8", "surrogateescape")

    @property
    def nbytes(self) -> int:
        return self.starts.nbytes + self.data.nbytes


class _ImageFiles:
    """Image files, decoded with Pillow: resized, scaled to [0, 1], normalised per channel."""

    def __init__(self, root: Path, names: list[str], preprocess: dict):
        self.root = str(root)
        self.names = _Names(names)  # paths relative to root
        self.size, self.channels = int(preprocess["image_size"]), int(preprocess["channels"])
        self.mean = np.asarray(preprocess["mean"], np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(preprocess["std"], np.float32).reshape(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.names)

    def describe(self) -> str:
        return f"images under {shown(self.root)}"

    def sample(self, i: int) -> np.ndarray:
        return (self.pixels(i) - self.mean) / self.std

    def pixels(self, i: int) -> np.ndarray:
        """Image i as (channels, size, size) float32 in [0, 1], not normalised."""
        return _decode(os.path.join(self.root, self.names[i]), self.size, self.channels)


def _decode(path: str, size: int, channels: int) -> np.ndarray:
    image = _pil()
    try:
        with _opened_image(path, rows=True) as im:
            white = _WIDE_MODES.get(im.mode)
            if white is not None:  # its own range scaled to [0, 1], in float (mode F)
                im = image.fromarray((np.asarray(im, dtype=np.float32) / white).clip(0.0, 1.0))
            else:
                im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (size, size):
                im = im.resize((size, size), image.Resampling.BILINEAR)
            pixels = np.asarray(im, dtype=np.float32) / (1.0 if white is not None else 255.0)
    except _image_errors(image) as exc:
        raise _unreadable(path, exc) from None
    if pixels.ndim == 2:  # grayscale: one channel, or the same three
        return np.repeat(pixels[None], channels, 0)
    return pixels.transpose(2, 0, 1)


# the channels of each PNG colour type (grey, RGB, palette, grey + alpha, RGBA)
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
# Adam7's passes: (first column, first row, column step, row step)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_data_bytes(width: int, height: int, depth: int, colour: int, interlaced: bool) -> int:
    """The bytes a PNG's image data inflate to: every row of every pass, with its filter byte."""
    bits = depth * _PNG_CHANNELS.get(colour, 1)
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        w, h = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if w > 0 and h > 0:
            total += h * (1 + -(-(w * bits) // 8))
    return total


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"  # (start of image, then a marker)
#: the most chunks a PNG may hold, and the largest chunk other than image data: a decoder walks
#: the chunks one at a time (a 144 MB file of 12 million empty chunks had taken minutes, at every
#: pass), and reads each such chunk whole (one of 512 MiB, sparse on disk, had taken 1.6 GB of
#: memory per decode); encoders write image data in chunks of 8 KiB or more, so that a PNG of
#: MAX_IMAGE_PIXELS holds some 33,000 of them, and profiles and text are far smaller
MAX_PNG_CHUNKS = 1 << 17
MAX_PNG_CHUNK = 1 << 24  # (an animated PNG's later frames, fdAT, too: Pillow reads them whole to pass them)


def _png_chunks(f, path: str) -> Iterator[tuple[bytes, int, int]]:
    """(kind, where its body starts, its length) of each chunk of the PNG file `f`, to IEND or
    the file's end; refuses a PNG past MAX_PNG_CHUNKS chunks, or with a chunk other than image
    data longer than MAX_PNG_CHUNK, as it comes to it."""
    at, count = len(_PNG_SIGNATURE), 0
    while True:
        f.seek(at)
        head = f.read(8)
        if len(head) < 8:
            return
        length, kind = struct.unpack(">I4s", head)
        count += 1
        if count > MAX_PNG_CHUNKS:
            raise DataError(f"image {shown(path)} is a PNG of more than {MAX_PNG_CHUNKS} chunks: deepsigns refuses it "
                            "rather than walk them; re-encode or remove the file")
        if length > MAX_PNG_CHUNK and kind != b"IDAT":
            raise DataError(f"image {shown(path)} holds a PNG chunk of {length} bytes beside its image data, more than "
                            f"the {MAX_PNG_CHUNK} deepsigns reads: re-encode or remove the file")
        yield kind, at + 8, length
        if kind == b"IEND":
            return
        at += 12 + length


def _check_png(f, path: str, rows: bool) -> None:
    """Walk a PNG's chunks (_png_chunks' limits) and, with `rows`, refuse one whose image data
    end before its last row. Pillow fills the rows such a file lacks with black and says
    nothing, when its compressed stream ends cleanly (a file cut short mid-stream it refuses).
    The data are read and inflated a MiB at a time (an image's data may inflate to 256 MiB)."""
    inflate, got, want = zlib.decompressobj(), 0, None
    try:
        for kind, at, length in _png_chunks(f, path):
            if not rows:
                continue
            if kind == b"IHDR" and length >= 13 and want is None:
                f.seek(at)
                width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", f.read(13))
                want = _png_data_bytes(width, height, depth, colour, interlace == 1)
            elif kind == b"IDAT" and want is not None:
                f.seek(at)
                while length and got <= want and not inflate.eof:
                    piece = f.read(min(length, 1 << 20))
                    if not piece:
                        break
                    length -= len(piece)
                    while piece and got <= want and not inflate.eof:
                        got += len(inflate.decompress(piece, 1 << 20))
                        piece = inflate.unconsumed_tail
    except zlib.error as exc:
        raise _unreadable(path, exc) from None
    if want is not None and got < want:  # (no header: Pillow read the file, nothing to add)
        raise DataError(f"cannot read image {shown(path)} (its image data end after {got} of {want} bytes: the "
                        "rows after them are missing): deepsigns fails on an unreadable image rather than skip it; "
                        "repair or remove the file")


#: the most scans a JPEG may hold: a progressive JPEG's decoder passes over the whole image once
#: per scan, and encoders write about 10 (libjpeg's progression: 10 in colour, 6 in grey); a 1 MB
#: file of 8,000 repeated scans had taken minutes to decode, every epoch
MAX_JPEG_SCANS = 100
_SOS = b"\xff\xda"  # a JPEG's start of scan (0xFF in the coded data is written 0xFF 0x00: no false match)


def _check_pixels(im, path: str, f) -> None:
    """Refuse an image whose header declares more than MAX_IMAGE_PIXELS, or a JPEG of more than
    MAX_JPEG_SCANS scans, before it is decoded (`f`: its open file)."""
    width, height = im.size
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"image {shown(path)} is {width}x{height}, more than {MAX_IMAGE_PIXELS} pixels: deepsigns "
                        "refuses it rather than decode it; shrink or remove the file")
    if im.format in ("JPEG", "MPO") and _jpeg_scans(f) > MAX_JPEG_SCANS:  # (MPO: a JPEG of several images)
        raise DataError(f"image {shown(path)} is a JPEG of more than {MAX_JPEG_SCANS} scans, each a pass of its "
                        "decoder over the whole image (encoders write about 10): deepsigns refuses it rather than "
                        "decode it; re-encode or remove the file")


def _jpeg_scans(f) -> int:
    """Start-of-scan markers in the file, counted up to MAX_JPEG_SCANS + 1 (a thumbnail's count
    too: a file holds few), a megabyte at a time; the file's position is left as it was."""
    at, count, tail = f.tell(), 0, b""
    f.seek(0)
    try:
        while count <= MAX_JPEG_SCANS:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            count += (tail + chunk).count(_SOS)
            tail = chunk[-1:] if chunk[-1:] == b"\xff" else b""  # (a marker split between two reads)
    finally:
        f.seek(at)
    return count


def _visible(entries) -> list[os.DirEntry]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _is_file(entry: os.DirEntry) -> bool:
    """Whether an entry is a file, or a link that leads to one (a loop of links leads nowhere)."""
    try:
        return entry.is_file()
    except OSError:
        return False


def _no_file(path: str) -> str:
    """What an entry named like an image is, that is no file (or none this user may reach),
    and its fix: "is no file ..."."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):  # (a link into a folder this user may not search)
            return (f"is no file this user may reach ({exc.strerror}): check the permissions of the folders it "
                    "leads into")
        how = "in a loop" if exc.errno == errno.ELOOP else "nowhere"
        return f"is no file (a link that leads {how}): mount or restore what it leads to, or remove it"
    what = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or a socket"
    return f"is no file ({what}): rename or remove it"


def _holds_images(folder: str) -> bool:
    """Whether a folder holds an entry named like an image (a look one level down only)."""
    with os.scandir(folder) as it:
        return any(e.name.lower().endswith(IMAGE_SUFFIXES) for e in _visible(it))


def _class_folders(split: Path, where: str) -> dict[str, list[str]]:
    """class name -> the image file names in it (sorted); every class must hold one."""
    try:
        with os.scandir(split) as it:
            entries = _visible(it)
        folders = [e for e in entries if e.is_dir()]
        # (a link that leads nowhere, as a class folder on a volume not mounted, had dropped that
        # class unsaid: the classes after it were numbered one lower)
        lost = next((e for e in entries if e.is_symlink() and not e.is_dir() and not _is_file(e)), None)
        if lost is not None:
            raise DataError(f"{where}/{split.name}/{shown(lost.name)} is a link that leads nowhere: mount what it "
                            "leads to, or remove it")
        found = {}
        for folder in folders:
            with os.scandir(folder.path) as it:
                visible = _visible(it)
            other = next((e for e in visible if e.name.lower().endswith(OTHER_IMAGE_SUFFIXES)), None)
            if other is not None:
                raise DataError(f"{where}/{split.name}/{shown(folder.name)}/{shown(other.name)} is an image in a "
                                "format deepsigns does not read (only .png, .jpg, .jpeg): convert it, or move it "
                                "out of the folder")
            named = [e for e in visible if e.name.lower().endswith(IMAGE_SUFFIXES)]
            # (images one folder down had been passed over unsaid: the model trained on less)
            nested = next((e for e in visible if not e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_dir()
                           and _holds_images(e.path)), None)
            if nested is not None:
                raise DataError(f"{where}/{split.name}/{shown(folder.name)}/{shown(nested.name)} is a folder of images "
                                "inside a class folder: deepsigns reads only the images directly in each class "
                                "folder; move them up into it, or move the folder out")
            for e in named:
                refuse_the_report_file(e.path, f"an image of the folder {where}")  # (by any name: a hard link too)
                if not _is_file(e):  # (skipped, a link that leads nowhere had trained the model on less, unsaid)
                    raise DataError(f"{where}/{split.name}/{shown(folder.name)}/{shown(e.name)} is named like an "
                                    f"image but {_no_file(e.path)}")
            found[folder.name] = [e.name for e in named]
    except OSError as exc:
        cause = "a loop of links" if exc.errno == errno.ELOOP else "the folder's permissions"
        raise DataError(f"cannot list {shown(exc.filename or split)} ({exc.strerror or one_line(exc)}): check "
                        f"{cause}") from None
    if not folders:
        raise DataError(f"{where}/{split.name} holds no class folders: {_FOLDER_FIX}")
    if not any(found.values()):
        raise DataError(f"{where}/{split.name} holds no images at all (.png, .jpg, .jpeg in its class "
                        f"folders): {_FOLDER_FIX}")
    for name, files in found.items():
        if not files:
            raise DataError(f"class folder {where}/{split.name}/{shown(name)} holds no image (.png, .jpg, "
                            ".jpeg): add images or remove the folder")
    return found


def _image_folder(root: Path, image_size: int | None, preprocess: dict | None) -> Dataset:
    where = shown(root)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"{where} has no {split}/ folder: {_FOLDER_FIX}")
    train, test = _class_folders(root / "train", where), _class_folders(root / "test", where)
    if preprocess is not None:
        preprocess = check_preprocess(preprocess)
        if image_size is not None and image_size != preprocess["image_size"]:
            raise InputError(f"--image-size {image_size} differs from the model's {preprocess['image_size']} "
                             "(recorded in its checkpoint by train): leave --image-size out")
        classes = preprocess["classes"]
        known = "the classes the model was trained on"
    else:
        classes = list(train)
        known = "train/'s classes"
    label = {name: i for i, name in enumerate(classes)}
    for split, found in (("train", train), ("test", test)):
        for name in found:
            if name not in label:
                # (a newline in a name escaped first: one_line would cut the list there)
                raise DataError(f"class folder {where}/{split}/{shown(name)} is not among {known} "
                                f"({one_line(shown(', '.join(classes)), 80)}): rename or remove it")
    if len(classes) < 2:
        raise DataError(f"{where}/train holds {len(classes)} class, a classifier needs at least 2: "
                        "add a folder of images per class")
    if len(classes) > MAX_CLASSES:
        raise DataError(f"{where}/train holds {len(classes)} classes, more than {MAX_CLASSES}")
    names = {split: [f"{split}/{c}/{f}" for c, files in found.items() for f in files]
             for split, found in (("train", train), ("test", test))}
    labels = {split: np.array([label[c] for c, files in found.items() for _ in files], np.int64)
              for split, found in (("train", train), ("test", test))}
    first = _check_images(root, names)
    if preprocess is None:
        preprocess = _fresh_preprocess(root, names["train"], first, image_size, classes)
    splits = {split: Samples(_ImageFiles(root, list(names[split]), preprocess),
                             (preprocess["channels"], preprocess["image_size"], preprocess["image_size"]))
              for split in ("train", "test")}
    name = shown(root.resolve().name or root)
    if name in BUILTIN_DATASETS:  # (a folder named digits: its models' records must not say the bundled set)
        name += "/"
    return Dataset(name, splits["train"], labels["train"], splits["test"], labels["test"],
                   num_classes=len(classes), preprocess=preprocess)


def _check_images(root: Path, names: dict[str, list[str]]) -> tuple[str, tuple[int, int]]:
    """Every file's header read and verified (the first failure names the file); the first
    training image's (mode, size), its mode "RGB" when it is grayscale and another training
    image is not (one grayscale image that sorted first had made a colour set train on one
    channel)."""
    image = _pil()
    first, colour, done = None, False, 0
    tick = _ticker(len(names["train"]) + len(names["test"]), "checking images")
    for split in ("train", "test"):
        for name in names[split]:
            path = os.path.join(root, name)
            try:
                with _opened_image(path) as im:
                    if first is None:
                        first = (im.mode, im.size)
                    colour = colour or (split == "train" and im.mode not in _GRAYSCALE_MODES)
                    im.verify()
            except _image_errors(image) as exc:
                raise _unreadable(path, exc) from None
            done += 1
            tick(done)
    return ("RGB", first[1]) if colour else first


def _fresh_preprocess(root: Path, train: list[str], first: tuple[str, tuple[int, int]],
                      image_size: int | None, classes: list[str]) -> dict:
    """Image size, channels, per-channel mean and std (on a fixed subsample of the training
    images), class names."""
    from .defaults import LIMITS

    mode, (width, height) = first
    if image_size is None:
        lo, hi = LIMITS["image_size"]
        if width != height or not lo <= width <= hi:
            raise InputError(f"the first training image of {shown(root)} ({shown(train[0])}) is {width}x{height}: "
                             f"give --image-size N (from {lo} to {hi}) to resize every image to N x N")
        image_size = width
    channels = 1 if mode in _GRAYSCALE_MODES else 3
    files = _ImageFiles(root, list(train), {"image_size": image_size, "channels": channels,
                                                "mean": [0.0] * channels, "std": [1.0] * channels})
    total, squares, count = np.zeros(channels), np.zeros(channels), 0
    rows = _subsample(len(train), _MEAN_STD_IMAGES)
    tick = _ticker(len(rows), "measuring images")
    for done, i in enumerate(rows, 1):
        pixels = files.pixels(int(i)).reshape(channels, -1).astype(np.float64)
        total += pixels.sum(1)
        squares += (pixels**2).sum(1)
        count += pixels.shape[1]
        tick(done)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    std = np.where(std < MIN_STD, 1.0, std)  # a constant channel: centred, not scaled
    preprocess = {"kind": "image-folder", "image_size": int(image_size), "channels": channels,
                  "mean": [float(v) for v in mean], "std": [float(v) for v in std], "classes": list(classes)}
    if len(json.dumps(preprocess)) > _MAX_RECORD:
        raise DataError(f"the class names of {shown(root)} take more than {_MAX_RECORD} characters, too "
                        "many to record in a checkpoint: shorten the class folders' names")
    return preprocess


def check_preprocess(value) -> dict:
    """An image folder's preprocessing as a file recorded it (it may be hostile): every field
    checked for type and range; ValueError says what is wrong."""
    from .defaults import LIMITS

    fields = ("kind", "image_size", "channels", "mean", "std", "classes")
    if not isinstance(value, dict) or set(value) != set(fields) or value.get("kind") != "image-folder":
        raise ValueError(f"'preprocess' must be an object with {', '.join(fields)} (kind image-folder)")
    size, channels = value["image_size"], value["channels"]
    lo, hi = LIMITS["image_size"]
    if type(size) is not int or not lo <= size <= hi:
        raise ValueError(f"'preprocess' image_size must be an integer from {lo} to {hi}")
    if channels not in (1, 3) or type(channels) is not int:
        raise ValueError("'preprocess' channels must be 1 or 3")
    # the mean and std of pixels scaled to [0, 1]: a record outside those ranges (a mean of 1e6)
    # had normalised samples to millions, and keygen wrote keys that no later command took
    for key, low in (("mean", 0.0), ("std", MIN_STD)):  # (train records 1 for a constant channel)
        numbers = value[key]
        if (not isinstance(numbers, list) or len(numbers) != channels
                or not all(type(v) in (int, float) and math.isfinite(v) and low <= v <= 1.0 for v in numbers)):
            raise ValueError(f"'preprocess' {key} must be {channels} numbers from {low:g} to 1 (of pixels in [0, 1])")
    classes = value["classes"]
    if (not isinstance(classes, list) or not 2 <= len(classes) <= MAX_CLASSES
            or not all(isinstance(c, str) and c not in ("", ".", "..") and len(c) <= 255 and "/" not in c
                       and "\x00" not in c for c in classes)
            or len(set(classes)) != len(classes)):
        raise ValueError("'preprocess' classes must be 2 or more distinct folder names")
    return {key: value[key] for key in fields}


# ============================================================================ factories


def _factory_data(source: str) -> Dataset:
    """`package.module:factory` -> (train, test) torch Datasets, each wrapped as a Samples."""
    with _settings_kept():
        return _factory_data_of(source)


@contextlib.contextmanager
def _settings_kept():
    """The process's settings as they were before the user's code ran, whatever it set: a
    factory (or its module) that made float64 torch's default dtype, or turned gradients off,
    had failed the training that followed as a bug of ours (exit 3), as did one that made "meta"
    the default device ("Cannot copy out of meta tensor"); one that changed the current folder
    had sent a relative --out into the folder it went to."""
    import torch

    dtype, grad, device = torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_default_device()
    try:
        with folder_kept():
            yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)
        if torch.get_default_device() != device:  # (the CPU, as it was: no device context at all)
            torch.set_default_device(None if device == torch.device("cpu") else device)


def _factory_data_of(source: str) -> Dataset:
    factory = load_factory(source, "--data", "data", DataError)
    want = f"data factory '{source}' must return two torch Datasets (train, test)"
    if not callable(factory):
        raise DataError(f"'{source}' is a {type(factory).__name__}, not a factory: {want}")
    try:
        made = factory()
    except KeyboardInterrupt:  # (Ctrl-C or a signal, never the user's failure)
        raise
    except USER_CODE_FAILURES as exc:
        raise DataError(f"data factory '{source}' failed ({user_failure(exc)}): it is called without "
                        "arguments and must return two torch Datasets (train, test)") from None
    try:
        return _factory_splits(source, made, want)
    except DeepSignsError:
        raise
    except KeyboardInterrupt:  # (Ctrl-C or a signal, never the user's failure)
        raise
    except USER_CODE_FAILURES as exc:  # (what it returned runs code of the user's as it is read: __len__, __repr__)
        raise DataError(f"data factory '{source}': the data it returned failed as they were read "
                        f"({user_failure(exc)}): fix the Datasets (or their samples' and labels' types)") from None


def _factory_splits(source: str, made, want: str) -> Dataset:
    """What a factory returned, checked and wrapped: (train, test) torch Datasets (`want`: what
    the message says a factory must return)."""
    from torch.utils.data import Dataset as TorchDataset
    from torch.utils.data import IterableDataset


    def usable(d) -> bool:
        return isinstance(d, TorchDataset) and not isinstance(d, IterableDataset) and hasattr(d, "__len__")

    if not (isinstance(made, (tuple, list)) and len(made) == 2 and all(usable(d) for d in made)):
        got = f"a {type(made).__name__}"
        if isinstance(made, (tuple, list)):
            kinds = ", ".join(type(d).__name__ for d in made)
            got += f" of {len(made)}" + (f": {kinds}" if kinds else "")  # (an empty one: "of 0", no list)
        raise DataError(f"{want}, got {one_line(got, 100)}: return (train_dataset, test_dataset), each "
                        "indexable, with a length")
    (xtr, ytr), (xte, yte) = (_torch_split(d, split, source) for d, split in zip(made, ("train", "test"), strict=True))
    if xtr.shape[1:] != xte.shape[1:]:
        raise DataError(f"data factory '{source}': train samples have shape {list(xtr.shape[1:])} and test "
                        f"samples {list(xte.shape[1:])}: give both splits samples of one shape")
    return _classified(source, xtr, ytr, xte, yte, f"data factory '{source}'", "factory")


def _classified(name: str, xtr, ytr, xte, yte, where: str, source: str) -> Dataset:
    present = np.union1d(np.unique(ytr), np.unique(yte))
    if len(present) < 2:
        raise DataError(f"{where}: the labels hold {len(present)} class, a classifier needs at least 2: give "
                        "samples of two or more classes")
    return Dataset(shown(name), xtr, ytr, xte, yte, int(present[-1]) + 1, source=source)


class _DatasetItems:
    """A torch map-style Dataset's samples: item i is (sample, label); the sample is decoded on
    access and checked (its shape that of the first, finite)."""

    def __init__(self, dataset, split: str, where: str, sample_shape: tuple[int, ...]):
        self.dataset, self.split, self.where, self.sample_shape = dataset, split, where, sample_shape

    def __len__(self) -> int:
        return len(self.dataset)

    def describe(self) -> str:
        return f"the {self.split} Dataset of {self.where}"

    def sample(self, i: int) -> np.ndarray:
        return self.checked(i)[0]

    def checked(self, i: int) -> tuple[np.ndarray, object]:
        """Item i, its sample of the first sample's shape."""
        x, y = self.item(i)
        if x.shape != self.sample_shape:
            raise DataError(f"{self.where}: {self.split} sample {i} has shape {list(x.shape)} but the first has "
                            f"{list(self.sample_shape)}: give samples of one shape")
        return x, y

    def item(self, i: int) -> tuple[np.ndarray, object]:
        try:
            item = self.dataset[i]
        except KeyboardInterrupt:  # (Ctrl-C or a signal, never the user's failure)
            raise
        except USER_CODE_FAILURES as exc:
            raise DataError(f"{self.where}: the {self.split} Dataset failed on item {i} ({user_failure(exc)}): "
                            "fix its __getitem__") from None
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"{self.where}: {self.split} item {i} is a {type(item).__name__}, not a (sample, "
                            "label) pair: return (x, y) from the Dataset's __getitem__")
        try:
            x = _as_sample(item[0])
        except KeyboardInterrupt:  # (Ctrl-C or a signal, never the user's failure)
            raise
        except USER_CODE_FAILURES as exc:  # (a tensor subclass or array-like of the user's)
            raise DataError(f"{self.where}: {self.split} sample {i} cannot be read as numbers ({user_failure(exc)}): "
                            "return plain tensors or arrays") from None
        if x is None:
            raise DataError(f"{self.where}: {self.split} sample {i} is a {type(item[0]).__name__}, not a tensor "
                            "or array of real numbers: return tensors (e.g. transforms.ToTensor())")
        if not np.isfinite(x).all():
            raise DataError(f"{self.where}: {self.split} sample {i} holds NaN or infinite values: clean or drop it")
        return x, item[1]


def _as_sample(x) -> np.ndarray | None:
    import torch

    if isinstance(x, torch.Tensor):
        if x.is_complex() or x.dtype == torch.bool:
            return None
        x = x.detach().to("cpu", torch.float32).numpy()
    if not isinstance(x, (np.ndarray, np.generic)) or x.dtype.kind not in "iuf":
        return None
    with np.errstate(all="ignore"):  # beyond float32: inf, refused by the caller
        return np.asarray(x, dtype=np.float32)


def _as_label(y) -> int | None:
    import torch

    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy() if y.numel() == 1 and not y.is_floating_point() else None
    if isinstance(y, np.ndarray):
        y = y.reshape(()).item() if y.size == 1 and y.dtype.kind in "iu" else None
    if isinstance(y, np.integer):
        y = int(y)
    return y if type(y) is int else None


MAX_ITEMS = 10**8  # items of a --data factory's Dataset (ImageNet's training set holds 1.3 million)


def _torch_split(dataset, split: str, source: str) -> tuple[Samples, np.ndarray]:
    """A torch Dataset as (Samples, labels): labels from its `.targets` when it has them, else
    from one pass over its items (which checks every sample's shape too)."""
    where = f"data factory '{source}'"
    try:
        n = len(dataset)
    except KeyboardInterrupt:  # (Ctrl-C or a signal, never the user's failure)
        raise
    except USER_CODE_FAILURES as exc:
        raise DataError(f"{where}: the {split} Dataset has no length ({user_failure(exc)}): give a map-style "
                        "Dataset with __len__") from None
    if n == 0:
        raise DataError(f"{where}: the {split} Dataset is empty: give at least one sample in each split")
    if type(n) is not int or n > MAX_ITEMS:  # (its labels alone are 8 bytes an item: 10**12 wanted 7 TiB)
        raise DataError(f"{where}: the {split} Dataset claims {one_line(repr(n), 40)} items, more than "
                        f"{MAX_ITEMS:,}: give a Dataset of at most that many (a shard of a larger set)")
    first, _ = _DatasetItems(dataset, split, where, ()).item(0)
    problem = _sample_problem((n, *first.shape), f"the {split} Dataset")
    if problem:
        raise DataError(f"{where}: {problem}")
    items = _DatasetItems(dataset, split, where, first.shape)
    try:
        targets = getattr(dataset, "targets", None)
    except KeyboardInterrupt:  # (Ctrl-C or a signal, never the user's failure)
        raise
    except USER_CODE_FAILURES as exc:  # (a property: the user's code)
        raise DataError(f"{where}: the {split} Dataset's .targets failed ({user_failure(exc)}): fix it, or "
                        "leave it out (labels are then read from the items)") from None
    if targets is not None:
        labels = _targets(targets, n, split, where)
    else:
        labels = np.empty(n, np.int64)
        tick = _ticker(n, f"reading {split} labels")
        for i in range(n):
            _, y = items.checked(i)
            label = _as_label(y)
            if label is None or not 0 <= label < MAX_CLASSES:  # (2**70 does not fit the labels' int64)
                raise DataError(f"{where}: {split} item {i} has label {one_line(repr(y), 40)}: labels must be "
                                f"integer class indices from 0 to {MAX_CLASSES - 1}")
            labels[i] = label
            tick(i + 1)
    return Samples(items, first.shape), _labels(labels, f"{split} labels", where)


def _targets(targets, n: int, split: str, where: str) -> np.ndarray:
    import torch

    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().numpy()
    try:
        y = np.asarray(targets)
    except KeyboardInterrupt:  # (Ctrl-C or a signal, never the user's failure)
        raise
    except USER_CODE_FAILURES as exc:  # (a sequence of the user's, read by its own code)
        raise DataError(f"{where}: the {split} Dataset's .targets is not an array ({user_failure(exc)}): give "
                        "integer class indices") from None
    if y.shape != (n,):
        raise DataError(f"{where}: the {split} Dataset's .targets has shape {list(y.shape)} for {n} items: give "
                        "one integer label per item")
    return _labels(y, f"{split}.targets", where)
