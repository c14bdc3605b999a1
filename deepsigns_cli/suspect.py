"""A suspect model as the schemes read it: the same two questions for torch and ONNX.

`scores(x)` gives the model's class scores for inputs x, `answers(x)` its predicted labels
(from the scores, or from an output of labels); `carriers(x, layer, width)` gives the
candidate activations a hidden-layer signature may sit in. Each scheme has one read path
written against this interface (no torch import here: `verify` runs on onnxruntime alone).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .defaults import DEFAULT_TIMEOUT
from .errors import InputError, OnnxError, OnnxTooMuch, OnnxUnread, SchemeError, one_line, shown

if TYPE_CHECKING:
    from torch import nn

    from .runtime import OnnxModel

__all__ = ["Suspect", "TorchSuspect", "OnnxSuspect", "open_suspect", "MAX_UNITS", "MAX_SET_UNITS", "MAX_SETS",
           "EVERY_UNIT"]

ALONE = ", one input at a time"  # (the reading of the units with the graph fed so)
EVERY_UNIT = "every unit"  # the reading of the units an ONNX graph computes, lined up with ours at once

# the units of an ONNX graph read side by side (`Suspect.units`), in the graph's order: with
# the keys' 448 inputs, 56 MiB of activations, lined up with ours a block of units at a time
MAX_UNITS = 1 << 15
# the tensors that reading left out (wider than what was left of it: a thief can widen the
# carrier with junk units, or put decoys first) are read in further sets, in the graph's order, of
# at most this many values per sample (a CNN's feature maps on 64x64 images; with the keys' 448
# inputs, 448 MiB of float32 activations, held one set at a time) and MAX_SET_BYTES in all
MAX_SET_UNITS = 1 << 18
MAX_SET_BYTES = 1 << 29
MAX_SETS = 8  # further sets read, each one more query of the model and one more reading counted in p


class Suspect:
    name: str = ""
    blackbox_only: bool = False  # True for `verify`: only the outputs may be used
    answer_classes: int | None = None  # classes scored by the last answers() (None: it read labels)
    query_budget: int | None = None  # the most queries one black-box reading may make (None: its default)

    def outputs(self, alone: bool = False) -> list[str | None]:
        """The outputs a black-box reading reads, one reading each, all counted in the p-value:
        every usable output of an ONNX model (a thief can put a decoy before the real answer)
        unless one was chosen; [None], the model's one answer, otherwise. `alone`: read one input
        at a time where that costs what a batch does (an ONNX model that takes batches of any
        length)."""
        return [None]

    def more_outputs(self, done: list) -> list:
        """After the readings of `done`: the further ways to read the outputs that they showed
        are needed (an ONNX model's outputs that answered an input alone otherwise than in a
        batch, read one input at a time)."""
        return []

    def noisy(self, output: str | None = None) -> bool:
        """Whether the output answered the same inputs otherwise from one ask to the next."""
        return False

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

    def units(self, x: np.ndarray, missed: list[str]) -> Iterator[tuple[str, list[np.ndarray]]]:
        """Every unit the model computes for inputs x, in sets of units side by side ((name, its
        tensors (n, u) in order), one set at a time: each is a reading of its own), where the
        carrier may have been rebuilt (an ONNX graph: padded, split, laid out otherwise); none
        where the carrier is known (a checkpoint's layer). `missed` gains why units were out of
        reach ("not read: ..."): a reading that found nothing then is no verdict."""
        return iter(())

    def out_of_reach(self) -> str:
        """Why some tensors the model computes can be read by no reading ('' when none): an ONNX
        graph's subgraphs (an If's branches, a Loop's body)."""
        return ""

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


class Way(NamedTuple):
    """One way of reading an output (`OnnxSuspect.outputs`)."""

    name: str
    ranked: bool = False  # integers read as classes ranked, the first the answer
    alone: bool = False  # the model fed one input at a time

    def __str__(self) -> str:  # (as reports name a reading)
        return self.name + (", as classes ranked" if self.ranked else "") + (ALONE if self.alone else "")


class OnnxSuspect(Suspect):
    def __init__(self, model: OnnxModel, *, blackbox_only: bool = False, output: str | None = None,
                 name: str | None = None):
        self.onnx, self.blackbox_only = model, blackbox_only
        self.name = str(model.path) if name is None else name
        self.output = output  # the graph output to read; None: chosen by kind
        if output is not None:
            model.choose_output(output)  # an unknown name fails now, before any query

    @property
    def broken(self):
        return self.onnx.broken

    def outputs(self, alone=False):
        if self.output is not None:
            names = [self.output]
        elif any(kind for kind, _ in self.onnx.outputs.values()):
            # every output, those it declares no kind for too (a reading says why it cannot read one)
            names = list(self.onnx.outputs)
        else:
            return [None]  # (none can be read, and a reading says why)
        # an output of integers, also read as classes ranked (a top-k's indices)
        ways = [Way(name, ranked) for name in names for ranked in ((False, True) if name in self.onnx.ranked
                                                                   else (False,))]
        if alone and self.onnx.batch_is_dynamic:  # (a fixed batch is filled with copies: its size times the cost)
            ways = [way._replace(alone=True) for way in ways]
        return [way if way.ranked or way.alone else way.name for way in ways]

    def more_outputs(self, done):
        # each output that answered an input alone otherwise than in a batch, read alone too
        ways = [w if isinstance(w, Way) else Way(w) for w in done if w is not None]
        return [w._replace(alone=True) for w in ways if not w.alone and w.name in self.onnx.batch_dependent]

    def noisy(self, output=None):
        return self.onnx.choose_output(self._chosen(output)[0])[0] in self.onnx.noisy

    def _chosen(self, output: str | Way | None) -> tuple[str | None, bool, bool]:
        """(the output's name, read as classes ranked, read one input at a time)."""
        ranked = alone = False
        if isinstance(output, Way):
            output, ranked, alone = output
        if output is not None and output != self.output and not self.onnx.outputs.get(output, ("", ""))[0]:
            # (one of the outputs the readings go through, not --output: not the user's input)
            raise OnnxError(f"output '{one_line(output, 60)}' of {shown(self.name)} {self.onnx.outputs[output][1]}")
        return (self.output if output is None else output), ranked, alone

    def scores(self, x, output=None):  # (a reading as classes ranked answers labels: `answer_kind`)
        name, _, alone = self._chosen(output)
        return self.onnx.scores(x, output=name, alone=alone)

    def answers(self, x, output=None):
        name, ranked, alone = self._chosen(output)
        answers, name, kind = self.onnx.answers(x, name, ranked=ranked, alone=alone)
        self.answer_classes = self.onnx.answer_classes
        return answers, name, kind + (ALONE if alone else "")

    def answer_kind(self, output=None):
        name, ranked, _ = self._chosen(output)
        return "labels" if ranked else self.onnx.choose_output(name)[1]

    def close(self):
        self.onnx.close()

    def carriers(self, x, layer, width):
        # every tensor of the carrier's width is a candidate, whatever its name (a hostile file
        # can give the carrier's name to a decoy); the read-out counts the candidates in p
        try:
            found = self.onnx.intermediates(x, width)
        except OnnxTooMuch as exc:  # (the other schemes are still read)
            return {}, f"not read: {exc}"
        # and with the graph fed one input at a time, those that answered otherwise than in the
        # batch (a graph that reverses its batch's rows had hidden the carrier from the batch's
        # reading; the reading of every unit alone, beside decoys made of the carrier, was not enough)
        self.onnx.allow(self.onnx.timeout or 0)
        try:
            alone = self.onnx.unit_tensors(x, width, alone=True).found
        except OnnxUnread as exc:
            return found, f"not read: {exc}"
        found |= {f"{name}{ALONE}": acts for name, acts in alone.items()
                  if name not in found or not np.allclose(acts, found[name], rtol=1e-5, atol=1e-6)}
        return found, ("" if found else f"no tensor of width {width} in this model: not our architecture")

    def out_of_reach(self):
        return self.onnx.out_of_reach()

    def units(self, x, missed):
        yield from self._unit_sets(x, missed, alone=False)
        # then again with the graph fed one input at a time: a graph that pads its batch, merges
        # it with another axis or reorders its rows (the same function) had hidden the carrier
        # from the reading of a batch, and the mark read as not detected
        self.onnx.allow(self.onnx.timeout or 0)
        yield from self._unit_sets(x, missed, alone=True)

    def _unit_sets(self, x, missed, alone: bool):
        """The units of the graph, set by set (`units`): (name, arrays) of each; what could not
        be read, appended to `missed`."""
        try:
            found, rest, _, unsteady = self.onnx.unit_tensors(x, units=MAX_UNITS, alone=alone)
        except OnnxUnread as exc:
            missed.append(f"not read: {exc}")
            return
        _unsteady(unsteady, missed)
        label = EVERY_UNIT + (ALONE if alone else "")
        if found:
            yield label, list(found.values())
        del found  # (a set's activations are let go before the next is asked for)
        # the tensors left out, in further sets, each tensor whole in one of them
        cap = max(1, min(MAX_SET_UNITS, MAX_SET_BYTES // (4 * len(x))))
        sets: list[list[str]] = []
        size = cap
        for name, values in rest.items():
            if values > cap:
                missed.append(f"not read: a tensor holds {values} values per sample, more than the {cap} "
                              "deepsigns reads side by side")
                continue
            if size + values > cap:
                sets.append([])
                size = 0
            sets[-1].append(name)
            size += values
        if len(sets) > MAX_SETS:
            missed.append(f"not read: its units past the first {MAX_UNITS} per sample fill {len(sets)} sets of "
                          f"{cap}, more than the {MAX_SETS} deepsigns reads")
        for k, names in enumerate(sets[:MAX_SETS], start=2):
            # (each set runs the whole graph again, with --timeout of its own: a wide ordinary
            # model that answered the first run in time had run out of time on its second)
            self.onnx.allow(self.onnx.timeout or 0)
            try:
                found, _, copies, unsteady = self.onnx.unit_tensors(x, names=names, alone=alone)
            except OnnxUnread as exc:
                missed.append(f"not read: {exc}")
                continue
            _unsteady(unsteady, missed)
            values = sum(a.shape[1] for a in found.values())
            # (a copy of another tensor of the set is left out here as in the first: the flattened
            # copy of a CNN's pooled map had left every 32x32 CNN's second set unread)
            answered = found.keys() | {name for name, twin in copies.items() if twin in found}
            if not answered >= set(names) or values > cap:  # (a tensor that answered otherwise this time)
                missed.append(f"not read: set {k} of its units did not answer as it had")
                continue
            yield f"{label}, set {k}", list(found.values())
            del found


def _unsteady(names: list[str], missed: list[str]) -> None:
    """A note of the tensors whose shape changed from one input to the next (a carrier widened
    by as many units as the input decides, and the head's weights with it, had read nowhere)."""
    if names:
        missed.append(f"not read: {len(names)} tensor{'s' if len(names) > 1 else ''} of it change shape "
                      "from one input to the next")


def open_suspect(path: str | Path, *, shapes: tuple[tuple[int, ...], int] | None = None,
                 arch: str | None = None, arch_kwargs: dict | None = None,
                 provider: str = "auto", timeout: float | None = DEFAULT_TIMEOUT,
                 output: str | None = None, name: str | None = None) -> Suspect:
    """A checkpoint (torch) or an ONNX file (onnxruntime) to examine.

    `shapes` (input shape, classes) come from the keys, for a plain state dict with --arch;
    `output` names the ONNX output to read (None: chosen by kind); `name`, what messages call
    the model (None: its path)."""
    from .runtime import OnnxModel

    if Path(path).suffix.lower() == ".onnx":
        return OnnxSuspect(OnnxModel(path, provider=provider, timeout=timeout, name=name), output=output, name=name)
    if output is not None:
        raise InputError("--output names an output of an ONNX model: leave it out for a checkpoint")
    from .checkpoint import load_checkpoint

    input_shape, num_classes = shapes if shapes else (None, None)
    model, info = load_checkpoint(path, arch=arch, arch_kwargs=arch_kwargs,
                                  input_shape=input_shape, num_classes=num_classes)
    return TorchSuspect(model, str(path) if name is None else name, input_shape=info.input_shape)
