"""A suspect model as the schemes read it: the same two questions for torch and ONNX.

`scores(x)` gives the model's class scores for inputs x, `answers(x)` its predicted labels
(from the scores, or from an output of labels); `carriers(x, layer, width)` gives the
candidate activations a hidden-layer signature may sit in. Each scheme has one read path
written against this interface (no torch import here: `verify` runs on onnxruntime alone).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .defaults import DEFAULT_TIMEOUT
from .errors import InputError, OnnxTooMuch, SchemeError, shown

if TYPE_CHECKING:
    from torch import nn

    from .runtime import OnnxModel

__all__ = ["Suspect", "TorchSuspect", "OnnxSuspect", "open_suspect", "MAX_UNITS"]

# the units of an ONNX graph read side by side (`Suspect.units`), in the graph's order: with
# the keys' 448 inputs, 56 MiB of activations, and a line-up of 512 x 65,536 (each unit also negated)
MAX_UNITS = 1 << 15


class Suspect:
    name: str = ""
    blackbox_only: bool = False  # True for `verify`: only the outputs may be used
    answer_classes: int | None = None  # classes scored by the last answers() (None: it read labels)
    query_budget: int | None = None  # the most queries one black-box reading may make (None: its default)

    def outputs(self) -> list[str | None]:
        """The outputs a black-box reading reads, one reading each, all counted in the p-value:
        every usable output of an ONNX model (a thief can put a decoy before the real answer)
        unless one was chosen; [None], the model's one answer, otherwise."""
        return [None]

    def scores(self, x: np.ndarray, output: str | None = None) -> np.ndarray:
        raise NotImplementedError

    def answers(self, x: np.ndarray, output: str | None = None) -> tuple[np.ndarray, str, str]:
        """(the predicted label of each input, int64 (n,), -1 for no answer; the output read;
        its kind: scores, probabilities or labels)."""
        raise NotImplementedError

    def carriers(self, x: np.ndarray, layer: str, width: int) -> tuple[dict[str, np.ndarray], str]:
        """(candidate name -> (n, width) activations, why there are none when empty)."""
        raise NotImplementedError

    @property
    def broken(self) -> bool:
        """Whether the suspect failed as a whole (an ONNX model that did not answer in time or
        crashed): a reading then fails, rather than going on with its other outputs."""
        return False

    def units(self, x: np.ndarray) -> np.ndarray | None:
        """Every unit the model computes for inputs x, side by side (n, U), where the carrier
        may have been rebuilt (an ONNX graph: padded, split, laid out otherwise); None where the
        carrier is known (a checkpoint's layer) or nothing is found."""
        return None

    def answer_kind(self, output: str | None = None) -> str:
        """What the suspect answers with: "scores", "probabilities" or "labels"."""
        return "scores"

    def loss_gradient(self, x: np.ndarray, target: int) -> np.ndarray | None:
        """d cross-entropy(model(x), target) / dx, exactly; None where only answers can be had
        (an ONNX model: the reader then estimates it from scores)."""
        return None

    def close(self) -> None:
        """Free what the suspect holds (an ONNX model's worker process)."""


class TorchSuspect(Suspect):
    """A model in memory. `shared`: its queries are shared out among the processes of a run
    (each answers its share of the rows; every process must ask the same)."""

    def __init__(self, model: nn.Module, name: str = "model", *, shared: bool = False,
                 input_shape: tuple[int, ...] | None = None):
        self.model, self.name, self.shared = model, name, shared
        self.input_shape = None if input_shape is None else tuple(input_shape)  # (a checkpoint's, when known)

    def _fit(self, x: np.ndarray) -> np.ndarray:
        """The keys' inputs, when they are samples of the model's input shape (a bundle is sealed,
        but who sealed it may be the other side of a dispute)."""
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise SchemeError(f"{shown(self.name)} takes inputs of shape {list(self.input_shape)} but the keys are "
                              f"samples of shape {list(x.shape[1:])}: this model cannot be queried with these keys")
        return x

    def scores(self, x, output=None):
        from .training import Processes, predict

        x = self._fit(x)
        if self.shared:
            return Processes.current().share_rows(lambda rows: predict(self.model, rows), x)
        return predict(self.model, x)

    def answers(self, x, output=None):
        from .runtime import answers_from_scores

        scores = self.scores(x)
        self.answer_classes = scores.shape[1]
        return answers_from_scores(scores), "logits", "scores"

    def loss_gradient(self, x, target):
        from .training import loss_gradient

        return loss_gradient(self.model, self._fit(x), target)

    def carriers(self, x, layer, width):
        from .zoo import activations

        try:
            acts = activations(self.model, layer, self._fit(x)).numpy()
        except InputError:  # no such layer in this model
            return {}, f"no layer '{layer}' in this model: not the architecture the keys were made for"
        if acts.shape[1] != width:
            return {}, (f"layer '{layer}' has {acts.shape[1]} units, the keys expect {width}: "
                        "not our architecture")
        return {layer: acts}, ""


class OnnxSuspect(Suspect):
    def __init__(self, model: OnnxModel, *, blackbox_only: bool = False, output: str | None = None):
        self.onnx, self.name, self.blackbox_only = model, str(model.path), blackbox_only
        self.output = output  # the graph output to read; None: chosen by kind
        if output is not None:
            model.choose_output(output)  # an unknown name fails now, before any query

    @property
    def broken(self):
        return self.onnx.broken

    def outputs(self):
        if self.output is not None:
            return [self.output]
        return [name for name, (kind, _) in self.onnx.outputs.items() if kind] or [None]  # (None: none can be
        # read, and a reading says why)

    def _chosen(self, output: str | None) -> str | None:
        return self.output if output is None else output

    def scores(self, x, output=None):
        return self.onnx.scores(x, output=self._chosen(output))

    def answers(self, x, output=None):
        got = self.onnx.answers(x, self._chosen(output))
        self.answer_classes = self.onnx.answer_classes
        return got

    def answer_kind(self, output=None):
        return self.onnx.choose_output(self._chosen(output))[1]

    def close(self):
        self.onnx.close()

    def carriers(self, x, layer, width):
        # every tensor of the carrier's width is a candidate, whatever its name (a hostile file
        # can give the carrier's name to a decoy); the read-out counts the candidates in p
        try:
            found = self.onnx.intermediates(x, width)
        except OnnxTooMuch as exc:  # (the other schemes are still read)
            return {}, f"not read: {exc}"
        return found, ("" if found else f"no tensor of width {width} in this model: not our architecture")

    def units(self, x):
        try:
            found = self.onnx.intermediates(x, units=MAX_UNITS)
        except OnnxTooMuch:
            return None
        if not found:
            return None
        # and each unit negated: the line-up follows units that rise with ours, and a carrier
        # negated (its ReLU turned to a Min at 0, the next layer negated) falls with them
        every = np.concatenate(list(found.values()), axis=1)
        return np.concatenate([every, -every], axis=1)


def open_suspect(path: str | Path, *, shapes: tuple[tuple[int, ...], int] | None = None,
                 arch: str | None = None, arch_kwargs: dict | None = None,
                 provider: str = "auto", timeout: float | None = DEFAULT_TIMEOUT,
                 output: str | None = None) -> Suspect:
    """A checkpoint (torch) or an ONNX file (onnxruntime) to examine.

    `shapes` (input shape, classes) come from the keys, for a plain state dict with --arch;
    `output` names the ONNX output to read (None: chosen by kind)."""
    from .runtime import OnnxModel

    if Path(path).suffix.lower() == ".onnx":
        return OnnxSuspect(OnnxModel(path, provider=provider, timeout=timeout), output=output)
    if output is not None:
        raise InputError("--output names an output of an ONNX model: leave it out for a checkpoint")
    from .checkpoint import load_checkpoint

    input_shape, num_classes = shapes if shapes else (None, None)
    model, info = load_checkpoint(path, arch=arch, arch_kwargs=arch_kwargs,
                                  input_shape=input_shape, num_classes=num_classes)
    return TorchSuspect(model, str(path), input_shape=info.input_shape)
