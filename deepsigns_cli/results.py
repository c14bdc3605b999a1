"""Typed results: what each command reports, as dataclasses (torch-free).

A scheme's read-out gives evidence and a p-value that already counts every search it made
(candidate tensors tried). `decide` is the one place where alpha is applied: it sets each
result's decision and thresholds, and the overall decision over the schemes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from . import stats
from .errors import valid_text

__all__ = [
    "SchemeKeys",
    "SchemeResult",
    "BitsResult",
    "MatchResult",
    "GradResult",
    "RESULT_KINDS",
    "Decision",
    "decide",
    "TrainReport",
    "KeygenReport",
    "EmbedReport",
    "ExportReport",
    "AttackReport",
    "InspectReport",
    "DisputeParty",
    "DisputeReport",
    "ScanRow",
    "ScanReport",
    "SweepRow",
    "SweepReport",
    "to_json_dict",
]


@dataclass
class SchemeKeys:
    """One scheme's secrets: JSON-able parameters and numpy arrays (sealed in the bundle)."""

    scheme: str
    params: dict
    arrays: dict  # name -> np.ndarray


@dataclass
class SchemeResult:
    scheme: str
    p_value: float  # counts every search the read-out made
    detected: bool = False  # set by decide()
    note: str | None = None
    unread: bool = False  # the suspect was not read whole (the note says why): not detected is no verdict

    def apply(self, alpha: float, schemes: int = 1) -> None:
        """Detected at this scheme's share of alpha, among `schemes` read at once (p x schemes
        against alpha: the verdict's own product, so that the two agree to the last bit)."""
        self.detected = not math.isnan(self.p_value) and stats.bonferroni(self.p_value, schemes) <= alpha

    def evidence(self) -> tuple[str, str]:
        """(where, evidence) as people read them."""
        return "-", self.note or ""

    def brief(self) -> str:
        """The evidence in a few characters, for a table cell."""
        return self.evidence()[1]


@dataclass
class BitsResult(SchemeResult):
    """A multi-bit signature read back (hidden layer; GradSigns)."""

    layer: str = ""
    n_bits: int = 0
    bits: str = ""  # the recovered bits, "" when no carrier was found
    bit_errors: int | None = None  # None: nothing was read (not "every bit wrong")
    ber: float | None = None
    tensor: str | None = None  # where the bits were read
    candidates: int = 0  # carrier tensors found
    readings: int = 0  # readings tried, all counted in the p-value: each candidate as it is and
    # with its units lined up with ours, over their scales and over their offsets (0: one per candidate)
    aligned: bool | None = None  # the best reading was the lined-up one (None: not tried)
    message: str | None = None
    message_errors: int | None = None  # bits of that message that differ from the keys' (None: no message)
    max_bit_errors: int | None = None  # set by decide(): the most errors the scheme's share of alpha allows
    warning: str | None = None

    def apply(self, alpha: float, schemes: int = 1) -> None:
        super().apply(alpha, schemes)
        tries = max(1, self.readings or self.candidates)

        def p_of(errors: int) -> float:  # (as the reading computes its p: schemes.hidden, gradsigns)
            return stats.bonferroni(stats.bonferroni(stats.bits_p_value(errors, self.n_bits), tries), schemes)

        self.max_bit_errors = stats.most_detected(self.n_bits, p_of, alpha)
        best = stats.smallest_bits_p_value(self.n_bits)
        if self.bits and best * tries * schemes > alpha:
            share = f" (this scheme's share of it: {alpha / schemes:.2g}, of {schemes} schemes)" if schemes > 1 else ""
            self.warning = (f"{self.n_bits} bits cannot reach alpha={alpha:g}{share} (best p = {best:.2g}"
                            f" x {tries} tries): re-key with more --bits")

    def brief(self) -> str:
        return f"{self.bit_errors}/{self.n_bits} wrong" if self.bits else "no carrier"

    def evidence(self) -> tuple[str, str]:
        if self.candidates > 1:
            where = f"{self.tensor} (best of {self.candidates} tensors)"
        else:
            where = str(self.tensor or self.layer or "-")
        if self.aligned:
            where += ", units lined up"
        if not self.bits:
            return where, self.note or "no carrier found"
        return where, f"{self.bit_errors}/{self.n_bits} bits wrong (BER {self.ber:.3f})"


@dataclass
class MatchResult(SchemeResult):
    """Key inputs answered with their key labels (output-layer scheme)."""

    keys: int = 0
    queries: int = 0
    matches: int = 0
    mismatches: int = 0
    num_classes: int = 0
    labels: int = 0  # the labels a key's label was drawn among (C - 1): chance = 1 / labels
    max_mismatches: int | None = None  # set by decide(): the paper's Eq. 5 threshold, at that chance
    onnx_seconds: float | None = None
    output: str | None = None  # the model's output the answers were read from
    output_kind: str | None = None  # its kind: scores, probabilities or labels
    outputs: int = 1  # the model's outputs read, the best kept: all counted in the p-value
    # (candidates, pool): the keys were drawn from a pool embed chose among that many candidates,
    # counted in the p-value at its worst (every candidate the model hits in the pool); None: no choice
    chosen_from: tuple[int, int] | None = None
    # the answers relabelled to read them, [answer, key label] for each the keys show moved (None:
    # read as answered); each reading with its share of alpha (stats.RELABEL_SHARE)
    relabelled: list | None = None
    key_classes: int = 0  # the keys' classes (C) and the distinct answers (D, at most C) a relabelling
    answer_values: int = 0  # maps to them: the relabelled reading counts C! / (C - D)! relabellings

    def __post_init__(self):
        if not self.labels and self.num_classes >= 2:  # a key's label avoids the unmarked model's
            self.labels = self.num_classes - 1

    def apply(self, alpha: float, schemes: int = 1) -> None:
        super().apply(alpha, schemes)

        def p_of(mismatches: int) -> float:  # (as the reading computes its p: schemes.output)
            relabel = None if self.relabelled is None else (self.key_classes, self.answer_values)
            p = stats.keys_p_value(self.keys - mismatches, self.keys, max(1, self.labels), self.chosen_from, relabel)
            return stats.bonferroni(stats.bonferroni(p, self.outputs), schemes)

        self.max_mismatches = stats.most_detected(self.keys, p_of, alpha)

    def evidence(self) -> tuple[str, str]:
        from .errors import one_line

        if self.unread and not self.queries:  # (no output could be read: the note says why)
            return "-", "not read (see the note)"
        best = f", best of {self.outputs} outputs" if self.outputs > 1 else ""
        read = f" ({self.output_kind} from '{one_line(self.output, 60)}'{best})" if self.output is not None else ""
        if self.relabelled is not None:
            moved = ", ".join(f"{a}->{b}" for a, b in self.relabelled[:6])
            moved += ", ..." if len(self.relabelled) > 6 else ""
            read += f", classes relabelled ({moved})"
        return (f"{self.queries} queries{read}",
                f"{self.matches}/{self.keys} keys match; {self.mismatches} mismatches "
                + ("(no count reaches alpha)" if (self.max_mismatches or 0) < 0
                   else f"(at most {self.max_mismatches} allowed)"))

    def brief(self) -> str:
        if self.unread and not self.queries:
            return "not read"
        return f"{self.matches}/{self.keys} match" + (", relabelled" if self.relabelled is not None else "")


@dataclass
class GradResult(BitsResult):
    """GradSigns' bits, read from the input gradient, and what the reading cost."""

    queries: int = 0  # answers the suspect gave (exact gradients: one per key input)
    key_inputs: int = 0  # key inputs the bits were read at
    estimator: str = ""
    onnx_seconds: float | None = None

    def brief(self) -> str:
        return super().brief() if self.bits else "not read"

    def evidence(self) -> tuple[str, str]:
        if not self.bits:
            return "-", "not read (see the note)" if self.note else "not read"
        where, evidence = super().evidence()
        best = f", best of {self.readings} outputs" if self.readings > 1 else ""
        return f"{self.queries} queries ({self.estimator}{best})", evidence


RESULT_KINDS = {"bits": BitsResult, "matches": MatchResult, "gradient": GradResult}


@dataclass
class Decision:
    """The report of `extract` and `verify`: one result per scheme, one decision."""

    command: str
    model: str
    key_id: str
    alpha: float
    results: list[SchemeResult]
    detected: bool = False
    p_value: float = 1.0
    commitment: str = ""  # SHA-256 of the bundle used: a claim counts with a published one

    @property
    def forger_key_sets(self) -> float:
        """About how many random key sets a forger would have to try to do this well by
        chance: 1 / p (p counts every search of the read-out and every scheme)."""
        return 1.0 / self.p_value if self.p_value > 0 else math.inf

    def meaning(self) -> str:
        n = self.forger_key_sets
        if n < 2:
            return "random key sets do this well by chance: no evidence of ownership"
        about = f"about {n:.2g}" if math.isfinite(n) else "more than 1e+308"  # (a p below the floats' range)
        return (f"a forger would have to try {about} random key sets to do this well by "
                f"chance (alpha = {self.alpha:g}: 1 in {1 / self.alpha:.2g})")


def decide(results: list[SchemeResult], alpha: float, *, command: str, model: str,
           key_id: str, commitment: str = "") -> Decision:
    """Decide over every result (Bonferroni over schemes), and apply each its share of alpha: a
    scheme's row is detected (and its threshold given) exactly where it carries the verdict. At
    the whole of alpha, a bundle of two schemes had a row at p = 0.108 detected at --alpha 0.16,
    under a verdict of not detected (p = 0.215)."""
    alpha = stats.check_alpha(alpha)
    for r in results:
        r.apply(alpha, max(1, len(results)))
    p = stats.bonferroni(min((r.p_value for r in results), default=1.0), len(results))
    return Decision(command, model, key_id, alpha, results, detected=any(r.detected for r in results), p_value=p,
                    commitment=commitment)


@dataclass
class TrainReport:
    arch: str
    data: str
    epochs: int
    test_accuracy: float
    seconds_per_epoch: float
    out: str
    command: str = "train"


@dataclass
class KeygenReport:
    out: str
    schemes: list[str]
    key_id: str
    commitment: str
    claim: dict = field(default_factory=dict)  # the record to publish (nothing secret)
    warnings: list[str] = field(default_factory=list)
    command: str = "keygen"


@dataclass
class EmbedReport:
    accuracy_before: float
    accuracy_after: float
    schemes: dict  # name -> {"epochs", "seconds_per_epoch"}
    fingerprint: str
    out: str
    keys: str
    commitment: str
    onnx: str | None = None
    onnx_max_abs_diff: float | None = None
    claim: dict = field(default_factory=dict)  # the record to publish with the model
    warnings: list[str] = field(default_factory=list)  # (a mark that does not read back: also on stderr)
    command: str = "embed"


@dataclass
class ExportReport:
    out: str
    opset: int
    max_abs_diff: float
    input_shape: list
    checker: str = "clean"  # onnx.checker's full check (a file that fails it is not written)
    warnings: list[str] = field(default_factory=list)  # (also on stderr)
    command: str = "export"


@dataclass
class AttackReport:
    attack: str
    accuracy_before: float
    accuracy_after: float
    params: dict  # every parameter the attack used, defaults filled in, and its own results
    seconds: float
    out: str
    model: str  # the victim (--model)
    data: str  # the attacker's data (--data)
    seed: int
    command: str = "attack"


@dataclass
class ScanRow:
    """One suspect of a scan: its decision, or why it could not be read."""

    model: str
    decision: Decision | None = None
    error: str | None = None


@dataclass
class ScanReport:
    """`extract`/`verify` over many suspects with one bundle. Exit like grep: 2 when a suspect
    could not be read (an error is never lost in a match), else 0 when any is detected, else 1."""

    command: str
    key_id: str
    commitment: str
    alpha: float
    rows: list[ScanRow]
    seconds: float = 0.0

    @property
    def detected(self) -> list[str]:
        return [r.model for r in self.rows if r.decision is not None and r.decision.detected]

    @property
    def errors(self) -> list[str]:
        return [r.model for r in self.rows if r.error is not None]


@dataclass
class SweepRow:
    """One strength of an attack sweep: the attacked model and what the owner's keys read in it
    (extract: every scheme; verify: the black-box schemes, from the model's ONNX answers)."""

    value: object  # the swept option's value; None for the victim itself (no attack)
    accuracy: float
    extract: Decision
    verify: Decision | None  # None: the bundle has no black-box scheme
    seconds: float  # the attack's own run time
    model: str | None = None  # where the attacked model was kept (None: not kept)
    results: dict = field(default_factory=dict)  # the attack's own results (sparsity, ...); none for the victim


@dataclass
class SweepReport:
    """`deepsigns attack NAME --sweep PARAM=v1,v2,...`: the attack at each strength, read with
    the owner's keys. The first row is the victim itself."""

    attack: str
    param: str
    params: dict  # every other parameter the attack used, defaults filled in
    model: str  # the victim (--model)
    data: str  # the attacker's data (--data)
    seed: int
    alpha: float
    key_id: str
    commitment: str
    rows: list[SweepRow]
    plot: str | None = None
    command: str = "attack"


@dataclass
class DisputeParty:
    name: str
    keys: str
    model: str
    commitment: str  # a claim counts with a commitment published before the dispute
    key_id: str


@dataclass
class DisputeReport:
    """Every party's keys read from every party's model: matrix[i][j] = keys i on model j."""

    parties: list[DisputeParty]
    matrix: list[list[Decision]]
    alpha: float
    first: str | None  # the party that marked first, None when undecided
    reading: str
    controls: list[str] = field(default_factory=list)  # models neither party made
    checked: list[list[Decision]] = field(default_factory=list)  # checked[i][j] = keys i on control j
    command: str = "dispute"

    @property
    def detected(self) -> bool:  # (the exit code: 0 when the reading names a party)
        return self.first is not None


@dataclass
class InspectReport:
    kind: str
    path: str
    facts: dict  # public facts only, never a secret


def _plain(value):
    """JSON-able: numpy scalars and arrays unwrapped, NaN and infinities as null, text valid
    Unicode (a file name that is not UTF-8 had come out as a lone surrogate, "\\udcff", which
    strict JSON parsers refuse)."""
    if isinstance(value, str):
        return valid_text(value)
    if isinstance(value, dict):
        return {valid_text(str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, bytes):  # numpy
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return valid_text(str(value))  # paths and the like


def to_json_dict(report) -> dict:
    """The JSON object of a report (valid JSON always: no NaN, no Infinity)."""
    if isinstance(report, InspectReport):
        return _plain({"kind": report.kind, "path": report.path, **report.facts})
    if isinstance(report, Decision):
        body = {"command": report.command, "model": report.model, "key_id": report.key_id,
                "commitment": report.commitment,
                "detected": report.detected, "p_value": report.p_value, "alpha": report.alpha,
                "forger_key_sets": report.forger_key_sets, "meaning": report.meaning(),
                "results": [_result_dict(r) for r in report.results]}
        return _plain(body)
    if isinstance(report, DisputeReport):
        def cell(i: int, of: dict, d: Decision) -> dict:
            return {"keys_of": report.parties[i].name, **of, "detected": d.detected, "p_value": d.p_value,
                    "forger_key_sets": d.forger_key_sets, "results": [_result_dict(r) for r in d.results]}

        cells = [cell(i, {"model_of": report.parties[j].name}, d)
                 for i, row in enumerate(report.matrix) for j, d in enumerate(row)]
        checked = [cell(i, {"control": report.controls[j]}, d)
                   for i, row in enumerate(report.checked) for j, d in enumerate(row)]
        return _plain({"command": "dispute", "detected": report.detected, "alpha": report.alpha,
                       "first": report.first,
                       "reading": report.reading, "parties": [asdict(p) for p in report.parties],
                       "matrix": cells, "controls": checked})
    if isinstance(report, ScanReport):
        rows = [{"model": r.model, "error": r.error} if r.decision is None
                else {k: v for k, v in to_json_dict(r.decision).items()
                      if k not in ("command", "key_id", "commitment", "alpha")}
                for r in report.rows]
        return _plain({"command": report.command, "key_id": report.key_id,
                       "commitment": report.commitment, "alpha": report.alpha,
                       "suspects": len(report.rows), "detected": report.detected,
                       "errors": report.errors, "seconds": report.seconds, "rows": rows})
    return _plain(asdict(report))


def _result_dict(result: SchemeResult) -> dict:
    """A result's fields, without the empty optional ones (a 'warning' only when there is one)."""
    optional = {"note", "message", "message_errors", "warning", "onnx_seconds"}
    return {f.name: getattr(result, f.name) for f in fields(result)
            if not (f.name in optional and getattr(result, f.name) is None or f.name == "unread" and not result.unread)}
