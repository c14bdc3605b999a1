"""The hidden-layer watermark's training objective (schemes/hidden.py): its step term, written
out in numpy on the CPU, and its bookkeeping. Apart from the scheme, so that reading a mark
(extract on an ONNX file) never imports torch."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from ..data import bounded_rows, take
from ..errors import SchemeError
from ..objective import Objective
from ..results import SchemeKeys
from ..zoo import activations, capture, captured
from .hidden import LineUp, _free_probes, _over_scale, lined_up, read_bits, unit_rms

# devices whose activations the step's term reads in place, as numpy arrays: there a small
# array's operation costs a quarter of torch's (1.0 against 3.9 us to scale a (3, 128) array
# on the 2-core machine), and the term is some 50 of them
HOST_DEVICES = {"cpu"}
# the pin's weight, as a share of lambda3, while the objective only keeps a mark embedded before
# (another scheme embeds; keys since own_rows): held as hard as while the mark went in, it left
# the output mark learnt meanwhile weaker against fine-tuning (29-56 keys of 100 left after the
# paper's 200 epochs, seeds 1-6, against 43-67 at a quarter)
KEEP_PIN = 0.25


class _RowIndex:
    """Where each of some chosen training rows is among them: one int32 per training row (as the
    epoch's order takes eight), so that a step finds its rows in one gather, not a binary search
    (5 against 20-50 us a step, twice a step)."""

    def __init__(self, chosen: np.ndarray, n_rows: int):
        self.where = np.full(n_rows, -1, np.int32)
        self.where[chosen] = np.arange(len(chosen), dtype=np.int32)

    def find(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(where in `rows`, where among the chosen rows) of the rows of `rows` that were chosen."""
        at = self.where[rows]
        mine = np.flatnonzero(at >= 0)
        return mine, at[mine]


class _Watch:
    """The carrier's activations on chosen training rows, taken as an epoch's steps pass them
    (each row once an epoch; under torchrun each process its share, summed at the epoch's end)."""

    def __init__(self, rows: np.ndarray, width: int, n_rows: int):
        self.unique, self.inverse = np.unique(rows, return_inverse=True)  # (a row may be asked twice)
        self.index = _RowIndex(self.unique, n_rows)
        self.width = width
        self.sums = self.counts = None

    def start(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(self.unique), self.width, device=device)
        self.counts = np.zeros(len(self.unique), np.int64)

    def see(self, act: torch.Tensor, rows: np.ndarray) -> None:
        """The activations `act` of training rows `rows` (one step's)."""
        mine, at = self.index.find(rows)
        if len(at):
            self.counts[at] += 1  # (a batch holds a row once)
            if act.device.type in HOST_DEVICES:  # (in numpy: a fraction of torch's cost on a few rows)
                self.sums.numpy()[at] += act.detach().float().numpy()[mine]
            else:
                mine, at = (torch.as_tensor(i, device=act.device) for i in (mine, at))
                self.sums.index_add_(0, at, act.detach().index_select(0, mine).float())

    def collect(self) -> np.ndarray | None:
        """Every row's activation this epoch (by every process), in the order asked; None when
        the epoch did not pass them all. The next epoch starts afresh."""
        from ..training import Processes

        procs = Processes.current()
        sums, counts = procs.total(self.sums), procs.total(torch.as_tensor(self.counts)).numpy()
        self.start(sums.device)
        if (counts == 0).any():
            return None
        return (sums.cpu().numpy() / counts[:, None].astype(np.float32))[self.inverse]


class _HiddenState(nn.Module):
    """The objective's tensors: trainable class centres and the fixed key material, laid out
    once as the step's term takes them."""

    def __init__(self, centres, classes, signs, A):
        super().__init__()
        self.centres = nn.Parameter(centres)
        self.register_buffer("classes", classes)
        k, n = signs.shape
        self.register_buffer("neg_signs", -signs[:, None, :])  # (s, 1, N): -1 for a 1 bit, +1 for a 0 bit
        blocks = A.view(A.shape[0], k, n)  # class j's own projection: columns j*n .. (j+1)*n - 1
        # (s, M, N): each column over its norm, times sqrt(M), so that a unit-norm mean
        # projects to ~N(0, 1); class by class, as a batched product takes it (and its transpose)
        unit = blocks / blocks.norm(dim=0) * (A.shape[0] ** 0.5)
        self.register_buffer("A_unit", unit.permute(1, 0, 2).contiguous())
        self.register_buffer("A_unit_T", unit.permute(1, 2, 0).contiguous())
        # (C, C): 1 at (a target class, another class): the pairs of centres pushed apart
        pairs = torch.zeros(len(centres), len(centres))
        pairs[classes] = 1.0
        pairs[classes, classes] = 0.0
        self.register_buffer("pairs", pairs)
        # (ours, theirs): the model's units over their scales and lined up with the unmarked
        # model's, as the read-out does it (both taken on the probes after every epoch)
        self.register_buffer("lined", torch.eye(A.shape[0]))

    def set_line_up(self, weights: torch.Tensor, inv_scale: torch.Tensor) -> None:
        """The line-up `weights` (ours, theirs) of units over their scales (`inv_scale`: theirs)."""
        self.lined.copy_(weights * inv_scale)

    def arrays(self, host: bool) -> dict:
        """The fixed tensors by name, as the step's term takes them: on the host as numpy arrays
        (views of the tensors, made again only when the state has moved or changed its dtype)."""
        if not host:
            return dict(self.named_buffers())
        if getattr(self, "_views_of", None) is not self.A_unit:
            self._views = {name: t.numpy() for name, t in self.named_buffers()}
            self._views_of = self.A_unit
        return self._views


class _WrittenOut(torch.autograd.Function):
    """A loss term whose gradients were computed with its value: autograd records one node for
    it, not one per operation."""

    @staticmethod
    def forward(ctx, value, act, centres, g_act, g_centres):
        ctx.save_for_backward(g_act, g_centres)
        return value

    @staticmethod
    def backward(ctx, grad):
        g_act, g_centres = ctx.saved_tensors
        if grad.device.type == "cpu" and grad.item() == 1.0:  # (the loss as it is: no copies to make)
            return None, g_act, g_centres, None, None
        return None, grad * g_act, grad * g_centres, None, None


def written_out(terms, act: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """The value of `terms(act, centres)` (which gives the value and both gradients) as a loss
    term that back-propagates those gradients. Computed in fp32 at least, out of autocast, on
    detached tensors (no graph); its gradients go back in the inputs' dtypes."""
    dtype = torch.float64 if act.dtype == torch.float64 else torch.float32
    device = act.device.type
    exact = torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()
    with exact:
        value, g_act, g_centres = terms(act.detach().to(dtype), centres.detach().to(dtype))
    return _WrittenOut.apply(value, act, centres, g_act.to(act.dtype), g_centres.to(centres.dtype))


class HiddenObjective(Objective):
    """loss1 (isolate the classes around trainable centres) + loss2 (project the trigger mean to the bits)."""

    def __init__(self, keys: SchemeKeys, model: nn.Module, info, data):
        params, arrays = keys.params, keys.arrays
        self.params = params
        self.layer = params["layer"]
        self.tx = torch.as_tensor(arrays["trigger_x"])
        self.ty = torch.as_tensor(arrays["trigger_y"])
        # centres start at the class means of the pretrained model (one per model class), taken
        # on at most STAT_ROWS training samples (a fixed subsample of a larger set: memory stays
        # bounded however large the data set)
        rows = bounded_rows(len(data.x_train))
        acts = activations(model, self.layer, take(data.x_train, rows))  # (also the pin's reference)
        if acts.shape[1] != params["width"]:
            raise SchemeError(
                f"layer '{self.layer}' has {acts.shape[1]} units in this model, the keys expect "
                f"{params['width']}: embed into the model the keys were made for"
            )
        y = torch.as_tensor(data.y_train[rows])
        centres = torch.zeros(info.num_classes, acts.shape[1])
        for c in range(info.num_classes):
            if (y == c).any():
                centres[c] = acts[y == c].mean(0)
        self.scale = float(acts.pow(2).sum(1).mean().clamp_min(1e-6))  # typical |a|^2
        self.state = _HiddenState(
            centres,
            torch.as_tensor(arrays["classes"]),
            torch.as_tensor(arrays["bits"], dtype=torch.float32) * 2 - 1,  # (s, N) signs
            torch.as_tensor(arrays["A"], dtype=torch.float32),
        )
        # what a step's rows need, on the host: each class as a row of the identity, and which
        # target class each class is (a row of zeros for the others)
        self._onehot = np.eye(info.num_classes, dtype=np.float32)
        self._member = self._onehot[:, arrays["classes"]]
        # each pair of centres pushed apart weighs lambda1 over their number
        self._per_pair = float(params["lambda1"]) / max(float(self.state.pairs.sum()), 1.0)
        # bundles of keygen since the unit line-up keep probes; older ones are read as they were
        self.arrays = arrays if "probe_ref" in arrays else None
        self.pin = None
        if self.arrays is not None:  # the probes of the other classes pin the units
            # (and the end-of-epoch check reads the probes and the trigger set in one pass)
            self._check_x = np.concatenate([arrays["probe_x"], arrays["trigger_x"]]).astype(np.float32)
            self._free = _free_probes(arrays)
            self._line_up_to = LineUp(arrays["probe_ref"][self._free])
            self.pin = tuple(torch.as_tensor(arrays[k][self._free]) for k in ("probe_x", "probe_y", "probe_ref"))
        self._n_trig, self._pin_rows = 0, None
        # keys since own_rows: the pin holds the batch's own rows of the other classes where the
        # model had them when the embedding began, on the training rows the centres were taken on
        # (at most STAT_ROWS of them: on a larger set, the batch rows among them are pinned)
        self.own_rows = bool(params.get("own_rows", False)) and self.pin is not None
        if self.own_rows:
            missing = np.setdiff1d(arrays["classes"], data.y_train)
            if len(missing):  # (no epoch count could teach those copies of the bits)
                raise SchemeError(
                    f"the training data hold no sample of class{'es' if len(missing) > 1 else ''} "
                    f"{', '.join(map(str, missing))}, on whose samples "
                    "the keys teach the watermark: embed with the data the keys were made with"
                )
            pool = np.arange(len(data.x_train))[rows]  # sorted
            pinned = ~np.isin(data.y_train[pool], arrays["classes"])
            self.pinned_rows = _RowIndex(pool[pinned], len(data.x_train))
            self.pinned_ref = acts[torch.as_tensor(pinned)]
        self.watch = self._watch(arrays, data) if self.own_rows else None
        self.stop_when_read = False  # propose to stop once every bit reads back, as extract reads it
        self._ctx = None
        self.store: dict = {}

    def _watch(self, arrays: dict, data) -> _Watch | None:
        """The probes and the trigger samples, watched as the epoch passes them, when the keys
        know where they are in these training data (keys since own_rows, on the data of keygen);
        None otherwise (the end of an epoch then reads them in a pass of its own)."""
        if "probe_rows" not in arrays:
            return None
        rows = np.concatenate([arrays["probe_rows"], arrays["trigger_rows"]])
        if rows.max() >= len(data.x_train):
            return None
        order = np.argsort(rows, kind="stable")  # (lazy data are read in order)
        found = np.empty_like(self._check_x)
        found[order] = np.asarray(data.x_train[rows[order]], dtype=np.float32)
        if not np.allclose(found, self._check_x, atol=1e-5):
            return None
        return _Watch(rows, int(self.params["width"]), len(data.x_train))

    def setup(self, model):
        self._line_up(model)
        if self.pin is not None:  # the reference rows live where the activations are
            device = next(model.parameters()).device
            if self.watch is not None:
                self.watch.start(device)
            self.pin = (*self.pin[:2], self.pin[2].to(device))
            if self.own_rows:
                self.pinned_ref = self.pinned_ref.to(device)
        self._ctx = capture(model, self.layer)
        self.store = self._ctx.__enter__()

    def _line_up(self, model) -> bool:
        """The bits are taught as the read-out sees them: through the model's units lined up
        with the unmarked model's (a shuffled copy of the marked model lines up the same way).
        Units drift while they learn, so this is redone after every epoch. Returns whether the
        read-out now finds every bit."""
        if self.arrays is None:
            return False
        from ..training import Processes

        # the probes and the trigger set in one pass, shared out among the processes of a run
        both = Processes.current().share_rows(lambda x: activations(model, self.layer, x).numpy(), self._check_x)
        return self._align_on(both)

    def _align_on(self, both: np.ndarray) -> bool:
        """Line the units up on the carrier's activations on the probes and the trigger set (in
        that order); returns whether both readings find every bit."""
        a = self.arrays
        probe, trig = both[: len(a["probe_x"])], both[len(a["probe_x"]):]
        weights = self._line_up_to(probe[self._free])
        inv_scale = torch.as_tensor(_over_scale(1.0, unit_rms(probe)), dtype=torch.float32)
        self.state.set_line_up(torch.as_tensor(weights, dtype=torch.float32), inv_scale)
        readings = (read_bits(trig, None, a), read_bits(trig, probe, a, weights))
        return all(bool((found == a["bits"]).all()) for found in readings)

    def end_epoch(self, model, epoch):
        if self.watch is not None:
            seen = self.watch.collect()
            if seen is not None:  # the epoch passed every probe and trigger sample: no pass of our own
                read_back = self._align_on(seen)
                # the activations were taken as the epoch went: an exact read confirms a stop
                return self.stop_when_read and read_back and self._line_up(model)
        read_back = self._line_up(model)
        return read_back and self.stop_when_read  # (not while it only keeps a mark embedded before)

    def teardown(self):
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def extra_batch(self, rng):
        if self.own_rows:
            return None
        per = int(self.params["trigger_batch"])
        idx = torch.as_tensor(rng.choice(len(self.tx), size=min(per, len(self.tx)), replace=False))
        self._n_trig = len(idx)
        if self.pin is None:
            return self.tx[idx], self.ty[idx]
        px, py, _ = self.pin
        jdx = rng.choice(len(px), size=min(int(self.params.get("pin_batch", 32)), len(px)), replace=False)
        self._pin_rows = torch.as_tensor(jdx)
        return torch.cat([self.tx[idx], px[jdx]]), torch.cat([self.ty[idx], py[jdx]])

    def _terms(self, act: torch.Tensor, centres: torch.Tensor, y: torch.Tensor, trig: slice,
               pin: tuple[np.ndarray, torch.Tensor, np.ndarray], lambda3: float):
        """lambda1 * loss1 + lambda2 * loss2 + lambda3 * pin, and its gradients with respect to
        `act` (every row's carrier activations) and the class centres, written out: few array
        operations and no graph. On the CPU in numpy, whose operations on small arrays cost a
        quarter of torch's; elsewhere in torch. An embedding step of a small model pays for the
        operations' number more than for their arithmetic, and more than they cost alone: the
        forward and backward passes before them leave numpy's code and the term's arrays out of
        the cache (on the 2-core machine, the term of the digits CNN took 582 us after a pass,
        134 us alone: scripts/bench.py term). `y`: every row's class; `trig`: the rows that
        teach the bits; `pin`: (rows of `act`, a tensor of reference activations, their rows
        in it). `act` and `centres` come detached (`written_out`)."""
        p = self.params
        lambda1, lambda2, scale = float(p["lambda1"]), float(p["lambda2"]), self.scale
        host = act.device.type in HOST_DEVICES
        xp = np if host else torch
        s = self.state.arrays(host)
        x, c, labels = (act.numpy(), centres.numpy(), y.numpy()) if host else (act, centres, y.cpu().numpy())

        def ours(a: np.ndarray):  # an array made on the host as xp's, in the activations' dtype
            return a.astype(x.dtype, copy=False) if host else torch.as_tensor(a, dtype=x.dtype, device=x.device)

        def squared(a):  # the sum of a's squares, as one product
            flat = a.reshape(-1)
            return flat @ flat

        # loss1, pull: every activation towards its class centre
        g_act = x - c[labels if host else y]  # (the difference, then in place its gradient)
        value = squared(g_act) * (lambda1 / (len(x) * scale))
        g_act *= 2 * lambda1 / (len(x) * scale)
        # loss1, push: each target centre away from the others, by exp(-d^2) (bounded in (0, 1]:
        # cannot diverge), over the (C, C) squared distances taken from the centres' products
        gram = c @ c.T
        norms = xp.diagonal(gram)
        near = xp.exp((norms[:, None] + norms[None, :] - 2 * gram).clip(min=0) * (-1 / scale)) * s["pairs"]
        value += near.sum() * self._per_pair
        w = near * (-2 * self._per_pair / scale)  # d value / d (centre i - centre j), for i and for j
        w = w + w.T
        g_centres = w.sum(1)[:, None] * c - w @ c - ours(self._onehot[labels]).T @ g_act  # (the pull's, before more)
        # pin: the rows of other classes keep their activations where the model had them before
        # the embedding, so that a suspect's units can be lined up with the unmarked model's
        at, refs, ref_at = pin
        if len(at):
            if not host:
                at, ref_at = (torch.as_tensor(i, device=act.device) for i in (at, ref_at))
            off = x[at] - (refs.detach().numpy() if host else refs)[ref_at]
            value += squared(off) * (lambda3 / (len(at) * scale))
            off *= 2 * lambda3 / (len(at) * scale)
            g_act[at] += off
        # loss2: the hinge on every bit, at every target class present among the `trig` rows, in
        # both readings of extract (the units as they are, and lined up with the unmarked
        # model's over their scales): the class's mean activation through its own columns of
        # A, over its norm (~N(0, 1) for an unrelated mean). The readings are linear in the
        # mean, so they are taken of the (s, M) means, not of every row.
        rows = self._member[labels[trig]]  # (t, s); other classes' rows: 0
        counts = rows.sum(0)
        rows = ours(rows / np.maximum(counts, 1))  # (each row's share of its class's mean)
        lined = s["lined"] if self.arrays is not None else None
        # the mean over the classes present (one with no row in the step has no term, and no
        # NaN) and the readings, each bit's hinge over N
        weight = (counts > 0) * (lambda2 / max(np.count_nonzero(counts) * (1 if lined is None else 2)
                                               * s["neg_signs"].shape[2], 1))
        weight = ours(weight)[:, None, None]  # (s, 1, 1)

        def through(a, back: bool = False):  # a @ lined.T (the lined reading); back: a @ lined (its gradient)
            if not host:
                return a @ (lined if back else lined.T)
            return lined_up(a, lined.T if back else lined)  # (numpy's product, as lined_up takes it)

        means = rows.T @ x[trig]  # (s, M)
        views = means[:, None] if lined is None else xp.stack([means, through(means)], 1)  # (s, v, M)
        inv_norm = (views * views).sum(2, keepdims=True).clip(min=1e-12) ** -0.5  # (s, v, 1)
        unit = views * inv_norm
        z = unit @ s["A_unit"]  # (s, v, N)
        short = float(p["margin"]) + s["neg_signs"] * z  # margin - the signed projection
        value += (short.clip(min=0) * weight).sum()
        g_z = (short > 0) * (s["neg_signs"] * weight)  # d value / d z
        g_views = (g_z @ s["A_unit_T"] - unit * (g_z * z).sum(2, keepdims=True)) * inv_norm
        g_means = g_views[:, 0] if lined is None else g_views[:, 0] + through(g_views[:, 1], back=True)
        g_act[trig] += rows @ g_means
        if host:
            return torch.as_tensor(value), torch.from_numpy(g_act), torch.from_numpy(g_centres)
        return value, g_act, g_centres

    def share(self, rows, rank, world):
        """The trigger rows and the pin rows, each shared out on its own."""
        (x, y), n = rows, self._n_trig
        trig, pins = slice(rank, n, world), slice(n + rank, len(x), world)
        self._n_trig = len(range(rank, n, world))
        if self._pin_rows is not None:
            self._pin_rows = self._pin_rows[rank::world]
        return torch.cat([x[trig], x[pins]]), torch.cat([y[trig], y[pins]])

    def _pin_own(self, rows: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
        """The batch's rows of the other classes that are in the reference pool: (where in the
        batch, the pool's reference activations, where in the pool)."""
        mine, at = self.pinned_rows.find(rows.numpy())  # (row numbers stay on the CPU: numpy looks up)
        return mine, self.pinned_ref, at

    def loss(self, batch):
        act, y, own = captured(self.store, self.layer, batch.model), batch.y, batch.own
        n = batch.n_train
        if self.watch is not None:
            self.watch.see(act[:n], batch.rows.numpy())
        keeping = self.own_rows and not self.stop_when_read
        lambda3 = float(self.params.get("lambda3", 0.0)) * (KEEP_PIN if keeping else 1.0)
        if self.own_rows:  # the batch's own rows: target classes teach the bits, the others are pinned
            trig, pin = slice(0, n), self._pin_own(batch.rows)
        else:  # keys made before: the trigger rows and the probe rows mixed into the step
            trig = slice(own.start, min(own.stop, own.start + self._n_trig))
            at = np.arange(trig.stop, own.stop if self.pin is not None else trig.stop)
            pin = at, None if self.pin is None else self.pin[2], self._pin_rows.numpy() if len(at) else at
        terms = written_out(lambda a, c: self._terms(a, c, y, trig, pin, lambda3), act, self.state.centres)
        if self.own_rows or own.stop == own.start:
            return terms
        # (the mixed-in rows get cross-entropy here too, weighed as their share of the batch)
        return terms + nn.functional.cross_entropy(batch.logits[own], y[own]) * ((own.stop - own.start) / own.stop)
