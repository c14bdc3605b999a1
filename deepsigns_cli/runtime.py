"""onnxruntime sessions, providers, and the handling of untrusted ONNX files.

A suspect ONNX file is written by someone who may want the tool to fail, so onnxruntime
never sees it in our own process. `OnnxModel` parses and checks the file here (protobuf and
`onnx.checker` only, with external data confined to the model's folder), then evaluates it
in a worker process forked for it (`_Worker`):

- time: all of one model's runs share one budget (`timeout`, default `DEFAULT_TIMEOUT`
  seconds, session creation included). At the deadline the worker is killed. onnxruntime's
  own `RunOptions.terminate` was measured and is not enough: it is read between kernels
  only, so one long kernel (a huge MatMul) or constant folding while the session is created
  runs on regardless;
- memory: what the worker may map is limited (`RLIMIT_AS`; `RLIMIT_DATA` with CUDA) to half
  of the machine's or the container's memory on top of what it already maps, so a graph that
  asks for a huge tensor fails inside the worker instead of drawing the OOM killer onto us;
- crashes: a worker that dies (a segfault in a hostile graph) becomes an `OnnxError`;
- answers: the worker sends back plain arrays (JSON header and raw bytes, never a pickle),
  checked and bounded in size before they are believed.

The worker is forked before any session exists for the suspect, and CUDA is never touched
in our process: the provider is resolved inside the worker (CUDA cannot be used in a child
forked after the parent initialised it). Where `os.fork` does not exist the model is
evaluated in this process, bounded in time between kernels only.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import math
import operator
import os
import re
import select
import signal
import struct
import sys
import time
import weakref
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .defaults import DEFAULT_TIMEOUT
from .errors import InputError, OnnxError, OnnxTooMuch, OnnxUnread, one_line, shown
from .fileio import require_file
from .memory import limit_mapping, machine_memory

__all__ = ["resolve_provider", "make_session", "OnnxModel", "load_onnx", "DEFAULT_TIMEOUT"]

PROVIDERS = ("auto", "cpu", "cuda")

MAX_FIXED_BATCH = 4096  # a model whose batch dimension is fixed above this is refused
MAX_MODEL_BYTES = 2**31  # protobuf cannot hold more: bigger weights live in external data
# the most nodes a file's graphs may hold in all (a ResNet-50 has some 120, a large transformer
# tens of thousands): parsed and checked here, outside the worker's bounds, 4 million Identity
# nodes in a 127 MB file took a minute and 3 GB before the checker refused them
MAX_NODES = 250_000
MEMORY_LIMIT: int | None = None  # bytes a worker may map beyond what it maps at start; None: half of RAM
MAX_REPLY_BYTES = 2**30  # outputs a worker may send back for one query
_MAX_THREADS = 8  # onnxruntime threads in a worker (each reserves stack and malloc arenas)
_MIN_OPSET = 7  # the oldest default-domain opset onnxruntime runs
# of the time a model has left, what a reading of one input at a time may take (its deadline
# then stops it, not the model's: the model stays usable for the readings after it)
ALONE_SHARE = 0.8
ALONE_CHECK = 16  # inputs of a batch whose answers are checked against their answers one at a time
_EXTRA_SESSIONS = 2  # sessions with a graph's own tensors as outputs a worker keeps (one per set asked for)

# the default-domain opset from which Cast converts each element type numpy cannot hold (TensorProto
# BFLOAT16, the FLOAT8 types, UINT4, INT4, FLOAT4E2M1) to float
_CAST_SINCE = {16: 13, 17: 19, 18: 19, 19: 19, 20: 19, 21: 21, 22: 21, 23: 23}
# onnxruntime's refusal of a file of a newer IR version than it reads: (the file's, the newest it reads)
_IR_TOO_NEW = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")
_FLOAT_INPUTS = {1: np.float32, 10: np.float16, 11: np.float64}  # TensorProto FLOAT, FLOAT16, DOUBLE
_ORT_ERROR_NAMES = (
    "Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
    "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail",
    "ModelLoadCanceled", "ModelRequiresCompilation", "NotFound", "DeviceReset",
)


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


def _by_class(value: np.ndarray, single: np.ndarray, rows: np.ndarray) -> bool:
    """Whether a batch's scores, (n, n), are laid out classes by inputs: each column the answers
    to one input, the inputs' own (`single`, their answers one at a time, of inputs `rows`). A
    graph that transposes its scores answers a batch of as many inputs as it has classes in a
    shape that passes for a batch's: read as it is, 10 keys on the digits classes had counted
    a reading of classes taken for inputs beside the right one (p doubled, over alpha). Read
    transposed, it is the same reading as one input at a time; no reading is dropped, so a
    graph that answers batches otherwise than single inputs is still read both ways."""
    n = len(value)
    return (value.ndim == 2 and value.shape == (n, n) and single.shape == (len(rows), n)
            and _alike(single, value.T[rows]))


def _alike(a: np.ndarray, b: np.ndarray) -> bool:
    """Two answers to the same inputs that agree as far as one computation and another of the
    same function can (a batch's kernels round otherwise than a single input's)."""
    return np.allclose(a, b, rtol=1e-3, atol=1e-5, equal_nan=True)


@lru_cache(maxsize=1)
def _cuda_usable() -> bool:
    """True only when CUDA really works here (not merely compiled into onnxruntime-gpu).

    Initialises CUDA (cuInit): call it only where the session will run, never in a process
    that forks workers afterwards."""
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


def _check_provider_name(provider: str) -> None:
    if provider not in PROVIDERS:
        raise InputError(f"unknown provider {one_line(repr(provider), 60)}: use one of {', '.join(PROVIDERS)}")


def resolve_provider(provider: str = "auto") -> list[str]:
    _check_provider_name(provider)
    if provider == "cpu" or (provider == "auto" and not _cuda_usable()):
        return ["CPUExecutionProvider"]
    if provider == "cuda" and not _cuda_usable():
        raise InputError(
            "--provider cuda asked, but CUDA is not usable here: use --provider auto or cpu"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


@lru_cache(maxsize=1)
def _ort_errors() -> tuple[type[BaseException], ...]:
    """What onnxruntime raises on a bad model: its own pybind exceptions (each derives from
    Exception directly, not from RuntimeError) and the standard ones pybind11 translates
    C++ exceptions to (std::bad_alloc is MemoryError; a name that is not UTF-8 is a
    UnicodeDecodeError, a ValueError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    own = tuple(getattr(state, name) for name in _ORT_ERROR_NAMES if isinstance(getattr(state, name, None), type))
    return (*own, RuntimeError, ValueError, TypeError, OverflowError, MemoryError)


def _session(model: bytes, providers: list[str], threads: int | None = None):
    """An InferenceSession in this process; onnxruntime's errors propagate."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # fatal only: failures come back as exceptions, not log lines
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model, sess_options=opts, providers=providers)


def make_session(model: bytes, provider: str = "auto"):
    """An onnxruntime session in this process, for a model we made ourselves (export's
    parity check). Suspect files go through OnnxModel, which evaluates them in a worker."""
    providers = resolve_provider(provider)
    try:
        return _session(model, providers)
    except _ort_errors() as exc:
        raise OnnxError(f"onnxruntime cannot load this model ({_ort_text(exc)}): check the file") from None


# --------------------------------------------------------------------------- loading


def _graphs(proto):
    """Every graph and function body of a model, subgraphs included (iterative: a deeply
    nested file cannot exhaust Python's recursion limit here)."""
    return _within(proto.graph, *proto.functions)


def _within(*roots):
    """The graphs (or function bodies) `roots` and every subgraph of their nodes."""
    stack = list(roots)
    while stack:
        graph = stack.pop()
        yield graph
        for node in graph.node:
            stack.extend(_subgraphs(node))


def _subgraphs(node) -> list:
    """The graphs a node holds (an If's branches, a Loop's body)."""
    return [g for attr in node.attribute for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)]


def _tensors(proto):
    """Every TensorProto of a model: initializers, sparse tensors' parts, attributes."""
    for graph in _graphs(proto):
        yield from getattr(graph, "initializer", ())
        for sparse in getattr(graph, "sparse_initializer", ()):
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                sparse_list = [*attr.sparse_tensors, *([attr.sparse_tensor] if attr.HasField("sparse_tensor") else [])]
                for sparse in sparse_list:
                    yield sparse.values
                    yield sparse.indices


def _is_external(tensor) -> bool:
    from onnx import TensorProto

    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def _tensor_name(tensor) -> str:
    name = tensor.name
    return one_line(name if isinstance(name, str) else repr(name), 80)


def _check_external_data(proto, folder: Path, budget: int) -> None:
    """Refuse external-data references that leave the model's folder (or are absolute), or
    whose offset or length is not a byte range of a regular file there, or that would read
    more than `budget` bytes in all (a sparse file beside the model costs its maker nothing)."""
    root = folder.resolve()
    total = 0
    for tensor in _tensors(proto):
        if not _is_external(tensor):
            continue
        name = _tensor_name(tensor)
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        if not isinstance(location, str) or "\x00" in location or not location:
            raise OnnxError(f"ONNX tensor '{name}' has an unusable external-data location "
                            f"({one_line(repr(location), 80)}): the file is malformed")
        shown_location = one_line(location, 120)
        try:
            target = (root / location).resolve()
            outside = os.path.isabs(location) or not target.is_relative_to(root)
            is_file = not outside and target.is_file()
            size = target.stat().st_size if is_file else 0
        except (OSError, ValueError) as exc:  # a name too long, a loop of links
            raise OnnxError(f"ONNX tensor '{name}' has an unusable external-data location "
                            f"('{shown_location}': {one_line(exc, 80)}): the file is malformed") from None
        if outside:
            raise OnnxError(
                f"ONNX tensor '{name}' points to external data outside the model's folder "
                f"('{shown_location}'): refusing to read it; keep external data beside the model"
            )
        if not is_file:
            raise OnnxError(
                f"ONNX tensor '{name}' needs external data '{shown_location}', which is missing "
                "(or not a regular file): put it beside the model"
            )
        numbers = {}
        for key in ("offset", "length"):
            text = entries.get(key)
            if text is None:
                continue
            if not isinstance(text, str) or not re.fullmatch(r"[0-9]{1,20}", text):
                raise OnnxError(f"ONNX tensor '{name}' has an external-data {key} that is not a "
                                f"byte count ({one_line(repr(text), 40)}): the file is malformed")
            numbers[key] = int(text)
        offset = numbers.get("offset", 0)
        if offset + numbers.get("length", 0) > size:
            raise OnnxError(f"ONNX tensor '{name}' asks for bytes beyond the end of its external data "
                            f"'{shown_location}' ({size} bytes): the file is malformed or truncated")
        total += numbers.get("length", size - offset)
        if total > budget:
            raise OnnxError(f"ONNX tensor '{name}' brings the model's external data beyond the {MAX_MODEL_BYTES >> 20} "
                            "MiB that onnxruntime takes with the graph: deepsigns does not load it")


# what onnx.checker and onnx's external-data loader raise besides ValidationError: a name
# that is not UTF-8 (UnicodeDecodeError), C++ exceptions pybind11 translates (std::out_of_range
# is IndexError, std::exception RuntimeError), RecursionError, and MemoryError
_CHECKER_ERRORS = (ValueError, TypeError, RuntimeError, LookupError, OverflowError, MemoryError, OSError)


def load_onnx(path: str | Path):
    """Load an ONNX file we may not trust: external data confined, checker clean."""
    import onnx
    from google.protobuf.message import DecodeError, EncodeError

    path = require_file(path, "ONNX model")
    p = shown(path)
    try:
        size = path.stat().st_size
        if size > MAX_MODEL_BYTES:
            raise OnnxError(f"{p} is {size} bytes, more than protobuf can hold (2 GiB): it is not "
                            "a valid ONNX model; keep large weights as external data beside it")
        data = path.read_bytes()
    except OSError as exc:
        raise OnnxError(f"{p} cannot be read ({one_line(exc)}): check the file") from None
    proto = onnx.ModelProto()
    try:  # always binary protobuf, whatever the file's name says
        proto.ParseFromString(data)
    except (DecodeError, RecursionError, ValueError, RuntimeError, MemoryError) as exc:
        raise OnnxError(f"{p} is not an ONNX model ({type(exc).__name__}): check the file") from None
    del data
    if not proto.graph.node or not proto.graph.output:  # (a graph with none computes or answers nothing)
        which = "no graph" if not proto.HasField("graph") else "no nodes" if not proto.graph.node else "no outputs"
        raise OnnxError(f"{p} is not an ONNX model deepsigns can read ({which}): check the file")
    nodes = sum(len(graph.node) for graph in _graphs(proto))
    if nodes > MAX_NODES:
        raise OnnxError(f"{p} holds {nodes} nodes, more than deepsigns checks and runs ({MAX_NODES}): it is "
                        "not a model deepsigns can read")
    # (the graph and its external data go to onnxruntime as one protobuf: 2 GiB in all)
    _check_external_data(proto, path.parent, MAX_MODEL_BYTES - size)
    import warnings

    try:
        with warnings.catch_warnings():  # onnx warns about unknown external-data keys
            warnings.simplefilter("ignore")
            onnx.load_external_data_for_model(proto, str(path.parent))
        if any(_is_external(t) for t in _tensors(proto)):
            raise OnnxError(f"{p} keeps tensors in external data where onnx does not load it "
                            "(a sparse tensor): deepsigns cannot check it; save the model with its data inline")
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, DecodeError, EncodeError, *_CHECKER_ERRORS) as exc:
        raise OnnxError(f"{p} fails the ONNX checker ({one_line(exc)}): it is malformed") from None
    return _inlined(proto)


def _function_sizes(functions: dict) -> dict | None:
    """(domain, name) -> the nodes of that function once inlined (at most MAX_NODES + 1); None
    when a function calls itself. Depth first without recursion: a chain of calls may be long."""
    size: dict = {}
    state: dict = {}  # 1: being sized (on the path), 2: sized

    def nodes(key):  # (a subgraph's nodes too: an If or Loop body is copied at every call)
        return (n for graph in _within(functions[key]) for n in graph.node)

    def callees(key):
        return iter(dict.fromkeys((n.domain, n.op_type) for n in nodes(key) if (n.domain, n.op_type) in functions))

    for root in functions:
        if root in state:
            continue
        state[root], path = 1, [(root, callees(root))]
        while path:
            key, pending = path[-1]
            callee = next(pending, None)
            if callee is None:
                size[key] = min(sum(size.get((n.domain, n.op_type), 1) for n in nodes(key)), MAX_NODES + 1)
                state[key] = 2
                path.pop()
            elif state.get(callee) == 1:
                return None
            elif callee not in state:
                state[callee] = 1
                path.append((callee, callees(callee)))
    return size


def _inlined(proto):
    """The model with its local functions inlined, when it has any and that stays within
    MAX_NODES; else as it is. The same computation, but every tensor it computes is then a
    tensor of the graph: one a white-box reading can ask for (exporters write a module as a
    function; a thief can wrap the whole network in one)."""
    import onnx
    import onnx.inliner

    if not proto.functions:
        return proto
    functions = {(f.domain, f.name): f for f in proto.functions}
    if len(functions) != len(proto.functions):
        return proto  # (overloads of one name: sized as one, one could hide a chain of calls)
    if any(attr.ref_attr_name and attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for graph in _within(*proto.functions) for n in graph.node for attr in n.attribute):
        return proto  # (a graph passed by reference is copied at every use: its size is the caller's, unbounded here)
    size = _function_sizes(functions)
    if size is None:
        return proto  # a function that calls itself: onnxruntime refuses the model
    nodes = sum(size.get((n.domain, n.op_type), 1) for graph in _within(proto.graph) for n in graph.node)
    if nodes > MAX_NODES:
        return proto
    try:
        return onnx.inliner.inline_local_functions(proto)
    except _CHECKER_ERRORS:
        return proto


# --------------------------------------------------------------------------- the worker's side


class _Failure(Exception):
    """Why a query failed, as the worker reports it: kind is input, load, run, memory or size."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def _output_problem(value, fed: int) -> str | None:
    """Why one output of a query cannot be read as per-sample values (None when it can)."""
    if not isinstance(value, np.ndarray):
        return "is a sequence or a map, not a tensor"
    kinds = {"b": "bool", "O": "string", "U": "string", "S": "string", "c": "complex"}
    if value.dtype.kind not in "fiu":
        return f"holds {kinds.get(value.dtype.kind, str(value.dtype))} values, not numbers"
    if value.ndim == 0 or value.shape[0] != fed:
        return f"has shape {list(value.shape)} for a batch of {fed} inputs: its first dimension is not the batch"
    return None


_MAX_MAP_CLASS = 1 << 16  # a map of probabilities may name classes 0 .. this - 1


def _maps_to_rows(value) -> np.ndarray | str:
    """A sequence of maps {class: probability} (skl2onnx's ZipMap) as rows (n, classes)
    ordered by class, -inf where a map lacks a class; or why it cannot be read so."""
    if not all(isinstance(m, dict) for m in value):
        return "is a sequence of something other than maps, not class probabilities"
    keys = sorted({k for m in value for k in m}) if value else []
    if not keys or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool)
                            and 0 <= k < _MAX_MAP_CLASS for k in keys):
        return (f"maps classes that are not integers from 0 to {_MAX_MAP_CLASS - 1}: "
                "deepsigns reads integer class labels")
    rows = np.full((len(value), int(keys[-1]) + 1), -np.inf)
    try:
        for i, m in enumerate(value):
            for k, v in m.items():
                rows[i, int(k)] = float(v)
    except (TypeError, ValueError, OverflowError):
        return "maps classes to values that are not numbers"
    return rows


# where quantized operators declare the (scale, zero point) of the integer tensors they read and
# write, as input positions: op -> ((tensor, scale, zero point) of each input read, (scale, zero
# point) of the output). The contrib operators of onnxruntime's quantizer are in com.microsoft
_QUANTIZED = {
    ("", "QuantizeLinear"): ((), (1, 2)),
    ("", "QLinearConv"): (((0, 1, 2),), (6, 7)),
    ("", "QLinearMatMul"): (((0, 1, 2), (3, 4, 5)), (6, 7)),
    ("com.microsoft", "QGemm"): (((0, 1, 2), (3, 4, 5)), (7, 8)),
    **{("com.microsoft", op): (((0, 1, 2), (3, 4, 5)), (6, 7)) for op in ("QLinearAdd", "QLinearMul")},
    **{("com.microsoft", op): (((0, 1, 2),), (3, 4)) for op in (
        "QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax", "QLinearAveragePool", "QLinearGlobalAveragePool")},
}
# operators whose output holds values of their first input, moved or picked: an integer output
# is read as the input is
_PASSING = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "MaxPool"}


def _dequantized(graph) -> dict[str, tuple[float, float]]:
    """The integer tensors of `graph` whose quantized operators declare a constant (scale, zero
    point): tensor -> (scale, zero point). Static quantisation in onnxruntime's QOperator format
    computes a network's hidden activations as uint8 (QGemm, QLinearConv), which had been passed
    over, and a quantized copy of a marked model read as not detected. What the producer declares
    comes first, then the first reader's. A declaration is the file's word, so it only saves a
    reading: one as declared reads the units as they are, and the reading over each unit's
    offset (schemes/hidden.py) needs none (a decoy DequantizeLinear at another zero point, or a
    reader that declares one first, shifts every unit alike)."""
    from onnx import numpy_helper

    constants = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    constants[node.output[0]] = attr.t

    def number(name: str, real: bool) -> float | None:
        tensor = constants.get(name)
        if tensor is None or _is_external(tensor) or math.prod(tensor.dims) != 1:
            return None
        try:
            value = numpy_helper.to_array(tensor)
        except _CHECKER_ERRORS:
            return None
        if value.size != 1 or value.dtype.kind not in ("f" if real else "iu"):
            return None
        value = float(value.reshape(()))
        return value if math.isfinite(value) and (value > 0 or not real) else None

    def declared(node, scale: int, zero: int) -> tuple[float, float] | None:
        inputs = node.input
        s = number(inputs[scale], True) if scale < len(inputs) else None
        z = (number(inputs[zero], False) if inputs[zero] else 0.0) if zero < len(inputs) else 0.0
        return None if s is None or z is None else (s, z)

    found: dict[str, tuple[float, float]] = {}
    read: dict[str, tuple[float, float]] = {}  # (declared by a reader)
    for node in graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        if domain == "" and node.op_type in _PASSING and node.input and node.input[0] in found and node.output:
            found.setdefault(node.output[0], found[node.input[0]])
        rule = _QUANTIZED.get((domain, node.op_type))
        if rule is None:
            continue
        for tensor, scale, zero in rule[0]:
            if tensor < len(node.input) and node.input[tensor] and node.input[tensor] not in read:
                if (pair := declared(node, scale, zero)) is not None:
                    read[node.input[tensor]] = pair
        if node.output and node.output[0] and (pair := declared(node, *rule[1])) is not None:
            found.setdefault(node.output[0], pair)
    for name, pair in read.items():
        found.setdefault(name, pair)
    return found


def _as_reals(value: np.ndarray, declared: tuple[float, float] | None) -> np.ndarray:
    """An integer tensor of the graph as float32: (q - zero point) x scale where the graph
    declares them (`_dequantized`), else its integers as they are."""
    if declared is None:
        return value.astype(np.float32)
    scale, zero = declared
    return ((value.astype(np.float64) - zero) * scale).astype(np.float32)


class _Evaluator:
    """One model in onnxruntime, in the process that runs it (the worker, or ours where
    fork is missing). Raises _Failure; never touches anything but its own sessions."""

    def __init__(self, proto, input_name: str, provider: str):
        self.proto, self.input_name, self.provider = proto, input_name, provider
        self.providers: list[str] | None = None
        self.sessions: dict[tuple[str, ...], object] = {}
        self.run_options = None
        self.dequantized: dict[str, tuple[float, float]] | None = None  # (_dequantized, on first use)
        self.casts: dict[str, str] | None = None  # (`_casts`, on first use)

    def prepare(self) -> None:
        """Resolve the provider (this initialises CUDA when it is asked for or usable)."""
        if self.providers is not None:
            return
        import onnxruntime as ort

        try:
            providers = resolve_provider(self.provider)
        except InputError as exc:
            raise _Failure("input", str(exc)) from None
        self.run_options = ort.RunOptions()
        self.run_options.log_severity_level = 4
        self.providers = providers

    def _session(self, extra: tuple[str, ...]):
        if extra in self.sessions:
            return self.sessions[extra]
        self.prepare()
        if extra:  # (each holds the model's weights: at most _EXTRA_SESSIONS of them, the oldest let go)
            kept = [key for key in self.sessions if key]
            for key in kept[: max(0, len(kept) - _EXTRA_SESSIONS + 1)]:
                del self.sessions[key]
        proto = self.proto
        if extra:
            import onnx

            casts = self._casts()
            proto = onnx.ModelProto()
            proto.CopyFrom(self.proto)
            outputs = {o.name for o in proto.graph.output}
            for name in extra:
                if casts.get(name):
                    proto.graph.node.append(onnx.helper.make_node("Cast", [name], [casts[name]],
                                                                  to=onnx.TensorProto.FLOAT))
                    proto.graph.output.append(onnx.ValueInfoProto(name=casts[name]))
                elif name not in outputs:  # (a graph output asked for again would be a duplicate)
                    proto.graph.output.append(onnx.ValueInfoProto(name=name))
        threads = _MAX_THREADS if (os.cpu_count() or 1) > _MAX_THREADS else None
        try:
            try:
                session = _session(proto.SerializeToString(), self.providers, threads)
            except _ort_errors() as exc:
                readable = _IR_TOO_NEW.search(str(exc))
                if readable is None or int(readable[1]) <= int(readable[2]):
                    raise
                # onnx writes its newest IR version by default, which an onnxruntime of its day
                # may not read yet (onnx 1.23's 14 against onnxruntime 1.31's 13, for a graph made
                # with onnx.helper). A version only adds to what a file may hold: one that holds
                # nothing newer reads the same, and one that does fails as it loads
                self.proto.ir_version = proto.ir_version = int(readable[2])  # (proto: a copy, with extra outputs)
                session = _session(proto.SerializeToString(), self.providers, threads)
        except _ort_errors() as exc:
            raise _Failure(_kind(exc, "load"), _ort_text(exc)) from None
        self.sessions[extra] = session
        return session

    def _casts(self) -> dict[str, str]:
        """The graph's tensors of a type numpy cannot hold (bfloat16, float8, 4-bit integers;
        as shape inference types them) -> the name of a Cast of each to float32 that a reading
        adds: onnxruntime returns none of them, and one such tensor anywhere in a graph had
        failed every reading of it (exit 2)."""
        if self.casts is None:
            import onnx
            import onnx.shape_inference

            self.casts = {}
            try:
                typed = onnx.shape_inference.infer_shapes(self.proto).graph
            except (*_CHECKER_ERRORS, onnx.shape_inference.InferenceError):
                return self.casts
            graph = self.proto.graph
            # (every name of the model, subgraphs' and sparse initializers' included: a Cast named like
            # one of them had made a graph that onnxruntime refused, "duplicate definition")
            taken = {name for g in _within(graph) for name in (
                *(o for n in g.node for o in (*n.input, *n.output)), *(i.name for i in (*g.input, *g.output)),
                *(t.name for t in g.initializer), *(t.values.name for t in g.sparse_initializer))}
            types = {info.name: info.type.tensor_type.elem_type for info in (*typed.value_info, *typed.output)
                     if info.type.WhichOneof("value") == "tensor_type"}
            constants = {t.name: t.data_type for t in graph.initializer}
            for node in graph.node:  # (a QuantizeLinear of onnxruntime's domain, which inference does not type,
                # gives its zero point's type: 4-bit activations in its QDQ format)
                if node.op_type == "QuantizeLinear" and len(node.input) > 2 and node.output and node.output[0]:
                    types.setdefault(node.output[0], constants.get(node.input[2], 0))
            opset = max((o.version for o in self.proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
            for tensor, elem in types.items():
                if elem >= onnx.TensorProto.BFLOAT16:
                    name = f"{tensor} as float32"
                    while name in taken:
                        name += "'"
                    taken.add(name)
                    # (none where the graph's opset cannot cast it: the tensor is not asked for)
                    self.casts[tensor] = name if opset >= _CAST_SINCE.get(elem, 1 << 30) else ""
        return self.casts

    def answer(self, header: dict, x: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
        """`run` as a query's header asks (`OnnxModel._query`)."""
        return self.run(header["names"], header["extra"], x, header["step"], header["batch"], header.get("width"),
                        header.get("units"), bool(header.get("alone")), header.get("within"))

    def run(self, names: list[str], extra: bool, x: np.ndarray, step: int, batch: int | None,
            width: int | None = None, units: int | None = None, alone: bool = False,
            within: float | None = None) -> tuple[dict[str, np.ndarray], dict]:
        """Outputs `names` for inputs x, fed `step` at a time (padded to `batch` when the
        model's batch is fixed): (usable arrays (n, ...), the facts of the others: "problems",
        why each is not usable; "left_out", the tensors `units` left out -> their values per
        sample; "copies", the tensors left out as copies of another -> that one; "unsteady", with
        `alone`, the tensors whose shape changed from one input to the next). With `width`, only
        tensors of that many values per sample are kept (and sent back); with `units`, tensors of
        numbers in the order of `names` while their values per sample add up to at most that
        many. Tensors of the graph (`extra`) may hold the batch on another axis (a graph that
        computes (units, batch)): it is the one axis whose length is the batch's in every batch fed (the callers
        feed batches of two lengths, so that an axis whose length only happens to be one of
        them, 448 units for 448 inputs, is not taken for it); a tensor with no such axis, or
        more than one, is left out (`units`) as one that was not read. Integer tensors of the
        graph come back as float32 (`_as_reals`). `alone` (the graph's tensors, `step` 1): every
        tensor is read as its one input's values, whatever its axes (`_one_input`), within
        `within` seconds (None: no limit of its own)."""
        problems: dict[str, str] = {}
        if extra:  # (a tensor numpy cannot hold and the graph cannot cast is not asked for)
            kept = [name for name in names if self._casts().get(name) != ""]
            problems = {name: "holds values of a type that neither numpy nor this graph's opset can read as numbers"
                        for name in names if name not in kept}
            names = kept
        session = self._session(tuple(names) if extra else ())
        if extra and self.dequantized is None:
            self.dequantized = _dequantized(self.proto.graph)
        parts: dict[str, list[tuple[np.ndarray, int, int]]] = {name: [] for name in names}  # (value, fed, real)
        axes: dict[str, set[int]] = {}  # (extra) the axes that may hold the batch, in every batch so far
        left_out: dict[str, int] = {}
        total, taken = 0, 0
        unsteady: list[str] = []  # (alone) the tensors whose shape changed from one input to the next
        seen: dict[bytes, str] = {}  # a tensor's values in the first batch (a digest) -> the first that held them
        twins: dict[str, str] = {}  # tensor -> the earlier one it has held the same values as, in every batch so far
        began = time.monotonic()
        try:
            for start in range(0, len(x), step):
                if within is not None and time.monotonic() - began > within:
                    raise _Failure("slow", f"it took more than {within:.3g} s to answer the keys' inputs one at a time")
                chunk = x[start : start + step]
                real = len(chunk)
                if batch is not None and real < batch:
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - real, axis=0)])
                values = session.run([self.casts.get(name, name) for name in names] if extra else names,
                                     {self.input_name: chunk}, self.run_options)
                fed = 1 if alone else len(chunk)  # (the rows of a tensor's batch axis)
                digests: dict[str, bytes] = {}  # (this batch's)
                # (after the first batch, only copies and what they copy are hashed: the other
                # tensors can no longer be found to be copies; an adversary's decoys had spent a
                # third of a reading one input at a time hashing every tensor for every input)
                watched = twins.keys() | set(twins.values())
                for name, value in zip(names, values, strict=True):
                    if name in problems:
                        continue
                    if isinstance(value, list) and not extra:  # a sequence of maps (ZipMap)
                        value = _maps_to_rows(value)
                        if isinstance(value, str):
                            problems[name] = value
                            parts[name] = []
                            continue
                    if alone and isinstance(value, np.ndarray):
                        value = _one_input(value, len(chunk))
                    moved = extra and isinstance(value, np.ndarray) and value.ndim > 1
                    if moved:  # (the batch's axis decided when every batch is in; the checks below hold for any)
                        fits = {0} if alone else {i for i, d in enumerate(value.shape) if d == fed}
                        if len(fits) > 1 and real < fed:  # (padded to a fixed batch: see _padded_axes)
                            fits = _padded_axes(value, fits, real)
                        axes[name] = axes[name] & fits if name in axes else fits
                        problem = _output_problem(value, fed) \
                            if not axes[name] or value.dtype.kind not in "fiu" else None
                    else:
                        problem = _output_problem(value, fed)
                    # (values per sample, on any axis; the first batch's for a later one)
                    size = (parts[name][0][0].size // parts[name][0][1] if parts[name] else value.size // fed) \
                        if problem is None else 0
                    if problem is None and parts[name] and (value.size != size * fed if moved else
                                                            value.shape[1:] != parts[name][0][0].shape[1:]):
                        problem = "changes shape from one batch of inputs to the next"
                        if alone:  # (a tensor whose shape the input decides: a reading that misses it says so)
                            unsteady.append(name)
                    if problem is None and width is not None and size != width:
                        problem = f"has {size} values per sample, not {width}"
                    fresh = not parts[name]  # (its first batch)
                    if problem is None and extra and value.dtype.kind in "iu" \
                            and (units is None or not fresh or taken + size <= units):
                        # an integer tensor as the reals it stands for, before it is compared with
                        # others (a Cast to int16 of a uint8 copy is a copy); one too wide for the
                        # units left is let go as it is (it was 3.5 GiB more as float64)
                        value = _as_reals(value, self.dequantized.get(name))
                    if problem is None and extra and (start == 0 or name in watched):
                        # a copy of an earlier tensor is left out, if it is one in every batch: a
                        # graph can make a tensor copy the carrier at one batch length alone, and a
                        # copy judged on the first batch had hidden the carrier from every reading
                        # (SHA-256: 2.6 times as fast as BLAKE2b where the CPU has SHA instructions,
                        # as this project's machines do)
                        digests[name] = hashlib.sha256(np.ascontiguousarray(value).view(np.uint8)).digest()
                        if fresh and start == 0 and digests[name] in seen:  # (seen: tensors kept, below)
                            twins[name] = seen[digests[name]]
                        elif name in twins and digests.get(twins[name]) != digests[name]:  # (no copy after all)
                            del twins[name]
                            fresh = True
                            total += sum(part[0].nbytes for part in parts[name])
                        if name in twins:  # (the twin's own array: a copy takes no memory while it is one)
                            parts[name].append(parts[twins[name]][-1])
                            continue
                    if problem is None and units is not None and fresh:  # (decided on the first batch it is read)
                        if value.dtype.kind not in "fiu" or taken + size > units:
                            problem = f"is not among the first {units} values per sample"
                            if value.dtype.kind in "fiu":
                                left_out[name] = size
                        else:
                            taken += size
                    if problem is not None:
                        problems[name] = problem
                        parts[name] = []
                        continue
                    if value.dtype == np.float16:
                        value = value.astype(np.float32)
                    total += value.nbytes
                    if total > MAX_REPLY_BYTES:
                        raise _Failure("size", f"the outputs exceed {MAX_REPLY_BYTES >> 20} MiB")
                    parts[name].append((value, fed, real))
                    if fresh and start == 0 and name in digests:  # (a later copy of it is left out)
                        seen.setdefault(digests[name], name)
        except _ort_errors() as exc:
            raise _Failure(_kind(exc, "alone" if alone else "run"), _ort_text(exc)) from None
        for name, twin in twins.items():
            problems[name] = f"holds the same values as '{twin}'"
        out = {}
        for name, chunks in parts.items():
            if not chunks or name in problems:
                continue
            if name in axes:
                if len(axes[name]) != 1:  # (no axis: no batch, as a constant; several: which, none can tell)
                    problems[name] = (f"has shape {list(chunks[0][0].shape)} for a batch of {chunks[0][1]} inputs: "
                                      f"{'no' if not axes[name] else 'more than one'} axis of it is the batch")
                    if axes[name] and units is not None:  # (a reading missed it)
                        left_out[name] = chunks[0][0].size // chunks[0][1]
                    continue
                (axis,) = axes[name]
                chunks = [(np.moveaxis(value, axis, 0), fed, real) for value, fed, real in chunks]
                if len({value.shape[1:] for value, _, _ in chunks}) > 1:
                    problems[name] = "changes shape from one batch of inputs to the next"
                    continue
            out[name] = np.concatenate([value[:real] for value, _, real in chunks])
        return out, {"problems": problems, "copies": twins, "unsteady": unsteady,
                     "left_out": {name: size for name, size in left_out.items() if name in problems}}


def _one_input(value: np.ndarray, fed: int) -> np.ndarray:
    """A tensor the graph computed for one input (fed `fed` times: a fixed batch is filled with
    copies of it) as that input's values, (1, values): along an axis of the batch's length
    whose slices are all alike, one of them; anything else whole. A graph that pads its batch,
    merges it with another axis or reorders its rows moves no other input's values into it."""
    if fed > 1:
        for axis, length in enumerate(value.shape):
            if length == fed:
                rows = np.moveaxis(value, axis, 0)
                if (rows == rows[:1]).all():
                    value = rows[:1]
                    break
    # (a copy: a view of one row had kept the whole batch alive, 64 times what the reply counted)
    return np.array(value.reshape(1, -1))


def _from_input(graph, name: str) -> set[str]:
    """The tensors of `graph` computed from its input `name`, however its nodes are ordered (a
    node's subgraphs count as its inputs): the others hold the same values for every input."""
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for used in itertools.chain(node.input, (used for g in _within(*_subgraphs(node))
                                                 for n in g.node for used in n.input)):
            readers.setdefault(used, []).append(i)
    reached, todo, done = {name}, [name], set()
    while todo:
        for i in readers.get(todo.pop(), ()):
            if i not in done:
                done.add(i)
                fresh = [o for o in graph.node[i].output if o and o not in reached]
                reached.update(fresh)
                todo.extend(fresh)
    return reached


def _padded_axes(value: np.ndarray, axes: set[int], real: int) -> set[int]:
    """Of `axes`, those that can hold a batch padded with copies of its last input (row `real`
    - 1): along the batch's axis, the rows from there on are alike. A model whose batch is fixed
    at its carrier's width (512 and 512) has two axes of the batch's length in every batch fed;
    none could be told apart, and the carrier was left unread (no verdict)."""
    kept = set()
    for axis in axes:
        tail = np.moveaxis(value, axis, 0)[real - 1:]
        if (tail == tail[:1]).all():
            kept.add(axis)
    return kept


def _axes_merged(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether one layout is the other with neighbouring axes merged (or split), axes of
    length 1 aside: (1, 8, 8), (64,) and (8, 8) are one layout, as are (3, 8, 8) and (3, 64);
    (3, 8, 8) and (8, 8, 3) are not, though a reshape takes one to the other."""
    def bounds(shape):
        return set(itertools.accumulate((d for d in shape if d != 1), operator.mul))

    first, second = bounds(a), bounds(b)
    return first <= second or second <= first


def _ort_text(exc: BaseException) -> str:
    """onnxruntime's message without its status prefix and C++ source locations."""
    text = one_line(exc, 2000)
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"/onnxruntime_src/\S+:\d+ (?:[^()]*\([^()]*\)(?: const)? )?", "", text)
    return one_line(text)


def _kind(exc: BaseException, default: str) -> str:
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "bad_alloc" in text or "bad allocation" in text \
            or "failed to allocate" in text or "out of memory" in text:
        return "memory"
    return default


# --------------------------------------------------------------------------- messages between processes
# A frame: two little-endian u64 (header length, data length), a JSON header, raw array bytes.
# The header lists each array as [dtype, shape]; only numeric dtypes are accepted, so a
# worker that a hostile graph has subverted can send wrong numbers at worst, never objects.

_DTYPE = re.compile(r"[<>|=][fiu][1248]")


def _pack(header: dict, arrays: list[np.ndarray]) -> bytes:
    arrays = [np.ascontiguousarray(a) for a in arrays]
    header = {**header, "arrays": [[a.dtype.str, list(a.shape)] for a in arrays]}
    head = json.dumps(header).encode("utf-8")
    data = b"".join(a.tobytes() for a in arrays)
    return struct.pack("<QQ", len(head), len(data)) + head + data


def _unpack(head: bytes, data: bytearray) -> tuple[dict, list[np.ndarray]]:
    """Raises ValueError when the frame is not one of ours."""
    header = json.loads(head.decode("utf-8"))
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
        raise ValueError("no array list")
    arrays, offset = [], 0
    for spec in header["arrays"]:
        if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str)
                and _DTYPE.fullmatch(spec[0]) and isinstance(spec[1], list)
                and all(type(d) is int and 0 <= d < 2**40 for d in spec[1])):
            raise ValueError("bad array description")
        dtype = np.dtype(spec[0])
        nbytes = math.prod(spec[1]) * dtype.itemsize
        if offset + nbytes > len(data):
            raise ValueError("short data")
        arrays.append(np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize,
                                    offset=offset).reshape(tuple(spec[1])))
        offset += nbytes
    if offset != len(data):
        raise ValueError("extra data")
    return header, arrays


class _Dead(Exception):
    """The worker is gone (it crashed or closed its pipe)."""


class _Late(Exception):
    """The deadline passed."""


def _wait(fd: int, write: bool, deadline: float | None) -> None:
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise _Late
        ready = select.select([], [fd], [], left) if write else select.select([fd], [], [], left)
        if ready[1 if write else 0]:
            return


def _write_all(fd: int, data: bytes, deadline: float | None) -> None:
    view = memoryview(data)
    while view:
        _wait(fd, True, deadline)
        try:
            n = os.write(fd, view[: 1 << 20])
        except (BrokenPipeError, ConnectionResetError):
            raise _Dead from None
        view = view[n:]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytearray:
    out = bytearray()
    while len(out) < n:
        _wait(fd, False, deadline)
        chunk = os.read(fd, min(n - len(out), 1 << 20))
        if not chunk:
            raise _Dead
        out += chunk
    return out


def _read_frame(fd: int, deadline: float | None, limit: int) -> tuple[dict, list[np.ndarray]]:
    head_len, data_len = struct.unpack("<QQ", _read_exact(fd, 16, deadline))
    if head_len > 1 << 20 or data_len > limit:
        raise ValueError("frame too large")
    head = bytes(_read_exact(fd, head_len, deadline))
    return _unpack(head, _read_exact(fd, data_len, deadline))


# --------------------------------------------------------------------------- the worker process


def _memory_limit() -> int:
    """Bytes a worker may add to its address space: MEMORY_LIMIT, else half of the machine's
    memory (or of the container's limit, when lower), at least 1 GiB."""
    if MEMORY_LIMIT is not None:
        return int(MEMORY_LIMIT)
    return max(1 << 30, machine_memory() // 2)


def _above_stdio(fd: int) -> int:
    """fd itself, or a copy numbered 3 or above (stdin/stdout/stderr are about to be replaced)."""
    if fd > 2:
        return fd
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD, 3)


def _child_setup(parent: int) -> None:
    """In the forked worker: die with the parent, stay silent, leave Ctrl-C to the parent,
    write no core file."""
    import gc
    import resource

    gc.disable()  # no finalizers of objects inherited from the parent (their workers are not ours)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the main thread
        pass
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # onnxruntime and CUDA may print; a hostile graph must not reach our output
        os.dup2(null, fd)
    os.close(null)
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass


def _limit_memory(providers: list[str] | None) -> None:
    """Cap what the worker may map from now on at _memory_limit() more than it maps now (with
    CUDA, its private writable memory: see memory.limit_mapping)."""
    limit_mapping(_memory_limit(), cuda=bool(providers) and providers[0] != "CPUExecutionProvider")


def _serve(evaluator: _Evaluator, rfd: int, wfd: int) -> None:
    """The worker's loop: one request in, one reply out, until the parent closes the pipe."""
    limited = False
    while True:
        try:
            header, arrays = _read_frame(rfd, None, 1 << 40)
        except (_Dead, ValueError):
            return
        if not limited:
            # after the provider is resolved (CUDA maps its address space when initialised),
            # before any session exists (constant folding may allocate at session creation)
            try:
                evaluator.prepare()
            except _Failure:
                pass  # reported by run() below
            _limit_memory(evaluator.providers)
            limited = True
        try:
            out, facts = evaluator.answer(header, arrays[0])
            names = list(out)
            reply = _pack({"ok": True, "names": names, **facts}, [out[n] for n in names])
        except _Failure as failure:
            reply = _pack({"ok": False, "kind": failure.kind, "message": failure.message}, [])
        except MemoryError:
            reply = _pack({"ok": False, "kind": "memory", "message": "out of memory"}, [])
        try:
            _write_all(wfd, reply, None)
        except _Dead:
            return


class _Worker:
    """A forked process evaluating one model; killed at its deadline, when it is stopped or
    garbage-collected, and when our process exits."""

    def __init__(self, evaluator: _Evaluator):
        import onnxruntime  # noqa: F401  (imported once here, shared with every worker)

        parent = os.getpid()
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the caller's code
            try:
                os.close(req_w)
                os.close(rep_r)
                rfd, wfd = _above_stdio(req_r), _above_stdio(rep_w)
                _child_setup(parent)
                keep = sorted((rfd, wfd))
                os.closerange(3, keep[0])  # other workers' pipes, our caller's files
                os.closerange(keep[0] + 1, keep[1])
                os.closerange(keep[1] + 1, 1 << 16)
                _serve(evaluator, rfd, wfd)
            finally:
                os._exit(0)
        os.close(req_r)
        os.close(rep_w)
        self.owner, self.pid, self.wfd, self.rfd = parent, pid, req_w, rep_r
        self.stopped = False
        _LIVE.add(self)

    def request(self, header: dict, x: np.ndarray, deadline: float | None) -> tuple[dict, list[np.ndarray]]:
        """Raises _Late at the deadline, _Dead when the worker is gone."""
        _write_all(self.wfd, _pack(header, [x]), deadline)
        try:
            return _read_frame(self.rfd, deadline, MAX_REPLY_BYTES + (1 << 20))
        except (ValueError, RecursionError):  # not a frame of ours
            raise _Dead from None

    def stop(self, wait: bool = True, grace: float = 0.0) -> str:
        """Kill the worker (only from the process that started it); how it had ended
        ('' when it was still running). `grace`: seconds to let a dying worker finish dying
        first (to learn the signal that ended it). Without `wait`, the kill is not waited for."""
        if self.stopped or os.getpid() != self.owner:
            return ""
        self.stopped = True
        _LIVE.discard(self)
        status = None
        try:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            end = time.monotonic() + grace
            while not done and time.monotonic() < end:
                time.sleep(0.005)
                done, status = os.waitpid(self.pid, os.WNOHANG)
            if not done:
                status = None
                os.kill(self.pid, signal.SIGKILL)
                if wait:
                    os.waitpid(self.pid, 0)
        except (ChildProcessError, ProcessLookupError):
            pass
        for fd in (self.wfd, self.rfd):
            try:
                os.close(fd)
            except OSError:
                pass
        return _ended(status)

    def __del__(self):
        self.stop()


def _ended(status: int | None) -> str:
    if status is None:
        return ""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}" + (", perhaps for lack of memory" if sig == signal.SIGKILL else "")
    return f"exit status {os.WEXITSTATUS(status)}" if os.WIFEXITED(status) else ""


_LIVE: weakref.WeakSet[_Worker] = weakref.WeakSet()


@atexit.register
def _stop_workers() -> None:
    """At exit, kill the workers still running without waiting for them to be torn down."""
    for worker in list(_LIVE):
        worker.stop(wait=False)


# --------------------------------------------------------------------------- the suspect model

_INT_ELEMS = {2, 3, 4, 5, 6, 7, 12, 13}  # TensorProto UINT8, INT8, UINT16, INT16, INT32, INT64, UINT32, UINT64
_REAL_ELEMS = {1, 10, 11}  # FLOAT, FLOAT16, DOUBLE


def output_kind(info) -> tuple[str, str]:
    """(kind, why) for a graph output, from its declared type and shape (never its name):
    "labels" (integers, one per input), "scores" (reals, a row per input: logits or
    probabilities), "probabilities" (a sequence of maps class -> probability, skl2onnx's
    ZipMap), or "" with why it cannot be read."""
    which = info.type.WhichOneof("value")
    if which == "sequence_type":
        elem = info.type.sequence_type.elem_type
        if elem.WhichOneof("value") == "map_type":
            key, value = elem.map_type.key_type, elem.map_type.value_type
            if key in _INT_ELEMS and value.WhichOneof("value") == "tensor_type" \
                    and value.tensor_type.elem_type in _REAL_ELEMS:
                return "probabilities", ""
            return "", "is a sequence of maps that are not integer class -> probability"
        return "", "is a sequence, not a tensor"
    if which != "tensor_type":
        return "", f"is a {which or 'value of no type'}, not a tensor"
    tensor = info.type.tensor_type
    if tensor.elem_type not in _INT_ELEMS | _REAL_ELEMS:
        from onnx import TensorProto

        try:
            name = TensorProto.DataType.Name(tensor.elem_type).lower()
        except ValueError:
            name = f"type {tensor.elem_type}"
        return "", f"holds {name} values, not numbers"
    dims = ([d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
            if tensor.HasField("shape") else None)
    if dims is not None and len(dims) == 0:
        return "", "is a single value, not one per input"
    if tensor.elem_type in _INT_ELEMS:
        if dims is None or len(dims) == 1 or (len(dims) == 2 and dims[1] == 1):
            return "labels", ""
        # integers in a row per input: scores (quantized logits or probabilities), or classes
        # ranked (a top-k's indices): read both ways (`OnnxModel.ranked`)
        return "scores", ""
    if dims is not None and len(dims) == 1:
        return "", "holds one number per input, not class scores"
    per_sample = None if dims is None or None in dims[1:] else math.prod(dims[1:])
    if per_sample == 0:
        return "", f"holds no scores (shape {_shape(dims)})"
    if per_sample == 1:
        return "", "holds one number per input, not class scores"
    return "scores", ""


def _shape(dims: list[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"



class Units(NamedTuple):
    """A graph's tensors read as units (`OnnxModel.unit_tensors`)."""

    found: dict[str, np.ndarray]  # name -> (inputs, values per input), in the graph's order
    left_out: dict[str, int]  # the tensors a limit of units left out -> their values per input
    copies: dict[str, str]  # the tensors left out as copies of another -> that one
    unsteady: list[str]  # (one input at a time) the tensors whose shape the input decides: not read


class OnnxModel:
    """A suspect model behind onnxruntime: one input; its answers are read from one output,
    chosen by kind (`output_kind`): scores or probabilities first, else labels.

    Evaluated in a worker process, within `timeout` seconds for all its queries together
    (None: no limit) and a bounded amount of memory."""

    def __init__(self, path: str | Path, provider: str = "auto", *,
                 timeout: float | None = DEFAULT_TIMEOUT, name: str | None = None):
        _check_provider_name(provider)
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not math.isfinite(timeout) or timeout <= 0):
            raise InputError(f"--timeout must be a number of seconds above 0, got {timeout!r}")
        self.path = Path(path)
        self.name = shown(self.path if name is None else name)  # (what messages call it: a file of
        # the command's own, in a scratch folder, by what the user knows it as)
        self.proto = load_onnx(path)
        self.provider = provider
        self.timeout = None if timeout is None else float(timeout)
        self._left = self.timeout
        self._worker: _Worker | None = None
        self._evaluator: _Evaluator | None = None
        self._broken: str | None = None
        p = self.name
        initializers = {t.name for t in self.proto.graph.initializer}
        inputs = [i for i in self.proto.graph.input if i.name not in initializers]
        names = [i.name for i in inputs] + [o.name for o in self.proto.graph.output]
        if not all(isinstance(name, str) for name in names):
            raise OnnxError(f"{p} has tensor names that are not UTF-8 text: it is malformed")
        if len(inputs) != 1:
            listed = one_line(", ".join(i.name for i in inputs), 120)
            raise OnnxError(
                f"{p} has {len(inputs)} inputs ({listed}): only single-input models "
                "can be verified; export the classifier alone"
            )
        self._input = inputs[0]
        self.input_name = inputs[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        self.input_dims = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in dims]
        self.output_name = self.proto.graph.output[0].name
        # name -> (kind, why unusable), in the graph's order
        self.outputs = {o.name: output_kind(o) for o in self.proto.graph.output}
        # the outputs of integers in a row per input (read as scores, and as classes ranked)
        self.ranked = {o.name for o in self.proto.graph.output if self.outputs[o.name][0] == "scores"
                       and o.type.tensor_type.elem_type in _INT_ELEMS}
        # the outputs that answered an input alone otherwise than in a batch (read both ways), and
        # those that answered the same input otherwise from one ask to the next
        self.batch_dependent: set[str] = set()
        self.noisy: set[str] = set()
        self._reached: set[str] | None = None  # (the tensors computed from the input: `_from_input`, on first use)
        self.answer_classes: int | None = None  # the number of scores of the last answers (None: labels)
        self.metadata = {prop.key: prop.value for prop in self.proto.metadata_props
                         if isinstance(prop.key, str) and isinstance(prop.value, str)}

    # ------------------------------------------------------------------ inputs
    def adapt(self, x: np.ndarray) -> np.ndarray:
        """Fit key inputs to the model's input: as they are, or reshaped when the model takes
        the same number of values per sample in another layout (e.g. flattened)."""
        want = [None, *x.shape[1:]]
        dims = self.input_dims
        if len(dims) == len(want) and all(d is None or w is None or d == w for d, w in zip(dims, want, strict=True)):
            return x
        per_sample = dims[1:]
        shown_dims = ["?" if d is None else d for d in dims]
        if per_sample and all(d is not None for d in per_sample):
            if math.prod(per_sample) == math.prod(x.shape[1:]):
                if _axes_merged(per_sample, x.shape[1:]):
                    return x.reshape(len(x), *per_sample)
                # (a reshape would scramble every sample: (3, 8, 8) read as (8, 8, 3) had given a
                # marked model channels last a verdict of not detected)
                raise OnnxError(
                    f"{self.name} takes inputs of shape {shown_dims}, the same number of values as the "
                    f"samples it is asked about ({list(x.shape[1:])}, the keys' or the data's) in another "
                    "layout (channels last, say), which deepsigns cannot tell: export the model to take "
                    "the keys' layout, or a flat one"
                )
        raise OnnxError(
            f"{self.name} takes inputs of shape {shown_dims} but is asked about samples of shape "
            f"{list(x.shape[1:])} (the keys', or the data's): it cannot be queried with them"
        )

    def _feed(self, x: np.ndarray) -> np.ndarray:
        """x as the model takes it: its layout and its floating-point type."""
        from onnx import TensorProto

        p = self.name
        kind = self._input.type.WhichOneof("value")
        elem = self._input.type.tensor_type.elem_type if kind == "tensor_type" else None
        if elem not in _FLOAT_INPUTS:
            if kind != "tensor_type":
                what = f"a {kind or 'value of no type'}"
            else:
                try:
                    what = f"tensors of {TensorProto.DataType.Name(elem).lower()}"
                except ValueError:
                    what = f"tensors of unknown type {elem}"
            raise OnnxError(f"{p} takes {one_line(what, 60)} as input: deepsigns queries a model with "
                            "real-valued samples, preprocessed as in training; a model with its preprocessing "
                            "inside (pixels in) cannot be asked them")
        # (a graph of ai.onnx.ml operators alone, as skl2onnx writes some, declares no default opset)
        opset = max((o.version for o in self.proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
        if opset is not None and opset < _MIN_OPSET:
            raise OnnxError(f"{p} uses ONNX opset {opset}, which onnxruntime cannot run (it needs "
                            f"opset {_MIN_OPSET} or later): re-export the model with a current exporter")
        return np.ascontiguousarray(self.adapt(x), dtype=_FLOAT_INPUTS[elem])

    def _batch(self) -> int | None:
        """The model's fixed batch size, or None when the batch dimension is dynamic."""
        batch = self.input_dims[0] if self.input_dims else None
        if batch is not None and not 1 <= batch <= MAX_FIXED_BATCH:
            raise OnnxError(f"{self.name} has its batch dimension fixed at {batch}: deepsigns "
                            f"feeds at most {MAX_FIXED_BATCH} samples at a time; export the model "
                            "with a dynamic batch dimension (dynamic_axes)")
        return batch

    # ------------------------------------------------------------------ evaluation
    def _query(self, names: list[str], extra: bool, x: np.ndarray, step: int,
               width: int | None = None, units: int | None = None, alone: bool = False,
               ) -> tuple[dict[str, np.ndarray], dict]:
        """Run the model on x for outputs `names` (with `width` or `units`: only those
        `_Evaluator.run` keeps; `alone`: one input at a time): (arrays (n, ...), the facts of the
        others, as `_Evaluator.run` gives them, checked)."""
        if len(x) == 0:
            raise InputError("no samples to query the model with")
        batch = self._batch()
        x = self._feed(x)
        if batch is not None:
            # a fixed batch: the graph's own tensors are read in batches half of them padding,
            # whose rows repeat the last input along the batch's axis alone (_padded_axes); full
            # batches of 64 had left a (64, 64) carrier with two axes that could be the batch
            step = max(1, (batch + 1) // 2) if extra else batch
        header = {"names": names, "extra": extra, "step": 1 if alone else max(1, step), "batch": batch,
                  "width": width, "units": units, "alone": alone,
                  # (a reading of its own ends before the model's time is up, and the model stays usable)
                  "within": None if not alone or self._left is None else ALONE_SHARE * self._left}
        if self._broken is not None:
            raise OnnxError(self._broken)
        start = time.monotonic()
        try:
            if _can_fork():
                reply = self._ask_worker(header, x, start)
            else:
                reply = self._ask_here(header, x, start)
        finally:
            if self._left is not None:
                self._left = max(0.0, self._left - (time.monotonic() - start))
        header, arrays = reply
        if not header.get("ok"):
            failure = self._failed(str(header.get("kind")), str(header.get("message")))
            if alone and type(failure) is OnnxError and not self.broken:
                # (a reading one input at a time that could not be taken, out of memory say: the
                # model and the readings of its batches stand)
                raise OnnxUnread(str(failure))
            raise failure
        got = header.get("names")
        problems, left_out, copies = header.get("problems"), header.get("left_out", {}), header.get("copies", {})
        unsteady = header.get("unsteady", [])
        if not isinstance(got, list) or len(got) != len(arrays) or not isinstance(problems, dict) \
                or not isinstance(left_out, dict) or not all(type(v) is int and v >= 0 for v in left_out.values()) \
                or not isinstance(copies, dict) or not isinstance(unsteady, list):
            raise self._crashed("it sent a malformed answer")
        return {str(n): a for n, a in zip(got, arrays, strict=True)}, {
            "problems": {str(k): str(v) for k, v in problems.items()},
            "left_out": {str(k): v for k, v in left_out.items() if k in names},
            "copies": {str(k): str(v) for k, v in copies.items() if k in names},
            "unsteady": [str(n) for n in unsteady if n in names]}

    def _ask_worker(self, header: dict, x: np.ndarray, start: float):
        deadline = None if self._left is None else start + self._left
        if self._worker is None:
            try:
                self._worker = _Worker(_Evaluator(self.proto, self.input_name, self.provider))
            except OSError as exc:
                raise OnnxError(f"cannot start a process to evaluate {self.name} "
                                f"({one_line(exc)}): free some memory or processes and try again") from None
        answered = False
        try:
            reply = self._worker.request(header, x, deadline)
            answered = True
            return reply
        except _Late:
            self._stop()
            raise self._timed_out() from None
        except _Dead:
            raise self._crashed(self._stop(grace=1.0) or "it stopped answering") from None
        finally:
            if not answered:  # Ctrl-C while waiting: the worker must not outlive the query
                self._stop()

    def _ask_here(self, header: dict, x: np.ndarray, start: float):
        """Where fork is missing: in this process, onnxruntime's terminate flag at the deadline
        (read between kernels only)."""
        import threading

        if self._evaluator is None:
            self._evaluator = _Evaluator(self.proto, self.input_name, self.provider)
        evaluator = self._evaluator
        timer = None
        if self._left is not None:
            def terminate():
                if evaluator.run_options is not None:
                    evaluator.run_options.terminate = True
            timer = threading.Timer(self._left, terminate)
            timer.start()
        try:
            out, facts = evaluator.answer(header, x)
        except _Failure as failure:
            if self._left is not None and time.monotonic() - start >= self._left:
                self._broken = str(self._timed_out())
                raise OnnxError(self._broken) from None
            return {"ok": False, "kind": failure.kind, "message": failure.message}, []
        finally:
            if timer is not None:
                timer.cancel()
        names = list(out)
        return {"ok": True, "names": names, **facts}, [out[n] for n in names]

    def _stop(self, grace: float = 0.0) -> str:
        how = ""
        if self._worker is not None:
            how = self._worker.stop(grace=grace)
            self._worker = None
        return how

    def allow(self, seconds: float) -> None:
        """`seconds` more for the queries still to come (one more run of the whole graph: the
        further sets of units that extract reads, each a run of its own)."""
        if self._left is not None:
            self._left += seconds

    def close(self) -> None:
        """End the worker process now (it also ends when the model is garbage-collected)."""
        self._stop()

    def __enter__(self) -> OnnxModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _timed_out(self) -> OnnxError:
        self._broken = (f"{self.name} did not answer within {self.timeout:g} s (a model "
                        "may loop for ever): if it is a large legitimate model, raise the limit "
                        "with --timeout")
        return OnnxError(self._broken)

    def _crashed(self, how: str) -> OnnxError:
        self._broken = (f"onnxruntime crashed evaluating {self.name} ({one_line(how, 80)}): "
                        "the file is malformed or hostile; it cannot be verified")
        return OnnxError(self._broken)

    def _failed(self, kind: str, message: str) -> OnnxError | InputError:
        p, why = self.name, one_line(message)
        if kind == "input":
            return InputError(why)
        if kind == "load":
            return OnnxError(f"onnxruntime cannot load {p} ({why}): the file is malformed or uses "
                             "operators onnxruntime lacks; check the file or re-export it")
        if kind == "memory":
            limit = _memory_limit()
            amount = f"{limit / 2**30:.1f} GiB" if limit >= 2**30 else f"{limit >> 20} MiB"
            return OnnxError(f"{p} needs more memory than the {amount} deepsigns allows a suspect "
                             f"model ({why}): the file is hostile or too large to verify on this machine")
        if kind == "size":
            return OnnxTooMuch(f"{p} answers with more data than deepsigns reads ({why}): "
                               "it is not a classifier's scores; check the file")
        if kind == "slow":
            return OnnxUnread(f"{why}: raise --timeout to read it so")
        if kind == "alone":
            return OnnxUnread(f"onnxruntime failed evaluating {p} on one input at a time ({why})")
        return OnnxError(f"onnxruntime failed evaluating {p} on the keys ({why}): the model cannot "
                         "answer these queries; check that it is a classifier for this data")

    # ------------------------------------------------------------------ public queries
    @property
    def broken(self) -> bool:
        """Whether the model failed as a whole (no answer in time, a crash, too much memory):
        every further query fails the same way."""
        return self._broken is not None

    def usable_outputs(self) -> str:
        """The outputs that can be read, with their kinds, as people read them."""
        usable = [f"'{one_line(n, 60)}' ({kind})" for n, (kind, _) in self.outputs.items() if kind]
        return ", ".join(usable) or "none"

    def _where(self, name: str) -> str:
        """An output as messages name it."""
        first = name == self.output_name
        return f"the {'first ' if first else ''}output of {self.name} ('{one_line(name, 60)}')"

    def choose_output(self, output: str | None = None) -> tuple[str, str]:
        """(name, kind) of the output to read: `output`, else the first scores or probabilities,
        else the first labels."""
        if output is not None:
            if output not in self.outputs or not self.outputs[output][0]:
                named = one_line(repr(output), 60)
                said = (f"--output {named} of {self.name} {self.outputs[output][1]}" if output in self.outputs
                        else f"--output {named} does not exist in {self.name}")
                usable = self.usable_outputs()
                raise InputError(f"{said}: " + (f"use one of its outputs: {usable}" if usable != "none" else
                                                "it has no output deepsigns can read (class scores, probabilities "
                                                "or labels)"))
            return output, self.outputs[output][0]
        for wanted in (("scores", "probabilities"), ("labels",)):  # scores say more than labels
            for name, (kind, _) in self.outputs.items():
                if kind in wanted:
                    return name, kind
        why = "; ".join(f"{'first ' if i == 0 else ''}output '{one_line(n, 60)}' {w}"
                        for i, (n, (_, w)) in enumerate(list(self.outputs.items())[:4]))
        raise OnnxError(f"{self.name} has no output deepsigns can read ({why}): the black-box schemes read "
                        "the class scores, probabilities or labels of each input")

    def _read(self, x: np.ndarray, output: str | None, batch_size: int,
              alone: bool = False) -> tuple[np.ndarray, str, str]:
        """(the chosen output for inputs x: (n, classes) for scores, (n,) for labels; name; kind),
        from batches of inputs, or (`alone`) one input at a time. A batch's answers are checked
        against a few inputs' own: an output that answers them otherwise is put in
        `batch_dependent` (its readers read it alone too: a graph that answers single inputs
        with a marked model and batches with another had read "not detected"). Every batch is
        checked, each with its own rows (a check on the first scheme's keys alone had left the
        next scheme's batch, answered otherwise, unchecked). Those inputs are asked alone once
        more (twice after a batch): an output that answers them otherwise from one ask to the
        next is put in `noisy`. An output that fails on a batch and answers one input at a
        time is read so (a model exported for one input at a time)."""
        name, kind = self.choose_output(output)
        try:
            value = self._value(x, name, kind, batch_size, alone)
        except OnnxError as exc:
            if alone or self.broken or len(x) == 1:
                raise
            try:
                return self._value(x, name, kind, batch_size, True), name, kind
            except OnnxError:
                raise exc from None
        if len(x) > 1:
            # rows drawn from the inputs themselves (the keys: secret), not at places a graph can
            # compute from the batch's length (evenly spaced rows had been answered by the marked
            # model, and the rest by another)
            seed = int.from_bytes(hashlib.blake2b(np.ascontiguousarray(x).view(np.uint8), digest_size=8).digest())
            rows = np.sort(np.random.default_rng(seed).choice(len(x), min(ALONE_CHECK, len(x)), replace=False))
            try:
                single = self._value(x[rows], name, kind, batch_size, True)
                same = single.shape == value[rows].shape and _alike(single, value[rows])
                if not same and not alone and _by_class(value, single, rows):
                    value, same = np.ascontiguousarray(value.T), True
                if not (same if alone else _alike(single, self._value(x[rows], name, kind, batch_size, True))):
                    self.noisy.add(name)
            except OnnxError:  # (one that cannot answer one input alone is read so too, and that
                # reading says why it fails: a graph that failed alone and answered batches of two
                # with the marked model had read "not detected")
                if self.broken:
                    raise
                same = False
            if not same and not alone:
                self.batch_dependent.add(name)
        return value, name, kind

    @property
    def batch_is_dynamic(self) -> bool:
        """Whether the model takes batches of any length (one input at a time is then a batch of one)."""
        return self._batch() is None

    def _value(self, x: np.ndarray, name: str, kind: str, batch_size: int, alone: bool) -> np.ndarray:
        """`_read`'s answers of output `name` (of `kind`)."""
        out, facts = self._query([name], False, x, batch_size, alone=alone)
        problems, where = facts["problems"], self._where(name)
        if name in problems:
            raise OnnxError(f"{where} {problems[name]}: verify needs the class scores, probabilities or "
                            "labels of each input; export them (or choose another output with --output)")
        value = out.get(name)
        if value is None or value.ndim == 0 or value.shape[0] != len(x):
            raise self._crashed("it sent no answers")
        if kind == "labels":
            if value.size != len(x) or value.dtype.kind not in "iu":
                raise OnnxError(f"{where} has shape {list(value.shape)} ({value.dtype}) for {len(x)} inputs: "
                                "it is not one label per input")
            return value.reshape(len(x)).astype(np.int64)
        scores = value.reshape(len(x), -1)
        if scores.shape[1] == 0:
            raise OnnxError(f"{where} holds no scores (shape {list(value.shape)}): export the "
                            "classifier's scores")
        if scores.shape[1] == 1:  # (declared with more: the file's shapes are data, its answers decide)
            raise OnnxError(f"{where} holds one number per input (shape {list(value.shape)}), not class scores: "
                            "export the classifier's scores, probabilities or labels")
        if scores.dtype.kind in "iu":
            scores = scores.astype(np.float64)
        return scores

    def scores(self, x: np.ndarray, batch_size: int = 512, output: str | None = None,
               alone: bool = False) -> np.ndarray:
        """The model's class scores (or probabilities) for a batch of inputs, as (n, classes):
        `output`, else its first output that has them (`alone`: one input at a time)."""
        name, kind = self.choose_output(output)
        if kind == "labels":
            what = self.name if output is None else self._where(name)
            raise OnnxError(f"{what} outputs labels only (no class scores): this reading needs the "
                            "scores; export the classifier's logits or probabilities")
        return self._read(x, name, batch_size, alone)[0]

    def answers(self, x: np.ndarray, output: str | None = None, batch_size: int = 512,
                ranked: bool = False, alone: bool = False) -> tuple[np.ndarray, str, str]:
        """(the predicted label of each input, int64 (n,), -1 where a row of scores has no
        answer (NaN, +inf twice, or nothing above -inf); the output's name; its kind).
        `ranked`: an output of integers read as classes ranked, the first the answer (-1 where
        it is no class); `alone`: one input at a time."""
        value, name, kind = self._read(x, output, batch_size, alone)
        self.answer_classes = None if kind == "labels" or ranked else value.shape[1]
        if ranked:
            first = value[:, 0]
            return np.where(first >= 0, first, -1).astype(np.int64), name, "ranked labels"
        if kind == "labels":
            return value, name, kind
        return answers_from_scores(value), name, kind

    def intermediates(self, x: np.ndarray, width: int | None = None, units: int | None = None,
                      names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Every tensor the graph computes (graph outputs included; with `width`, only those of
        that many values per sample; with `units`, those in the graph's order while they hold
        at most that many in all; with `names`, those) for inputs x, flattened per sample, in
        the graph's order. Names are not looked at: a suspect's names are data, and a hostile
        file can point any name anywhere. Tensors computed inside a subgraph (an If's branch, a
        Loop's body) or a function left as it is are out of reach (`out_of_reach` says so)."""
        return self.unit_tensors(x, width, units, names).found

    def unit_tensors(self, x: np.ndarray, width: int | None = None, units: int | None = None,
                     names: list[str] | None = None, alone: bool = False) -> Units:
        """`intermediates(x, width, units, names)`, with what was left out of it (`Units`).
        `alone`: the graph fed one input at a time, every tensor computed from the input read as
        that input's values whatever its axes (a graph that pads its batch, merges it with
        another axis or reorders its rows hid its units from a batch's reading)."""
        produced = [o for n in self.proto.graph.node for o in n.output if o and isinstance(o, str)]
        wanted = list(dict.fromkeys(produced))
        if alone:  # (a tensor the same for every input, a weight computed as the graph runs, holds no input's units)
            if self._reached is None:
                self._reached = _from_input(self.proto.graph, self.input_name)
            wanted = [name for name in wanted if name in self._reached]
        if names is not None:
            asked = set(names)
            wanted = [name for name in wanted if name in asked]
        if not wanted:  # (session.run with no names would return every graph output instead)
            return Units({}, {}, {}, [])
        # (in two batches of two lengths: the axis that holds the batch is the one that has its
        # length in both, which an axis of a fixed length cannot, whatever it is)
        out, facts = self._query(wanted, True, x, max(1, len(x) // 2 + 1), width, units, alone)
        return Units({name: value.reshape(len(x), -1) for name, value in out.items()
                      if name in wanted and np.issubdtype(value.dtype, np.floating)
                      and value.ndim >= 1 and value.shape[0] == len(x)},
                     {name: facts["left_out"][name] for name in wanted if name in facts["left_out"]},
                     facts["copies"], facts["unsteady"])

    def out_of_reach(self) -> str:
        """Why some tensors the model computes cannot be asked for ('' when every one can): a
        graph output is a tensor of the main graph, and onnxruntime gives none of those computed
        inside a subgraph (the branches of an If, the body of a Loop or Scan) or a local function
        left as it is (`_inlined`)."""
        functions = {(f.domain, f.name) for f in self.proto.functions}
        ops = []
        for node in self.proto.graph.node:
            if (node.domain, node.op_type) in functions:
                ops.append(f"function {one_line(node.op_type, 40)}")
            elif any(attr.HasField("g") or attr.graphs for attr in node.attribute):
                ops.append(one_line(node.op_type, 40))
        if not ops:
            return ""
        kinds = list(dict.fromkeys(ops))
        listed = ", ".join(kinds[:3]) + (", ..." if len(kinds) > 3 else "")
        return f"it computes tensors inside a subgraph or function ({listed}), which no reading can ask for"


def answers_from_scores(scores: np.ndarray) -> np.ndarray:
    """argmax of each row (the same for logits and probabilities), -1 for a row with a NaN,
    with +inf more than once, or with no value above -inf (argmax would read it as class 0). A
    row's one +inf is its answer: a deployment that sets the winner's score to +inf answers
    as argmax does, and had read as no answer at all (a marked model, 0 of 100 keys)."""
    scores = np.asarray(scores, dtype=np.float64)
    ok = ~np.isnan(scores).any(1) & (np.isposinf(scores).sum(1) <= 1) & (scores > -np.inf).any(1)
    return np.where(ok, scores.argmax(1), -1).astype(np.int64)


@lru_cache(maxsize=1)
def _can_fork() -> bool:
    return hasattr(os, "fork") and hasattr(os, "waitpid")
