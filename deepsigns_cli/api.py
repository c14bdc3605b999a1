"""The library's front door: every command is a function here, callable from Python.

Data flows one way: CLI -> api -> schemes/training/checkpoint -> torch/onnxruntime.
Nothing here prints; progress goes through a callback.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import stats
from .bundle import Bundle
from .data import Dataset
from .errors import InputError, SchemeError
from .schemes import BLACKBOX, get_scheme

if TYPE_CHECKING:
    from .checkpoint import ModelInfo

# torch comes in through checkpoint/training/zoo, imported inside the functions that need it:
# `verify` runs on onnxruntime alone and starts in a fraction of the time

__all__ = [
    "train_baseline",
    "make_keys",
    "embed_keys",
    "extract_watermarks",
    "verify_ownership",
    "load_suspect",
    "combine",
]


def train_baseline(
    arch: str,
    data: Dataset,
    *,
    arch_kwargs: dict | None = None,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "auto",
    progress=None,
):
    """A plain, unmarked model. Returns (model, info, report)."""
    from .checkpoint import ModelInfo
    from .training import TrainConfig, evaluate, fit, seed_everything
    from .zoo import build_model

    seed_everything(seed)
    model = build_model(arch, arch_kwargs or {}, data.input_shape, data.num_classes)
    cfg = TrainConfig(epochs, batch_size, lr, seed, device, "train")
    history = fit(model, data.x_train, data.y_train, cfg, progress=progress)
    model.cpu()
    acc = evaluate(model, data.x_test, data.y_test)
    info = ModelInfo(
        arch, dict(arch_kwargs or {}), data.input_shape, data.num_classes, lr,
        extra={"producer": "deepsigns", "data": data.name, "seed": seed,
               "test_accuracy": round(acc, 4)},
    )
    report = {"command": "train", "arch": arch, "data": data.name, "epochs": history["epochs"],
              "test_accuracy": acc, "seconds_per_epoch": float(np.mean(history["epoch_seconds"]))}
    return model, info, report


def make_keys(model, info: ModelInfo, data: Dataset, schemes: list[str], options: dict,
              *, seed: int | None = None) -> Bundle:
    """Draw every secret for the given schemes (keys that depend on the model use it)."""
    from .checkpoint import fingerprint

    data.check_fits(info.input_shape, info.num_classes)
    if not schemes:
        raise InputError("no scheme given: use --scheme hidden (or output, or hidden,output)")
    rng = np.random.default_rng(seed)  # seed=None: fresh OS entropy, the normal case for keys
    bundle = Bundle(info={
        "arch": info.arch, "arch_kwargs": info.arch_kwargs,
        "input_shape": list(info.input_shape), "num_classes": info.num_classes,
        "base_fingerprint": fingerprint(model), "embedded": False,
    })
    for name in schemes:
        params, arrays = get_scheme(name).keygen(model, info, data, options.get(name, {}), rng)
        bundle.add(name, params, arrays)
    return bundle


def embed_keys(model, info: ModelInfo, data: Dataset, bundle: Bundle, *, epochs: int | None = None,
               lr: float | None = None, seed: int = 0, device: str = "auto", progress=None):
    """Embed every scheme of the bundle in order (hidden before output, as in the paper's Fig. 2).

    Returns (model, info, bundle, report); the model is trained in place.
    """
    from .checkpoint import fingerprint
    from .training import TrainConfig, evaluate, resolve_device

    data.check_fits(info.input_shape, info.num_classes)
    _check_bundle_fits(bundle, info)
    dev = resolve_device(device)
    acc_before = evaluate(model, data.x_test, data.y_test)
    report = {"command": "embed", "accuracy_before": acc_before, "schemes": {}}
    embedded = []  # (scheme, keys) already in the model: their objectives keep them there
    for name in _embed_order(bundle):
        scheme = get_scheme(name)
        params, arrays = bundle.schemes[name]["params"], bundle.schemes[name]["arrays"]
        # --epochs, else the scheme's own default (hidden: 10; output: a cap, it stops at 99%)
        default_epochs = params.get("max_epochs", 10)
        cfg = TrainConfig(epochs=epochs or default_epochs, lr=lr or info.lr, seed=seed,
                          device=str(dev), description=f"embed {name}")
        model.to(dev)
        also = tuple(s.objective(model, data, k) for s, k in embedded)
        params, arrays = scheme.embed(model, info, data, (params, arrays), cfg, progress, also)
        model.cpu()
        history = params.pop("embed_history", {})
        embedded.append((scheme, (params, arrays)))
        bundle.add(name, params, arrays)
        report["schemes"][name] = {
            "epochs": history.get("epochs"),
            "seconds_per_epoch": float(np.mean(history["epoch_seconds"])) if history else None,
        }
    report["accuracy_after"] = evaluate(model, data.x_test, data.y_test)
    fp = fingerprint(model)
    bundle.info.update(embedded=True, marked_fingerprint=fp)
    # no key id and no "embed" in the metadata: a marked file must look like any other
    info = replace(info, extra={**info.extra, "test_accuracy": round(report["accuracy_after"], 4)})
    report["fingerprint"] = fp
    return model, info, bundle, report


def _embed_order(bundle: Bundle) -> list[str]:
    order = ["hidden", "output", "gradsigns"]
    return sorted(bundle.schemes, key=lambda s: order.index(s) if s in order else len(order))


def _check_bundle_fits(bundle: Bundle, info: ModelInfo) -> None:
    made_for = (bundle.info.get("arch"), bundle.info.get("arch_kwargs") or {})
    if made_for != (info.arch, info.arch_kwargs or {}):
        raise SchemeError(
            f"the keys were made for architecture '{made_for[0]}' {made_for[1] or ''}, this model "
            f"is '{info.arch}' {info.arch_kwargs or ''}: embed into the model the keys were made for"
        )
    want = tuple(bundle.info.get("input_shape", info.input_shape))
    if want != tuple(info.input_shape) or bundle.info.get("num_classes") != info.num_classes:
        raise SchemeError(
            f"the keys were made for inputs {list(want)} and {bundle.info.get('num_classes')} "
            f"classes, this model takes {list(info.input_shape)} and {info.num_classes}: "
            "use the model the keys were made with"
        )


def combine(results: list[dict], alpha: float) -> dict:
    """Overall decision over several schemes: Bonferroni over the schemes that could decide."""
    p = stats.bonferroni(min((r["p_value"] for r in results), default=1.0), len(results))
    return {"detected": p <= alpha, "p_value": p, "alpha": alpha, "results": results}


def load_suspect(path: str | Path, bundle: Bundle, *, arch: str | None = None,
                 provider: str = "auto"):
    """A checkpoint (torch) or an ONNX file (onnxruntime) to examine with these keys."""
    from .checkpoint import load_checkpoint
    from .runtime import OnnxModel

    if Path(path).suffix.lower() == ".onnx":
        return OnnxModel(path, provider=provider)
    model, _ = load_checkpoint(
        path, arch=arch, arch_kwargs=bundle.info.get("arch_kwargs") if arch == bundle.info.get("arch") else None,
        input_shape=tuple(bundle.info["input_shape"]), num_classes=bundle.info["num_classes"],
    )
    return model


def extract_watermarks(suspect, bundle: Bundle, *, alpha: float = 1e-3) -> dict:
    """White-box: every scheme of the bundle read from a torch model or an OnnxModel."""
    from .runtime import OnnxModel

    results = []
    for name in _embed_order(bundle):
        scheme = get_scheme(name)
        keys = (bundle.schemes[name]["params"], bundle.schemes[name]["arrays"])
        if isinstance(suspect, OnnxModel):
            results.append(scheme.extract_onnx(suspect, keys, alpha))
        else:
            results.append(scheme.extract(suspect, keys, alpha))
    return combine(results, alpha)


def verify_ownership(suspect, bundle: Bundle, *, alpha: float = 1e-3) -> dict:
    """Black-box: only the suspect's outputs to the keys are used."""
    names = [n for n in _embed_order(bundle) if BLACKBOX.get(n)]
    if not names:
        raise SchemeError(
            "this bundle holds white-box keys only (scheme: "
            f"{', '.join(bundle.schemes)}): use 'deepsigns extract' to read them"
        )
    results = []
    for name in names:
        keys = (bundle.schemes[name]["params"], bundle.schemes[name]["arrays"])
        results.append(get_scheme(name).verify(suspect, keys, alpha))
    return combine(results, alpha)
