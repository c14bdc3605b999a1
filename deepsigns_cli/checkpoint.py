"""Every read and write of model files: safetensors checkpoints, .pt state dicts, ONNX export."""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, InputError
from .fileio import atomic_output, require_file
from .zoo import build_model, capture, layer_names

__all__ = [
    "ModelInfo",
    "save_checkpoint",
    "load_checkpoint",
    "fingerprint",
    "export_onnx",
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
    def from_metadata(cls, meta: dict[str, str], path: Path) -> ModelInfo:
        try:
            extra = {
                k: json.loads(v)
                for k, v in meta.items()
                if k not in ("format", "arch", "arch_kwargs", "input_shape", "num_classes", "lr")
            }
            return cls(
                arch=meta["arch"],
                arch_kwargs=json.loads(meta.get("arch_kwargs", "{}")),
                input_shape=tuple(json.loads(meta["input_shape"])),
                num_classes=int(meta["num_classes"]),
                lr=float(meta.get("lr", DEFAULT_LR)),
                extra=extra,
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"{path} is a safetensors file without deepsigns metadata ({exc}): "
                "load its tensors with --arch, or re-save it with 'deepsigns train'"
            ) from None


def fingerprint(model: nn.Module) -> str:
    """SHA-256 over the state dict (names, shapes, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        arr = t.detach().cpu().contiguous().numpy()
        h.update(f"{name}:{arr.dtype}:{list(arr.shape)};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def save_checkpoint(model: nn.Module, info: ModelInfo, path: str | Path, *, force: bool) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(path, force) as tmp:
        save_file(state, str(tmp), metadata=info.to_metadata())


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable .safetensors file ({exc}): it may be truncated or "
            "not a checkpoint; re-export it"
        ) from None
    return state, meta


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import pickle
    import re
    import zipfile

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch colours its message
        # torch's refusal starts with how to load the file unsafely: show only the reason
        reason = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|$)", text, re.M)
        first = reason.group(1) if reason else (text.splitlines()[0] if text else type(exc).__name__)
        raise CheckpointError(
            f"{path} is not a plain PyTorch state dict ({first[:160]}); only weights are "
            "loaded (weights_only=True, no unpickling of objects): save model.state_dict()"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors: save model.state_dict()")
    return state


def load_checkpoint(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module, ModelInfo]:
    """Load a model in eval mode on the CPU. `.pt`/`.pth` need `arch` and the shapes."""
    path = require_file(path, "model file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        raise InputError(f"{path} is an ONNX model: this command needs a checkpoint (.safetensors)")
    if suffix == ".safetensors":
        state, meta = _read_safetensors(path)
        if arch is None:
            info = ModelInfo.from_metadata(meta, path)
        else:
            info = _info_from_flags(path, arch, arch_kwargs, input_shape, num_classes)
    elif suffix in (".pt", ".pth", ".bin"):
        if arch is None:
            raise InputError(
                f"{path} is a plain state dict that does not name its architecture: pass --arch "
                "(mlp, cnn, resnet or package.module:factory)"
            )
        state = _read_state_dict(path)
        info = _info_from_flags(path, arch, arch_kwargs, input_shape, num_classes)
    else:
        raise CheckpointError(
            f"{path} is not a checkpoint: expected .safetensors (or .pt/.pth with --arch)"
        )
    model = build_model(info.arch, info.arch_kwargs, info.input_shape, info.num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:240]
        raise CheckpointError(
            f"the weights in {path} do not fit architecture '{info.arch}' ({detail}): pass the "
            "--arch (and --arch-kwargs) the file was trained with"
        ) from None
    return model.eval(), info


def _info_from_flags(path, arch, arch_kwargs, input_shape, num_classes) -> ModelInfo:
    if input_shape is None or num_classes is None:
        raise InputError(
            f"{path}: with --arch the input shape and class count come from --data or the keys; "
            "give --data"
        )
    return ModelInfo(arch, dict(arch_kwargs or {}), tuple(input_shape), int(num_classes))


# ----------------------------------------------------------------------------- ONNX export


class _Exposed(nn.Module):
    """Returns the logits and every named layer's activation, so that each gets a known name."""

    def __init__(self, model: nn.Module, layers: list[str]):
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, x):
        from contextlib import ExitStack

        with ExitStack() as stack:
            stores = [stack.enter_context(capture(self.model, name)) for name in self.layers]
            logits = self.model(x)
        return (logits, *[s["act"] for s in stores])


def export_onnx(
    model: nn.Module,
    info: ModelInfo,
    path: str | Path,
    *,
    force: bool,
    check_inputs: np.ndarray | None = None,
    atol: float = 1e-4,
) -> dict:
    """Export with a dynamic batch, check with onnx.checker and for parity with torch.

    Every layer's activation is a named tensor inside the graph (name = layer name, e.g.
    "head:input"), but only the logits are a graph output: nothing in the interface points
    to the watermark, and `extract` finds the carrier by name.
    """
    import onnx

    model = model.cpu().eval()
    layers = layer_names(model)
    example = torch.zeros(2, *info.input_shape)
    # the exporter refuses some names (e.g. "0", a layer of nn.Sequential): export under
    # placeholders, then give every activation its layer's name inside the graph
    placeholders = [f"deepsigns_layer_{i}" for i in range(len(layers))]
    output_names = ["logits", *placeholders]
    with atomic_output(path, force) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            # eval(): the exporter restores the wrapper's mode afterwards, and a wrapper left in
            # training mode would switch the model's BatchNorm to batch statistics
            _Exposed(model, layers).eval(),
            (example,),
            str(tmp),
            input_names=["input"],
            output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in ["input", *output_names]},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
        proto = onnx.load(str(tmp))
        _rename_tensors(proto.graph, dict(zip(placeholders, layers, strict=True)))
        keep = [o for o in proto.graph.output if o.name == "logits"]
        del proto.graph.output[:]
        proto.graph.output.extend(keep)
        proto.producer_name = "deepsigns"
        for key, value in {
            "deepsigns.arch": info.arch,
            "deepsigns.input_shape": json.dumps(list(info.input_shape)),
            "deepsigns.num_classes": str(info.num_classes),
            "deepsigns.layers": json.dumps(layers),
        }.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
        parity = _parity(model, proto, info, check_inputs)
        if parity > atol:
            raise CheckpointError(
                f"ONNX export differs from torch by {parity:.2e} (> {atol}): this architecture "
                "uses an operation the exporter does not reproduce; report it"
            )
    return {"max_abs_diff": parity, "opset": ONNX_OPSET, "layers": layers}


def _rename_tensors(graph, names: dict[str, str]) -> None:
    """Rename tensors everywhere they appear in a graph (node inputs and outputs, value infos)."""
    for node in graph.node:
        for tensors in (node.input, node.output):
            for i, name in enumerate(tensors):
                if name in names:
                    tensors[i] = names[name]
    for info in [*graph.output, *graph.value_info]:
        if info.name in names:
            info.name = names[info.name]


def _parity(model: nn.Module, proto, info: ModelInfo, inputs: np.ndarray | None) -> float:
    from .runtime import make_session

    if inputs is None:
        inputs = np.random.default_rng(0).random((16, *info.input_shape), dtype=np.float32)
    inputs = np.ascontiguousarray(inputs, dtype=np.float32)
    session = make_session(proto.SerializeToString(), provider="cpu")
    (onnx_out,) = session.run(["logits"], {"input": inputs})
    model.eval()
    with torch.no_grad():
        torch_out = model(torch.from_numpy(inputs)).numpy()
    return float(np.abs(onnx_out - torch_out).max())
