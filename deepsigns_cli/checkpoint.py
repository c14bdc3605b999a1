"""Every read and write of model files: safetensors checkpoints, .pt state dicts, ONNX export."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import USER_CODE_FAILURES, CheckpointError, InputError, one_line, out_of_memory, shown, user_failure
from .fileio import native_output_to_nowhere, require_file
from .zoo import ZOO, build_model, is_factory_name, shape_problem, skeleton

__all__ = [
    "ModelInfo",
    "save_checkpoint",
    "load_checkpoint",
    "fingerprint",
    "export_onnx",
    "recorded_preprocess",
    "ONNX_OPSET",
]

FORMAT = "deepsigns-checkpoint/1"
ONNX_OPSET = 17
DEFAULT_LR = 1e-3


@dataclass
class ModelInfo:
    """What a checkpoint says about itself (safetensors metadata, all strings on disk)."""

    arch: str
    arch_kwargs: dict
    input_shape: tuple[int, ...]
    num_classes: int
    lr: float = DEFAULT_LR
    extra: dict = field(default_factory=dict)  # provenance: producer, accuracy, schemes, key id

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT,
            "arch": self.arch,
            "arch_kwargs": json.dumps(self.arch_kwargs, sort_keys=True),
            "input_shape": json.dumps(list(self.input_shape)),
            "num_classes": str(self.num_classes),
            "lr": repr(float(self.lr)),
        }
        meta.update({k: json.dumps(v) for k, v in self.extra.items()})
        return meta

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path,
                      advice: str = "load its tensors with --arch, or re-save it with 'deepsigns train'") -> ModelInfo:
        """Parse and check a checkpoint's metadata. It is data from a file that may be hostile:
        every field is checked for type and range; the architecture it names is NOT trusted
        here (load_checkpoint decides whether it may be built). `advice` ends the error."""
        try:
            return _parse_metadata(meta)
        except ValueError as exc:
            raise CheckpointError(
                f"{shown(path)} is a safetensors file without deepsigns metadata we can use ({exc}): {advice}"
            ) from None


_CORE_FIELDS = ("format", "arch", "arch_kwargs", "input_shape", "num_classes", "lr")
_MAX_FIELD = 64 * 1024  # characters in one metadata value: ours are a few dozen


def _field_json(meta: dict, key: str):
    """One metadata value parsed as JSON; ValueError says what is wrong with it."""
    text = _field_text(meta, key)
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"'{key}' is nested too deeply") from None
    except ValueError:
        raise ValueError(f"'{key}' is not JSON: {one_line(text, 60)}") from None


def _field_text(meta: dict, key: str) -> str:
    if key not in meta:
        raise ValueError(f"no '{key}' field")
    text = meta[key]
    if not isinstance(text, str):
        raise ValueError(f"'{key}' is not text")
    if len(text) > _MAX_FIELD:
        raise ValueError(f"'{key}' is longer than {_MAX_FIELD} characters")
    return text


def _parse_metadata(meta) -> ModelInfo:
    """ModelInfo from safetensors metadata, or ValueError naming the first bad field."""
    if not isinstance(meta, dict) or not meta:
        raise ValueError("no metadata")
    arch = _field_text(meta, "arch")
    if arch not in ZOO and not is_factory_name(arch):
        raise ValueError(f"'arch' {one_line(repr(arch), 60)} is neither {', '.join(ZOO)} nor "
                         "package.module:factory")
    arch_kwargs = _field_json(meta, "arch_kwargs") if "arch_kwargs" in meta else {}
    if not isinstance(arch_kwargs, dict):
        raise ValueError(f"'arch_kwargs' must be a JSON object, got {type(arch_kwargs).__name__}")
    input_shape = _field_json(meta, "input_shape")
    classes_text = _field_text(meta, "num_classes")
    if not re.fullmatch(r"[0-9]{1,20}", classes_text):
        raise ValueError(f"'num_classes' is not a whole number: {one_line(classes_text, 40)}")
    problem = shape_problem(input_shape if isinstance(input_shape, list) else None, int(classes_text))
    if problem:
        # show what the file says, not what it was turned into
        raise ValueError(problem if isinstance(input_shape, list)
                         else f"'input_shape' must be a list of integers, got {one_line(json.dumps(input_shape), 40)}")
    lr = DEFAULT_LR
    if "lr" in meta:
        lr_text = _field_text(meta, "lr")
        try:  # (float() also reads "1_0" as 10, and " 1e-3 ")
            if "_" in lr_text or lr_text != lr_text.strip():
                raise ValueError
            lr = float(lr_text)
        except ValueError:
            raise ValueError(f"'lr' is not a number: {one_line(lr_text, 40)}") from None
        if not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"'lr' must be a finite number above 0, got {one_line(lr_text, 40)}")
    extra = {k: _field_json(meta, k) for k in meta if k not in _CORE_FIELDS}
    return ModelInfo(arch, arch_kwargs, tuple(input_shape), int(classes_text), lr, extra)


def fingerprint(model: nn.Module) -> str:
    """SHA-256 over the state dict (names, shapes, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        arr = t.detach().cpu().contiguous().numpy()
        h.update(f"{name}:{arr.dtype}:{list(arr.shape)};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def save_checkpoint(model: nn.Module, info: ModelInfo, path: str | Path) -> None:
    """Write the checkpoint to `path` as it is (callers write a temporary file of
    fileio.Outputs, which renames it into place)."""
    from safetensors.torch import save_file

    state, held = {}, set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        # layers that share a tensor (tied weights) have it written under each name: safetensors
        # writes a storage once; loading gives every name its copy, the same values
        state[name] = tensor.clone() if storage in held else tensor
        held.add(storage)
    save_file(state, str(path), metadata=info.to_metadata())
    _sort_header(path)


def _sort_header(path: str | Path) -> None:
    """safetensors writes its header from a hash map, in an order new in every process: the
    header rewritten in place with its keys sorted (the same JSON reordered: the same length),
    so that equal checkpoints are equal bytes."""
    import struct

    with open(path, "r+b") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
        meta = header.pop("__metadata__", None)
        ordered = {} if meta is None else {"__metadata__": dict(sorted(meta.items()))}
        ordered.update(sorted(header.items()))
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # (never: serde_json and json write the same text; then left as it was)
            return
        fh.seek(8)
        fh.write(text.ljust(size))  # (safetensors pads its header with spaces too)


#: a header's bytes that deepsigns parses at most: the tensors' names, shapes and offsets and our
#: metadata take kilobytes (safetensors took 2 s and 1.4 GB to refuse a 32 MB header of junk)
MAX_HEADER_BYTES = 16 << 20


class _Twice(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_twice(pairs: list) -> dict:
    """A JSON object of the header, refused when it names a key twice."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _Twice(key)
        seen[key] = value
    return seen


def _check_header(path: Path, header: bytes) -> None:
    """A header that names a tensor (or a metadata field) twice is refused: readers differ on
    which copy they keep (a thief's file could show one model to deepsigns and another to the
    world). Any other fault of the header is left to safetensors, which says what it is."""
    try:
        json.loads(header, object_pairs_hook=_no_twice)
    except _Twice as twice:
        raise CheckpointError(
            f"{shown(path)} names {_name(twice.key)} twice in its header: readers differ on which "
            "copy they keep, so deepsigns reads neither; re-export it"
        ) from None
    except (ValueError, RecursionError):  # (UnicodeDecodeError too: safetensors says what is wrong)
        return


@contextlib.contextmanager
def _safe_open(path: Path):
    """safetensors' safe_open on a checkpoint, then its header checked (`_check_header`: after
    safetensors' own typed parse has refused any header of another shape, at no cost), both on
    the file opened here (where /dev/fd exists: a file put in its place meanwhile is not read)."""
    from safetensors import safe_open

    with open(path, "rb") as raw:
        name = str(path)
        if Path("/dev/fd").is_dir():
            name = f"/dev/fd/{raw.fileno()}"
        else:
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:  # (safetensors takes only a UTF-8 name)
                raise CheckpointError(f"{shown(path)}: a name that is not UTF-8 can be read only where "
                                      "/dev/fd exists; rename the file") from None
        claimed = int.from_bytes(raw.read(8), "little")
        if claimed > MAX_HEADER_BYTES:
            raise CheckpointError(f"{shown(path)} is not a readable .safetensors file (its header claims {claimed} "
                                  f"bytes, more than the {MAX_HEADER_BYTES >> 20} MiB any checkpoint needs): it may "
                                  "be truncated or not a checkpoint; re-export it")
        with safe_open(name, framework="pt") as fh:  # (which reads the file through a descriptor of its own)
            _check_header(path, raw.read(claimed))
            yield fh


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError

    try:
        with _safe_open(path) as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    # TypeError/RuntimeError: a dtype that torch cannot hold; MemoryError: more than we have
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError, MemoryError) as exc:
        if isinstance(exc, PermissionError):  # (the file itself, before safetensors: not a damaged checkpoint)
            raise CheckpointError(f"cannot open {shown(path)} ({exc.strerror}): check its permissions") from None
        if out_of_memory(exc):  # (safetensors' "Cannot allocate memory (os error 12)" under ulimit -v: the
            # machine's limit, which the command reports as such, not a damaged file to re-export)
            raise MemoryError(str(exc)) from None
        raise CheckpointError(
            f"{shown(path)} is not a readable .safetensors file ({one_line(exc, 160)}): it may be "
            "truncated or not a checkpoint; re-export it"
        ) from None
    return state, meta


_NOT_A_STATE_DICT = "only weights are loaded (weights_only=True, no unpickling of objects): save model.state_dict()"


def _check_archive(path: Path) -> None:
    """torch.save writes a zip of stored (uncompressed) records: one that inflates (a zip bomb)
    or claims more bytes than the file holds is not ours to unpack."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return  # the legacy format, a plain pickle: torch.load refuses or reads it
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError) as exc:  # "zip file version"
        raise CheckpointError(
            f"{shown(path)} is not a plain PyTorch state dict (a damaged archive: {one_line(exc, 120)}); "
            + _NOT_A_STATE_DICT
        ) from None
    size = path.stat().st_size
    if (any(r.compress_type != zipfile.ZIP_STORED for r in records)
            or sum(r.file_size for r in records) > size):
        raise CheckpointError(
            f"{shown(path)} is not a plain PyTorch state dict (its archive holds compressed records "
            "that torch.save never writes); " + _NOT_A_STATE_DICT
        )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import pickle
    import zipfile

    _check_archive(path)
    try:
        # torch warns about what it reads (e.g. "Detected pickle protocol 4"): the file is
        # refused or accepted on its own terms, and no warning reaches the user
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError,
            TypeError, KeyError, IndexError, AttributeError, MemoryError, RecursionError,
            NotImplementedError) as exc:
        text = str(exc)
        # torch's refusal starts with how to load the file unsafely: show only the reason
        reason = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Please use|Check the documentation|$)",
                           text, re.S)
        first = one_line(reason.group(1) if reason and reason.group(1).strip() else text, 160)
        raise CheckpointError(
            f"{shown(path)} is not a plain PyTorch state dict ({first or type(exc).__name__}); "
            + _NOT_A_STATE_DICT
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{shown(path)} holds a {type(state).__name__}, not a state dict of tensors: save model.state_dict()"
        )
    for key, value in state.items():
        if not isinstance(key, str):
            problem = f"a key is a {type(key).__name__}, not a name"
        elif not isinstance(value, torch.Tensor):
            problem = f"entry {one_line(repr(key), 60)} is a {type(value).__name__}"
        else:
            continue
        raise CheckpointError(
            f"{shown(path)} does not hold a state dict of tensors ({problem}): save model.state_dict()"
        )
    return state


def _name(key: str) -> str:
    """A tensor name from a file, fit for one line: control characters escaped, cut short."""
    return one_line(shown(key), 60)


def _fit_state(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], path: Path,
               arch: str) -> dict[str, torch.Tensor]:
    """The file's tensors checked against the architecture's (names, shapes, dtypes; the
    reference may live on the meta device), cast to the architecture's dtypes."""

    def misfit(detail: str) -> CheckpointError:
        return CheckpointError(
            f"the weights in {shown(path)} do not fit architecture '{shown(arch)}' ({detail}): pass the "
            "--arch (and --arch-kwargs) the file was trained with"
        )

    def names(keys: list[str]) -> str:
        listed = ", ".join(_name(k) for k in keys[:3])
        return listed + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    if missing or unexpected:
        parts = ([f"missing {names(missing)}"] if missing else []) + (
            [f"unexpected {names(unexpected)}"] if unexpected else [])
        raise misfit("; ".join(parts))
    fitted = {}
    for key, want in reference.items():
        tensor = state[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise misfit(f"{_name(key)} is {list(tensor.shape)}, the architecture needs {list(want.shape)}")
        if want.dtype.is_floating_point:
            ok = tensor.dtype.is_floating_point  # float16/bfloat16/float64 are cast to float32
            kind = "floating-point"
        else:  # an integer buffer, such as BatchNorm's num_batches_tracked
            ok = not (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool)
            kind = "integer"
        if not ok:
            raise CheckpointError(
                f"tensor {_name(key)} in {shown(path)} holds {str(tensor.dtype).replace('torch.', '')} "
                f"values where architecture '{shown(arch)}' has {kind} ones: re-save the weights "
                "with the model's own dtypes (float32)"
            )
        fitted[key] = tensor.to(want.dtype)
    return fitted


def load_checkpoint(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module, ModelInfo]:
    """Load a model in eval mode on the CPU. `.pt`/`.pth` need `arch` and the shapes.

    `arch` is the architecture the USER named (--arch). A file never chooses code to run: a
    checkpoint whose metadata names a package.module:factory is refused unless the user names
    that same factory; its arguments and shapes are then read from the file (unless given)."""
    path = require_file(path, "model file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        raise InputError(f"{shown(path)} is an ONNX model: this command needs a checkpoint (.safetensors)")
    from_file = False  # whether the architecture's arguments come from the file
    if suffix == ".safetensors":
        state, meta = _read_safetensors(path)
        if arch is None:
            info = ModelInfo.from_metadata(meta, path)
            if info.arch not in ZOO:
                raise CheckpointError(
                    f"{shown(path)} names architecture '{info.arch}', which is not built in: a file "
                    f"never chooses code to run; if you trust that code, pass --arch {info.arch} "
                    "(with --arch-kwargs, and --data for the shapes, to override the file's)"
                )
            from_file = True
        else:
            try:
                filed = ModelInfo.from_metadata(meta, path)
            except CheckpointError:
                filed = None  # a foreign file: --arch and the shapes say it all
            info = _info_from_flags(path, arch, arch_kwargs, input_shape, num_classes, filed)
            from_file = filed is not None and filed.arch == arch and arch_kwargs is None
    elif suffix in (".pt", ".pth", ".bin"):
        if arch is None:
            raise InputError(
                f"{shown(path)} is a plain state dict that does not name its architecture: pass --arch "
                "(mlp, cnn, resnet or package.module:factory)"
            )
        state = _read_state_dict(path)
        info = _info_from_flags(path, arch, arch_kwargs, input_shape, num_classes)
    else:
        raise CheckpointError(
            f"{shown(path)} is not a checkpoint: expected .safetensors (or .pt/.pth with --arch)"
        )
    origin = shown(path) if from_file else None
    # a built-in architecture is checked on the meta device first: arguments that ask for a
    # huge layer, or weights that do not fit, fail before any memory is taken
    frame = skeleton(info.arch, info.arch_kwargs, info.input_shape, info.num_classes, origin=origin)
    if frame is not None:
        state = _fit_state(state, frame.state_dict(), path, info.arch)
    model = build_model(info.arch, info.arch_kwargs, info.input_shape, info.num_classes, origin=origin)
    if frame is None:
        state = _fit_state(state, model.state_dict(), path, info.arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"the weights in {shown(path)} do not fit architecture '{shown(info.arch)}' ({one_line(exc, 240)}): "
            "pass the --arch (and --arch-kwargs) the file was trained with"
        ) from None
    return model.eval(), info


def recorded_preprocess(path: str | Path) -> dict | None:
    """The image-folder preprocessing `train` recorded in a .safetensors checkpoint (only its
    header is read), checked field by field; None for any other file, a checkpoint without
    that record, or one that cannot be read (loading it says why)."""
    from safetensors import SafetensorError

    from .data import check_preprocess

    path = Path(path)
    try:
        if path.suffix.lower() != ".safetensors" or not path.is_file():
            return None
        with _safe_open(path) as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError, MemoryError):
        return None
    if "preprocess" not in meta:
        return None
    try:
        return check_preprocess(_field_json(meta, "preprocess"))
    except ValueError as exc:
        raise CheckpointError(
            f"{shown(path)} records an image preprocessing we cannot use ({exc}): its metadata is "
            "damaged; re-train it with 'deepsigns train', or give its weights as a .pt with --arch"
        ) from None


def _info_from_flags(path, arch, arch_kwargs, input_shape, num_classes, filed=None) -> ModelInfo:
    """The model the command line describes. `filed` is what the checkpoint says about itself:
    when it names the same architecture as --arch, its arguments (unless --arch-kwargs is
    given), shapes, learning rate and provenance are used."""
    if filed is not None and filed.arch == arch:
        kwargs = filed.arch_kwargs if arch_kwargs is None else dict(arch_kwargs)
        return ModelInfo(arch, kwargs, filed.input_shape, filed.num_classes, filed.lr, filed.extra)
    if input_shape is None or num_classes is None:
        raise InputError(
            f"{shown(path)}: with --arch the input shape and class count come from --data or the keys; "
            "give --data"
        )
    input_shape, num_classes = tuple(int(d) for d in input_shape), int(num_classes)
    problem = shape_problem(input_shape, num_classes)
    if problem:
        raise InputError(f"{shown(path)}: {problem}: give --data with the model's input shape and classes")
    return ModelInfo(arch, dict(arch_kwargs or {}), input_shape, num_classes)


# ----------------------------------------------------------------------------- ONNX export


def export_onnx(
    model: nn.Module,
    info: ModelInfo,
    path: str | Path,
    *,
    check_inputs: np.ndarray | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-5,
) -> dict:
    """A plain `torch.onnx.export` (input "input", output "logits", a dynamic batch), checked
    with onnx.checker and for parity with torch: within `atol` plus `rtol` of the largest
    output (float32 sums drift with the size of what they add: a noised model's logits reach
    the thousands).

    The file carries no trace of deepsigns: no metadata of ours, no extra outputs, no named
    layers, the exporter's own producer name. Nothing in it tells a thief where a watermark
    sits or that there is one; `extract` finds the carrier among all tensors of its width.
    """
    import io

    import onnx

    model = model.cpu().eval()
    example = torch.zeros(2, *info.input_shape)
    exported = io.BytesIO()  # (the exporter takes only a name it can encode as UTF-8: Python writes the file)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", torch.jit.TracerWarning)  # (the others: not shown)
        try:
            with native_output_to_nowhere():
                torch.onnx.export(
                    model,
                    (example,),
                    exported,
                    input_names=["input"],
                    output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                    opset_version=ONNX_OPSET,
                    dynamo=False,
                )
        except KeyboardInterrupt:  # (Ctrl-C or a signal, never the user's failure)
            raise
        except USER_CODE_FAILURES as exc:  # (an operation with no ONNX form, or the model's own code failing)
            raise CheckpointError(f"this model cannot be exported to ONNX ({user_failure(exc)}): export takes "
                                  f"the operations of ONNX opset {ONNX_OPSET} alone") from None
        proto = onnx.load_from_string(exported.getvalue())
        onnx.checker.check_model(proto, full_check=True)
        parity, largest = _parity(model, proto, info, check_inputs)
        allowed = atol + rtol * largest
        if not parity <= allowed:
            raise CheckpointError(
                f"ONNX export differs from torch by {parity:.2e} (> {allowed:.2e}, for outputs up to "
                f"{largest:.2e}): this architecture uses an operation the exporter does not reproduce; report it"
            )
    Path(path).write_bytes(exported.getvalue())  # written as it is: callers give a temporary file of fileio.Outputs
    # the trace follows the path the example inputs took: a forward that turns a tensor into a
    # Python value (a branch on its input's values) may take another for other inputs, which
    # the parity check sees only when its inputs do
    traced = any(issubclass(w.category, torch.jit.TracerWarning) and "trace to be incorrect" in str(w.message)
                 for w in seen)
    return {"max_abs_diff": parity, "opset": ONNX_OPSET,
            "warnings": [TRACED_ONE_PATH] if traced else []}


TRACED_ONE_PATH = ("the model's forward turns a tensor into a Python value (a branch or a loop on its input's "
                   "values): the ONNX file follows the path the export's inputs took, and may answer inputs that "
                   "take another otherwise, past the parity check; export a forward that computes the same "
                   "operations for every input")


def _parity(model: nn.Module, proto, info: ModelInfo, inputs: np.ndarray | None) -> tuple[float, float]:
    """(the largest difference between the ONNX model's outputs and torch's, the largest |output|)."""
    from .runtime import make_session

    if inputs is None:
        inputs = np.random.default_rng(0).random((16, *info.input_shape), dtype=np.float32)
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    session = make_session(proto.SerializeToString(), provider="cpu")
    (onnx_out,) = session.run(["logits"], {"input": inputs})
    model.eval()
    with torch.no_grad():
        torch_out = model(torch.from_numpy(inputs)).numpy()
    if not np.isfinite(torch_out).all():  # (a difference of NaNs compares as nothing)
        raise CheckpointError("the model's outputs are not all finite numbers (its weights hold NaN or infinite "
                              "values, or overflow): it cannot be exported and checked")
    return float(np.abs(onnx_out - torch_out).max()), float(np.abs(torch_out).max())
