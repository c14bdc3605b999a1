"""Public facts of any file of ours: never a secret."""

from __future__ import annotations

from pathlib import Path

from .errors import InputError, one_line, shown
from .fileio import require_file

__all__ = ["describe"]


def describe(path: str | Path) -> dict:
    path = require_file(path, "file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise InputError(f"cannot read {shown(path)} ({one_line(exc)}): give a file deepsigns wrote") from None
    from .bundle import MAGIC

    if head == MAGIC or path.suffix == ".dskey":
        return _bundle(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _checkpoint(path)
    if suffix == ".onnx":
        return _onnx(path)
    raise InputError(f"{path}: not a file deepsigns knows (.dskey, .safetensors, .onnx)")


def _bundle(path: Path) -> dict:
    from .bundle import commitment, read_header

    header = read_header(path)
    kdf = {k: v for k, v in header["kdf"].items() if k != "salt"}
    return {"kind": "key bundle", "path": str(path), "format": header["format"],
            "version": header["version"], "schemes": header["schemes"],
            "created": header["created"], "updated": header.get("updated"),
            "key_id": header["key_id"], "cipher": header["cipher"], "kdf": kdf,
            "commitment": commitment(path)}


def _checkpoint(path: Path) -> dict:
    from .checkpoint import ModelInfo, _read_safetensors

    state, meta = _read_safetensors(path)
    # (inspect has no --arch to offer, as the other commands do)
    info = ModelInfo.from_metadata(meta, path, "inspect shows the checkpoints deepsigns writes (train, embed, attack)")
    facts = {"kind": "checkpoint", "path": str(path), "arch": info.arch,
             "arch_kwargs": info.arch_kwargs, "input_shape": list(info.input_shape),
             "num_classes": info.num_classes, "lr": info.lr,
             "tensors": len(state), "parameters": int(sum(t.numel() for t in state.values()))}
    # then the file's own extra fields, by name: none of them can stand in for a fact we report,
    # nor push one out of the table's first rows
    return {**facts, **{k: v for k, v in sorted(info.extra.items()) if k not in facts}}


def _onnx(path: Path) -> dict:
    from .runtime import OnnxModel

    model = OnnxModel(path, provider="cpu")
    g = model.proto.graph
    init = {t.name for t in g.initializer}

    def shape(v):
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in v.type.tensor_type.shape.dim]

    meta = dict(model.metadata)  # strings, shown as they are: a suspect's metadata is data
    return {"kind": "onnx", "path": str(path),
            "opset": max((o.version for o in model.proto.opset_import if o.domain in ("", "ai.onnx")), default=None),
            "producer": model.proto.producer_name,
            "inputs": [{"name": i.name, "shape": shape(i)} for i in g.input if i.name not in init],
            "outputs": [{"name": o.name, "shape": shape(o)} for o in g.output],
            "nodes": len(g.node), "metadata": meta}
