"""Scheme 1: DeepSigns hidden-layer watermark (paper section 3.1), white-box.

The owner's bits live in the mean activation of a secret trigger set (training samples
of secret target classes) at a carrier layer, read through a secret projection A ~ N(0, 1):
bits = (mean . A > 0).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import stats
from ..errors import InputError, SchemeError
from ..training import Objective
from ..zoo import activations, capture, default_layer, layer_width
from .base import Keys, Scheme, register_scheme

__all__ = ["HiddenScheme", "message_to_bits", "bits_to_message"]

DEFAULTS = {
    "classes": 1,
    "trigger_per_class": 64,
    "lambda1": 0.01,  # activation isolation (paper: 0.01)
    "lambda2": 1.0,  # projection towards the bits
    "margin": 0.5,  # required |projection| in units of a random projection's spread
    # (0.5, not 1.0: a non-negative (ReLU) carrier cannot give every bit 1.0 past ~64 bits)
    "trigger_batch": 32,  # trigger samples mixed into every step
}


def message_to_bits(message: str) -> np.ndarray:
    raw = np.frombuffer(message.encode("utf-8"), dtype=np.uint8)
    return np.unpackbits(raw).astype(np.uint8)


def bits_to_message(bits: np.ndarray) -> str:
    return np.packbits(bits.astype(np.uint8)).tobytes().decode("utf-8", errors="replace")


@register_scheme("hidden")
class HiddenScheme(Scheme):
    # ------------------------------------------------------------------ keygen
    def keygen(self, model, info, data, options, rng) -> Keys:
        opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
        layer = opts.get("layer") or default_layer(model)
        width = layer_width(model, layer, info.input_shape)
        message = opts.get("message")
        if message:
            bits = message_to_bits(message)
        else:
            n = int(opts.get("bits") or 32)
            if n < 1:
                raise SchemeError(f"--bits must be at least 1, got {n}")
            bits = rng.integers(0, 2, n).astype(np.uint8)
        n_bits = len(bits)
        if n_bits > width:
            raise SchemeError(
                f"{n_bits} bits do not fit layer '{layer}', which has {width} units: use at "
                f"most {width} bits (a shorter --message or smaller --bits) or a wider --layer"
            )
        s = int(opts["classes"])
        if not 1 <= s < info.num_classes:
            raise SchemeError(f"--classes must be between 1 and {info.num_classes - 1}, got {s}")
        classes = np.sort(rng.choice(info.num_classes, size=s, replace=False))
        trig_idx = []
        for c in classes:
            members = np.flatnonzero(data.y_train == c)
            if len(members) == 0:
                raise SchemeError(f"class {c} has no training samples: cannot build a trigger set")
            take = min(int(opts["trigger_per_class"]), len(members))
            trig_idx.append(rng.choice(members, size=take, replace=False))
        trig_idx = np.concatenate(trig_idx)
        params = {
            "layer": layer,
            "width": width,
            "n_bits": n_bits,
            "message": message or None,
            **{k: opts[k] for k in ("lambda1", "lambda2", "margin", "trigger_batch")},
        }
        arrays = {
            "A": rng.standard_normal((width, n_bits)).astype(np.float32),
            "bits": np.tile(bits, (s, 1)),  # (s, N): the same signature at every class centre
            "classes": classes.astype(np.int64),
            "trigger_x": data.x_train[trig_idx].astype(np.float32),
            "trigger_y": data.y_train[trig_idx].astype(np.int64),
        }
        return params, arrays

    # ------------------------------------------------------------------ embed
    def objective(self, model, data, keys) -> Objective:
        return HiddenObjective(keys, model, data)

    # ------------------------------------------------------------------ extract
    @staticmethod
    def _means(acts: np.ndarray, arrays) -> np.ndarray:
        ty = arrays["trigger_y"]
        return np.stack([acts[ty == c].mean(0) for c in arrays["classes"]])

    def _decide(self, means: np.ndarray, keys: Keys, alpha: float, tries: int = 1) -> dict:
        params, arrays = keys
        found = (means @ arrays["A"] > 0).astype(np.uint8)  # (s, N)
        want = arrays["bits"]
        errors = int((found != want).sum())
        n = int(want.size)
        p = stats.bonferroni(stats.bits_p_value(errors, n), tries)
        result = {
            "scheme": "hidden",
            "layer": params["layer"],
            "bits": "".join(map(str, found.reshape(-1))),
            "n_bits": n,
            "bit_errors": errors,
            "ber": errors / n,
            "p_value": p,
            "max_bit_errors": stats.max_bit_errors(n, alpha / max(1, tries)),
            "detected": p <= alpha,
        }
        if params.get("message"):
            result["message"] = bits_to_message(found[0])
        if stats.smallest_bits_p_value(n) * max(1, tries) > alpha:
            result["warning"] = (
                f"{n} bits cannot reach alpha={alpha:g} (best p = {stats.smallest_bits_p_value(n):.2g}"
                f" x {tries} tries): re-key with more --bits"
            )
        return result

    def _absent(self, keys, alpha, note: str) -> dict:
        """No carrier in this model: another architecture, so not ours (exit 1, not bad input)."""
        params, arrays = keys
        n = int(arrays["bits"].size)
        # nothing was read: no bit counts (not "every bit wrong"), and no evidence at all
        return {"scheme": "hidden", "layer": params["layer"], "bits": "", "n_bits": n,
                "bit_errors": None, "ber": None, "p_value": 1.0,
                "max_bit_errors": stats.max_bit_errors(n, alpha), "detected": False,
                "tensor": None, "candidates": 0, "note": note}

    def extract(self, model, keys, alpha) -> dict:
        params, arrays = keys
        try:
            acts = activations(model, params["layer"], arrays["trigger_x"]).numpy()
        except InputError:  # no such layer in this model
            return self._absent(keys, alpha, f"no layer '{params['layer']}' in this model: "
                                "not the architecture the keys were made for")
        if acts.shape[1] != params["width"]:
            return self._absent(keys, alpha, f"layer '{params['layer']}' has {acts.shape[1]} "
                                f"units, the keys expect {params['width']}: not our architecture")
        result = self._decide(self._means(acts, arrays), keys, alpha)
        result["tensor"] = params["layer"]
        result["candidates"] = 1
        return result

    def extract_onnx(self, model, keys, alpha) -> dict:
        """Read the carrier by name when we exported the file; else try every tensor of its width."""
        params, arrays = keys
        x = arrays["trigger_x"]
        named = model.intermediates(x, [params["layer"]])
        if params["layer"] in named and named[params["layer"]].shape[1] == params["width"]:
            candidates = named
        else:
            candidates = {
                k: v for k, v in model.intermediates(x).items() if v.shape[1] == params["width"]
            }
        if not candidates:
            return self._absent(keys, alpha, f"no tensor of width {params['width']} in this "
                                "model: not our architecture")
        best = None
        for name, acts in candidates.items():
            r = self._decide(self._means(acts, arrays), keys, alpha, tries=len(candidates))
            r["tensor"] = name
            if best is None or r["bit_errors"] < best["bit_errors"]:
                best = r
        best["candidates"] = len(candidates)
        return best


class HiddenObjective(Objective):
    """loss1 (isolate the classes around trainable centres) + loss2 (project the trigger mean to the bits)."""

    def __init__(self, keys: Keys, model: nn.Module, data):
        params, arrays = keys
        self.params = params
        self.layer = params["layer"]
        self.classes = torch.as_tensor(arrays["classes"])
        self.signs = torch.as_tensor(arrays["bits"], dtype=torch.float32) * 2 - 1  # (s, N)
        self.A = torch.as_tensor(arrays["A"])
        self.tx = torch.as_tensor(arrays["trigger_x"])
        self.ty = torch.as_tensor(arrays["trigger_y"])
        # centres start at the class means of the pretrained model
        acts = activations(model, self.layer, data.x_train)
        if acts.shape[1] != params["width"]:
            raise SchemeError(
                f"layer '{self.layer}' has {acts.shape[1]} units in this model, the keys expect "
                f"{params['width']}: embed into the model the keys were made for"
            )
        y = torch.as_tensor(data.y_train)
        num_classes = int(max(data.num_classes, y.max() + 1))
        centres = torch.zeros(num_classes, acts.shape[1])
        for c in range(num_classes):
            if (y == c).any():
                centres[c] = acts[y == c].mean(0)
        self.scale = float(acts.pow(2).sum(1).mean().clamp_min(1e-6))  # typical |a|^2
        self.centres = nn.Parameter(centres)
        self._ctx = None
        self.store: dict = {}

    def setup(self, model, device):
        self.device = device
        for name in ("classes", "signs", "A"):
            setattr(self, name, getattr(self, name).to(device))
        with torch.no_grad():
            self.centres.data = self.centres.data.to(device)
        self._ctx = capture(model, self.layer)
        self.store = self._ctx.__enter__()

    def teardown(self):
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None
        self.centres.data = self.centres.data.cpu()

    def parameters(self):
        return [self.centres]

    def extra_batch(self, rng):
        per = int(self.params["trigger_batch"])
        idx = torch.as_tensor(rng.choice(len(self.tx), size=min(per, len(self.tx)), replace=False))
        return self.tx[idx], self.ty[idx]

    def loss(self, logits, y, own):
        act = self.store["act"]
        # loss1: pull every activation to its class centre; push target centres from the others
        # (trigger samples are training samples: they get cross-entropy here too)
        ce = nn.functional.cross_entropy(logits[own], y[own]) if own.stop > own.start else 0.0
        pull = (act - self.centres[y]).pow(2).sum(1).mean() / self.scale
        tc = self.centres[self.classes]  # (s, M)
        d2 = torch.cdist(tc, self.centres).pow(2) / self.scale  # (s, C)
        other = torch.ones_like(d2, dtype=torch.bool)
        other[torch.arange(len(self.classes), device=d2.device), self.classes] = False
        push = torch.exp(-d2[other]).mean()  # bounded in (0, 1]: cannot diverge
        loss1 = pull + push
        # loss2: the trigger samples (our rows of the batch) drive the extracted quantity itself
        trig_act, trig_y = act[own], y[own]
        terms = []
        for k, c in enumerate(self.classes):
            mask = trig_y == c
            if not mask.any():  # no sample of this class in the batch: no term, no NaN
                continue
            proj = trig_act[mask].mean(0) @ self.A  # (N,)
            z = proj / self.A.norm(dim=0) / trig_act[mask].mean(0).norm().clamp_min(1e-6)
            z = z * (self.A.shape[0] ** 0.5)  # ~N(0, 1) for an unrelated mean activation
            bce = nn.functional.binary_cross_entropy_with_logits(z, (self.signs[k] + 1) / 2)
            hinge = torch.relu(float(self.params["margin"]) - self.signs[k] * z).mean()
            terms.append(bce + hinge)
        loss2 = torch.stack(terms).mean() if terms else act.sum() * 0
        weight = (own.stop - own.start) / max(1, own.stop)  # their share of the batch, as before
        return (
            weight * ce
            + float(self.params["lambda1"]) * loss1
            + float(self.params["lambda2"]) * loss2
        )
