"""Scheme 3: GradSigns (Aramoon, Chen, Qu, MLSys'21), a multi-bit signature read from scores.

The bits live in the gradient of the cross-entropy (towards a secret target class T) with
respect to the input, at secret carrier coordinates, seen through a secret key matrix K:
bits = (K . g >= 0), g the mean gradient over key inputs of class T.

Two choices of ours, both for a reading from answers alone:

- The key inputs are class-T training samples blended with noise. The model is sure of its
  own training samples (the sample MLP gives them p_T = 0.9998), so their gradient vanishes;
  on blended samples it is large enough to be measured, and to be shaped.
- The signature is embedded at the key inputs *and* in a ball around them (each step's key
  rows are jittered within it). A black-box read then takes central differences along K's
  rows with a step as large as that ball: 2 queries per bit and key input instead of the
  anchor's 1 + |carriers| per key input, and a step large enough that scores rounded to a
  few decimals still differ. The step is the tool's, recorded in the keys, never the user's.

Under the null (a model that is not ours) each reading K_i . g is a fair coin: K's rows are
drawn symmetric, and a central difference changes sign with its direction. A difference of
exactly zero (scores rounded flat) is no reading and counts as a wrong bit.
"""

from __future__ import annotations

import hashlib
import math
import time

import numpy as np

from .. import stats
from ..errors import DeepSignsError, InputError, NotForScheme, SchemeError, one_line, shown
from ..objective import Objective
from ..results import GradResult, SchemeKeys
from .base import Scheme, each_output
from .signature import bits_to_message, check_message, message_to_bits

__all__ = ["GradSignsScheme", "SCHEME", "DEFAULT_QUERIES"]

MAX_INPUT = 1e6  # the largest key input value and difference step a bundle may hold (data lie near 1)

DEFAULTS = {
    "bits": 64,
    "carriers": 64,  # input coordinates that carry the signature (all of them when fewer)
    "key_inputs": 50,  # class-T training samples, blended with noise
    "sure": 0.9,  # a key input is a class-T sample blended with just enough noise that the
    # unmarked model gives it p_T below this (on its own samples p_T is 0.9998: no gradient)
    "step": 0.1,  # the ball (and the read's difference step), in units of a key input's norm
    "lambda": 0.5,
    "key_batch": 32,  # key rows mixed into every step
    "per_row": 1.0,  # weight of the term on each key row's own gradient
    "keep": 1.0,  # weight of the band that keeps p_T at the key rows within [1 - sure, sure]:
    # where the model is sure the gradient vanishes, and a rounded p_T of 0 or 1 reads nothing
    "read_share": 0.9,  # embedding stops once each key input alone reads this share of the bits
    "settle": 5,  # ...and this many epochs later (margin against fine-tuning)
}
DEFAULT_QUERIES = 1000  # a black-box read's budget (`--queries`)
RESCUE_AT = 0.99  # the median p_T at the key inputs past which the band has lost its hold...
RESCUE_AFTER = 8  # ...if it still has after this many epochs (most key sets start sure and recover)


class GradSignsScheme(Scheme):
    name = "gradsigns"
    defaults = DEFAULTS
    more_evidence = "--bits, or a longer --message"

    # ------------------------------------------------------------------ keygen
    def key_samples(self, options):
        return int(options["key_inputs"])

    def keygen(self, model, info, data, options, rng) -> SchemeKeys:
        opts = self.resolved(options)
        width = math.prod(info.input_shape)
        n_carriers = int(opts["carriers"])
        if not 1 <= n_carriers <= width:
            given = "given" if options.get("carriers") is not None else "the default"
            raise SchemeError(f"--carriers must be from 1 to {width} (the input has {width} values), "
                              f"got {n_carriers} ({given}): give --carriers {width} or fewer")
        message = opts.get("message")
        check_message(message)
        bits = message_to_bits(message) if message else None
        n_bits = len(bits) if message else int(opts["bits"])
        if n_bits > stats.MAX_BITS:
            raise SchemeError(f"{n_bits} bits are more than the {stats.MAX_BITS} deepsigns reads: use fewer --bits")
        if not 1 <= n_bits <= n_carriers:
            raise SchemeError(f"{n_bits} bits do not fit {n_carriers} carriers: use at most {n_carriers} bits "
                              "(a shorter --message or smaller --bits) or more --carriers")
        target = opts.get("target_class")
        present = np.unique(data.y_train)
        if target is not None and not 0 <= int(target) < info.num_classes:
            raise SchemeError(f"--target-class must be from 0 to {info.num_classes - 1}, got {target}")
        if target is not None and int(target) not in present:
            raise SchemeError(f"--target-class {target} has no training samples: choose a class the data hold")
        if bits is None:
            bits = rng.integers(0, 2, n_bits).astype(np.uint8)
        target = int(rng.choice(present) if target is None else target)
        carriers = np.sort(rng.choice(width, size=n_carriers, replace=False)).astype(np.int64)
        K = rng.uniform(-1.0, 1.0, (n_bits, n_carriers)).astype(np.float32)
        members = np.flatnonzero(data.y_train == target)
        take = rng.choice(members, size=min(int(opts["key_inputs"]), len(members)), replace=False)
        x = _unsure(model, data.x_train[take].astype(np.float32), target, data.value_range,
                    float(opts["sure"]), rng)
        norm = float(np.median(np.linalg.norm(x.reshape(len(x), -1)[:, carriers], axis=1)))
        params = {
            "n_bits": n_bits, "n_carriers": n_carriers, "target": target, "message": message or None,
            "step": float(opts["step"]) * max(norm, 1e-6), "lambda": float(opts["lambda"]),
            "key_batch": int(opts["key_batch"]), "sure": float(opts["sure"]),
            "per_row": float(opts["per_row"]), "read_share": float(opts["read_share"]),
            "settle": int(opts["settle"]), "keep": float(opts["keep"]),
        }
        arrays = {"K": K, "bits": bits.astype(np.uint8), "carriers": carriers, "x": x}
        return SchemeKeys(self.name, params, arrays)

    def check(self, keys):
        self.require(keys, {"n_bits": int, "n_carriers": int, "target": int, "step": (int, float),
                            "lambda": (int, float), "key_batch": int},
                     {"K": 2, "bits": 1, "carriers": 1})
        p, a = keys.params, keys.arrays
        x = a.get("x")
        fits = (isinstance(x, np.ndarray) and x.ndim >= 2 and len(x) >= 1 and x.dtype.kind == "f"
                and np.isfinite(x).all() and 1 <= p["n_bits"] <= stats.MAX_BITS and p["key_batch"] >= 1
                and a["carriers"].dtype.kind in "iu" and np.abs(x).max() <= MAX_INPUT
                and p["step"] <= MAX_INPUT
                and a["K"].shape == (p["n_bits"], p["n_carriers"]) and a["bits"].shape == (p["n_bits"],)
                and len(a["carriers"]) == p["n_carriers"] and p["step"] > 0 and math.isfinite(p["step"])
                and p["target"] >= 0)
        if fits:
            width = math.prod(x.shape[1:])
            fits = bool((a["carriers"] >= 0).all() and (a["carriers"] < width).all())
        if not fits:
            self.damaged("shapes that do not fit together")
        return keys

    # ------------------------------------------------------------------ embed
    def objective(self, model, info, data, keys) -> Objective:
        return GradObjective(keys)

    def best_p_value(self, keys):
        return stats.smallest_bits_p_value(int(keys.params["n_bits"]))

    def embed(self, model, info, data, keys, cfg, progress, also=()):
        from ..suspect import TorchSuspect
        from ..training import fit

        if keys.params["target"] >= info.num_classes:
            self.damaged("a target class the model does not have")
        objective = self.objective(model, info, data, keys)
        objective.stop_when_read = True
        history = fit(model, data.x_train, data.y_train, cfg, [objective, *also], progress)
        # how far apart the marked model's scores lie at the key inputs: a reading undoes a
        # temperature put on the scores by bringing them back to it (`temperature_undone`)
        spread = score_spread(TorchSuspect(model, shared=True).scores(keys.arrays["x"]))
        return SchemeKeys(keys.scheme, {**keys.params, "score_spread": spread}, keys.arrays), history

    # ------------------------------------------------------------------ read
    def read(self, suspect, keys) -> GradResult:
        params, arrays = keys.params, keys.arrays
        n, target = int(params["n_bits"]), int(params["target"])
        start = time.perf_counter()
        exact = suspect.loss_gradient(arrays["x"], target)
        if exact is not None:  # white-box: the exact gradient at every key input
            slopes = exact.reshape(len(exact), -1)[:, arrays["carriers"]] @ _unit_rows(arrays["K"]).T
            readings, estimator, missed = [(slopes, len(exact), None, False)], "exact gradients", []
        else:  # every output that gives scores is read (each reading counted in p), the best kept
            budget = _check_budget(suspect.query_budget or DEFAULT_QUERIES, n)

            def one(output):
                if suspect.answer_kind(output) == "labels":
                    raise NotForScheme(f"{shown(suspect.name)} answers with labels only: GradSigns reads its bits "
                                      "from the class scores (or probabilities); query an output that gives them")
                step = float(params["step"])
                scores = difference_queries(suspect, arrays, step, budget, output)
                slopes, label = slopes_from(scores, arrays, target, step), output
                factor = temperature_undone(scores, params.get("score_spread"))
                if factor is not None:  # also brought back to the marked model's spread: of the two, the
                    # one whose key inputs agree more is the output's reading (one reading per output:
                    # a second had doubled what each decoy output cost in p)
                    rescaled = as_logits(scores) * factor
                    if np.isfinite(rescaled).all():  # (where it overflows, the reading as it is stands)
                        other = slopes_from(rescaled, arrays, target, step)
                        if agreement(other) > agreement(slopes):
                            slopes, label = other, f"{output if output is not None else 'scores'}, times {factor:.3g}"
                return slopes, len(scores), label, suspect.noisy(output)

            try:  # one input at a time (where the graph takes batches of any length): a graph that
                # answered a few rows of a batch otherwise (those with a near neighbour in it: the
                # differences' rows) had read "not detected", past the check of a batch's rows alone
                readings, missed = each_output(suspect, one, alone=True)
                # noise drawn at every run on the scores: a reading that finds nothing is no verdict
                # (refused outright, noise of 1e-4 had turned a detection into none)
                missed += [f"'{label}' answered the same input otherwise from one ask to the next"
                           for _, _, label, noisy in readings if noisy]
            except DeepSignsError as exc:
                if suspect.broken:  # (no answer in time, a crash: the reading fails)
                    raise
                # answers no gradient can be read from (labels, NaN, too few scores): this scheme
                # reads nothing, and the bundle's other schemes still read what they can
                return GradResult("gradsigns", 1.0, note=one_line(exc, 300), unread=True, layer="input gradient",
                                  n_bits=n)
            estimator = f"central differences along the key's {n} directions"

        # each reading's bits, "?" where no difference was seen (or not a number); the fewest wrong kept
        means = [estimate(r[0]) for r in readings]
        outs = ["".join("?" if m == 0 or not np.isfinite(m) else "1" if m > 0 else "0" for m in mean)
                for mean in means]
        wrong = [sum(b != str(int(want)) for b, want in zip(out, arrays["bits"], strict=True)) for out in outs]
        best = wrong.index(min(wrong))
        (slopes, _, output, _), mean, reading, errors = readings[best], means[best], outs[best], wrong[best]
        # readings that read the same bits are one reading in p (near-copies of one output had
        # multiplied it: a 32-bit mark read 0 wrong went past alpha). Exact: which bits a reading
        # finds does not depend on the signature (a row of K drawn with the other sign flips its
        # bit in every reading), so the chance that any of the distinct read-outs comes this close
        # to a signature drawn at random is at most their number times that of one
        distinct = len(set(outs))
        found = (mean > 0).astype(np.uint8)
        unknown = reading.count("?")
        if unknown:  # bits that read nothing are counted wrong, and a reading they decide is no verdict
            missed = [*missed, f"{unknown} of the {n} bits read nothing: the slope along their directions was 0 "
                               "or not a number (scores rounded, or labels given as numbers)"]
        has_message = bool(params.get("message"))
        return GradResult(
            "gradsigns", stats.bonferroni(stats.bits_p_value(errors, n), distinct), layer="input gradient",
            n_bits=n, bits=reading, bit_errors=errors, ber=errors / n, tensor=None if output is None else str(output),
            candidates=len(readings), readings=distinct, message=bits_to_message(found) if has_message else None,
            message_errors=errors if has_message else None, queries=sum(r[1] for r in readings),
            note="; ".join(missed) or None, unread=bool(missed),
            key_inputs=len(slopes), estimator=estimator,
            onnx_seconds=time.perf_counter() - start if exact is None else None,
        )


def _unsure(model, clean: np.ndarray, target: int, value_range, sure: float, rng) -> np.ndarray:
    """Each sample blended with uniform noise, at the smallest share of noise (of 0.3, 0.35,
    ..., 0.95) that brings the model's p_T below `sure`."""
    from ..training import predict

    low, high = value_range
    noise = rng.uniform(low, high, clean.shape).astype(np.float32)
    shares = np.linspace(0.3, 0.95, 14, dtype=np.float32)
    out = noise * shares[-1] + clean * (1 - shares[-1])
    done = np.zeros(len(clean), bool)
    for share in shares:
        blend = (1 - share) * clean + share * noise
        p = _softmax(predict(model, blend))[:, target]
        pick = ~done & (p < sure)
        out[pick], done = blend[pick], done | pick
    return out


def _unit_rows(K: np.ndarray) -> np.ndarray:
    return K / np.maximum(np.linalg.norm(K, axis=1, keepdims=True), 1e-12)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def cross_entropy(scores: np.ndarray, target: int) -> np.ndarray:
    """-log p_T per row, from logits, or from probabilities (`_probabilities`)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise InputError("the suspect answers NaN or infinite scores to the GradSigns queries: its "
                         "gradient cannot be read")
    if _probabilities(scores):
        return -np.log(np.maximum(scores[:, target], 1e-12))
    z = scores - scores.max(1, keepdims=True)
    return np.log(np.exp(z).sum(1)) - z[:, target]


def central_differences(suspect, arrays: dict, target: int, step: float, budget: int,
                        output: str | None = None) -> tuple[np.ndarray, int]:
    """(the slope of the cross-entropy along each of K's rows at each key input read, (S, N);
    the queries made): `difference_queries`, read by `slopes_from`."""
    scores = difference_queries(suspect, arrays, step, budget, output)
    return slopes_from(scores, arrays, target, step), len(scores)


def difference_queries(suspect, arrays: dict, step: float, budget: int, output: str | None = None) -> np.ndarray:
    """The suspect's scores (its `output`'s; None: its answer) at x + d and x - d for each of
    K's rows d (of length `step`) at each key input x read, (S * 2 * N, classes) in that order:
    2 queries per bit and key input, as many key inputs as the budget allows (at least one:
    `_check_budget`), asked together (one input at a time where `output` is a way read so)."""
    x, K, carriers = arrays["x"], arrays["K"], arrays["carriers"]
    n = len(K)
    s = min(len(x), budget // (2 * n))
    flat = x[:s].reshape(s, -1).astype(np.float32)
    dirs = np.zeros((n, flat.shape[1]), np.float32)
    dirs[:, carriers] = _unit_rows(K) * step
    batch = np.concatenate([flat[:, None, :] + dirs[None], flat[:, None, :] - dirs[None]], axis=1)
    # the queries go in an order the suspect cannot know: a graph can read a row's place in
    # its batch (Shape, Range, Mod), and in the layout above the place tells which bit and
    # which side of it the row asks for; with a known --message, an untrained graph that
    # answered by place had read every bit (p = 1e-19). The order comes from K, a secret.
    order = _secret_order(K, s * 2 * n)
    asked = suspect.scores(batch.reshape(s * 2 * n, *x.shape[1:])[order], output)
    scores = np.empty_like(asked)
    scores[order] = asked
    return scores


def slopes_from(scores: np.ndarray, arrays: dict, target: int, step: float) -> np.ndarray:
    """The slope of the cross-entropy towards `target` along each of K's rows at each key input,
    (S, N), from the scores of `difference_queries`."""
    n = len(arrays["K"])
    if scores.ndim != 2 or target >= scores.shape[1]:
        raise InputError(f"the suspect gives {scores.shape[-1] if scores.ndim else 0} scores per input, the "
                         f"GradSigns keys need class {target}: not the model the keys were made for")
    ce = cross_entropy(scores, target).reshape(-1, 2, n)
    return (ce[:, 0] - ce[:, 1]) / (2 * step)


# a reading at another temperature is taken where the scores spread this many times more or less
# than the marked model's did (a calibrating temperature of up to 1.5 leaves the bits as they were)
TEMPERATURE_SEEN = 1.5


def as_logits(scores: np.ndarray) -> np.ndarray:
    """Scores as logits (up to a constant per row): probabilities (rows of non-negative numbers
    that sum to 1) through their logarithm, anything else as it is."""
    scores = np.asarray(scores, dtype=np.float64)
    return np.log(np.maximum(scores, 1e-12)) if _probabilities(scores) else scores


def _probabilities(scores: np.ndarray) -> bool:
    """Whether rows of scores are probabilities: non-negative numbers that sum to 1 (what a
    suspect gives is data, so the test is on the numbers, never a name)."""
    return bool((scores >= 0).all() and np.allclose(scores.sum(1), 1.0, atol=1e-3))


def score_spread(scores: np.ndarray) -> float:
    """How far apart a model's scores lie: the median, over the rows, of the standard deviation
    of a row's logits (a temperature T divides it by T; a constant added to a row leaves it);
    0 where it is not a finite number."""
    logits = as_logits(scores)
    with np.errstate(over="ignore", invalid="ignore"):
        spread = float(np.median(logits.std(1))) if np.isfinite(logits).all() else 0.0
    return spread if math.isfinite(spread) else 0.0


# each bit's slopes are held within this many (normal-scaled) median absolute deviations of
# their median before they are averaged
OUTLIER_MADS = 3.0


def estimate(slopes: np.ndarray) -> np.ndarray:
    """Each bit's slope over the key inputs read, (S, N) -> (N,): their mean, each slope first
    held within OUTLIER_MADS median absolute deviations of the bit's median (a bit whose slopes
    are mostly alike, a deviation of 0, is their plain mean). A mean alone let one outlier decide
    a bit: a graph that raised the top score by 50 on 1% of inputs (every answer as it was) read
    1 of 32 bits wrong, and 15 of 64 at 8%. The same on the slopes of a bit negated is negated:
    which bits it reads does not depend on the signature."""
    with np.errstate(invalid="ignore"):
        centre = np.median(slopes, 0)
        spread = np.median(np.abs(slopes - centre), 0) * 1.4826 * OUTLIER_MADS
        held = np.clip(slopes, centre - spread, centre + spread)
    return np.where(spread > 0, held.mean(0), slopes.mean(0))


def agreement(slopes: np.ndarray) -> float:
    """How far the key inputs agree on each bit's sign, on average over the bits (1: all alike;
    about 0 for signs drawn at random). The embedding teaches every key input the whole signature,
    so a reading at the scale it was taught at agrees more than one at a scale that turns it. A row
    of K drawn with the other sign flips every slope of its bit and leaves this as it was: a
    choice by it depends on the answers alone, not on the signature, and is one reading in p."""
    signs = np.sign(np.nan_to_num(slopes, nan=0.0))
    return float(np.abs(signs.sum(0)).mean() / max(len(signs), 1))


def temperature_undone(scores: np.ndarray, recorded) -> float | None:
    """The factor that brings the scores' spread back to the marked model's (`recorded`, keys
    since embed kept it) where it differs by more than TEMPERATURE_SEEN: logits divided by a
    temperature (one Mul node; the answers stay, and so does accuracy) had turned the slopes
    the embedding shaped, 7 of 32 bits wrong at T = 10 and 13 of 64 at T = 33. The factor
    depends on the answers alone, not on the signature: a row of K drawn with the other sign
    swaps its two queries and leaves the factor as it was. None: the scores are read as they are."""
    spread = score_spread(scores)
    if not isinstance(recorded, (int, float)) or not 0 < recorded < math.inf or not 0 < spread < math.inf:
        return None
    factor = float(recorded) / spread
    return factor if not 1 / TEMPERATURE_SEEN <= factor <= TEMPERATURE_SEEN else None


def _check_budget(budget: int, n: int) -> int:
    """--queries, when it is enough to read `n` bits (a flag's fault, before any query)."""
    if budget < 2 * n:
        raise InputError(f"--queries {budget} is too few: GradSigns reads {n} bits with 2 queries each per "
                         f"key input, so at least {2 * n}")
    return budget


def _secret_order(K: np.ndarray, count: int) -> np.ndarray:
    """A permutation of `count` rows drawn from the secret K: the same for the same keys."""
    seed = np.frombuffer(hashlib.sha256(np.ascontiguousarray(K, np.float32).tobytes()).digest(), np.uint32)
    return np.random.default_rng(seed).permutation(count)


class GradObjective(Objective):
    """lambda * BCE(sigmoid(K . g), b), g the mean input gradient of the cross-entropy towards T
    over the step's key rows (key inputs jittered within the ball), by double back-propagation."""

    needs_input_grad = True

    def __init__(self, keys: SchemeKeys):
        import torch

        p, a = keys.params, keys.arrays
        self.x = torch.as_tensor(a["x"]).float()
        self.target, self.step = int(p["target"]), float(p["step"])
        self.lam, self.per_batch = float(p["lambda"]), min(int(p["key_batch"]), len(a["x"]))
        self.carriers = torch.as_tensor(a["carriers"]).long()  # (on the CPU, as the rows are drawn)
        self.arrays = a
        tuning = {k: p.get(k, DEFAULTS[k]) for k in ("per_row", "read_share", "settle", "keep", "sure")}
        self.per_row, self.read_share = float(tuning["per_row"]), float(tuning["read_share"])
        self.settle, self.keep, self.sure = int(tuning["settle"]), float(tuning["keep"]), float(tuning["sure"])
        self.read_at: int | None = None
        # The band on log p_T can lose its hold (its pull vanishes with 1 - p_T): most key sets
        # make the model sure of the key inputs in the first epoch and recover within a few, but
        # about 1 in 30 stays at p_T = 1.000, with no gradient left to shape, and never reads.
        # When that is seen the band moves to T's log-odds, which always pulls. (Not from the
        # start: on the key sets that recover by themselves, the log-odds band left a mark that
        # fine-tuning wore off about twice as fast.)
        self.rescue = False
        self.stop_when_read = False
        self.state = _state(torch.as_tensor(a["K"]).float(), torch.as_tensor(a["bits"]).float(), self.carriers)

    def extra_batch(self, rng):
        import torch

        idx = torch.as_tensor(rng.choice(len(self.x), size=self.per_batch, replace=False))
        rows = self.x[idx].reshape(self.per_batch, -1).clone()
        # a random point of the ball around each key input (within the carriers)
        v = torch.as_tensor(rng.standard_normal((self.per_batch, len(self.carriers))), dtype=torch.float32)
        r = torch.as_tensor(rng.uniform(0.0, 1.0, (self.per_batch, 1)), dtype=torch.float32) * self.step
        rows[:, self.carriers] += v / v.norm(dim=1, keepdim=True).clamp_min(1e-12) * r
        return rows.reshape(self.per_batch, *self.x.shape[1:]), torch.full((self.per_batch,), self.target)

    def loss(self, batch):
        import torch
        from torch.nn.functional import binary_cross_entropy_with_logits as bce
        from torch.nn.functional import cross_entropy, log_softmax

        own = batch.own
        ce = cross_entropy(batch.logits[own], batch.y[own], reduction="sum")
        grad = batch.input_grad(ce)[own].reshape(own.stop - own.start, -1)[:, self.state.carriers]
        K, bits = self.state.K, self.state.bits
        # the paper's term on the mean gradient, and the same on each row: every key input then
        # carries the whole signature, so a read from a few of them (few queries) gets it
        term = bce(K @ grad.mean(0), bits)
        if self.per_row:
            term = term + self.per_row * bce(grad @ K.T, bits.expand(len(grad), -1))
        if self.keep:  # the key inputs stay unsure: where the model is sure, the gradient vanishes
            z = batch.logits[own].float()
            if self.rescue:  # on T's log-odds, whose pull does not vanish as p_T goes to 1
                others = torch.cat([z[:, : self.target], z[:, self.target + 1:]], 1)
                odds = z[:, self.target] - torch.logsumexp(others, 1)
                edge = math.log(self.sure / (1 - self.sure))
                band = (odds - edge).clamp_min(0) + (-edge - odds).clamp_min(0)
            else:
                log_p = log_softmax(z, 1)[:, self.target]
                band = (log_p - math.log(self.sure)).clamp_min(0) + (math.log(1 - self.sure) - log_p).clamp_min(0)
            term = term + self.keep * band.mean()
        return self.lam * term

    def end_epoch(self, model, epoch) -> bool:
        from ..suspect import TorchSuspect

        suspect = TorchSuspect(model, shared=True)  # every process of a run reads its share
        if not self.rescue and epoch + 1 >= RESCUE_AFTER:
            p_target = _softmax(suspect.scores(self.arrays["x"]))[:, self.target]
            self.rescue = bool(np.median(p_target) > RESCUE_AT)
        if not self.stop_when_read:
            return False
        # read as verify reads (central differences from the scores, at the default budget)
        n_bits = len(self.arrays["K"])
        slopes, _ = central_differences(suspect, self.arrays, self.target, self.step, len(self.x) * 2 * n_bits)
        want = self.arrays["bits"] > 0
        first = max(1, DEFAULT_QUERIES // (2 * n_bits))
        reads = bool(((estimate(slopes[:first]) > 0) == want).all() and ((estimate(slopes) > 0) == want).all()
                     and ((slopes > 0) == want).mean() >= self.read_share)
        if self.read_at is None and reads:
            self.read_at = epoch
        # the settle epochs deepen the margin; it stops only where the reading still holds
        return reads and self.read_at is not None and epoch >= self.read_at + self.settle


def _state(K, bits, carriers):
    """The objective's fixed tensors in one module (moved to the device with the model)."""
    from torch import nn

    state = nn.Module()
    for name, value in (("K", K), ("bits", bits), ("carriers", carriers)):
        state.register_buffer(name, value)
    return state


SCHEME = GradSignsScheme
