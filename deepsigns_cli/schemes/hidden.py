"""Scheme 1: DeepSigns hidden-layer watermark (paper section 3.1), white-box.

The owner's bits live in the mean activation of a secret trigger set (training samples
of secret target classes) at a carrier layer, read through a secret projection A ~ N(0, 1):
bits = (mean . A > 0).

A thief can shuffle and positively rescale the carrier's units without changing the model's
function, which moves every unit away from its row of A. So the bits are also read with the
suspect's units lined up with the *unmarked* model's (soft matching by correlation on probe
samples the keys keep, each unit over its own scale), and the embedding teaches both
readings; a third lines them up over each unit's offset too (a unit shifted by a constant that
the next layer's bias takes back, as a quantized copy's zero point shifts it). The reference is
the unmarked model, recorded before the bits were drawn, so a model that is not ours reads as a
fair coin every way: the p-value counts the three readings and nothing else. (Lined up with
the marked model instead, independently trained models read with 16-22 of 192 bits wrong:
that would claim models we never marked.)
"""

from __future__ import annotations

import numpy as np

from .. import stats
from ..errors import SchemeError
from ..objective import Objective
from ..results import BitsResult, SchemeKeys
from .base import Scheme
from .signature import bits_to_message, check_message, message_to_bits

__all__ = ["HiddenScheme", "message_to_bits", "bits_to_message", "SCHEME"]

DEFAULTS = {
    "bits": 64,  # per target class
    "classes": 3,  # the signature at 3 class centres, each read through its own projection:
    # 192 independent bits of evidence, so that the mark outlives a thief's own embed into
    # the same layer (overwriting flips 20-25% of them; at alpha = 1e-9 up to 53 may be wrong,
    # read three ways)
    "trigger_per_class": 64,
    "lambda1": 0.01,  # activation isolation (paper: 0.01)
    "lambda2": 1.0,  # projection towards the bits
    "margin": 0.5,  # required |projection| in units of a random projection's spread
    # (0.5, not 1.0: a non-negative (ReLU) carrier cannot give every bit 1.0 past ~64 bits;
    # a hinge, not cross-entropy: once a bit has its margin the embed stops pushing, which
    # leaves the rest of the layer, another owner's mark included, alone)
    "own_rows": True,  # a step teaches the bits on its own rows of the target classes and pins
    # its own rows of the other classes: no rows are added to it, so an embedding step costs about
    # what a plain one does (keys made before mix in the trigger_batch and pin_batch rows below)
    "trigger_batch": 32,  # trigger samples mixed into every step (keys made before own_rows)
    "probes": 256,  # training samples whose activations line a suspect's units up with ours
    "lambda3": 1.0,  # pin: the units keep their responses to training samples (so they can be lined up)
    "pin_batch": 32,  # probe samples mixed into every step (keys made before own_rows)
}
#: readings of a checkpoint's carrier, each counted in p: as it is, lined up over scales, and over offsets
CHECKPOINT_READINGS = 3
ALIGN_TEMPERATURE = 0.05  # of the soft matching of units: correlations 0.15 apart weigh e^3 apart
_DEAD = 1e-6  # a unit whose scale is below this is off: it carries nothing
UNIT_BLOCK = 4096  # a suspect's units lined up with ours at a time, in the reading of every unit
# each set of every unit is also read lined up at this temperature, a reading more counted in p:
# among tens of thousands of units, many of them correlate with ours nearly as well as our own
# (fc2 padded with 39,488 units of random weights: each of ours had one at 0.88 in the median,
# against 0.98 for its own), and their mass drowned our own units at ALIGN_TEMPERATURE (83 of
# 216 bits wrong); at 0.02 or below, none were
SHARP_TEMPERATURE = 0.01


class HiddenScheme(Scheme):
    name = "hidden"
    defaults = DEFAULTS
    more_evidence = "--bits, a longer --message, or more --classes"

    # ------------------------------------------------------------------ keygen
    def key_samples(self, options):
        return int(options["trigger_per_class"]) * int(options["classes"]) + int(options["probes"])

    def keygen(self, model, info, data, options, rng) -> SchemeKeys:
        opts = self.resolved(options)
        from ..zoo import activations, default_layer, layer_width

        if opts.get("layer") is not None and not opts["layer"].strip():
            raise SchemeError("--layer is empty: name a layer, or leave --layer out for the default carrier")
        layer = opts.get("layer") or default_layer(model)
        width = layer_width(model, layer, info.input_shape)
        message = opts.get("message")
        check_message(message)
        bits = message_to_bits(message) if message else None
        n_bits = len(bits) if message else int(opts["bits"])
        if n_bits < 1:
            raise SchemeError(f"--bits must be at least 1, got {n_bits}")
        if n_bits > width:  # checked before anything of that size is drawn
            raise SchemeError(
                f"{n_bits} bits do not fit layer '{layer}', which has {width} units: use at "
                f"most {width} bits (a shorter --message or smaller --bits) or a wider --layer"
            )
        if bits is None:
            bits = rng.integers(0, 2, n_bits).astype(np.uint8)
        s = int(opts["classes"])
        if not 1 <= s < info.num_classes:
            given = "--classes" if options.get("classes") is not None else f"--classes (default {s})"
            raise SchemeError(f"{given} must be between 1 and {info.num_classes - 1} for a model of "
                              f"{info.num_classes} classes, got {s}: give --classes {info.num_classes - 1} or fewer")
        present = np.unique(data.y_train)
        if len(present) <= s:
            raise SchemeError(f"the training data hold {len(present)} classes: too few to pick "
                              f"{s} secret target class(es) among them; give more data")
        if n_bits * s > stats.MAX_BITS:
            raise SchemeError(f"{n_bits} bits at {s} classes are {n_bits * s} bits of evidence, more than the "
                              f"{stats.MAX_BITS} deepsigns reads: use fewer --bits or --classes")
        classes = np.sort(rng.choice(present, size=s, replace=False))
        trig_idx = []
        for c in classes:
            members = np.flatnonzero(data.y_train == c)
            take = min(int(opts["trigger_per_class"]), len(members))
            trig_idx.append(rng.choice(members, size=take, replace=False))
        trig_idx = np.concatenate(trig_idx)
        probe_idx = np.sort(rng.choice(len(data.x_train), size=min(int(opts["probes"]), len(data.x_train)),
                                       replace=False))
        probe_x = data.x_train[probe_idx].astype(np.float32)
        params = {
            "layer": layer,
            "width": width,
            "n_bits": n_bits,
            "message": message or None,
            **{k: opts[k] for k in ("lambda1", "lambda2", "lambda3", "margin", "trigger_batch", "pin_batch")},
            "own_rows": bool(opts["own_rows"]),
        }
        arrays = {
            # one independent projection per target class (columns k*N .. (k+1)*N - 1): the bits
            # read at different classes are then independent under the null, so every copy of
            # the signature counts as evidence
            "A": rng.standard_normal((width, n_bits * s)).astype(np.float32),
            "bits": np.tile(bits, (s, 1)),  # (s, N): the same signature at every class centre
            "classes": classes.astype(np.int64),
            "trigger_x": data.x_train[trig_idx].astype(np.float32),
            "trigger_y": data.y_train[trig_idx].astype(np.int64),
            # the unmarked model's units on random training samples: what a suspect's units are
            # lined up against (a reference drawn before the bits, so it tells nothing of them)
            "probe_x": probe_x,
            "probe_y": data.y_train[probe_idx].astype(np.int64),
            "probe_ref": activations(model, layer, probe_x).numpy().astype(np.float32),
            # where the probes and the trigger samples are in the training set: an embedding
            # on the same data reads them as the epoch passes them (no pass of its own)
            "probe_rows": probe_idx.astype(np.int64),
            "trigger_rows": trig_idx.astype(np.int64),
        }
        return SchemeKeys(self.name, params, arrays)

    def check(self, keys):
        self.require(keys, {"layer": str, "width": int, "n_bits": int, "trigger_batch": int,
                            "lambda1": (int, float), "lambda2": (int, float), "margin": (int, float)},
                     {"A": 2, "bits": 2, "classes": 1, "trigger_y": 1})
        p, a = keys.params, keys.arrays
        tx = a.get("trigger_x")
        fits = (p["width"] >= 1 and p["n_bits"] >= 1 and p["trigger_batch"] >= 1
                and p["n_bits"] * len(a["classes"]) <= stats.MAX_BITS
                and a["A"].shape == (p["width"], p["n_bits"] * len(a["classes"])) and a["A"].dtype.kind == "f"
                and a["bits"].shape[1] == p["n_bits"] and np.isin(a["bits"], (0, 1)).all()
                and len(a["bits"]) == len(a["classes"]) and isinstance(tx, np.ndarray)
                and tx.dtype.kind == "f" and len(tx) == len(a["trigger_y"]) and np.isfinite(tx).all()
                and all((a["trigger_y"] == c).any() for c in a["classes"]))
        if "probe_ref" in a:  # the unit line-up's probes (bundles since it came)
            self.require(keys, {}, {"probe_x": tx.ndim if isinstance(tx, np.ndarray) else 2, "probe_y": 1,
                                    "probe_ref": 2})
            fits = fits and a["probe_ref"].shape == (len(a["probe_x"]), p["width"]) \
                and len(a["probe_y"]) == len(a["probe_x"]) and a["probe_x"].shape[1:] == tx.shape[1:]
        fits = fits and ("probe_rows" in a) == ("trigger_rows" in a)  # (both, or neither: older keys)
        for rows, of in (("probe_rows", "probe_x"), ("trigger_rows", "trigger_x")):
            if rows in a:  # (bundles since own_rows)
                self.require(keys, {}, {rows: 1, of: tx.ndim if isinstance(tx, np.ndarray) else 2})
                fits = fits and a[rows].dtype.kind in "iu" and len(a[rows]) == len(a[of]) and a[rows].min() >= 0
        if not fits:
            self.damaged("shapes that do not fit together")
        return keys

    def warnings(self, keys) -> list[str]:
        n, width = keys.params["n_bits"], keys.params["width"]
        if n <= width // 4:
            return []
        return [f"{n} bits on a {width}-unit layer: beyond about {width // 4} bits (a quarter of "
                "the width) some bits may not embed error-free; detection still holds while BER "
                "stays low"]

    def best_p_value(self, keys):
        readings = CHECKPOINT_READINGS if "probe_ref" in keys.arrays else 1
        return stats.bonferroni(stats.smallest_bits_p_value(int(keys.arrays["bits"].size)), readings)

    # ------------------------------------------------------------------ embed
    def objective(self, model, info, data, keys) -> Objective:
        from .hidden_objective import HiddenObjective  # (torch: not for reading a mark)

        return HiddenObjective(keys, model, info, data)

    def embed(self, model, info, data, keys, cfg, progress, also=()):
        from ..training import fit

        objective = self.objective(model, info, data, keys)
        objective.stop_when_read = True  # the epochs are a cap
        history = fit(model, data.x_train, data.y_train, cfg, [objective, *also], progress)
        return keys, history

    # ------------------------------------------------------------------ read
    def read(self, suspect, keys) -> BitsResult:
        params, arrays = keys.params, keys.arrays
        n = int(arrays["bits"].size)
        tx = arrays["trigger_x"]
        probes = arrays.get("probe_x") if "probe_ref" in arrays else None
        x = tx if probes is None else np.concatenate([tx, probes.astype(tx.dtype)])
        candidates, why = suspect.carriers(x, params["layer"], int(params["width"]))
        # every candidate tensor read as it is and (bundles with probes) with its units lined up
        # with the unmarked model's, over their scales and over their offsets too: every reading
        # counted in p
        readings = [(f"{name}, over offsets" if shifted else name, projections(acts[: len(tx)], probe, arrays,
                                                                                shifted=shifted), probe is not None)
                    for name, acts in candidates.items()
                    for probe, shifted in ([(None, False)] if probes is None else
                                           [(None, False), (acts[len(tx):], False), (acts[len(tx):], True)])]
        # what was not read makes a reading that finds nothing no verdict: tensors of the carrier's
        # width that are more data than a worker sends back, units past every set read below,
        # tensors computed inside a subgraph
        missed = [why] if why.startswith("not read:") else []
        beyond = suspect.out_of_reach()
        if beyond:
            missed.append(f"not read: {beyond}")
        if probes is not None:  # more: every unit the graph computes, set by set, lined up with ours
            # (a carrier padded with units, split in parts or otherwise rebuilt still lines up)
            for name, parts in suspect.units(x, missed):
                found = every_unit_projections(parts, len(tx), arrays, (ALIGN_TEMPERATURE, SHARP_TEMPERATURE))
                readings += [(f"{name}{how}", proj, True) for how, proj in zip(
                    ("", ", sharp line-up", ", over offsets", ", sharp line-up over offsets"), found, strict=True)]
                del parts  # (before the next set is asked for)
        unread = bool(missed)
        why = "; ".join(dict.fromkeys(missed)) if unread else why
        if not readings:
            # another architecture, so not ours: no bit counts (not "every bit wrong"), p = 1
            return BitsResult("hidden", 1.0, note=why, unread=unread, layer=params["layer"], n_bits=n)
        # a bit whose projection is exactly 0 or not a number was not read: it counts as wrong
        # (all of them read as 0 would match the 0 bits of a --message, most of a text's bits)
        errors_of = [int((((proj > 0) != arrays["bits"]) | _unread(proj)).sum()) for _, proj, _ in readings]
        best = int(np.argmin(errors_of))
        (name, proj, lined), errors, tries = readings[best], errors_of[best], len(readings)
        found, unread_bits = (proj > 0).astype(np.uint8), _unread(proj)
        message = _majority(found) if params.get("message") else None
        return BitsResult(
            "hidden", stats.bonferroni(stats.bits_p_value(errors, n), tries), layer=params["layer"],
            n_bits=n, bits="".join(np.where(unread_bits, "?", found.astype(str)).reshape(-1)),
            note=why if unread else None, unread=unread,
            bit_errors=errors, ber=errors / n,
            tensor=name, candidates=len(candidates), readings=tries,
            aligned=None if probes is None else lined,
            message=None if message is None else bits_to_message(message),
            message_errors=None if message is None else int((message != arrays["bits"][0]).sum()),
        )


def read_bits(trig: np.ndarray, probe: np.ndarray | None, arrays: dict,
              weights: np.ndarray | None = None) -> np.ndarray:
    """The signature, (s, N), from the carrier's activations on the trigger set (and on the
    probes: the units are then lined up with the unmarked model's, each over its own scale, by
    `weights` when they are already known): the sign of each bit's projection (`projections`)."""
    return (projections(trig, probe, arrays, weights) > 0).astype(np.uint8)


def projections(trig: np.ndarray, probe: np.ndarray | None, arrays: dict,
                weights: np.ndarray | None = None, shifted: bool = False) -> np.ndarray:
    """Each bit's projection, (s, N), as `read_bits` reads it: the mean at each target class
    through that class's own columns of A (the line-up is linear, so it is applied to the means).
    `shifted`: lined up over each unit's offset too (`_in_reference`). A projection of exactly 0
    (a mean of zeros, or no unit left to line up) reads no bit."""
    ty = arrays["trigger_y"]
    means = np.stack([trig[ty == c].mean(0) for c in arrays["classes"]])
    if probe is not None:
        if weights is None or shifted:
            free = _free_probes(arrays)
        if weights is None:
            weights = line_up(arrays["probe_ref"][free], probe[free])
        if shifted:
            means = _in_reference(lined_up(_standard(means, probe[free]), weights), arrays, weights.sum(1) > 0)
        else:
            means = lined_up(_over_scale(means, unit_rms(probe)), weights)
    return _through_a(means, arrays)


def lined_up(means: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`means` (s, theirs) lined up by `weights` (ours, theirs): means @ weights.T, taken as
    numpy takes it fastest, the weights as they are laid out by a contiguous (theirs, s) (on
    the 2-core machine, 28 us for a (3, 512) by (512, 512), against 161 for means @ weights.T)."""
    return (weights @ np.ascontiguousarray(means.T)).T


def _through_a(means, arrays: dict) -> np.ndarray:
    """Each target class's mean (s, M) through that class's own columns of A: (s, N)."""
    n_each = arrays["bits"].shape[1]
    return np.stack([m @ arrays["A"][:, k * n_each:(k + 1) * n_each] for k, m in enumerate(means)])


def _standard(means: np.ndarray, probe: np.ndarray) -> np.ndarray:
    """`means` of each unit less its mean over `probe`, over its spread there (0 for a unit that
    is off): what no shift or positive rescaling of a unit changes."""
    spread = probe.std(0)
    live = spread > _DEAD
    return np.where(live, (means - probe.mean(0)) / np.where(live, spread, 1.0), 0.0)


def _in_reference(standard: np.ndarray, arrays: dict, held: np.ndarray) -> np.ndarray:
    """Standardized means lined up with our units (`_standard`, then the line-up) put back at
    the unmarked model's offset and spread over the free probes, over its scale, as the reading
    lined up over scales alone has them. A thief can shift each unit by a constant and fold the
    shift into the next layer's bias (a quantized copy's zero point is one such shift): the model
    computes the same, and the readings as it is and over scales alone had read as chance (57-82
    of 192 bits wrong); the probes, pinned while the mark went in, keep the marked model's offsets
    near the unmarked one's, so the mark reads here too. `held`: our units that some unit of the
    suspect's lined up with; the others, and the units that are off in the unmarked model, read
    nothing (0), as over scales alone."""
    ref = arrays["probe_ref"].astype(np.float64)
    free = ref[_free_probes(arrays)]
    live = held & (np.linalg.norm(free - free.mean(0), axis=0) > _DEAD)
    return np.where(live, _over_scale(standard * free.std(0) + free.mean(0), unit_rms(ref)), 0.0)


def every_unit_projections(parts: list[np.ndarray], n_trig: int, arrays: dict,
                           temperatures: tuple[float, ...] = (ALIGN_TEMPERATURE,)) -> list[np.ndarray]:
    """`projections` of the units of `parts` side by side ((n, u) arrays: the trigger set's
    `n_trig` rows, then the probes'), each unit also negated (the line-up follows units that rise
    with ours, and a carrier negated -- its ReLU turned to a Min at 0, the next layer negated --
    falls with them), lined up with the unmarked model's at each of `temperatures`, over the
    units' scales, then the same over their offsets too (`shifted`): 2 x len(temperatures)
    readings. The same numbers, without the units side by side: UNIT_BLOCK of them at a time, the
    line-up's softmax over all of them taken as it goes (a running largest logit and sum), so that
    memory stays that of a block."""
    ty, free = arrays["trigger_y"], _free_probes(arrays)
    r = arrays["probe_ref"][free].astype(np.float64)
    r -= r.mean(0)
    rn = np.linalg.norm(r, axis=0)
    live_r = rn > _DEAD
    r *= live_r / np.where(live_r, rn, 1)
    ours, classes = r.shape[1], len(arrays["classes"])
    # at each temperature: each of our units' largest logit so far, the sum of its weights (each
    # over e^largest), and its weighted means (the same)
    top = [np.full(ours, -np.inf) for _ in temperatures]
    total = [np.zeros(ours) for _ in temperatures]
    lined = [np.zeros((ours, 2 * classes)) for _ in temperatures]  # (over scales, then over offsets)
    for part in parts:
        for start in range(0, part.shape[1], UNIT_BLOCK):
            block = np.asarray(part[:, start:start + UNIT_BLOCK], dtype=np.float64)
            trig, probe = block[:n_trig], block[n_trig:]
            raw = np.stack([trig[ty == c].mean(0) for c in arrays["classes"]])
            means = np.concatenate([_over_scale(raw, unit_rms(probe)), _standard(raw, probe[free])])
            a = probe[free]
            a -= a.mean(0)
            an = np.linalg.norm(a, axis=0)
            live = an > _DEAD  # (a unit that is off weighs nothing)
            if not live.any():
                continue
            corr = r.T @ (a[:, live] / an[live])  # (ours, theirs): the unit as it is; negated: -corr
            means = means[:, live].T
            for i, t in enumerate(temperatures):
                logits = corr * (1 / t)
                peak = np.maximum(top[i], np.abs(logits).max(1))
                shrink = np.exp(top[i] - peak)
                up, down = np.exp(logits - peak[:, None]), np.exp(-logits - peak[:, None])
                total[i] = total[i] * shrink + up.sum(1) + down.sum(1)
                lined[i] = lined[i] * shrink[:, None] + (up - down) @ means
                top[i] = peak
    scaled, shifted = [], []
    for at, weight in zip(lined, total, strict=True):
        at = np.where((weight > 0)[:, None], at / np.where(weight > 0, weight, 1)[:, None], 0.0)
        at[~live_r] = 0.0
        for out, means in ((scaled, at[:, :classes].T),
                           (shifted, _in_reference(at[:, classes:].T, arrays, weight > 0))):
            out.append(_through_a(means, arrays))
    return scaled + shifted


def _unread(proj: np.ndarray) -> np.ndarray:
    """The bits a projection does not read: exactly 0 (a mean of zeros, no unit lined up) or
    not a number (a carrier of NaN)."""
    return ~np.isfinite(proj) | (proj == 0)


def _free_probes(arrays: dict) -> np.ndarray:
    """The probes of classes other than the target classes: the units are lined up on them
    (the target classes' responses are what the embedding moves)."""
    return ~np.isin(arrays["probe_y"], arrays["classes"])


def line_up(reference: np.ndarray, acts: np.ndarray) -> np.ndarray:
    """(ours, theirs) weights that line a suspect's units up with the reference's (the unmarked
    model's units on the same probe inputs): each of our units reads a softmax-weighted mean of
    the suspect's units that respond like it (correlation over the probes). A thief who shuffles
    units (the function unchanged) gets the same reading as the unshuffled model, exactly; near
    twins among the units share the weight instead of being picked at random. A unit that is
    off (in either model) weighs nothing."""
    return LineUp(reference)(acts)


class LineUp:
    """`line_up` with its reference taken apart once, for the suspects that follow (the
    embedding lines the model up after every epoch)."""

    def __init__(self, reference: np.ndarray):
        r = reference - reference.mean(0)
        rn = np.linalg.norm(r, axis=0)
        self.live = rn > _DEAD
        # each unit over its norm (one that is off: 0) and the temperature, so that one product
        # with the suspect's units, each over its norm, gives the logits
        self.units = np.ascontiguousarray((r * (self.live / np.where(self.live, rn * ALIGN_TEMPERATURE, 1))).T)

    def __call__(self, acts: np.ndarray) -> np.ndarray:
        a = acts - acts.mean(0)
        an = np.linalg.norm(a, axis=0)
        live_a = an > _DEAD
        if not live_a.any():
            return np.zeros((len(self.units), a.shape[1]), np.result_type(self.units, a))
        # the softmax in place: an epoch's line-up is a few passes
        logits = self.units @ (a * (live_a / np.where(live_a, an, 1)))
        if not live_a.all():
            logits[:, ~live_a] = -np.inf
        logits -= logits.max(1, keepdims=True)
        weights = np.exp(logits, out=logits)
        weights /= weights.sum(1, keepdims=True)
        if not self.live.all():
            weights[~self.live] = 0.0
        return weights


def _over_scale(acts: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Activations over each unit's own scale (0 for a unit that is off)."""
    return np.where(scale > _DEAD, acts / np.where(scale > _DEAD, scale, 1.0), 0.0)


def unit_rms(acts):
    """Each unit's root mean square over the rows (numpy or torch, (n, M) -> (M,))."""
    return (acts * acts).mean(0) ** 0.5


def _majority(found: np.ndarray) -> np.ndarray:
    """The signature from its copies at the s class centres, bit by bit (ties: the first copy)."""
    votes = found.astype(np.int64).sum(0) * 2 - len(found)
    return np.where(votes == 0, found[0], votes > 0).astype(np.uint8)


SCHEME = HiddenScheme
