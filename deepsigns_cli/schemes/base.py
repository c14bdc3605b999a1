"""The interface every watermark scheme implements."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import BundleError, DeepSignsError, NotForScheme, one_line
from ..registry import load_scheme, scheme_entry
from ..results import SchemeKeys, SchemeResult

if TYPE_CHECKING:
    from torch import nn

    from ..checkpoint import ModelInfo
    from ..data import Dataset
    from ..objective import Objective
    from ..suspect import Suspect
    from ..training import Progress, TrainConfig

__all__ = ["Scheme", "get_scheme", "each_output"]


class Scheme:
    """One watermark method. Its registry row (`registry.SCHEMES[name]`) says the rest."""

    name: str = ""
    more_evidence: str = ""  # the keygen options that give keys more bits or keys (keygen's warning)
    defaults: dict[str, Any] = {}  # keygen's options when not given

    def resolved(self, options: dict[str, Any]) -> dict[str, Any]:
        """keygen's options: those given (None: not given) over the defaults."""
        return {**self.defaults, **{k: v for k, v in options.items() if v is not None}}

    @property
    def entry(self):
        return scheme_entry(self.name)

    def keygen(self, model: nn.Module, info: ModelInfo, data: Dataset, options: dict[str, Any],
               rng: np.random.Generator) -> SchemeKeys:
        """Fresh keys, every secret drawn from `rng` (api.make_keys: the seed together with all
        else keygen was given, so that no input can be fitted to what a seed draws)."""
        raise NotImplementedError

    def key_samples(self, options: dict[str, Any]) -> int:
        """The most input samples keys made with keygen's `options` (resolved) hold: a bundle
        too large to seal is refused before any is drawn (api.make_keys)."""
        return 0

    def objective(self, model: nn.Module, info: ModelInfo, data: Dataset, keys: SchemeKeys) -> Objective:
        """The training objective that puts (and keeps) this watermark in the model."""
        raise NotImplementedError

    def embed(self, model: nn.Module, info: ModelInfo, data: Dataset, keys: SchemeKeys,
              cfg: TrainConfig, progress: Progress | None,
              also: tuple[Objective, ...] = ()) -> tuple[SchemeKeys, dict]:
        """Train `model` in place (with `also`: objectives of watermarks already embedded,
        which must survive); return the final keys and the training history."""
        from ..training import fit

        objectives = [self.objective(model, info, data, keys), *also]
        history = fit(model, data.x_train, data.y_train, cfg, objectives, progress)
        return keys, history

    def can_embed(self, keys: SchemeKeys, data: Dataset) -> None:
        """SchemeError when these keys cannot be embedded with these data; asked of every
        scheme of a bundle before any is trained."""

    def check(self, keys: SchemeKeys) -> SchemeKeys:
        """Refuse keys this scheme cannot use (a damaged or foreign bundle), before any use.
        Subclasses list what they need with `require`."""
        return keys

    def require(self, keys: SchemeKeys, params: dict[str, type | tuple], arrays: dict[str, int]) -> None:
        """Each param of its type; each array numeric, finite, of its number of dimensions."""
        bad = [k for k, t in params.items() if not isinstance(keys.params.get(k), t)
               or isinstance(keys.params.get(k), bool) and bool not in (t if isinstance(t, tuple) else (t,))]
        for name, ndim in arrays.items():
            a = keys.arrays.get(name)
            if not isinstance(a, np.ndarray) or a.ndim != ndim or a.size == 0 \
                    or a.dtype.kind not in "iuf" or (a.dtype.kind == "f" and not np.isfinite(a).all()):
                bad.append(name)
        if bad:
            self.damaged(", ".join(bad))

    def damaged(self, what: str):
        raise BundleError(f"the bundle's {self.name} keys are damaged or from another version "
                          f"({what}): use the bundle that keygen and embed wrote")

    def warnings(self, keys: SchemeKeys) -> list[str]:
        """What keygen should tell the owner about these keys (none by default)."""
        return []

    def best_p_value(self, keys: SchemeKeys) -> float | None:
        """The smallest p-value these keys can give (every bit or key read right, the fewest
        readings counted); None where it cannot be told at keygen."""
        return None

    #: where best_p_value is not a bound before embed but what it typically comes to, the words
    #: that say so ("" for a bound)
    best_is_typical: str = ""

    def read(self, suspect: Suspect, keys: SchemeKeys) -> SchemeResult:
        """The evidence in a suspect (torch or ONNX); alpha is applied by results.decide."""
        raise NotImplementedError


def each_output(suspect: Suspect, read: Callable[[str | None], Any], alone: bool = False) -> tuple[list, list[str]]:
    """read(output) for every output the suspect offers (`Suspect.outputs`): (the readings, in
    order; "not read: ..." for each output that could not be read). An output that cannot be
    read (not class scores, answers NaN, ...) is no reading, and is named: a reading that finds
    nothing is then no verdict (beside an output deepsigns could not read, a decoy of scores
    had made a marked model "not detected"). One that holds nothing for the scheme
    (`NotForScheme`) is neither. Where no output can be read, the first one's error stands (the
    first that is not `NotForScheme`, where there is one: a KNN's probabilities of -inf had been
    reported as "labels only", its other output). A
    suspect that fails as a whole (no answer in time, a crash) fails the reading: a verdict
    from the outputs it gave before would hide that it was not read. `alone`: every output is
    read one input at a time, where that costs what a batch does (`Suspect.outputs`)."""
    outputs, readings, first, missed = suspect.outputs(alone), [], None, []
    # then again, one input at a time, each output that answered so otherwise (`more_outputs`)
    for ways in (outputs, None):
        for output in suspect.more_outputs(outputs) if ways is None else ways:
            try:
                readings.append(read(output))
            except DeepSignsError as exc:
                if (len(outputs) == 1 and ways is not None) or suspect.broken:
                    raise
                if first is None or isinstance(first, NotForScheme) and not isinstance(exc, NotForScheme):
                    first = exc  # (why an output of scores could not be read says more than "labels only")
                if not isinstance(exc, NotForScheme):
                    missed.append(f"not read: {one_line(exc, 300)}")
    if not readings:
        raise first
    return readings, list(dict.fromkeys(missed))


def get_scheme(name: str) -> Scheme:
    return load_scheme(name)
