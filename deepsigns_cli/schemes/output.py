"""Scheme 2: DeepSigns output-layer watermark (paper section 3.2), black-box.

Keys are random inputs whose penultimate activations fall where the training data's
activations are sparse ("rarely explored regions"), each with a random label that the
unmarked model does not predict. Fine-tuning teaches the model those labels; a suspect that
answers them far more often than chance is ours. A key's label is drawn among the C - 1
labels the unmarked model does not give it, so an unrelated model hits it with probability
1/(C - 1) at most (the paper's Eq. 5 uses 1/C, which a model that always disagrees with the
owner's beats): p = P[Binomial(K, 1/(C - 1)) >= matches]. With C = 2 the label is fixed by the
unmarked model's answer and the scheme proves nothing: keygen refuses it.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from .. import stats
from ..data import bounded_rows, digest_number, take
from ..errors import DeepSignsError, InputError, NotLearnt, SchemeError, one_line
from ..objective import Objective
from ..results import MatchResult, SchemeKeys
from .base import Scheme, each_output

# torch is imported inside the methods that train: verify() runs on onnxruntime alone

__all__ = ["OutputScheme", "RareRegions", "SCHEME"]

DEFAULTS = {
    "key_size": 100,  # K: at alpha = 1e-9, 41 of 100 must match when embed draws them from 300
    # of 400 candidates (16 of 20 for K = 20; 35 and 14 had been enough before the choice was
    # counted in p): a mark that loses keys to a thief's fine-tuning holds while 2 in 5 of them last
    "candidates": 400,  # K' = max(400, 4 K) candidates are drawn and learnt
    "oversample": 4,
    "neighbours": 10,  # epsilon = median distance of a training point to its 10th neighbour
    "quantile": 0.05,  # accept when fewer neighbours than 95% of training points have
    "pca_variance": 0.90,  # PCA keeps the components explaining this much variance
    "key_batch": 512,  # candidate keys mixed into every step (all of K' = 400 by default)
    "reference_points": 4000,  # training activations used as the density reference
    "settle_epochs": 60,  # epochs of key training after 99% of the candidates are learnt: keys
    # learnt just past the boundary are the first a thief's fine-tuning takes back
    "robust_epochs": 30,  # keys are chosen among those that outlive this much fine-tuning of a
    # copy of the marked model (Adam at the model's own rate, as a thief would); 0: no such test
}


MAX_KEY_SIZE = 1000  # K' = 4 K candidates are drawn, tested and learnt: bounded work


class RareRegions:
    """Density of training activations in PCA space, with thresholds taken from the data."""

    def __init__(self, train_acts: np.ndarray, opts: dict, rng: np.random.Generator):
        if len(train_acts) > opts["reference_points"]:
            train_acts = train_acts[rng.choice(len(train_acts), opts["reference_points"], replace=False)]
        unusable = SchemeError("the model's activations on the training data are not finite or "
                               "too large to analyse (NaN, infinite or huge weights, or inputs too "
                               "large for it): use a trained model and data in its usual range")
        if not np.isfinite(train_acts).all():
            raise unusable
        train_acts = train_acts.astype(np.float64)  # float32 squares of large activations overflow
        self.mean = train_acts.mean(0)
        try:
            with np.errstate(all="ignore"):
                _, s, vt = np.linalg.svd(train_acts - self.mean, full_matrices=False)
        except np.linalg.LinAlgError:
            raise unusable from None
        if not (np.isfinite(s).all() and np.isfinite(vt).all()):
            raise unusable
        explained = np.cumsum(s**2) / max(float((s**2).sum()), 1e-12)
        self.dims = int(min(len(s), np.searchsorted(explained, opts["pca_variance"]) + 1))
        self.components = vt[: self.dims].T  # (M, d)
        self.ref = self.project(train_acts)
        k = min(int(opts["neighbours"]), len(self.ref) - 1)
        d = self._dist(self.ref, self.ref)
        np.fill_diagonal(d, np.inf)
        self.eps = float(np.median(np.sort(d, axis=1)[:, k - 1]))
        self.train_counts = (d <= self.eps).sum(1)  # each training point's own neighbours
        self.threshold = max(1, int(np.quantile(self.train_counts, opts["quantile"])))

    def project(self, acts: np.ndarray) -> np.ndarray:
        return (acts - self.mean) @ self.components

    @staticmethod
    def _dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
        return np.sqrt(np.maximum(d2, 0))

    def counts(self, acts: np.ndarray) -> np.ndarray:
        """Training points within epsilon of each activation (in PCA space)."""
        out = []
        for i in range(0, len(acts), 2048):
            out.append((self._dist(self.project(acts[i : i + 2048]), self.ref) <= self.eps).sum(1))
        return np.concatenate(out) if out else np.zeros(0, int)

    def rare(self, acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        counts = self.counts(acts)
        return counts < self.threshold, counts


class OutputScheme(Scheme):
    name = "output"
    defaults = DEFAULTS
    more_evidence = "a larger --key-size"

    # ------------------------------------------------------------------ keygen
    def key_samples(self, options):
        return max(int(options["candidates"]), min(int(options["key_size"]), MAX_KEY_SIZE) * int(options["oversample"]))

    def keygen(self, model, info, data, options, rng) -> SchemeKeys:
        from ..training import predict
        from ..zoo import activations, default_layer

        opts = self.resolved(options)
        key_size = int(opts["key_size"])
        if info.num_classes < 3:
            raise SchemeError(f"the output-layer scheme needs 3 or more classes, the model has {info.num_classes}: "
                              "a key's label would be the one the unmarked model does not give, which "
                              "proves nothing; use --scheme hidden")
        if not 1 <= key_size <= MAX_KEY_SIZE:
            raise SchemeError(f"--key-size must be between 1 and {MAX_KEY_SIZE}, got {key_size}")
        wanted = max(int(opts["candidates"]), key_size * int(opts["oversample"]))
        layer = default_layer(model)
        # the density reference is drawn before any activation is computed (the same draw as
        # RareRegions would make): memory is bounded by reference_points, not the data set
        x_ref = data.x_train
        if len(x_ref) > opts["reference_points"]:
            x_ref = take(x_ref, rng.choice(len(x_ref), opts["reference_points"], replace=False))
        regions = RareRegions(activations(model, layer, x_ref).numpy(), opts, rng)
        lo, hi = data.value_range
        accepted, acc_counts, rej_counts, drawn, n_accepted = [], [], [], 0, 0
        while n_accepted < wanted:
            if drawn >= 50 * wanted:
                raise SchemeError(
                    f"only {n_accepted} of {wanted} random inputs fell in rarely "
                    f"explored regions after {drawn} draws: lower --key-size"
                )
            x = rng.uniform(lo, hi, size=(wanted, *info.input_shape)).astype(np.float32)
            drawn += len(x)
            ok, counts = regions.rare(activations(model, layer, x).numpy())
            accepted.append(x[ok])
            n_accepted += int(ok.sum())
            acc_counts.append(counts[ok])
            rej_counts.append(counts[~ok])
        x_cand = np.concatenate(accepted)[:wanted]
        # a random label that the unmarked model does not predict
        pred = predict(model, x_cand).argmax(1)
        shift = rng.integers(1, info.num_classes, size=len(x_cand))
        y_cand = ((pred + shift) % info.num_classes).astype(np.int64)
        acc_counts, rej_counts = np.concatenate(acc_counts)[:wanted], np.concatenate(rej_counts)
        params = {
            "layer": layer,
            "key_size": key_size,
            "num_classes": info.num_classes,
            "embedded": False,
            "pca_dims": regions.dims,
            "epsilon": regions.eps,
            "threshold": regions.threshold,
            "draws": drawn,
            "neighbour_counts": {
                "train": _summary(regions.train_counts),
                "accepted": _summary(acc_counts),
                "rejected": _summary(rej_counts),
                "test": _summary(regions.counts(activations(
                    model, layer, take(data.x_test, bounded_rows(len(data.x_test)))).numpy())),
            },
            "key_batch": opts["key_batch"],
            "robust_epochs": opts["robust_epochs"],
            "data_digest": data.digest,
        }
        return SchemeKeys(self.name, params, {"x_candidates": x_cand, "y_candidates": y_cand})

    def check(self, keys):
        self.require(keys, {"key_size": int, "num_classes": int, "key_batch": int}, {})
        x, y = ("x", "y") if keys.params.get("embedded") else ("x_candidates", "y_candidates")
        self.require(keys, {}, {y: 1})
        xs, ys = keys.arrays.get(x), keys.arrays[y]
        # (labels are class numbers: a label of 2.5 never matched, and relabelled it would index a table)
        if not (isinstance(xs, np.ndarray) and xs.dtype.kind == "f" and len(xs) == len(ys) and ys.dtype.kind in "iu"
                and np.isfinite(xs).all() and keys.params["num_classes"] >= 3
                and keys.params["key_batch"] >= 1 and 1 <= keys.params["key_size"] <= MAX_KEY_SIZE
                and ys.min() >= 0 and ys.max() < keys.params["num_classes"]
                and len(ys) <= (keys.params["key_size"] if keys.params.get("embedded") else 4 * MAX_KEY_SIZE)):
            self.damaged("keys that do not fit their labels")
        if keys.params.get("embedded"):
            try:
                _choice(keys.params, len(ys))
            except ValueError:
                self.damaged("a pool of keys that does not fit its candidates")
        return keys

    # ------------------------------------------------------------------ embed
    def objective(self, model, info, data, keys) -> Objective:
        params, arrays = keys.params, keys.arrays
        if params.get("embedded"):
            return KeyObjective(arrays["x"], arrays["y"], int(params["key_batch"]))
        return KeyObjective(arrays["x_candidates"], arrays["y_candidates"], int(params["key_batch"]))

    def can_embed(self, keys, data):
        if keys.params.get("embedded"):
            raise SchemeError("these output-layer keys are already embedded: run keygen for a new model")
        _check_data(keys.params, data)

    def embed(self, model, info, data, keys, cfg, progress, also=()):
        from ..training import fit, predict

        params, arrays = keys.params, keys.arrays
        x, y = arrays["x_candidates"], arrays["y_candidates"]
        unmarked = predict(model, x).argmax(1)
        objective = self.objective(model, info, data, keys)
        objective.stop_at, objective.settle = 0.99, int(params.get("settle_epochs", DEFAULTS["settle_epochs"]))
        # at the model's own rate (the paper takes a tenth of it: keys learnt that gently are
        # gone after 30 epochs of fine-tuning at the full rate, 5 of 20 kept; see the README)
        history = fit(model, data.x_train, data.y_train, cfg, [objective, *also], progress)
        marked = predict(model, x).argmax(1)
        good = np.flatnonzero((marked == y) & (unmarked != y))
        key_size = int(params["key_size"])
        if len(good) < key_size:
            raise NotLearnt(f"only {len(good)} keys were learnt by the model (needed {key_size}) after "
                            f"{history['epochs']} epochs", "raise --epochs (or make fewer keys: keygen's --key-size)")
        # the keys that outlive a thief's fine-tuning of a copy, when there are enough of them
        lasting = self._lasting(model, data, cfg, x, y, good, int(params.get("robust_epochs", 0)), progress)
        pool = lasting if len(lasting) >= key_size else good
        pick = _pick(x, y, pool, key_size)
        # (the pool the keys were drawn from, among how many candidates: read() counts the choice)
        params = {**params, "embedded": True, "candidates_learnt": float((marked == y).mean()),
                  "qualified": int(len(good)), "lasting": int(len(lasting)),
                  "candidates": int(len(x)), "pool": int(len(pool))}
        return SchemeKeys(self.name, params, {"x": x[pick], "y": y[pick]}), history

    @staticmethod
    def _lasting(model, data, cfg, x, y, good, epochs: int, progress) -> np.ndarray:
        """The learnt keys that a copy of the marked model still answers after `epochs` of plain
        fine-tuning (Adam at the model's rate, another seed): a thief's first move, simulated.
        The keys are then drawn among them at random. Their labels are the random ones keygen
        drew, but the choice favours labels the architecture finds natural at a key: unrelated
        models matched 5.7% of such keys (0-2 of 20) against 1.5% of keys chosen without the
        test, under the 1/(C - 1) = 11% the p-value assumes (README, "What survives")."""
        import copy

        from ..training import fit, predict

        if epochs <= 0:
            return good
        thief = copy.deepcopy(model)
        fit(thief, data.x_train, data.y_train,
            replace(cfg, epochs=epochs, seed=cfg.seed + 1, optimizer="adam", description="embed output: "
                    "fine-tune a copy as a thief would"), [], progress)
        return good[predict(thief, x[good]).argmax(1) == y[good]]

    # ------------------------------------------------------------------ read
    best_is_typical = "with the pool embed typically keeps (3 in 4 of the candidates)"

    def best_p_value(self, keys):
        """Every key answered. Before embed, the pool the keys will be drawn from is taken at
        three quarters of the candidates, about what embed keeps on the digits models (294-394
        of 400 lasted, three seeds at the defaults)."""
        params, k = keys.params, int(keys.params["key_size"])
        if params.get("embedded"):
            chosen = _choice(params, k)
        else:
            n = len(keys.arrays["y_candidates"])
            pool = max(k, 3 * n // 4)
            chosen = (n, pool) if int(params.get("robust_epochs", 0)) > 0 and pool < n else None
        return stats.keys_p_value(k, k, int(params["num_classes"]) - 1, chosen)

    def read(self, suspect, keys) -> MatchResult:
        params, arrays = keys.params, keys.arrays
        if not params.get("embedded"):
            raise SchemeError("the output-layer keys are not embedded yet: run 'deepsigns embed' first")
        start = time.perf_counter()
        k, c = len(arrays["y"]), int(params["num_classes"])

        silent: list[str] = []  # the outputs that left keys with no answer

        def one(output):
            # the label each key gets: argmax of the scores or probabilities, or the model's own
            # label output; -1 where there is no answer (NaN scores), which never matches
            answers, name, kind = suspect.answers(arrays["x"], output)
            answers = np.asarray(answers, dtype=np.int64).reshape(k)
            note, width = None, suspect.answer_classes
            # (fewer scores than classes are read as the first classes': a head that drops a class's
            # column still answers the others, a top-k head's sorted probabilities answer none)
            if width is not None and width != c:
                note = f"the model gives {width} scores, the keys have {c} classes"
            elif width is None and (answers >= c).any():  # such a label never matches a key
                note = f"the model answers label {int(answers.max())}, the keys have {c} classes"
            # chance among the classes the suspect answers, never more than the keys' C (keys that
            # claim a million classes and label ten had claimed every model, at p = 1e-37); of a
            # label output, those it gave (a larger one only makes its own p-value smaller)
            classes = min(c, int(answers.max(initial=-1)) + 1 if width is None else width)
            matches, relabelled, p, values = _either_reading(answers, arrays["y"], c, max(classes - 1, 1), chosen)
            if (answers < 0).any() and not kind.startswith("ranked"):  # (a model that answers no key, NaN,
                # had read as "not detected"; integers that are no ranking are simply no answer that way)
                silent.append(f"not read: {int((answers < 0).sum())} of the {k} keys got no answer (NaN scores, "
                              f"or no class) from output '{one_line(str(output or name), 60)}'")
            return matches, name, kind, note, classes, p, answers.tobytes(), relabelled, values

        chosen = _choice(params, k)

        # every output the model gives is read (each reading counted in p), the best kept
        try:
            readings, missed = each_output(suspect, one)
            missed += silent
        except InputError:  # (an --output it does not have: the command's input is wrong)
            raise
        except DeepSignsError as exc:
            if suspect.broken:  # (no answer in time, a crash: the reading fails)
                raise
            # no output gives class scores or labels (strings, a sequence of maps, ...): this
            # scheme reads nothing, and the bundle's other schemes still read what they can
            return MatchResult("output", 1.0, note=one_line(exc, 300), unread=True, keys=k)
        matches, output, kind, note, classes, p, _, relabelled, values = min(
            readings, key=lambda r: (r[5], -r[0], r[2] == "labels"))
        # outputs that gave the same answers are one reading (100 copies of one output had
        # multiplied p by 100, and taken a marked model below alpha)
        distinct = len({r[6] for r in readings})
        return MatchResult("output", stats.bonferroni(p, distinct),
                           note="; ".join(filter(None, [*missed, note])) or None, unread=bool(missed), keys=k,
                           queries=k * len(readings), matches=matches, mismatches=k - matches,
                           num_classes=classes, labels=max(classes - 1, 1), chosen_from=chosen,
                           onnx_seconds=time.perf_counter() - start if suspect.blackbox_only else None,
                           output=output, output_kind=kind, outputs=distinct, relabelled=relabelled,
                           key_classes=c, answer_values=values)


def _either_reading(answers: np.ndarray, y: np.ndarray, c: int, labels: int, chosen: tuple[int, int] | None
                    ) -> tuple[int, list[list[int]] | None, float, int]:
    """(matches, relabelling, p, D) of the better of the two readings of a suspect's `answers` to
    the keys (labels `y` among `c` classes; chance 1/`labels`): as they are, and through the
    relabelling of their D distinct values (at most `c`: beyond, those of a class number only)
    that matches the most keys. A thief who renumbers the classes (a permuted head, labels 1..C
    or ids of his own, with his own map to their names) answers every key with another label.
    Each reading has its share of alpha (stats.RELABEL_SHARE), the second counts every way of
    giving each value a class; the relabelling is None when the first reading is kept, else
    [answer, key label] for each value it moves that the keys show."""
    k = len(y)
    matches = int((answers == y).sum())
    p = stats.keys_p_value(matches, k, labels, chosen)
    values = np.unique(answers[answers >= 0])  # (-1: no answer)
    if len(values) > c:
        values = values[values < c]
    d = len(values)
    if not d or stats.keys_p_value(k, k, labels, chosen, (c, d)) >= p:
        return matches, None, p, d  # (no relabelling could read better, every key matched: not searched)
    from scipy.optimize import linear_sum_assignment

    keyed = np.unique(y)  # (a table of the labels the keys have: a bundle's C may be any size)
    at = np.minimum(np.searchsorted(values, answers), d - 1)
    valued = values[at] == answers
    table = np.zeros((d, len(keyed)), np.int64)  # keys by (answer, key label)
    np.add.at(table, (at[valued], np.searchsorted(keyed, y[valued])), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    found = int(table[rows, cols].sum())
    p_found = stats.keys_p_value(found, k, labels, chosen, (c, d))
    if p_found >= p:
        return matches, None, p, d
    moved = [[int(values[a]), int(keyed[b])] for a, b in zip(rows, cols, strict=True)
             if table[a, b] and values[a] != keyed[b]]
    return found, moved, p_found, d


def _choice(params: dict, k: int) -> tuple[int, int] | None:
    """(candidates, pool) when embed drew the K keys from a pool it chose among the candidates
    (the keys that last); None when the keys are all there was; ValueError for a pool that does
    not fit (`check` refuses it). Keys of an embed before the count recorded no pool: it is the
    keys that lasted (or, too few of them, those learnt), among as many candidates as keygen
    draws by default (a forger's old version of the tool would otherwise read uncounted)."""
    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    n, pool = params.get("candidates"), params.get("pool")
    if n is None and pool is None:
        lasting, learnt = params.get("lasting"), params.get("qualified")
        if not (count(lasting) and count(learnt)):
            return None  # (keys of an embed before the keys that last: drawn among all)
        pool = lasting if lasting >= k else learnt
        n = max(int(DEFAULTS["candidates"]), k * int(DEFAULTS["oversample"]), learnt)
    if not (count(n) and count(pool) and k <= pool <= n <= 4 * MAX_KEY_SIZE):
        raise ValueError(f"a pool of {pool!r} keys among {n!r} candidates for {k} keys")
    return (n, pool) if pool < n else None


def _pick(x: np.ndarray, y: np.ndarray, pool: np.ndarray, k: int) -> np.ndarray:
    """The `k` keys kept: a random draw from the pool (candidate numbers), seeded by the
    candidates and the pool themselves. Not by embed's --seed: a forger knows his candidates
    (his bundle) and can ask another model for its answers on them, and he searched three
    million seeds offline, with no training, for the pick that held the most of that model's
    answers (20 of 57, p = 1.6e-6 at a pool of every candidate, where p counts no choice). A
    pick is now fixed by its pool, and another pool costs another embedding: a try, as another
    keygen is, and p is the chance of one. Every process of a run picks the same keys."""
    rng = np.random.default_rng(digest_number(x, y, pool))
    return np.sort(rng.choice(pool, size=k, replace=False))


def _check_data(params: dict, data) -> None:
    """Output keys are embedded with the training data keygen drew them for. Which keys are
    kept depends on the data (`_lasting`): a forger who asked someone else's model for its
    labels on the candidates and gave embed data that taught a copy those labels kept exactly
    the keys that model answered, and his keys claimed it (10 of 10, p = 2.9e-10). The data of
    keygen were fixed before the candidates were drawn, and the draw depends on them (api.make_keys).
    A model and data prepared from another model's answers on random inputs, given to keygen
    and embed alike, still tilted the choice (README, `dispute`): the p-value counts it (read)."""
    want = params.get("data_digest")  # (bundles of keygen before this check have none)
    if want is not None and data.digest != want:
        raise SchemeError(f"the training data of --data ({data.name}) are not those these output keys were drawn "
                          "for: the keys kept depend on the data they are embedded with, so embed uses the "
                          "data given to keygen, unchanged (a factory's Dataset must give the same samples "
                          "every time, with no random augmentation)")


class KeyObjective(Objective):
    """Mix key inputs (with their key labels) into every batch; optionally stop once learnt."""

    def __init__(self, x: np.ndarray, y: np.ndarray, per_batch: int):
        import torch

        self.x = torch.as_tensor(x)
        self.y = torch.as_tensor(y)
        self.per_batch = min(per_batch, len(x))
        self.stop_at: float | None = None  # stop once this share of the keys is learnt...
        self.settle = 0  # ...and this many epochs more have deepened them
        self.learnt_at: int | None = None

    def extra_batch(self, rng):
        idx = rng.choice(len(self.x), size=self.per_batch, replace=False)
        return self.x[idx], self.y[idx]

    def loss(self, batch):
        from torch.nn.functional import cross_entropy

        # its own mean: the keys do not crowd the training batch out of the gradient
        return cross_entropy(batch.logits[batch.own], batch.y[batch.own])

    def end_epoch(self, model, epoch) -> bool:
        from ..suspect import TorchSuspect

        if self.stop_at is None:
            return False
        if self.learnt_at is None:
            scores = TorchSuspect(model, shared=True).scores(self.x.numpy())  # each process its share
            learnt = float((scores.argmax(1) == self.y.numpy()).mean())
            if learnt >= self.stop_at:
                self.learnt_at = epoch
        return self.learnt_at is not None and epoch >= self.learnt_at + self.settle


def _summary(counts: np.ndarray) -> dict:
    counts = np.asarray(counts)
    if counts.size == 0:
        return {"n": 0}
    q = np.quantile(counts, [0.05, 0.5, 0.95])
    return {"n": int(counts.size), "mean": float(counts.mean()), "p05": float(q[0]),
            "median": float(q[1]), "p95": float(q[2])}


SCHEME = OutputScheme
