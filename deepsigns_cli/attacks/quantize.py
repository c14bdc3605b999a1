"""Weight quantization: int8 through onnxruntime (an .onnx --out), or k-bit rounding (a
.safetensors --out).

int8: the plain ONNX export, pre-processed and quantized by onnxruntime's own tools
(`quant_pre_process`, then `quantize_dynamic` with signed int8 weights, per tensor): what a
thief who deploys with onnxruntime gets in two calls. Weights become int8 initializers,
biases stay float, activations are quantized on the fly. With `--static`, `quantize_static`
in onnxruntime's QOperator format instead: the activations too are uint8 throughout (QGemm,
QLinearConv), at ranges calibrated on the attacker's training samples (MinMax, at most
CALIBRATION_ROWS of them).

k-bit: every parameter of the model, the weights of dimension >= 2 and the 1-D ones
(biases, normalisation scales and shifts) alike, is rounded to the nearest of 2^k evenly
spaced levels over its own [min, max]; buffers (BatchNorm's running statistics) are left as
they are. Asymmetric (min-max) rather than symmetric over [-max|w|, max|w|]: the levels
cover only the values the tensor has, so the step is as fine as k bits allow (biases are
often all of one sign, where a symmetric grid wastes half its levels), and the extremes are
kept exactly. The price: 0 is not always a level, so weights pruned to zero become small
non-zero ones.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import numpy as np
import torch

from ..errors import InputError, one_line
from ..fileio import scratch_folder
from .base import Attack

__all__ = ["QuantizeAttack", "ATTACK", "round_to_levels"]

CALIBRATION_ROWS = 512  # training samples --static calibrates activation ranges on (a fixed subsample)


def round_to_levels(t: torch.Tensor, bits: int) -> torch.Tensor:
    """`t` rounded to 2^bits evenly spaced levels over [t.min(), t.max()] (same dtype)."""
    x = t.detach().double()
    lo, hi = x.min(), x.max()
    if not hi > lo:  # constant (or one element): already on its only level
        return t.detach().clone()
    step = (hi - lo) / (2**bits - 1)
    q = torch.round((x - lo) / step).clamp_(0, 2**bits - 1)
    return (lo + q * step).to(t.dtype)


def _relative_change(old: np.ndarray, new: np.ndarray) -> float:
    """max |new - old| relative to the tensor's largest magnitude."""
    scale = float(np.abs(old).max()) if old.size else 0.0
    return float(np.abs(new - old).max()) / scale if scale > 0 else 0.0


@contextmanager
def _quiet_quantizer():
    """onnxruntime's quantizer logs through the root logger (`logging.info`, `logging.warning`),
    which installs a handler on stderr for the rest of the process: keep both out."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


class QuantizeAttack(Attack):
    """`max_relative_change`: the largest weight change, relative to its tensor's largest
    magnitude, over the tensors quantized."""

    name = "quantize"

    def run(self, model, ctx):
        bits, static = int(ctx.option("bits", 8)), bool(ctx.option("static", False))
        if static and ctx.out_kind != "onnx":
            raise InputError("--static quantizes activations in an ONNX graph: use --out x.onnx (a --sweep of "
                             "quantize rounds weights to 2^k levels in checkpoints, and takes no --static)")
        if ctx.out_kind == "onnx":
            if bits != 8:
                raise InputError("int8 only for .onnx; use --out .safetensors for k-bit rounding")
            from .permute import tied_layers

            tied = sorted(tied_layers(model))
            if tied:  # (it transposed a shared square weight once per layer: one layer computed W x for W^T x)
                raise InputError(f"onnxruntime's int8 quantizer mishandles weights shared between layers (tied "
                                 f"here: {one_line(', '.join(tied), 100)}): use --out .safetensors for k-bit rounding")
            proto, change = self._int8_onnx(model, ctx, static)
            return proto, {"bits": 8, "mode": "int8-static-onnx" if static else "int8-onnx",
                           "max_relative_change": change}
        change = 0.0
        with torch.no_grad():
            for p in model.parameters():
                if not p.is_floating_point() or p.numel() == 0:
                    continue
                new = round_to_levels(p, bits)
                change = max(change, _relative_change(p.cpu().numpy(), new.cpu().numpy()))
                p.copy_(new)
        return model, {"bits": bits, "mode": "k-bit", "max_relative_change": change}

    @staticmethod
    def _int8_onnx(model, ctx, static: bool):
        import onnx
        from onnx import numpy_helper
        from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

        from ..checkpoint import export_onnx
        from ..data import bounded_rows, take

        with scratch_folder("deepsigns-quantize-") as folder:  # (removed by the next command if this one is killed)
            plain, ready, quantized = (folder / n for n in ("plain.onnx", "pre.onnx", "int8.onnx"))
            export_onnx(model, ctx.info, plain, check_inputs=ctx.data.x_test[:64])
            with _quiet_quantizer():
                quant_pre_process(plain, ready)
                if static:
                    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

                    name = onnx.load(str(ready)).graph.input[0].name
                    x = np.asarray(take(ctx.data.x_train, bounded_rows(len(ctx.data.x_train), CALIBRATION_ROWS)),
                                   dtype=np.float32)

                    class Batches(CalibrationDataReader):
                        def __init__(self):
                            self.left = iter(range(0, len(x), 64))

                        def get_next(self):
                            start = next(self.left, None)
                            return None if start is None else {name: x[start : start + 64]}

                    quantize_static(ready, quantized, Batches(), quant_format=QuantFormat.QOperator,
                                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
                else:
                    quantize_dynamic(ready, quantized, weight_type=QuantType.QInt8)
            proto = onnx.load(str(quantized))
            floats = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(ready)).graph.initializer}
        # the int8 weights, dequantized, against the float ones they replaced
        inits = {t.name: t for t in proto.graph.initializer}
        change = 0.0
        for name, tensor in inits.items():
            base = name.removesuffix("_quantized")
            if base == name or base not in floats or f"{base}_scale" not in inits:
                continue
            q = numpy_helper.to_array(tensor).astype(np.float64)
            zero = numpy_helper.to_array(inits[f"{base}_zero_point"]) if f"{base}_zero_point" in inits else 0
            scale = numpy_helper.to_array(inits[f"{base}_scale"])
            if np.size(scale) != 1 or np.size(zero) != 1:
                continue  # (per-channel scales: not made by the call above)
            new = (q - zero) * scale
            # a Gemm's weight is stored transposed for MatMulInteger: compare in its layout
            old = floats[base]
            layouts = [w for w in (old, old.T) if w.shape == new.shape]
            if layouts:
                change = max(change, min(_relative_change(w, new) for w in layouts))
        return proto, change


ATTACK = QuantizeAttack
