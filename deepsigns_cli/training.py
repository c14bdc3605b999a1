"""The one training loop. Schemes add to it through Objectives; callers watch it through a callback.

Device, process rank and the unwrapped model are handled here and nowhere else.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from . import defaults
from .defaults import PRECISIONS
from .errors import (
    STOP_SIGNALS,
    DataError,
    DeepSignsError,
    InputError,
    TrainingError,
    one_line,
    out_of_memory,
    user_failure,
)
from .objective import Objective

__all__ = [
    "TrainConfig",
    "Objective",
    "Batch",
    "Processes",
    "distributed",
    "fit",
    "evaluate",
    "predict",
    "loss_gradient",
    "resolve_device",
    "check_device",
    "seed_everything",
    "unwrap",
    "Progress",
    "LOSSES",
    "PRECISIONS",
    "OPTIMIZERS",
]

# progress(done, total, description): called after every optimisation step
Progress = Callable[[int, int, str], None]

MEMORY_LIMIT: int | None = None  # bytes training on the CPU may map beyond what it maps at start (_bounded_memory)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked, but torch sees no GPU here: use --device auto or cpu")
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device '{device}': use auto, cpu or cuda")
    return torch.device(device)


def check_device(device: str = "auto") -> None:
    """Fail early (before any work) when the device asked for is not here."""
    resolve_device(device)


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, out of a DistributedDataParallel (or DataParallel) wrapper."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


@dataclass(frozen=True)
class Processes:
    """Where this process stands among the processes of one run (torchrun sets RANK etc.)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Processes:
        import torch.distributed as dist

        from .fileio import run_place

        if _grouped():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls(*run_place())

    @property
    def alone(self) -> bool:
        """Whether this process works alone: no other process, or no process group joined."""
        return self.world_size == 1 or not _grouped()

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints the report."""
        return self.rank == 0

    def agree(self, flag: bool) -> bool:
        """One decision for every process: true when any process says so."""
        import torch.distributed as dist

        if self.alone:
            return flag
        t = torch.tensor([int(flag)], device=_collective_device())  # (nccl reduces on the GPU only)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def differ(self, facts: Sequence[int]) -> list[list[int]] | None:
        """Every process's `facts` (numbers of the same length in every process), when they
        are not the same in all of them; None when they are (or this process is alone)."""
        import torch.distributed as dist

        if self.alone:
            return None
        mine = torch.tensor(list(facts), dtype=torch.int64, device=_collective_device())
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine)
        every = [part.tolist() for part in parts]
        return None if all(f == every[0] for f in every) else every

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over every process of the run (t itself in a run of one)."""
        import torch.distributed as dist

        if self.alone:
            return t
        out = t.to(_collective_device() or t.device)
        dist.all_reduce(out)
        return out.to(t.device)

    def share_rows(self, fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
        """fn(x) for a fn that gives one output row per row of x, each process computing its
        share of the rows and every process getting all of them, in order: an end-of-epoch
        check then costs each of N processes 1/N of it, not all of it."""
        import torch.distributed as dist

        world = self.world_size
        if self.alone or len(x) < world:
            return fn(x)
        bounds = np.linspace(0, len(x), world + 1).astype(int)
        sizes = np.diff(bounds)
        mine = torch.as_tensor(np.ascontiguousarray(fn(x[bounds[self.rank]: bounds[self.rank + 1]])))
        padded = torch.zeros((int(sizes.max()), *mine.shape[1:]), dtype=mine.dtype, device=_collective_device())
        padded[: len(mine)] = mine.to(padded.device)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]).cpu().numpy()


def _check_same_everywhere(procs: Processes, net: nn.Module, x, y: np.ndarray) -> None:
    """Every process of a run must train the same model on the same data (each takes its share
    of the rows): a --data factory that gives each process its own data fails here, with one
    line, instead of deep in DistributedDataParallel or as a collective left waiting."""
    from .data import MAX_INPUT_DIMS

    if procs.alone:
        return
    # (samples, largest label, weights, a digest of every label, then the sample shape, padded
    # to the most dimensions): a factory that gives each process its own shard of one size
    # differs in the labels' digest alone. The samples themselves are not compared: a Dataset
    # may augment them with an RNG of each process's own, and machines may decode an image a
    # bit apart
    facts = [len(y), int(np.asarray(y).max(initial=-1)), sum(p.numel() for p in net.parameters()),
             _labels_digest(y), *x.shape[1:], *[0] * (MAX_INPUT_DIMS - len(x.shape[1:]))]
    every = procs.differ(facts)
    if every is not None:
        other = next(rank for rank, f in enumerate(every) if f != every[0])
        brief = ", ".join(f"process {r}: {f[0]} samples of shape {[d for d in f[4:] if d]}, labels up to {f[1]}, "
                          f"{f[2]} weights" for r in (0, other) for f in [every[r]])
        if every[other][:3] + every[other][4:] == every[0][:3] + every[0][4:]:
            brief = f"the same counts and shapes, but other labels in process {other} than in process 0"
        raise DataError(f"the processes of this run do not train the same model on the same data ({brief}): "
                        "every process must load the same --data")


def _labels_digest(y: np.ndarray) -> int:
    """63 bits of a digest of every label, in order."""
    import hashlib

    digest = hashlib.blake2b(np.ascontiguousarray(y, np.int64).tobytes(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def _collective_device() -> torch.device | None:
    """Where a collective's tensors must be: this process's GPU under nccl (None: anywhere)."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None


def _grouped() -> bool:
    """Whether this process has joined a process group (a torchrun run)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


_WAITING_NOTICE_SECONDS = 3.0  # (a wait this long is said, where no torchrun agent has met the others)


@contextmanager
def distributed(device: str = "auto", waiting: Callable[[str], None] | None = None):
    """One process group for a command run by torchrun (WORLD_SIZE > 1 in the environment;
    the rendezvous comes from torchrun's variables, so several machines work as torchrun
    documents): gloo on the CPU, nccl on CUDA, each process on its own GPU. A failure of
    another process ends this one with one line, and nothing is written. `waiting` is told,
    once, when a process that no torchrun agent started (the variables set by hand, or left
    over from another run) has waited a few seconds for the others: it waits up to
    defaults.RENDEZVOUS_SECONDS, silent otherwise, and then ends with one line."""
    import torch.distributed as dist

    from .fileio import run_place, stop_with_parent

    rank, world = run_place()
    if world == 1 or _grouped():
        yield
        return
    # (torchrun's agent killed, its processes had trained on, and the first wrote its outputs
    # after the command that started them had said "nothing was written")
    parent = os.getppid()
    stop_with_parent(parent)
    _kill_when_orphaned(parent)
    use_cuda = resolve_device(device).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0") or 0))
    # the rendezvous waits in C++ (up to the timeout, for machines that start late), where a
    # Python handler never runs: Ctrl-C, SIGTERM and SIGHUP end the process at once meanwhile
    # (nothing is written yet), instead of 10 minutes later
    # (a signal the process was started to ignore, as a shell's background job ignores SIGINT,
    # stays ignored)
    stops = [s for s in STOP_SIGNALS if signal.getsignal(s) != signal.SIG_IGN] \
        if threading.current_thread() is threading.main_thread() else []
    handlers = {s: signal.signal(s, signal.SIG_DFL) for s in stops}
    try:
        _meet("nccl" if use_cuda else "gloo", rank, world, waiting)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    try:
        yield
    except RuntimeError as exc:  # a collective whose peer is gone (gloo, nccl); a bug goes on up
        if not isinstance(exc, dist.DistError) and not any(
                word in str(exc) for word in ("gloo", "NCCL", "nccl", "Connection", "connection")):
            raise
        raise TrainingError(f"process {dist.get_rank()} of {world}: another process of this run failed "
                            f"({one_line(exc, 120)}); nothing was written") from None
    finally:
        dist.destroy_process_group()


def _meet(backend: str, rank: int, world: int, waiting: Callable[[str], None] | None) -> None:
    """init_process_group, bounded by defaults.RENDEZVOUS_SECONDS, its failures as one line. Outside
    torchrun's agent (which has met the others, and serves the store), a process other than the
    first waits here, in Python, for the first to serve the store at MASTER_ADDR:MASTER_PORT:
    torch's own client retried in C++, and printed a C++ stack dump to stderr at every try."""
    import torch.distributed as dist

    from .fileio import run_by_agent

    where = f"{one_line(os.environ.get('MASTER_ADDR'), 60)}:{os.environ.get('MASTER_PORT')}"
    unset = "unset RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT left over from another run"
    agent = run_by_agent()
    seconds = defaults.RENDEZVOUS_SECONDS
    deadline = time.monotonic() + seconds
    notice = None
    if waiting is not None and not agent:
        notice = threading.Timer(_WAITING_NOTICE_SECONDS, waiting, (
            f"process {rank} of {world} is waiting for the other processes of its run at {where} (up to "
            f"{seconds:g} s; RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are set here): start "
            f"them, or stop this one and {unset}",))
        notice.daemon = True
        notice.start()
    try:
        if not agent:
            address = _master_address(f"process {rank} of {world}", unset)
            if rank != 0:
                _wait_for_store(address, deadline, f"process {rank} of {world}", where, unset)
        # (the first process waits for the others this long; the run's steps, each as long: not
        # what was left of the rendezvous's time, which machines that met late had cut short)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    except dist.DistError as exc:
        if any(word in str(exc).lower() for word in ("timed out", "timeout")):  # (the others never came)
            raise InputError(f"process {rank} of {world} waited {seconds:g} s for the other processes of its "
                             f"run at {where} ({one_line(exc, 120)}): start every process of the run "
                             f"(torchrun does), or {unset}") from None
        if rank != 0:  # (the first process ended meanwhile: it gave up on others that never came)
            raise InputError(f"process {rank} of {world} lost the first process of its run at {where} "
                             f"({one_line(exc, 120)}): it ended before the run met; start every process of the run "
                             f"(torchrun does), or {unset}") from None
        # (the first process cannot listen there: a port in use)
        raise InputError(f"process {rank} of {world} could not meet the others at MASTER_ADDR:MASTER_PORT "
                         f"({where}: {one_line(exc, 160)}): give torchrun a free --master-port, or {unset}") from None
    finally:
        if notice is not None:
            notice.cancel()


def _master_address(who: str, unset: str) -> tuple[str, int]:
    """(MASTER_ADDR, MASTER_PORT), once the name is found to resolve: one that does not had
    printed a C++ warning at every try, and then a stack dump."""
    host, port = os.environ.get("MASTER_ADDR", ""), int(os.environ.get("MASTER_PORT", "0"))
    try:
        socket.getaddrinfo(host, port)
    except (OSError, UnicodeError) as exc:  # (gaierror; a name that IDNA cannot encode)
        raise InputError(f"{who}: MASTER_ADDR {one_line(host, 60)} does not resolve "
                         f"({one_line(getattr(exc, 'strerror', None) or exc, 80)}): give the first process's host "
                         f"name or address, or {unset}") from None
    return host, port


def _wait_for_store(address: tuple[str, int], deadline: float, who: str, where: str, unset: str) -> None:
    """Until the rendezvous's store answers at `address` (the first process serves it); an
    InputError at `deadline` (time.monotonic), or for something else that listens there (a web
    server: torch's client had waited on it for ever)."""
    while True:
        with suppress(OSError), socket.create_connection(address, timeout=1.0):
            break
        if time.monotonic() > deadline:
            raise InputError(f"{who} waited {defaults.RENDEZVOUS_SECONDS:g} s for the first process of its run to "
                             f"answer at {where}, and none did: start every process of the run (torchrun does), or "
                             f"{unset}")
        time.sleep(0.5)
    if not _answers_as_a_store(address, deadline):
        raise InputError(f"{who}: what listens at {where} does not answer as the first "
                         "process of a torch.distributed run would: give the first process's MASTER_ADDR and "
                         f"MASTER_PORT, or {unset}")


def _answers_as_a_store(address: tuple[str, int], deadline: float) -> bool:
    """Whether what listens at `address` answers a query as torch's TCPStore does, by
    `deadline`: asked in a thread of its own, which a server that never answers holds."""
    import torch.distributed as dist

    answered = []

    def ask() -> None:
        with suppress(Exception):
            store = dist.TCPStore(address[0], address[1], is_master=False, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=max(deadline - time.monotonic(), 1.0)))
            store.check(["deepsigns-probe"])
            answered.append(True)

    thread = threading.Thread(target=ask, name="deepsigns-store-probe", daemon=True)
    thread.start()
    thread.join(max(deadline - time.monotonic(), 1.0))
    return bool(answered)


_ORPHAN_GRACE_SECONDS = 30  # what torchrun's agent gives its processes between SIGTERM and SIGKILL


def _kill_when_orphaned(parent: int) -> None:
    """A thread that kills this process when the grace is over after its parent (torchrun's
    agent) is gone: SIGTERM came then (`stop_with_parent`), but a process that waits in a
    collective for peers that are gone cannot act on it (a Python handler runs between C++ calls),
    and one had waited on its own, unseen."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        time.sleep(_ORPHAN_GRACE_SECONDS)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="deepsigns-orphan-watch", daemon=True).start()


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against probability targets (distillation)."""
    return -(target * nn.functional.log_softmax(logits, dim=1)).sum(1).mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ce": nn.functional.cross_entropy,  # integer labels
    "soft": _soft_cross_entropy,  # rows of class probabilities
}
OPTIMIZERS = ("adam", "sgd")


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    description: str = "train"
    optimizer: str = "adam"  # adam or sgd (momentum below)
    loss: str = "ce"  # a key of LOSSES: "ce" for labels, "soft" for probability targets
    momentum: float = 0.9
    weight_decay: float = 0.0
    workers: int = 0  # data-loading processes (0: batches are read in this process)
    precision: str = "fp32"  # fp32, or bf16 / fp16 autocast (fp16 on CUDA only, with loss scaling)
    fused: bool = True  # optimiser steps in one kernel (fp32/fp64 parameters; see make_optimizer)
    blas_threads: int | None = 1  # numpy's BLAS threads while training (see fit; None: numpy's own)
    extra: dict = field(default_factory=dict)  # free for callers (recorded, not used)

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        # fused: one kernel updates every tensor. Torch's default on the CPU is a loop over the
        # tensors, several operations each: a fine-tuning epoch of the digits MLP with Adam took
        # 0.078 s that way and 0.055 s fused (`scripts/bench.py optimizer`). Only for fp32/fp64
        # parameters: fused SGD on the CPU skips fp16/bf16 updates (pytorch/pytorch#191763; seen
        # in torch 2.13: tests/test_seams.py::test_the_loops_optimiser_updates_every_weight)
        params = list(params)
        fused = self.fused and bool(params) and all(p.dtype in (torch.float32, torch.float64) for p in params)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, fused=fused)
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                                   weight_decay=self.weight_decay, fused=fused)
        raise InputError(f"unknown optimizer '{self.optimizer}': use {' or '.join(OPTIMIZERS)}")


@dataclass
class Batch:
    """One step, as an objective sees it."""

    x: torch.Tensor  # every row of the step: the training batch first, then objectives' rows
    y: torch.Tensor  # their targets (labels, or probabilities with loss="soft")
    logits: torch.Tensor
    n_train: int  # rows [0, n_train) are the ordinary training batch
    model: nn.Module  # the unwrapped model
    own: slice = field(default_factory=lambda: slice(0, 0))  # this objective's rows (set per objective)
    rows: torch.Tensor | None = None  # the training batch's row numbers in the training set (on the CPU)

    def input_grad(self, outputs: torch.Tensor, *, create_graph: bool = True) -> torch.Tensor:
        """d outputs / d x (every row), kept in the graph for double back-propagation.
        Needs `needs_input_grad = True` on the objective."""
        if not self.x.requires_grad:
            raise RuntimeError("input_grad() needs an objective with needs_input_grad = True")
        (grad,) = torch.autograd.grad(outputs, self.x, create_graph=create_graph)
        return grad


class _Rows(torch.utils.data.Dataset):
    """A whole batch per item: the loader is given the batch's indices (our own seeded order),
    and x may be an array or a lazy one (an image folder) that decodes only what it is asked."""

    def __init__(self, x, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx):
        idx = torch.as_tensor(np.asarray(idx))
        return torch.as_tensor(np.asarray(self.x[idx.numpy()]), dtype=torch.float32), self.y[idx], idx


def _epoch_batches(order: np.ndarray, cfg: TrainConfig, procs: Processes) -> list[np.ndarray]:
    """This process's batches of one epoch: the batches of one process, each split among the
    processes (a global batch of cfg.batch_size; every process runs the same number of steps).
    A tail batch that would give a process a single row is topped up from the epoch's start to
    two rows a process: a layer that normalises over the batch (BatchNorm) cannot train on one
    (1,348 samples in batches of 449 left one; on two processes, a tail of 3 gave one of them 1)."""
    world = procs.world_size
    batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    least = 2 * world if cfg.batch_size >= 2 * world and len(order) >= 2 * world else world
    batches = [b if len(b) >= least else np.concatenate([b, order[: least - len(b)]]) for b in batches]
    return batches if world == 1 else [b[procs.rank :: world] for b in batches]


def _sync_state_grads(states, procs: Processes) -> None:
    """The objectives' own parameters (class centres) take the mean gradient of all processes,
    as the model's do under DistributedDataParallel: they stay the same everywhere."""
    if procs.alone:
        return
    import torch.distributed as dist

    for p in (p for s in states for p in s.parameters()):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= procs.world_size


def fit(
    model: nn.Module,
    x,
    y: np.ndarray,
    cfg: TrainConfig,
    objectives: Sequence[Objective] = (),
    progress: Progress | None = None,
) -> dict:
    """Train in place on cfg.device, and give the model back on the device it came on (the
    objectives' state too); returns seconds per epoch and the epochs run. `x` is an array, or
    a lazy array (decoded batch by batch, in `cfg.workers` loader processes). Under torchrun
    (an initialised process group) the model is wrapped in DistributedDataParallel and each
    process trains on its share of every batch.

    numpy's BLAS (OpenBLAS, MKL) works on one thread meanwhile (cfg.blas_threads). The
    objectives' numpy products are small, and between them its idle threads spin on the cores
    that torch's threads train on: with both libraries at their default of a thread per core,
    an embedding epoch of the digits MLP on a 2-core machine took 151-156 ms, and 67-87 ms with
    numpy's BLAS on one thread (plain fine-tuning: 38-49 ms; `scripts/bench.py threads`).

    On the CPU, what the process maps meanwhile is bounded (`_bounded_memory`)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=cfg.blas_threads, user_api="blas"), _bounded_memory(cfg.device):
        return _fit(model, x, y, cfg, objectives, progress)


@contextmanager
def _bounded_memory(device: str):
    """On the CPU: this process (and each of its loader processes) may map at most its share
    of the memory available when training starts beyond what it maps then (MEMORY_LIMIT, else
    three quarters of memory.available_memory(), over the processes torchrun runs on this
    machine; at least 1 GiB). A step too large for the machine (a --batch-size or --image-size
    too large) then fails as an allocation, one line (`_machine_failure`), where it had drawn
    the kernel's out-of-memory killer: exit 137, no line. The quarter is left to the pages
    already mapped and to other processes: with all of it, a ResNet at --image-size 2048
    failed so, but only after it had held 23.4 GB of the 2-core machine's 23; at three
    quarters, after 6.6 GB and 75 s. Not with CUDA, whose host memory is the driver's."""
    from . import memory

    if resolve_device(device).type != "cpu":
        yield
        return
    extra = MEMORY_LIMIT
    if extra is None:
        local = os.environ.get("LOCAL_WORLD_SIZE", "1")  # (torchrun's: the processes on this machine)
        share = 4 * (int(local) if local.isdigit() and int(local) else 1)
        extra = max(1 << 30, 3 * memory.available_memory() // share)
    previous = memory.limit_mapping(extra)
    try:
        yield
    finally:
        memory.restore_mapping(previous)


def _fit(model: nn.Module, x, y: np.ndarray, cfg: TrainConfig, objectives: Sequence[Objective],
         progress: Progress | None) -> dict:
    # 1. device, processes, the model and every objective's tensors on the device
    device = resolve_device(cfg.device)
    procs = Processes.current()
    rng = seed_everything(cfg.seed)
    loss_fn = LOSSES.get(cfg.loss)
    if loss_fn is None:
        raise InputError(f"unknown loss '{cfg.loss}': use one of {', '.join(LOSSES)}")
    autocast, scaler = _mixed_precision(cfg.precision, device)  # (a bad precision fails before any hook)
    net = unwrap(model)
    home = next(iter(net.parameters()), torch.empty(0)).device
    net.to(device).train()
    states = [o.state for o in objectives if o.state is not None]
    for state in states:
        state.to(device)
    for obj in objectives:
        obj.setup(net)
    _check_same_everywhere(procs, net, x, y)
    runner = _parallel(net, device, procs)
    params = list(net.parameters()) + [p for s in states for p in s.parameters()]
    optimizer = cfg.make_optimizer(params)
    need_grad = any(o.needs_input_grad for o in objectives)
    yt = torch.as_tensor(y, dtype=torch.float32 if cfg.loss == "soft" else torch.int64)
    rows = _Rows(x, yt)
    steps_per_epoch = len(_epoch_batches(np.arange(len(y)), cfg, procs))
    total, done, epoch_seconds = cfg.epochs * steps_per_epoch, 0, []
    batches_read = None  # (the epoch's loader, as it is read)
    scratch = ExitStack()  # (with --workers: tempfile's folder while the loader processes run)
    if cfg.workers:
        _room_for_loaders(cfg.workers)
        _loader_temp_dir()
        scratch.enter_context(_loader_scratch())
    try:
        for epoch in range(cfg.epochs):
            runner.train()
            start = time.perf_counter()
            batches = _epoch_batches(rng.permutation(len(y)), cfg, procs)
            loader = torch.utils.data.DataLoader(
                rows, sampler=batches, batch_size=None, num_workers=cfg.workers,
                pin_memory=device.type == "cuda", persistent_workers=False,
                worker_init_fn=_stdout_to_stderr if cfg.workers else None)
            batches_read = _started(loader)
            for xs, ys, index in batches_read:
                # 2. the batch, with every objective's own rows mixed in after it
                parts, own, at = [(xs, ys)], [], len(xs)
                for obj in objectives:
                    # every process draws the same rows and keeps its share of them: together
                    # they mix what one process would
                    extra = obj.extra_batch(rng)
                    if extra is not None and procs.world_size > 1:
                        extra = obj.share(extra, procs.rank, procs.world_size)
                    n = 0 if extra is None else len(extra[0])
                    if n:
                        parts.append(extra)
                    own.append(slice(at, at + n))
                    at += n
                # (each part to the device first: the loader's batch is pinned on CUDA, and a
                # tensor joined on the host would not be, which makes its copy a blocking one)
                xb = torch.cat([p[0].to(device, non_blocking=True).float() for p in parts])
                yb = torch.cat([p[1].to(device, non_blocking=True).to(yt.dtype) for p in parts])
                if need_grad:
                    xb.requires_grad_(True)
                # 3. one forward pass: the loss on the training batch, plus each objective's term
                # (gradients on, whatever a Dataset's __getitem__ just set: one that turned them
                # off had failed the step as a bug of ours, exit 3)
                with autocast(), torch.enable_grad():
                    logits = runner(xb)
                    loss = loss_fn(logits[: len(xs)], yb[: len(xs)])
                    batch = Batch(xb, yb, logits, len(xs), net, rows=index)
                    for obj, own_rows in zip(objectives, own, strict=True):
                        batch.own = own_rows
                        term = obj.loss(batch)
                        if term is not None:
                            loss = loss + term
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"the training loss became {loss.item()} at epoch {epoch + 1}: the learning "
                        f"rate ({cfg.lr:g}) is too high or the data hold extreme values; lower --lr"
                    )
                # 4. step (objectives' tensors have their gradients zeroed too), then the hooks
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                _sync_state_grads(states, procs)
                scaler.step(optimizer)
                scaler.update()
                done += 1
                for obj in objectives:
                    obj.after_step(net, done)
                if progress is not None and procs.is_main:
                    progress(done, total, f"{cfg.description} epoch {epoch + 1}/{cfg.epochs}")
            if device.type == "cuda":
                torch.cuda.synchronize()
            net.eval()
            # 5. early stop: every objective is asked, and all processes stop together (the
            # objectives' end-of-epoch work is part of what an epoch costs)
            proposals = [obj.end_epoch(net, epoch) for obj in objectives]
            epoch_seconds.append(time.perf_counter() - start)
            if procs.agree(any(proposals)):
                break
    except DeepSignsError as exc:  # from a loader process: its own line, not the worker's traceback
        text = str(exc).strip()
        if text.startswith("Caught ") and "Original Traceback" in text:
            raise type(exc)(text.splitlines()[-1].split(": ", 1)[-1]) from None
        raise
    except (RuntimeError, MemoryError, OSError, EOFError) as exc:  # what the machine did, not a bug of ours
        cause = exc
        try:
            _stop_loader(batches_read)
        except RuntimeError as again:
            # torch's SIGCHLD handler raises a loader process's death wherever the command is
            # until the loader is stopped; it can come here, after the error it caused (in CI:
            # an internal error, exit 3). It comes once: the second stop is heard by nobody.
            cause = again
            _stop_loader(batches_read)
        failure = _machine_failure(cause, cfg)
        if failure is not None and _STOP_SIGNALS.search(str(failure)):
            # a loader process stopped by SIGTERM or SIGHUP sent to the whole process group (timeout,
            # kill -- -PGID), whose death was heard first: the command's own comes, and is the cause
            time.sleep(_OWN_SIGNAL_SECONDS)
        raise failure or cause from None
    except ValueError as exc:
        if "Expected more than 1 value per channel" not in str(exc):
            raise
        raise TrainingError(f"the model normalises over the batch (BatchNorm), and a step had one sample per "
                            f"channel to normalise (--batch-size {cfg.batch_size} on {procs.world_size} "
                            f"process(es)): use a --batch-size of at least {2 * procs.world_size}") from None
    finally:
        scratch.close()
        for obj in objectives:
            obj.teardown()
        net.to(home)
        for state in states:
            state.to(home)
        net.eval()
    return {"epoch_seconds": epoch_seconds, "epochs": len(epoch_seconds), "lr": cfg.lr}


def _started(loader: torch.utils.data.DataLoader):
    """iter(loader), which starts its loader processes. Under a start method that pickles what
    each is given ('spawn' or 'forkserver': a factory's module may choose one, as CUDA code
    does, and Python 3.14 defaults to forkserver), a Dataset that does not pickle (a lambda, a
    local class, a __getstate__ that raises or exits) is one line, exit 2: it had been an
    internal error, or exit 0 for a sys.exit(0)."""
    try:
        return iter(loader)
    except KeyboardInterrupt:  # (Ctrl-C or a signal, never the user's failure)
        raise
    except BaseException as exc:
        if not _in_pickling(exc):  # (what the machine did as it started them, a fork that failed: as before)
            raise
        context = loader.multiprocessing_context
        method = context.get_start_method() if context else torch.multiprocessing.get_start_method()
        raise InputError(f"--workers {loader.num_workers}: the data cannot be sent to loader processes started by "
                         f"'{method}' ({user_failure(exc)}): give --workers 0, a Dataset that pickles (no lambda "
                         "or local class in it), or the 'fork' start method") from None


def _in_pickling(exc: BaseException) -> bool:
    """Whether `exc` was raised as multiprocessing pickled what a new process is given (inside
    multiprocessing.reduction.dump): by the Dataset's own pickling, whatever it raised."""
    import multiprocessing.reduction

    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is multiprocessing.reduction.dump.__code__:
            return True
        tb = tb.tb_next
    return False


def _stdout_to_stderr(worker_id: int) -> None:
    """A loader process's prints go to stderr: stdout holds the report alone (a forked process
    inherits the command's redirection; one started by forkserver or spawn, Python 3.14's
    default on Linux, would not)."""
    import sys

    sys.stdout = sys.stderr


_SOCKET_PATH = 100  # bytes of a socket's path that every system takes (Linux: 107)


# the open files a command takes beside its loader processes, and what each loader process adds
# (its pipes, and a descriptor for each batch's tensors in flight): at `ulimit -n 20` and
# --workers 2 the loader processes had spun, streaming tracebacks (2.4 GB in 10 minutes)
_FILES_BESIDE_LOADERS, _FILES_PER_LOADER = 64, 32


def _room_for_loaders(workers: int) -> None:
    """Raise the open-file limit (its soft part, up to its hard part) as far as `workers` loader
    processes need; InputError where the hard limit is too low."""
    try:
        import resource
    except ImportError:  # (not POSIX)
        return
    need = _FILES_BESIDE_LOADERS + _FILES_PER_LOADER * workers
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard == resource.RLIM_INFINITY or hard >= need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        return
    raise InputError(f"--workers {workers} needs about {need} open files, and this process may open {hard} "
                     "(ulimit -n): raise the limit, or use fewer --workers (0 reads the data in this process)")


def _loader_temp_dir() -> None:
    """multiprocessing's temporary folder (pymp-*), made now, so that the loader processes share
    it instead of making their own, which one stopped on an error left behind (only the process
    that made it removes it, as it exits). Its sockets' paths must be short: under a temporary
    folder of a long path, a loader process could not pass a batch ("AF_UNIX path too long"),
    and the command waited forever; it is then made in /tmp (as Python 3.13 does)."""
    import multiprocessing.util
    import tempfile

    longest = len(os.fsencode(os.path.join(tempfile.gettempdir(), "pymp-12345678", "listener-12345678")))
    if longest <= _SOCKET_PATH or not os.access("/tmp", os.W_OK | os.X_OK):
        multiprocessing.util.get_temp_dir()  # (once made, the same folder every time)
        return
    with _tempfile_folder("/tmp"):
        multiprocessing.util.get_temp_dir()


@contextmanager
def _tempfile_folder(folder: str):
    """tempfile's folder `folder` while the block runs, then what it was."""
    import tempfile

    saved, tempfile.tempdir = tempfile.tempdir, folder
    try:
        yield
    finally:
        tempfile.tempdir = saved


@contextmanager
def _loader_scratch():
    """tempfile's folder, while the loader processes run, a scratch folder of the command's own
    (`fileio.scratch_folder`: removed after them). When a batch cannot be read, torch's
    DataLoader makes 10 temporary files to see whether open files ran out; torch's SIGCHLD
    handler, raising a dead loader process's death in the middle of making one, had left it in
    $TMPDIR for good."""
    from .fileio import scratch_folder

    with scratch_folder("deepsigns-loader-") as folder, _tempfile_folder(str(folder)):
        yield


# (torch names a loader process's signal as strsignal does: "Terminated", "Hangup", ...)
_STOP_SIGNALS = re.compile(f"killed by signal: ({'|'.join(re.escape(signal.strsignal(s)) for s in STOP_SIGNALS)})")
_OWN_SIGNAL_SECONDS = 0.5


def _stop_loader(batches_read) -> None:
    """The loader processes stopped and forgotten now: a dead one's SIGCHLD would otherwise
    raise torch's "DataLoader worker ... killed" later, anywhere (while the error is reported)."""
    stop = getattr(batches_read, "_shutdown_workers", None)  # (no public way; none without workers)
    if stop is not None:
        with suppress(RuntimeError):  # (the handler may still raise while they stop)
            stop()


def _machine_failure(exc: BaseException, cfg: TrainConfig) -> TrainingError | None:
    """The error for a run that the machine stopped: a loader process that died (the kernel's
    out-of-memory killer, a signal, its Dataset ending the process) or memory that ran out,
    each of which had been an internal error (exit 3); None for anything else."""
    # (a worker's death may surface as the error met while it was being read from, a
    # ConnectionResetError, with torch's own "DataLoader worker ... killed" as its context)
    chain, link = [], exc
    while link is not None and len(chain) < 8:
        chain.append(link)
        link = link.__cause__ or link.__context__
    text = next((str(e) for e in chain if "DataLoader worker" in str(e)), str(exc))
    # (or as the connection to it lost, when a batch it had sent was being read)
    lost = cfg.workers and any(isinstance(e, (ConnectionError, EOFError)) for e in chain)
    if "DataLoader worker" in text or lost:
        return TrainingError(f"a data-loading process (--workers {cfg.workers}) ended without finishing its batch "
                             f"({one_line(text, 120)}): out of memory, a signal, or its Dataset ended the process; "
                             "nothing was written: run again with fewer --workers, or --workers 0 to see the cause")
    if out_of_memory(exc, text):
        return TrainingError(f"out of memory while training ({one_line(text, 120)}); nothing was written: lower "
                             "--batch-size (or --image-size, --workers)")
    return None


def _mixed_precision(precision: str, device: torch.device):
    """(a context for the forward pass and the loss, the gradient scaler): autocast to bf16 or
    fp16 (fp16 with loss scaling, on CUDA only), or plain fp32."""
    import contextlib

    if precision not in PRECISIONS:
        raise InputError(f"unknown precision '{precision}': use {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise InputError("--precision fp16 needs CUDA: use bf16 or fp32 on the CPU")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if precision == "fp32":
        return contextlib.nullcontext, scaler
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def _parallel(net: nn.Module, device: torch.device, procs: Processes) -> nn.Module:
    """The module the loop runs: the model itself, or under torchrun the model wrapped in
    DistributedDataParallel (gradients averaged over the processes at every step)."""
    if procs.alone:
        return net
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(net, device_ids=ids)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Logits for x, in eval mode, on the model's device; returns numpy."""
    from .zoo import eval_rows

    model.eval()
    device = next(model.parameters()).device
    outs = []
    batch_size = eval_rows(x, batch_size)
    for i in range(0, len(x), batch_size):
        xb = torch.as_tensor(x[i : i + batch_size], dtype=torch.float32, device=device)
        outs.append(model(xb).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def loss_gradient(model: nn.Module, x: np.ndarray, target: int, batch_size: int = 1024) -> np.ndarray:
    """d cross-entropy(model(x), target) / dx for every row, in eval mode; returns numpy."""
    from .zoo import eval_rows

    model.eval()
    device = next(model.parameters()).device
    outs = []
    batch_size = eval_rows(x, batch_size)
    for i in range(0, len(x), batch_size):
        xb = torch.as_tensor(x[i : i + batch_size], dtype=torch.float32, device=device).requires_grad_(True)
        logits = model(xb)
        if not 0 <= target < logits.shape[-1]:
            raise InputError(f"the model gives {logits.shape[-1]} scores per input, the keys need class {target}: "
                             "not the model the keys were made for")
        loss = nn.functional.cross_entropy(logits, torch.full((len(xb),), target, device=device), reduction="sum")
        (grad,) = torch.autograd.grad(loss, xb)
        outs.append(grad.float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy, in percent."""
    return float((predict(model, x).argmax(1) == y).mean() * 100.0)
