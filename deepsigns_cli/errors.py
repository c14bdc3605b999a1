"""Domain errors. The CLI turns every DeepSignsError into one line on stderr and exit 2."""

from __future__ import annotations

__all__ = [
    "DeepSignsError",
    "InputError",
    "CheckpointError",
    "DataError",
    "BundleError",
    "SchemeError",
    "OnnxError",
    "OutputExistsError",
]


class DeepSignsError(Exception):
    """A mistake in the user's input: the message says what is wrong and how to fix it."""


class InputError(DeepSignsError):
    """A bad option value or combination."""


class CheckpointError(DeepSignsError):
    """A model file that cannot be read or does not fit its architecture."""


class DataError(DeepSignsError):
    """A data set that cannot be read or does not fit the model."""


class BundleError(DeepSignsError):
    """A key bundle that cannot be opened, or a wrong passphrase."""


class SchemeError(DeepSignsError):
    """Watermark keys that cannot be made or used as asked."""


class OnnxError(DeepSignsError):
    """An ONNX file that is malformed, unsafe, or does not fit the keys."""


class OutputExistsError(DeepSignsError):
    """An output path exists and --force was not given."""
