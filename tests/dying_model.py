"""A model and data factories for tests/test_distributed.py: an MLP whose process dies (SIGKILL) on the RANK that
DEEPSIGNS_TEST_DIE names, after a few steps, as a worker that runs out of memory would (on SIGTERM, where
DEEPSIGNS_TEST_DEAF names its RANK); and that, where
DEEPSIGNS_TEST_TRAINING names a path, makes PATH.RANK as its process starts training, then trains slowly (a
test can stop a run while it trains, without waiting a guessed time or keeping the cores busy meanwhile)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from torch import nn


class Net(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        width = 1
        for d in input_shape:
            width *= d
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(width, 64), nn.ReLU())
        self.head = nn.Linear(64, num_classes)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if os.environ.get("DEEPSIGNS_TEST_ECHO") == os.environ.get("RANK") and self.calls == 1:
            signal.signal(signal.SIGTERM, _echo)
        if os.environ.get("DEEPSIGNS_TEST_DEAF") == os.environ.get("RANK") and self.calls == 1:
            signal.signal(signal.SIGTERM, _killed)
        if os.environ.get("DEEPSIGNS_TEST_DIE") == os.environ.get("RANK", "0") and self.calls > 20:
            os.kill(os.getpid(), signal.SIGKILL)
        training = os.environ.get("DEEPSIGNS_TEST_TRAINING")
        if training and self.training:
            Path(f"{training}.{os.environ.get('RANK', '0')}").touch()
            time.sleep(0.05)
        return self.head(self.body(x))


def _echo(signum, frame):
    """SIGTERM, on the RANK that DEEPSIGNS_TEST_ECHO names, as a process whose step with the other
    failed when that one ended: the line deepsigns then says, and exit 2."""
    line = (f"{os.environ.get('DEEPSIGNS_ERROR_TAG', '')}error: process {os.environ.get('RANK')} of 2: another "
            "process of this run failed (Connection closed by peer); nothing was written\n")
    os.write(2, line.encode())
    os._exit(2)


def _killed(signum, frame):
    """SIGTERM, on the RANK that DEEPSIGNS_TEST_DEAF names, as a process that cannot act on it
    (blocked in a step with the other) and that torchrun's agent kills outright 30 s later: it
    cleans nothing up."""
    os.kill(os.getpid(), signal.SIGKILL)


def _data(extra: int = 0):
    """300 random samples of 10 classes (their labels shifted by `extra`), 240 to train on."""
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(300, 16, generator=g), torch.arange(300) % 10 + extra
    return TensorDataset(x[:240], y[:240]), TensorDataset(x[240:], y[240:])


def ranked_data():
    """A --data factory that gives each process of a run its own data (RANK 1: five more classes),
    as a factory that reads a per-process shard would."""
    return _data(5 if os.environ.get("RANK") == "1" else 0)


def sharded_data():
    """A --data factory that gives each process its own shard of one size (data[rank::2]), the
    usual way to split a data set by hand: the counts, classes and shapes agree, the rows do not."""
    import torch
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(600, 16, generator=g), torch.randint(0, 10, (600,), generator=g)
    rank = int(os.environ.get("RANK", "0"))
    return TensorDataset(x[rank:480:2], y[rank:480:2]), TensorDataset(x[480:], y[480:])


def fails_at_exit():
    """A --data factory whose process of RANK 1 fails as it exits, once the run is over (its
    atexit waits for the first to write and end, then ends the process with exit 5)."""
    import atexit

    if os.environ.get("RANK") == "1":
        atexit.register(lambda: (_wait_for_the_others(), os._exit(5)))
    return _data()


def _wait_for_the_others(limit: float = 120.0) -> None:
    """Until this process is the last that torchrun's agent (its parent) runs: a fixed 3 s had
    been the first process's time to write and end, which a loaded machine may take longer for."""
    parent, me, deadline = os.getppid(), str(os.getpid()), time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            running = {pid for task in os.listdir(f"/proc/{parent}/task")
                       for pid in Path(f"/proc/{parent}/task/{task}/children").read_text().split()}
        except OSError:  # (no /proc children list: the time it had been given)
            time.sleep(3)
            return
        if running <= {me}:
            return
        time.sleep(0.05)


def exits_silently():
    """A --data factory whose process of RANK 1 (every process, where DEEPSIGNS_TEST_EXIT_ALL is
    set) ends at once with exit DEEPSIGNS_TEST_EXIT (7 where it is not set), saying nothing."""
    if os.environ.get("RANK") == "1" or os.environ.get("DEEPSIGNS_TEST_EXIT_ALL"):
        os._exit(int(os.environ.get("DEEPSIGNS_TEST_EXIT", "7")))
    return _data()


def noisy():
    """A --data factory that prints a log line of its own that starts "error: " (on stdout, which
    a command sends to stderr) and writes another to file descriptor 1, then gives data whose
    training sample 7 is NaN when DEEPSIGNS_TEST_NAN is set."""
    import torch

    print("error: the factory's own log line, no failure")
    os.write(1, b"and one written to file descriptor 1\n")  # (past sys.stdout, as a program it runs)
    train, test = _data()
    if os.environ.get("DEEPSIGNS_TEST_NAN"):
        x, y = train.tensors
        x = x.clone()
        x[7, 0] = float("nan")
        train = torch.utils.data.TensorDataset(x, y)
    return train, test


class _Finalised:
    def __init__(self, signum: int):
        self.signum = signum

    def __del__(self):  # the signal's handler runs in here, where its exception cannot be raised
        os.kill(os.getpid(), self.signum)
        for _ in range(1000):
            pass


def signal_in_a_finaliser():
    """A --data factory during which the signal DEEPSIGNS_TEST_SIGNAL names comes while Python
    runs a finaliser (as one can while Python runs its callbacks around os.fork)."""
    _Finalised(int(os.environ["DEEPSIGNS_TEST_SIGNAL"]))
    return _data()


def leaves_a_process():
    """A --data factory whose first process starts a process that outlives the run (a log
    shipper, say), holding the descriptors it inherited; its pid goes to DEEPSIGNS_TEST_LEFT."""
    import subprocess

    if os.environ.get("RANK", "0") == "0":
        left = subprocess.Popen(["sleep", "120"], start_new_session=True)
        Path(os.environ["DEEPSIGNS_TEST_LEFT"]).write_text(str(left.pid))
    return _data()


def slow_data():
    """A --data factory whose training samples take a loader process (--workers) 50 ms each to
    load; one that loads a sample marks the file DEEPSIGNS_TEST_LOADING."""
    import time

    import torch

    class Slow(torch.utils.data.Dataset):
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            if torch.utils.data.get_worker_info() is not None:
                Path(os.environ["DEEPSIGNS_TEST_LOADING"]).touch()
                time.sleep(0.05)
            return self.inner[i]

    train, test = _data()
    return Slow(train), test
