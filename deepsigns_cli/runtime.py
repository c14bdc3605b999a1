"""onnxruntime sessions, providers, and the handling of untrusted ONNX files."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import InputError, OnnxError
from .fileio import require_file

__all__ = ["resolve_provider", "make_session", "OnnxModel", "load_onnx"]

PROVIDERS = ("auto", "cpu", "cuda")


def _cuda_devices() -> int:
    """GPUs the CUDA driver reports (0 without a driver); asks libcuda, not torch (fast)."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


@lru_cache(maxsize=1)
def _cuda_usable() -> bool:
    """True only when CUDA really works here (not merely compiled into onnxruntime-gpu)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers() or _cuda_devices() == 0:
        return False
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()  # finds the CUDA/cuDNN libraries that torch (or nvidia-* wheels) ship
        except (OSError, RuntimeError):
            return False
    return True


def resolve_provider(provider: str = "auto") -> list[str]:
    if provider not in PROVIDERS:
        raise InputError(f"unknown provider '{provider}': use one of {', '.join(PROVIDERS)}")
    if provider == "cpu" or (provider == "auto" and not _cuda_usable()):
        return ["CPUExecutionProvider"]
    if provider == "cuda" and not _cuda_usable():
        raise InputError(
            "--provider cuda asked, but CUDA is not usable here: use --provider auto or cpu"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def make_session(model: bytes, provider: str = "auto"):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: no warning spam on stderr
    try:
        return ort.InferenceSession(model, sess_options=opts, providers=resolve_provider(provider))
    except (ort.capi.onnxruntime_pybind11_state.Fail, RuntimeError) as exc:  # type: ignore[attr-defined]
        first = str(exc).strip().splitlines()[0][:200]
        raise OnnxError(f"onnxruntime cannot load this model ({first}): check the file") from None


def _check_external_data(proto, folder: Path) -> None:
    """Refuse external-data references that leave the model's folder (or are absolute)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    root = folder.resolve()
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                tensors.append(attr.t)
    for tensor in tensors:
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        target = (root / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(root):
            raise OnnxError(
                f"ONNX tensor '{tensor.name}' points to external data outside the model's folder "
                f"('{location}'): refusing to read it; keep external data beside the model"
            )
        if not target.is_file():
            raise OnnxError(
                f"ONNX tensor '{tensor.name}' needs external data '{location}', which is missing"
            )


def load_onnx(path: str | Path):
    """Load an ONNX file we may not trust: external data confined, checker clean."""
    import onnx
    from google.protobuf.message import DecodeError

    path = require_file(path, "ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise OnnxError(f"{path} is not an ONNX model ({type(exc).__name__}): check the file") from None
    if not proto.graph.node or not proto.graph.output:
        raise OnnxError(f"{path} is not an ONNX model (no graph): check the file")
    _check_external_data(proto, path.parent)
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise OnnxError(f"{path} fails the ONNX checker ({first}): it is malformed") from None
    return proto


class OnnxModel:
    """A suspect model behind onnxruntime: one input, the first output is the scores."""

    def __init__(self, path: str | Path, provider: str = "auto"):
        self.path = Path(path)
        self.proto = load_onnx(path)
        self.provider = provider
        initializers = {t.name for t in self.proto.graph.initializer}
        inputs = [i for i in self.proto.graph.input if i.name not in initializers]
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise OnnxError(
                f"{self.path} has {len(inputs)} inputs ({names}): only single-input models "
                "can be verified; export the classifier alone"
            )
        self.input_name = inputs[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        self.input_dims = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        self.output_name = self.proto.graph.output[0].name
        self.metadata = {p.key: p.value for p in self.proto.metadata_props}
        self._session = None

    @property
    def session(self):
        if self._session is None:
            self._session = make_session(self.proto.SerializeToString(), self.provider)
        return self._session

    def adapt(self, x: np.ndarray) -> np.ndarray:
        """Fit key inputs to the model's input: as they are, or reshaped when the model takes
        the same number of values per sample in another layout (e.g. flattened)."""
        want = [None, *x.shape[1:]]
        dims = self.input_dims
        if len(dims) == len(want) and all(d is None or w is None or d == w for d, w in zip(dims, want, strict=True)):
            return x
        per_sample = dims[1:]
        if per_sample and all(d is not None for d in per_sample):
            if int(np.prod(per_sample)) == int(np.prod(x.shape[1:])):
                return x.reshape(len(x), *per_sample)
        shown = ["?" if d is None else d for d in dims]
        raise OnnxError(
            f"{self.path} takes inputs of shape {shown} but the keys are samples of shape "
            f"{list(x.shape[1:])}: this model cannot be queried with these keys"
        )

    def scores(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
        """The model's first output for a batch of inputs, as (n, classes)."""
        x = self.adapt(x)
        outs = []
        for i in range(0, len(x), batch_size):
            chunk = np.ascontiguousarray(x[i : i + batch_size], dtype=np.float32)
            (out,) = self.session.run([self.output_name], {self.input_name: chunk})
            outs.append(np.asarray(out).reshape(len(chunk), -1))
        return np.concatenate(outs)

    def intermediates(self, x: np.ndarray, names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Every intermediate tensor (or just `names`) for inputs x, flattened per sample."""
        import onnx

        graph_outputs = {o.name for o in self.proto.graph.output}
        produced = [o for n in self.proto.graph.node for o in n.output if o]
        wanted = [n for n in (names or produced) if n in produced and n not in graph_outputs]
        if not wanted:  # (session.run with no names would return every graph output instead)
            return {}
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        for name in wanted:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
        session = make_session(proto.SerializeToString(), self.provider)
        chunk = np.ascontiguousarray(self.adapt(x), dtype=np.float32)
        values = session.run(wanted, {self.input_name: chunk})
        out = {}
        for name, value in zip(wanted, values, strict=True):
            value = np.asarray(value)
            if value.ndim >= 1 and value.shape[0] == len(x) and np.issubdtype(value.dtype, np.floating):
                out[name] = value.reshape(len(x), -1)
        return out
