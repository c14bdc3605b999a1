"""Streaming data: image folders decoded lazily with Pillow, `package.module:factory` torch
Datasets, the preprocessing a checkpoint records and every later command reuses, and the bad
inputs (exit 2, one line, nothing written)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    assert_bad_input,
    assert_one_error_line,
    deepsigns_argv,
    partial_files,
    process_env,
    run_cli,
    run_json,
    run_proc,
)
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import TensorDataset

from deepsigns_cli import api
from deepsigns_cli.checkpoint import recorded_preprocess
from deepsigns_cli.data import STAT_ROWS, DataSpec, Samples, bounded_rows, load_data, take
from deepsigns_cli.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
COUNT, SIZE = 600, 16
N_TRAIN, N_TEST = 480, 120  # 10 classes, 80/20 in each
# (a smaller set takes too few steps per epoch for the hidden mark to settle in a few epochs)


def _generator():
    spec = importlib.util.spec_from_file_location("make_image_folder", ROOT / "scripts" / "make_image_folder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The generated folder, shared read-only: tests that change it copy it first."""
    out = tmp_path_factory.mktemp("images") / "imgs"
    assert _generator()(out, COUNT, size=SIZE, seed=0) == {"train": N_TRAIN, "test": N_TEST}
    return out


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("trained") / "base.safetensors"
    report = run_json("train", "--arch", "cnn", "--data", folder, "--epochs", 3, "--device", "cpu",
                      "--out", base)
    assert report["data"] == "imgs"
    return base


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "imgs"))


# ----------------------------------------------------------------------------- the owner's flow


def test_generator_is_deterministic_and_fast(folder, tmp_path):
    again = tmp_path / "again"
    _generator()(again, COUNT, size=SIZE, seed=0)

    def digest(root: Path) -> dict:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*.png"))}

    assert digest(again) == digest(folder)
    assert sorted(p.name for p in (folder / "train").iterdir()) == [str(c) for c in range(10)]


def test_folder_loads_lazily_with_its_preprocessing(folder):
    data = load_data(str(folder))
    assert isinstance(data.x_train, Samples) and data.num_classes == 10
    assert data.x_train.shape == (N_TRAIN, 3, SIZE, SIZE) and data.x_test.shape == (N_TEST, 3, SIZE, SIZE)
    assert data.x_train.ndim == 4 and data.x_train.dtype == np.float32 and len(data.x_train) == N_TRAIN
    assert data.y_train.dtype == np.int64 and sorted(set(data.y_train)) == list(range(10))
    pre = data.preprocess
    assert pre["image_size"] == SIZE and pre["channels"] == 3 and pre["classes"] == [str(c) for c in range(10)]
    # normalised per channel with the recorded mean and std
    x = data.x_train[:]
    assert x.dtype == np.float32 and abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2
    # the same preprocessing given back (from a checkpoint) gives the same samples
    again = load_data(str(folder), preprocess=pre)
    assert again.preprocess == pre and np.array_equal(again.x_test[:], data.x_test[:])
    assert load_data(DataSpec(str(folder), image_size=8)).x_train.shape == (N_TRAIN, 3, 8, 8)


def test_files_that_are_not_images_are_passed_over(folder, tmp_path):
    imgs = _copy(folder, tmp_path)
    for path in ("train/2/notes.txt", "train/2/.DS_Store", "test/4/labels.csv", "train/README.md", "test/.hidden"):
        (imgs / path).write_bytes(b"not pixels\n")
    data, plain = load_data(str(imgs)), load_data(str(folder))
    assert data.preprocess == plain.preprocess and np.array_equal(data.y_train, plain.y_train)
    assert np.array_equal(data.x_test[:], plain.x_test[:]) and np.array_equal(data.y_test, plain.y_test)


def test_a_folder_named_like_the_bundled_data_set_is_recorded_as_a_folder(folder, tmp_path):
    """A folder named digits had been recorded as "digits", the bundled set's name: a model's
    provenance could not tell the two apart (and --data digits is the bundled set: ./digits the folder)."""
    imgs = _copy(folder, tmp_path / "here")
    named = imgs.rename(imgs.parent / "digits")
    assert load_data(str(named)).name == "digits/" and load_data("digits").name == "digits"
    assert load_data(str(folder)).name == folder.name


def test_one_grayscale_image_first_does_not_make_a_colour_set_grayscale(folder, tmp_path):
    """The first training image alone had decided the channels: a grayscale one that sorted
    first made the whole colour set train on one channel, unsaid. A set all grayscale is."""
    from PIL import Image

    imgs = _copy(folder, tmp_path)
    first = sorted((imgs / "train" / "0").iterdir())[0]
    Image.open(first).convert("L").save(first)
    assert load_data(str(imgs)).preprocess["channels"] == 3
    for path in (imgs / "train").glob("*/*.png"):
        Image.open(path).convert("L").save(path)
    assert load_data(str(imgs)).x_train.shape == (N_TRAIN, 1, SIZE, SIZE)


def test_samples_index_like_numpy_pickle_and_load_in_workers(folder):
    x = load_data(str(folder)).x_train
    whole = x[:]
    assert np.array_equal(x[5], whole[5]) and np.array_equal(x[-1], whole[-1])
    assert np.array_equal(x[3:9:2], whole[3:9:2])
    assert np.array_equal(x[[7, 2, 7]], whole[[7, 2, 7]])
    assert np.array_equal(x[np.array([4, 0])], whole[[4, 0]]) and x[[]].shape == (0, 3, SIZE, SIZE)
    assert np.array_equal(np.asarray(x), whole)
    with pytest.raises(IndexError):
        x[N_TRAIN]
    view = take(x, np.array([9, 1]))
    assert isinstance(view, Samples) and np.array_equal(view[:], whole[[9, 1]])
    assert np.array_equal(pickle.loads(pickle.dumps(x))[[1, 2]], whole[[1, 2]])
    # a DataLoader worker (forked) indexes it with a batch of indices, as the training loop does
    batches = [np.array([0, 1, 2]), np.array([N_TRAIN - 1, 5])]

    class Rows(TorchDataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, idx):
            return torch.as_tensor(x[idx])

    got = list(torch.utils.data.DataLoader(Rows(), sampler=batches, batch_size=None, num_workers=1))
    assert all(np.array_equal(g.numpy(), whole[b]) for g, b in zip(got, batches, strict=True))


def test_statistics_read_a_bounded_subsample():
    assert bounded_rows(1347) == slice(None)  # digits: every row, exactly as before
    rows = bounded_rows(50_000)
    assert len(rows) == STAT_ROWS and np.array_equal(rows, bounded_rows(50_000))
    assert np.all(np.diff(rows) > 0)


def test_train_keygen_embed_extract_on_an_image_folder(folder, trained, tmp_path):
    facts = run_json("inspect", trained)
    assert facts["input_shape"] == [3, SIZE, SIZE] and facts["preprocess"]["image_size"] == SIZE
    assert recorded_preprocess(trained) == load_data(str(folder)).preprocess
    keys, marked = tmp_path / "owner.dskey", tmp_path / "marked.safetensors"
    run_json("keygen", "--model", trained, "--data", folder, "--scheme", "hidden", "--bits", 16,
             "--seed", 0, "--out", keys)
    embed = run_json("embed", "--model", trained, "--data", folder, "--keys", keys, "--epochs", 20,
                     "--seed", 0, "--device", "cpu", "--out", marked)  # a cap: it stops once read
    assert embed["schemes"]["hidden"]["epochs"] <= 20
    assert recorded_preprocess(marked) == recorded_preprocess(trained)  # carried to the marked file
    decision = run_json("extract", "--model", marked, "--keys", keys)
    # (detected, not necessarily every bit: 20 epochs is a cap, and another key draw took 40 to read all)
    read = decision["results"][0]
    assert decision["detected"] and read["bit_errors"] <= read["max_bit_errors"] and read["ber"] < 0.1, read


def test_later_commands_reuse_the_recorded_preprocessing(folder, trained, tmp_path):
    imgs = _copy(folder, tmp_path)
    # a first training image that is not square: a fresh load would ask for --image-size,
    # the checkpoint's record says 16 x 16
    first = imgs / "train" / "0" / "000000.png"
    from PIL import Image

    Image.new("RGB", (20, 12), (200, 10, 10)).save(first)
    line = assert_bad_input(run_cli("train", "--arch", "cnn", "--data", imgs, "--epochs", 1, "--out",
                                    tmp_path / "m.safetensors", code=None), "20x12", "--image-size")
    assert "000000.png" in line
    run_json("keygen", "--model", trained, "--data", imgs, "--scheme", "hidden", "--seed", 0,
             "--out", tmp_path / "k.dskey")
    run_json("export", trained, "--data", imgs, "--out", tmp_path / "m.onnx")
    assert_bad_input(run_cli("keygen", "--model", trained, "--data", imgs, "--image-size", 8, "--out",
                             tmp_path / "k2.dskey", code=None), "--image-size 8", "the model's 16")


def test_output_keys_refuse_an_image_folder_changed_since_keygen(folder, trained, tmp_path):
    """Output keys are embedded with the data they were drawn for (tests/test_forged_keys.py): an
    image folder is known by its files as stored (a decoder of another version may decode them a
    bit apart), wherever it is copied to; one changed image makes other data."""
    from deepsigns_cli.data import training_digest

    imgs = _copy(folder, tmp_path)
    assert training_digest(load_data(str(imgs))) == training_digest(load_data(str(folder)))
    keys = tmp_path / "owner.dskey"
    run_json("keygen", "--model", trained, "--data", imgs, "--scheme", "output", "--key-size", 5, "--seed", 0,
             "--out", keys)
    from PIL import Image

    first = imgs / "train" / "0" / "000000.png"
    with Image.open(first) as im:
        changed = im.copy()
    changed.putpixel((0, 0), tuple(255 - v for v in changed.getpixel((0, 0))))
    changed.save(first)
    result = run_cli("embed", "--model", trained, "--data", imgs, "--keys", keys, "--device", "cpu",
                     "--out", tmp_path / "m.safetensors", code=2)
    assert_bad_input(result, "not those these output keys were drawn for")


# ----------------------------------------------------------------------------- factories


def _digits_split(n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_data("digits")
    x, y = data.x_train[offset : offset + n], data.y_train[offset : offset + n]
    return torch.as_tensor(x), torch.as_tensor(y)


class _Labelled(TorchDataset):
    """A Dataset with `.targets` (as torchvision's): its labels are read without a pass."""

    def __init__(self, x, y):
        self.x, self.targets = x, y.tolist()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.targets[i]


def tiny_digits():
    """The factory the tests name on the command line: (train, test) torch Datasets."""
    return TensorDataset(*_digits_split(300)), _Labelled(*_digits_split(80, offset=300))


def not_a_pair():
    return TensorDataset(*_digits_split(10))


def nothing_at_all():
    return ()


def missing_column():  # the user's code may fail in any way: it is theirs to fix, not a bug of ours
    return {}["label"]


def exits():  # a data module written as a script (argparse at import) ends in sys.exit
    raise SystemExit(0)


class Panic(BaseException):  # (as a Rust library's PanicException: not an Exception)
    pass


def panics():
    raise Panic("the library panicked")


def fails_unsaid():
    raise RuntimeError()


class _Panicky(TorchDataset):
    """Its items past the first few raise a BaseException of their own (mid-epoch)."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        if i >= 3:
            raise Panic(f"item {i} panicked")
        return torch.zeros(1, 8, 8), i % 10


def panicky_items():
    return _Panicky(), _Panicky()


class _Broken(TorchDataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return 1 / 0


def broken_items():
    return _Broken(), _Broken()


class _BadTargets(TorchDataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.zeros(4), i % 2

    @property
    def targets(self):
        raise KeyError("labels are loaded lazily")


def bad_targets():
    return _BadTargets(), _BadTargets()


class _Odd(TorchDataset):
    """Ten items, or as many as `claimed`; labels `label` (an int too large for int64, say)."""

    def __init__(self, claimed=10, label=0):
        self.claimed, self.label = claimed, label

    def __len__(self):
        return self.claimed

    def __getitem__(self, i):
        return torch.zeros(4), self.label


def huge_label():
    return _Odd(label=2**70), _Odd()


def huge_length():
    return _Odd(claimed=10**12), _Odd()


class _Unprintable(Exception):  # its __str__ reads an attribute never set: the message fails too
    def __str__(self):
        return f"missing {self.path}"


def unprintable_failure():
    raise _Unprintable()


class _LabelOfItsOwn:  # a label whose repr fails, met as the labels are read
    def __repr__(self):
        raise RuntimeError("repr failed")


def label_of_its_own():
    return _Odd(label=_LabelOfItsOwn()), _Odd()


class _Splits(list):
    def __len__(self):
        raise RuntimeError("len failed")


def splits_without_length():
    return _Splits([_Odd(), _Odd()])


class _DiesInAWorker(TorchDataset):
    """Digits whose loader process is killed (SIGKILL, as the kernel's out-of-memory killer
    does) when it reads item 50; read in the main process, it is whole."""

    def __init__(self):
        self.x, self.y = _digits_split(300)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        import os
        import signal

        if i == 50 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.x[i], self.y[i]


def dies_in_a_worker():
    return _DiesInAWorker(), TensorDataset(*_digits_split(80, offset=300))


def dies_in_a_worker_heard_late():
    """The same, with the death heard as CI once heard it: torch's SIGCHLD handler raising it
    after the loop's own error was caught, just before the loader was stopped."""
    from deepsigns_cli import training

    stop, heard = training._stop_loader, []

    def stop_loader(batches_read):
        if not heard:
            heard.append(True)
            raise RuntimeError("DataLoader worker (pid 12345) is killed by signal: Killed.")
        stop(batches_read)

    training._stop_loader = stop_loader
    return dies_in_a_worker()


def dies_in_a_worker_leaving_a_temporary_file():
    """The same, with the temporary file torch's loader had left behind when the death was heard
    while it made one (it makes ten, to see whether open files ran out): made and lost here, in
    tempfile's folder, as each batch is asked for."""
    import tempfile

    from torch.utils.data import dataloader

    ask = dataloader._MultiProcessingDataLoaderIter._try_get_data

    def try_get_data(self, *args, **kwargs):
        os.close(tempfile.mkstemp()[0])
        return ask(self, *args, **kwargs)

    dataloader._MultiProcessingDataLoaderIter._try_get_data = try_get_data
    return dies_in_a_worker()


@pytest.mark.parametrize("factory", ["dies_in_a_worker", "dies_in_a_worker_heard_late",
                                     "dies_in_a_worker_leaving_a_temporary_file"])
def test_a_loader_process_that_dies_is_one_line_not_a_bug(tmp_path, factory):
    """It had been an internal error of deepsigns (exit 3, torch's "DataLoader worker exited
    unexpectedly"), and once more in CI when the death was heard late; under load, a temporary
    file of torch's had been left in $TMPDIR. A real process: torch's SIGCHLD handler, left
    behind in a test process, raised the worker's death later inside an unrelated test (and in
    pytest itself)."""
    scratch = tmp_path.parent / f"{tmp_path.name}-tmp"
    scratch.mkdir()
    proc = run_proc("train", "--arch", "mlp", "--data", f"test_image_data:{factory}", "--workers", 1,
                    "--epochs", 1, "--device", "cpu", "--out", tmp_path / "m.safetensors",
                    env={"PYTHONPATH": str(Path(__file__).parent), "TMPDIR": str(scratch)})
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout, "a data-loading process (--workers 1) ended",
                          "nothing was written", "fewer --workers")
    assert list(tmp_path.iterdir()) == []
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []


class _FailsAt(TorchDataset):
    """Digits that fail at item 200, with their labels as `targets` (read without the items)."""

    def __init__(self):
        self.x, self.y = _digits_split(300)
        self.targets = self.y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i == 200:
            raise KeyError(i)
        return self.x[i], self.y[i]


def fails_at_item_200():
    return _FailsAt(), TensorDataset(*_digits_split(80, offset=300))


@pytest.mark.parametrize("long", [False, True], ids=["tmp", "a-long-tmp"])
def test_a_dataset_that_fails_in_loader_processes_leaves_no_temporary_folder(tmp_path, long):
    """Each of the loader processes, stopped on the error, left a pymp-* folder behind. Under a
    temporary folder of a long path, a loader process could not pass a batch (its socket's
    path too long) and the command waited forever."""
    scratch = tmp_path.parent / f"{tmp_path.name}-{'t' * 90 if long else 'tmp'}"
    scratch.mkdir()
    proc = run_proc("train", "--arch", "mlp", "--data", "test_image_data:fails_at_item_200", "--workers", 2,
                    "--epochs", 1, "--device", "cpu", "--out", tmp_path / "m.safetensors",
                    env={"PYTHONPATH": str(Path(__file__).parent), "TMPDIR": str(scratch)}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert list(tmp_path.iterdir()) == []
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []


def _spawning(method: str, dataset_class: type):
    import multiprocessing

    multiprocessing.set_start_method(method, force=True)  # (as CUDA code does; forkserver: Python 3.14's default)
    return dataset_class(), TensorDataset(*_digits_split(80, offset=300))


def _local_class() -> type:
    class Local(_FailsAt):  # (a local class does not pickle)
        def __getitem__(self, i):
            return self.x[i], self.y[i]

    return Local


def spawned_unpicklable():
    return _spawning("spawn", _local_class())


def forkserved_unpicklable():
    return _spawning("forkserver", _local_class())


class _RefusesCopies(_FailsAt):
    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def __getstate__(self):
        refusal = os.environ.get("DEEPSIGNS_TEST_REFUSAL")
        if refusal == "exit":
            sys.exit(0)  # (a crash that exits 0 reads as success)
        if refusal == "oserror":
            raise PermissionError(13, "Permission denied", "/Local")  # (not the machine's failure: the Dataset's)
        raise RuntimeError("Local data, not to be copied")


def spawned_refusing_copies():
    return _spawning("spawn", _RefusesCopies)


@pytest.mark.parametrize("factory, method, refusal", [
    ("spawned_unpicklable", "spawn", ""), ("forkserved_unpicklable", "forkserver", ""),
    ("spawned_refusing_copies", "spawn", ""), ("spawned_refusing_copies", "spawn", "exit"),
    ("spawned_refusing_copies", "spawn", "oserror")])
def test_data_that_cannot_reach_spawned_loader_processes_is_one_line(tmp_path, factory, method, refusal):
    """A factory's module that chose the 'spawn' start method (forkserver: Python 3.14's default
    on Linux), with a Dataset that does not pickle: --workers had been an internal error, exit 3
    (helper-62), and so was one whose __getstate__ raised (helper-64); one whose __getstate__
    called sys.exit(0) had exited 0 with nothing written, and an OSError it raised had been
    taken for the machine's (helper-65)."""
    scratch = tmp_path.parent / f"{tmp_path.name}-tmp"
    scratch.mkdir()
    proc = run_proc("train", "--arch", "mlp", "--data", f"test_image_data:{factory}", "--workers", 2,
                    "--epochs", 1, "--device", "cpu", "--out", tmp_path / "m.safetensors", timeout=120,
                    env={"PYTHONPATH": str(Path(__file__).parent), "TMPDIR": str(scratch),
                         "DEEPSIGNS_TEST_REFUSAL": refusal})
    assert proc.returncode == 2, proc.stderr
    said = {"": "Local", "exit": "it called sys.exit(0)", "oserror": "PermissionError: [Errno 13] Permission denied"}
    assert_one_error_line(proc.stderr, proc.stdout, "--workers 2: the data cannot be sent to loader processes",
                          f"started by '{method}'", said[refusal], "--workers 0")
    assert list(tmp_path.iterdir()) == []
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []


def keeps_a_thread():
    """The digits, and a thread that never ends (not a daemon: a data library's prefetcher)."""
    import threading
    import time

    threading.Thread(target=lambda: [time.sleep(0.2) for _ in iter(int, 1)], name="prefetcher").start()
    return TensorDataset(*_digits_split(300)), TensorDataset(*_digits_split(80, offset=300))


def test_a_thread_the_users_code_leaves_running_does_not_keep_the_command_alive(tmp_path):
    """Python waits for every thread that is not a daemon at exit: the command had printed its
    report and written its model, then run for ever, deaf to Ctrl-C and SIGTERM."""
    proc = run_proc("train", "--arch", "mlp", "--data", "test_image_data:keeps_a_thread", "--epochs", 1,
                    "--device", "cpu", "--out", tmp_path / "m.safetensors", "--json", timeout=120,
                    env={"PYTHONPATH": str(Path(__file__).parent)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["command"] == "train" and (tmp_path / "m.safetensors").exists()


def sets_torch_state():
    """The digits, made by code that leaves float64 torch's default dtype, gradients off, the
    default device "meta" (set once its data are made) and the current folder another."""
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(False)
    os.chdir(os.environ["ANOTHER_FOLDER"])
    made = TensorDataset(*_digits_split(300)), TensorDataset(*_digits_split(80, offset=300))
    torch.set_default_device("meta")
    return made


class _Wanders(TensorDataset):
    def __getitem__(self, i):
        os.chdir(os.environ["ANOTHER_FOLDER"])  # (as code that reads its files relative to a folder may)
        return super().__getitem__(i)


def wanders_per_item():
    return _Wanders(*_digits_split(300)), TensorDataset(*_digits_split(80, offset=300))


def test_torchs_settings_a_factory_changes_are_put_back(tmp_path):
    """A factory that made float64 the default dtype ("mat1 and mat2 must have the same dtype"),
    turned gradients off or made "meta" the default device ("Cannot copy out of meta tensor") had
    failed the training as a bug of ours (exit 3); one that changed
    the current folder had sent a relative --out there."""
    (tmp_path / "here").mkdir()
    (tmp_path / "there").mkdir()
    proc = run_proc("train", "--arch", "mlp", "--data", "test_image_data:sets_torch_state", "--epochs", 1,
                    "--device", "cpu", "--out", "m.safetensors", "--json", timeout=120, cwd=tmp_path / "here",
                    env={"PYTHONPATH": str(Path(__file__).parent), "ANOTHER_FOLDER": str(tmp_path / "there")})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "here" / "m.safetensors").exists() and not any((tmp_path / "there").iterdir())


class _WanderingNet(torch.nn.Module):
    """An MLP whose every pass changes the current folder (as code that reads files of its own
    relative to a folder may)."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(int(np.prod(input_shape)), 64),
                                        torch.nn.ReLU())
        self.head = torch.nn.Linear(64, num_classes)

    def forward(self, x):
        os.chdir(os.environ["ANOTHER_FOLDER"])
        return self.head(self.body(x))


def wandering_net(input_shape, num_classes):
    return _WanderingNet(input_shape, num_classes)


@pytest.mark.parametrize("who", ["dataset", "model"])
def test_user_code_that_changes_the_current_folder_leaves_relative_paths_alone(tmp_path, who):
    """A Dataset that changed the current folder as it was read (after the factory) had sent
    train's relative --out into the folder it went to (or failed its commit after the whole
    training, exit 2; helper-62), and keygen then failed to read its relative --model, an
    internal error (exit 3); an --arch model that changed it in its forward, the same (helper-64)."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    env = {"PYTHONPATH": str(Path(__file__).parent), "ANOTHER_FOLDER": str(there)}
    given = {"dataset": ("--data", "test_image_data:wanders_per_item"),
             "model": ("--data", "test_image_data:plain_digits", "--arch", "test_image_data:wandering_net")}[who]
    arch = () if who == "model" else ("--arch", "mlp")
    for args in (("train", *arch, "--epochs", 2, "--device", "cpu", "--out", "base.safetensors"),
                 ("keygen", "--model", "base.safetensors", "--out", "k.dskey"),
                 ("embed", "--model", "base.safetensors", "--keys", "k.dskey", "--epochs", 2, "--device", "cpu",
                  "--out", "m.safetensors", "--onnx", "m.onnx")):
        proc = run_proc(*args, *given, "--json", timeout=120, cwd=here, env=env)
        assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in here.iterdir()) == ["base.safetensors", "k.dskey", "m.onnx", "m.safetensors"]
    assert not any(there.iterdir())
    model = ("--arch", "test_image_data:wandering_net") if who == "model" else ()
    proc = run_proc("extract", "--model", "m.safetensors", *model, "--keys", "k.dskey", cwd=here, env=env)
    assert proc.returncode in (0, 1) and "error" not in proc.stderr, proc.stderr  # (read: a verdict, either way)


def plain_digits():
    """The digits as two TensorDatasets: no .targets, so the labels are read from the items."""
    return TensorDataset(*_digits_split(300)), TensorDataset(*_digits_split(80, offset=300))


def class_nine_tested_only():
    """Digits whose class 9 is in the test Dataset alone."""
    x, y = _digits_split(300)
    keep = y != 9
    return TensorDataset(x[keep], y[keep]), TensorDataset(*_digits_split(80, offset=300))


def test_a_factorys_class_of_the_test_dataset_alone_is_told_in_its_terms(tmp_path):
    """The advice had spoken of an .npz's random split and its x_train, y_train arrays."""
    proc = run_proc("train", "--arch", "mlp", "--data", "test_image_data:class_nine_tested_only", "--epochs", 1,
                    "--device", "cpu", "--out", tmp_path / "m.safetensors",
                    env={"PYTHONPATH": str(Path(__file__).parent)})
    assert proc.returncode == 2, proc.stderr
    line = assert_one_error_line(proc.stderr, proc.stdout, "the test split holds class 9",
                                 "give it training samples (in the factory's train Dataset)")
    assert ".npz" not in line and "x_train" not in line
    assert list(tmp_path.iterdir()) == []


def test_the_passes_over_the_data_report_their_progress(folder, tmp_path):
    """An image folder's check of every file and its mean and std, the labels read from a
    Dataset's items and keygen's digest of the training data had each been minutes without a
    word on a large or slow data set (helper-62): each reports to the command's progress, from
    0 to its end, at most about a hundred times."""
    def passes(command, *args, **kwargs) -> dict[str, list[tuple[int, int]]]:
        seen: dict[str, list[tuple[int, int]]] = {}
        command(*args, **kwargs, progress=lambda done, total, what: seen.setdefault(what, []).append((done, total)))
        return seen

    factory = "test_image_data:plain_digits"
    found = {**passes(api.train, "mlp", tmp_path / "f.safetensors", data=factory, epochs=1, device="cpu"),
             **passes(api.train, "cnn", tmp_path / "i.safetensors", data=str(folder), epochs=1, device="cpu")}
    found["keygen"] = passes(api.keygen, tmp_path / "f.safetensors", tmp_path / "k.dskey", "pw",
                             data=factory)["reading the training data"]
    for what, total in (("reading train labels", 300), ("reading test labels", 80), ("checking images", COUNT),
                        ("measuring images", N_TRAIN), ("keygen", 300)):
        done = [d for d, t in found[what] if t == total]
        assert len(done) == len(found[what]) <= 101, (what, found[what])
        assert done == sorted(set(done)) and done[-1] == total, (what, done)


class _GradientsOff(TensorDataset):
    def __getitem__(self, i):
        torch.set_grad_enabled(False)  # (as code that runs a model on each sample may leave it)
        return super().__getitem__(i)


def turns_gradients_off_per_item():
    return _GradientsOff(*_digits_split(300)), TensorDataset(*_digits_split(80, offset=300))


def test_a_dataset_that_turns_gradients_off_as_it_reads_still_trains(tmp_path):
    """A __getitem__ that turned gradients off failed the next step ("element 0 of tensors does
    not require grad") as a bug of ours, exit 3."""
    proc = run_proc("train", "--arch", "mlp", "--data", "test_image_data:turns_gradients_off_per_item", "--epochs", 1,
                    "--device", "cpu", "--out", tmp_path / "m.safetensors", "--json", timeout=120,
                    env={"PYTHONPATH": str(Path(__file__).parent)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["epochs"] == 1


class _Chatty(TensorDataset):
    def __getitem__(self, i):
        print(f"reading item {i}")  # (in a loader process too)
        if i == 0:
            os.write(1, b"item 0 on file descriptor 1\n")
        return super().__getitem__(i)


def chatty_digits():
    print("loading the digits...")
    # past Python's sys.stdout: a program the factory runs, and a write to the descriptor itself
    subprocess.run(["echo", "fetching shard 1 of 1"], check=True)
    os.write(1, b"written to file descriptor 1\n")
    return _Chatty(*_digits_split(300)), TensorDataset(*_digits_split(80, offset=300))


def test_what_the_users_code_prints_never_breaks_the_report(tmp_path):
    """A factory that prints (research code does) had put its lines into the --json report on
    stdout, which no longer parsed; they go to stderr now, and stdout holds the report alone.
    So do the bytes that reach the descriptor itself (a program it runs, os.write), in the
    command's process and in a loader process."""
    proc = run_proc("train", "--arch", "mlp", "--data", "test_image_data:chatty_digits", "--workers", 1,
                    "--epochs", 1, "--device", "cpu", "--out", tmp_path / "m.safetensors", "--json",
                    env={"PYTHONPATH": str(Path(__file__).parent)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["data"] == "test_image_data:chatty_digits"
    assert "loading the digits..." in proc.stderr and "reading item 0" in proc.stderr
    for line in ("fetching shard 1 of 1", "written to file descriptor 1", "item 0 on file descriptor 1"):
        assert line in proc.stderr
    # with stderr closed, the copy of stdout had taken the free descriptor 2, and it all went there
    closed = subprocess.run([*deepsigns_argv(), "train", "--arch", "mlp", "--data", "test_image_data:chatty_digits",
                             "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "n.safetensors"), "--json"],
                            env=process_env({"PYTHONPATH": str(Path(__file__).parent)}), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, text=True, timeout=300, preexec_fn=lambda: os.close(2))
    assert closed.returncode == 0
    assert json.loads(closed.stdout)["data"] == "test_image_data:chatty_digits"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT],
                         ids=["SIGTERM", "SIGHUP", "SIGQUIT"])
def test_a_signal_to_the_process_group_stops_a_run_with_loader_processes_in_one_line(tmp_path, signum):
    """timeout(1), `kill -- -PGID`, a closed terminal or Ctrl-\\ signal the loader processes (--workers) too.
    Their deaths had been reported as well: torch's "DataLoader worker ... killed by signal"
    traceback after the line (every time), or, heard before the command's own signal, as a
    data-loading failure, exit 2."""
    loading, out = tmp_path / "loading", tmp_path / "m.safetensors"
    env = process_env({"PYTHONPATH": str(Path(__file__).parent), "DEEPSIGNS_TEST_LOADING": str(loading)})
    proc = subprocess.Popen([*deepsigns_argv(), "train", "--arch", "mlp", "--data", "dying_model:slow_data",
                             "--workers", "2", "--epochs", "50", "--device", "cpu", "--out", str(out)],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        for _ in range(1200):  # (the loader processes are loading samples)
            if loading.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        time.sleep(0.3)
        os.killpg(proc.pid, signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signum, stderr
    assert_one_error_line(stderr, stdout, "interrupted: no output was written")
    assert not out.exists() and partial_files(tmp_path) == []


def test_a_loader_death_met_while_reading_its_batch_is_still_one_line():
    """Under load the same death surfaced once as ConnectionResetError (the batch being read
    from the dead process), with torch's "DataLoader worker ... killed" as its context: exit 3."""
    from deepsigns_cli.errors import TrainingError
    from deepsigns_cli.training import TrainConfig, _machine_failure

    try:
        try:
            raise RuntimeError("DataLoader worker (pid 17531) is killed by signal: Killed.")
        except RuntimeError:
            raise ConnectionResetError(104, "Connection reset by peer")  # noqa: B904  (its context, as torch's)
    except ConnectionResetError as met:
        failure = _machine_failure(met, TrainConfig(workers=2))
    assert isinstance(failure, TrainingError) and "a data-loading process (--workers 2) ended" in str(failure)
    assert _machine_failure(ConnectionResetError(104, "Connection reset by peer"), TrainConfig()) is None


def test_factory_data_trains(tmp_path):
    data = load_data("test_image_data:tiny_digits")
    assert isinstance(data.x_train, Samples) and data.x_train.shape == (300, 1, 8, 8)
    assert data.num_classes == 10 and data.y_test.dtype == np.int64 and data.preprocess is None
    assert np.array_equal(data.x_test[:4], load_data("digits").x_train[300:304])
    report = run_json("train", "--arch", "cnn", "--data", "test_image_data:tiny_digits", "--epochs", 2,
                      "--device", "cpu", "--out", tmp_path / "f.safetensors")
    assert report["data"] == "test_image_data:tiny_digits" and report["test_accuracy"] > 30
    assert recorded_preprocess(tmp_path / "f.safetensors") is None


# ----------------------------------------------------------------------------- bad input


def _no_train(d: Path) -> None:
    shutil.rmtree(d / "train")


def _empty_class(d: Path) -> None:
    for p in (d / "train" / "3").iterdir():
        p.unlink()


def _unknown_test_class(d: Path) -> None:
    (d / "test" / "3").rename(d / "test" / "cat")


def _unknown_class_beside_a_newline(d: Path) -> None:
    for split in ("train", "test"):
        (d / split / "9").rename(d / split / "9\nnine")
    _unknown_test_class(d)


def _corrupt_image(d: Path) -> None:
    path = d / "test" / "5" / "000595.png"
    path.write_bytes(path.read_bytes()[:60])  # a truncated PNG


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    """A PNG chunk: its length, kind, body and CRC."""
    import struct
    import zlib

    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(pixels: np.ndarray, interlaced: bool = False, rows: int | None = None) -> bytes:
    """An RGB PNG of `pixels` (h, w, 3) written by hand (Pillow writes no interlaced PNG), its
    compressed image data ending cleanly after `rows` of its rows (all: None)."""
    import struct
    import zlib

    chunk = _png_chunk
    h, w, _ = pixels.shape
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    lines = [b"\0" + bytes(line) for x0, y0, dx, dy in (passes if interlaced else ((0, 0, 1, 1),))
             for line in pixels[y0::dy, x0::dx].astype(np.uint8).reshape(-1, 3 * len(range(x0, w, dx)))
             if len(line)]
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, int(interlaced))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(lines[:rows])))
            + chunk(b"IEND", b""))


def test_a_png_whose_image_data_end_early_is_unreadable_not_black(tmp_path):
    """Pillow fills the rows a PNG's cleanly ended data lack with black, and says nothing: such
    an image had trained as a mostly black one. Whole files, interlaced or not, read as written."""
    from deepsigns_cli.data import _decode

    pixels = np.random.default_rng(0).integers(0, 256, (13, 13, 3))  # (odd: passes of unequal rows)
    for interlaced in (False, True):
        whole, short = tmp_path / f"whole-{interlaced}.png", tmp_path / f"short-{interlaced}.png"
        whole.write_bytes(_png(pixels, interlaced))
        assert np.array_equal(np.rint(_decode(str(whole), 13, 3) * 255), pixels.transpose(2, 0, 1))
        short.write_bytes(_png(pixels, interlaced, rows=-3))
        with pytest.raises(DataError, match="image data end after .* bytes"):
            _decode(str(short), 13, 3)


def _short_image_data(d: Path) -> None:
    from PIL import Image

    path = d / "train" / "4" / "000004.png"
    path.write_bytes(_png(np.asarray(Image.open(path).convert("RGB")), rows=5))


def _short_jpeg_header(d: Path) -> None:
    """A small JPEG cut short within its header (a copy that stopped): Pillow cannot tell its
    format, and the message had called it another format, to be converted."""
    from PIL import Image

    path = d / "train" / "5" / "zz-cut.jpg"
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(path, quality=95)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) * 2 // 3])  # (within its header: Pillow tells no format)


def _not_an_image(d: Path) -> None:
    (d / "train" / "2" / "notes.jpg").write_bytes(b"these are not pixels\n")


def _no_images(d: Path) -> None:
    for p in (d / "train").rglob("*.png"):
        p.unlink()


def _bomb(d: Path) -> None:
    """A PNG of a few kilobytes whose header claims 6000 x 6000 pixels (Pillow itself accepts it)."""
    from PIL import Image

    Image.new("L", (6000, 6000)).save(d / "train" / "4" / "zz-bomb.png", optimize=True)


def _header_bomb(d: Path) -> None:
    """A PNG of a kilobyte whose header claims 100000 x 100000 pixels: Pillow refuses it as it
    opens it, under a limit of its own (178,956,970 pixels), which had been quoted."""
    import struct
    import zlib

    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0))
    data = _png_chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + _png_chunk(b"IEND", b"")
    (d / "train" / "4" / "zz-bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + data)


def _progressive_jpeg(size: int, repeat_last_scan: int = 1) -> bytes:
    """A progressive JPEG of a flat colour written by Pillow (libjpeg's progression: 10 scans),
    its last scan repeated: a decoder passes over the whole image once per scan."""
    import io
    import re

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (120, 60, 200)).save(buf, "JPEG", progressive=True, quality=50)
    data = buf.getvalue()
    last = [m.start() for m in re.finditer(b"\xff\xda", data)][-1]
    end = data.rindex(b"\xff\xd9")  # (the last scan runs to the end of image)
    return data[:last] + data[last:end] * repeat_last_scan + data[end:]


def _scan_bomb(d: Path) -> None:
    """A JPEG of 150 scans (a file of 8,000 scans, 1 MB, had taken minutes to decode, every epoch)."""
    (d / "train" / "4" / "zz-scans.jpg").write_bytes(_progressive_jpeg(64, 141))


def test_padded_pngs_within_the_limits_are_read(tmp_path):
    from deepsigns_cli.data import MAX_PNG_CHUNK, MAX_PNG_CHUNKS, _decode

    for name, padding in (("many", {"chunks": MAX_PNG_CHUNKS - 4}), ("big", {"body": MAX_PNG_CHUNK})):
        _padded_png(tmp_path / f"{name}.png", **padding)
        assert np.allclose(_decode(str(tmp_path / f"{name}.png"), 8, 1), 128 / 255)


def test_progressive_jpegs_as_encoders_write_them_are_read():
    from deepsigns_cli.data import MAX_JPEG_SCANS, _decode, _jpeg_scans

    for size, repeat in ((37, 1), (64, MAX_JPEG_SCANS - 9)):
        with tempfile.NamedTemporaryFile(suffix=".jpg") as f:
            f.write(_progressive_jpeg(size, repeat))
            f.flush()
            f.seek(0)
            assert _jpeg_scans(f) == 9 + repeat and f.tell() == 0
            pixels = _decode(f.name, 8, 3)
        assert np.allclose(pixels.mean((1, 2)), np.array([120, 60, 200]) / 255, atol=0.03)


def _padded_png(path: Path, chunks: int = 0, body: int = 0, kind: bytes = b"abCd") -> None:
    """An 8 x 8 grey PNG with `chunks` empty private chunks before its image data, or one chunk
    of kind `kind` and `body` zero bytes (sparse on disk: the file is extended, not written;
    Pillow checks its CRC)."""
    import struct
    import zlib

    chunk = _png_chunk
    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
    tail = chunk(b"IDAT", zlib.compress((b"\0" + b"\x80" * 8) * 8)) + chunk(b"IEND", b"")  # (8 rows of grey 128)
    with open(path, "wb") as f:
        f.write(head + chunk(b"abCd", b"") * chunks)
        if body:
            f.write(struct.pack(">I", body) + kind)
            f.truncate(f.tell() + body)  # (its body: zeros, not written)
            f.seek(0, os.SEEK_END)
            f.write(struct.pack(">I", zlib.crc32(bytes(body), zlib.crc32(kind))))
        f.write(tail)


def _chunk_flood(d: Path) -> None:
    """A PNG of 131,073 empty chunks (12 million, 144 MB, had taken minutes at every pass)."""
    from deepsigns_cli.data import MAX_PNG_CHUNKS

    _padded_png(d / "train" / "4" / "zz-flood.png", chunks=MAX_PNG_CHUNKS)


def _big_chunk(d: Path) -> None:
    """A private chunk of 16 MiB and a byte (one of 512 MiB had taken 1.6 GB of memory per decode)."""
    from deepsigns_cli.data import MAX_PNG_CHUNK

    _padded_png(d / "train" / "4" / "zz-padded.png", body=MAX_PNG_CHUNK + 1)


def _big_frame(d: Path) -> None:
    """An animated PNG's later frame (fdAT) of 16 MiB and a byte: Pillow reads it whole to pass it."""
    from deepsigns_cli.data import MAX_PNG_CHUNK

    _padded_png(d / "train" / "4" / "zz-frames.png", body=MAX_PNG_CHUNK + 1, kind=b"fdAT")


def _dangling_link(d: Path) -> None:
    (d / "train" / "6" / "zz-gone.png").symlink_to(d / "nowhere.png")


def _link_loop(d: Path) -> None:
    (d / "train" / "6" / "zz-a.png").symlink_to("zz-b.png")
    (d / "train" / "6" / "zz-b.png").symlink_to("zz-a.png")


def _dangling_class_link(d: Path) -> None:
    """A class folder that is a link to a volume not mounted: the class had been dropped unsaid, and the
    classes after it numbered one lower (in test/ too: otherwise test/3 was named, as a class train/ lacks)."""
    for split in ("train", "test"):
        shutil.rmtree(d / split / "3")
        (d / split / "3").symlink_to("/nowhere/3")


def _nested_images(d: Path) -> None:
    """Images in a folder inside a class folder (torchvision's ImageFolder reads them): passed over unsaid."""
    (d / "train" / "5" / "more").mkdir()
    for path in sorted((d / "train" / "5").glob("*.png"))[:3]:
        shutil.move(path, d / "train" / "5" / "more" / path.name)


def _class_link_loop(d: Path) -> None:
    (d / "train" / "zz").symlink_to("zz")


def _fifo(d: Path) -> None:
    os.mkfifo(d / "test" / "7" / "zz-pipe.jpg")


def _other_format(d: Path) -> None:
    """Pillow reads a BMP, deepsigns does not: passed over, it had trained the model on less, unsaid."""
    (d / "train" / "3" / "zz-scan.bmp").write_bytes(b"BM")


def _one_class(d: Path) -> None:
    for c in range(1, 10):
        shutil.rmtree(d / "train" / str(c))
        shutil.rmtree(d / "test" / str(c))


BAD_FOLDERS = {
    "no-train": (_no_train, ["no train/ folder", "DIR/train/<class>"]),
    "empty-class": (_empty_class, ["train/3", "holds no image"]),
    "unknown-test-class": (_unknown_test_class, ["test/cat", "not among train/'s classes"]),
    # (the list of classes had stopped at the newline, unsaid)
    "unknown-class-beside-a-newline": (_unknown_class_beside_a_newline, ["test/cat", "8, 9\\nnine)"]),
    "corrupt-image": (_corrupt_image, ["000595.png", "fails on an unreadable image rather than skip"]),
    "short-image-data": (_short_image_data, ["train/4/000004.png", "image data end after", "fails on an unreadable"]),
    "short-jpeg-header": (_short_jpeg_header, ["cannot read image", "train/5/zz-cut.jpg",
                                               "a JPEG file whose header is cut short", "repair or remove"]),
    "not-an-image": (_not_an_image, ["notes.jpg", "is not a PNG or JPEG file", "convert or remove"]),
    "no-images": (_no_images, ["no images at all"]),
    "one-class": (_one_class, ["1 class", "at least 2"]),
    "dangling-link": (_dangling_link, ["train/6/zz-gone.png", "is no file", "a link that leads nowhere"]),
    "link-loop": (_link_loop, ["train/6/zz-a.png", "is no file", "in a loop"]),
    "nested-images": (_nested_images, ["train/5/more", "a folder of images inside a class folder", "move them up"]),
    "dangling-class-link": (_dangling_class_link, ["train/3", "a link that leads nowhere", "mount", "remove it"]),
    # (it had said "check the folder's permissions")
    "class-link-loop": (_class_link_loop, ["cannot list", "train/zz", "check a loop of links"]),
    "fifo": (_fifo, ["test/7/zz-pipe.jpg", "is no file (a FIFO)", "rename or remove it"]),
    "other-format": (_other_format, ["train/3/zz-scan.bmp", "format deepsigns does not read", "convert it"]),
    "pixel-bomb": (_bomb, ["zz-bomb.png", "6000x6000", "more than 33554432 pixels"]),
    "header-bomb": (_header_bomb, ["zz-bomb.png", "of 10000000000 pixels, more than 33554432", "shrink or remove"]),
    "scan-bomb": (_scan_bomb, ["train/4/zz-scans.jpg", "more than 100 scans", "re-encode or remove"]),
    "chunk-flood": (_chunk_flood, ["train/4/zz-flood.png", "more than 131072 chunks", "re-encode or remove"]),
    "big-chunk": (_big_chunk, ["train/4/zz-padded.png", "chunk of 16777217 bytes", "re-encode or remove"]),
    "big-frame": (_big_frame, ["train/4/zz-frames.png", "chunk of 16777217 bytes", "re-encode or remove"]),
}


def test_sixteen_bit_images_read_as_their_eight_bit_twins(folder, tmp_path):
    """A 16-bit grayscale PNG (scans, medical images) is scaled from its own range: converted to
    8 bits, Pillow clipped it at 255 of 65535, and every such image turned white."""
    from PIL import Image

    narrow, wide = (Path(shutil.copytree(folder, tmp_path / name)) for name in ("narrow", "wide"))
    for path in sorted((narrow / "train").rglob("*.png"))[::40]:  # one image in 40, every class
        gray = np.asarray(Image.open(path).convert("L"), np.uint16)
        Image.fromarray(gray.astype(np.uint8)).save(path)  # 8 bits (mode L)
        twin = wide / path.relative_to(narrow)
        Image.fromarray(gray * 257).save(twin)  # the same picture in 16 bits
        assert Image.open(twin).mode in ("I;16", "I")
    ours = load_data(str(narrow))
    theirs = load_data(str(wide), preprocess=ours.preprocess)  # (normalised alike)
    assert np.abs(theirs.x_train[:] - ours.x_train[:]).max() < 1e-4


def _check_bad(tmp_path: Path, args: list, *needles: str) -> str:
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    line = assert_bad_input(run_cli(*args, code=None), *needles)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before, "a failed command wrote a file"
    assert partial_files(tmp_path) == []
    return line


def test_a_file_of_another_format_under_an_image_name_runs_nothing(folder, tmp_path):
    """An EPS file named .png: Pillow, left to guess the format, ran Ghostscript (an external
    program, here a stand-in that leaves a mark) on the adversary's file. Only the PNG and JPEG
    decoders are tried now, so it is refused like any unreadable image, as is a BMP named .png."""
    from PIL import Image

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ran = tmp_path / "ghostscript-ran"
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {ran}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    for name, write in {"zz-page.png": lambda p: p.write_bytes(
                            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n"),
                        "zz-bitmap.png": lambda p: Image.new("L", (8, 8)).save(p, format="BMP")}.items():
        imgs = _copy(folder, tmp_path / name)
        write(imgs / "train" / "4" / name)
        proc = run_proc("train", "--arch", "cnn", "--data", imgs, "--epochs", 1, "--out", tmp_path / "m.safetensors",
                        env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
        assert proc.returncode == 2, proc.stderr
        assert_one_error_line(proc.stderr, proc.stdout, name, "is not a PNG or JPEG file", "convert or remove")
        assert not ran.exists() and not (tmp_path / "m.safetensors").exists()


def test_stdout_sent_into_an_image_of_the_data_folder_by_any_name_is_refused(folder, tmp_path):
    """`>> imgs/train/3/x.png`, or a hard link to it elsewhere: the report had been appended to
    the training image, exit 0."""
    imgs = _copy(folder, tmp_path)
    image = sorted((imgs / "train" / "3").iterdir())[0]
    before = image.read_bytes()
    os.link(image, tmp_path / "notes.log")
    for into in (image, tmp_path / "notes.log"):
        with open(into, "ab") as stdout:
            proc = subprocess.run([*deepsigns_argv(), "train", "--arch", "mlp", "--data", str(imgs), "--epochs", "1",
                                   "--out", str(tmp_path / "m.safetensors")], env=process_env(),
                                  stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, text=True,
                                  timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert_one_error_line(proc.stderr, "", f"stdout is {image}", "the report would be written into it")
    assert image.read_bytes() == before and not (tmp_path / "m.safetensors").exists()


def test_an_image_replaced_by_a_fifo_or_a_huge_sparse_file_is_one_line_at_once(folder, tmp_path):
    """A FIFO put in an image's place while a command ran had stopped it for good (a plain
    open() waits for a writer); a sparse file of 8 GiB that takes 4 KB on disk had taken
    keygen's digest 38 s, its declared size setting what reading it costs."""
    from deepsigns_cli.data import MAX_IMAGE_BYTES, training_digest
    from deepsigns_cli.errors import DataError

    imgs = _copy(folder, tmp_path)
    data = load_data(str(imgs))  # (the folder checked as it was: the images are read later)
    name = sorted((imgs / "train" / "0").iterdir())[0]
    name.unlink()
    os.mkfifo(name)
    with pytest.raises(DataError, match="no longer a regular file"):
        data.x_train[[0]]
    name.unlink()
    with open(name, "wb") as f:
        f.truncate(MAX_IMAGE_BYTES + 1)
    for read in (lambda: data.x_train[[0]], lambda: training_digest(data)):
        with pytest.raises(DataError, match=f"more than the {MAX_IMAGE_BYTES} deepsigns reads in one image"):
            read()


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_bad_image_folders(folder, tmp_path, case):
    imgs = _copy(folder, tmp_path)
    spoil, needles = BAD_FOLDERS[case]
    spoil(imgs)
    _check_bad(tmp_path, ["train", "--arch", "cnn", "--data", imgs, "--epochs", 1,
                          "--out", tmp_path / "m.safetensors"], *needles)


def test_an_image_linked_into_a_folder_the_user_may_not_search_is_named_so(folder, tmp_path):
    """A link into a folder this user may not search had been called "no file (a folder, a
    link that leads nowhere or in a loop, a FIFO or a device)" (helper-62). As root, the
    process runs without the capabilities that pass over permissions (setpriv)."""
    imgs = _copy(folder, tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    shutil.copy(next((imgs / "train" / "5").iterdir()), locked / "real.png")
    (imgs / "train" / "5" / "zz-linked.png").symlink_to(locked / "real.png")
    argv = [*deepsigns_argv(), "train", "--arch", "cnn", "--data", str(imgs), "--epochs", "1", "--device", "cpu",
            "--out", str(tmp_path / "m.safetensors")]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root, and no setpriv to run without the capabilities that pass over permissions")
        argv = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                "--bounding-set=-dac_override,-dac_read_search", *argv]
    locked.chmod(0)
    try:
        proc = subprocess.run(argv, env=process_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=120)
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout, "train/5/zz-linked.png", "no file this user may reach",
                          "permission denied", "check the permissions of the folders it leads into")
    assert not (tmp_path / "m.safetensors").exists() and partial_files(tmp_path) == []


def test_an_output_inside_the_image_folder_is_refused(folder, tmp_path):
    """--force replaced a training image with the model, and every later use of the folder failed."""
    imgs = _copy(folder, tmp_path)
    image = next((imgs / "train" / "0").iterdir())
    before = image.read_bytes()
    _check_bad(tmp_path, ["train", "--arch", "cnn", "--data", imgs, "--epochs", 1, "--out", image, "--force"],
               "is inside the --data folder")
    assert image.read_bytes() == before


@pytest.mark.parametrize("size", [1, 5000])
def test_image_size_out_of_range(folder, tmp_path, size):
    _check_bad(tmp_path, ["train", "--arch", "cnn", "--data", folder, "--image-size", size,
                          "--out", tmp_path / "m.safetensors"], "--image-size", "2<=x<=2048")


def test_a_step_too_large_for_the_memory_is_one_line(folder, tmp_path, monkeypatch):
    """Training on the CPU may map only its share of the memory available when it starts: a
    step that needs more fails as an allocation (one line, exit 2, nothing written), where the
    kernel's out-of-memory killer had ended the command (exit 137, no line, a .part file left:
    a ResNet at --image-size 2048). Here 256 MiB stands in for the machine's memory. The limit
    is put back when training ends, and a step that fits in it trains."""
    import resource

    from deepsigns_cli import training

    before = resource.getrlimit(resource.RLIMIT_AS)
    monkeypatch.setattr(training, "MEMORY_LIMIT", 256 << 20)
    _check_bad(tmp_path, ["train", "--arch", "resnet", "--data", folder, "--image-size", 256, "--epochs", 1,
                          "--device", "cpu", "--out", tmp_path / "m.safetensors"],
               "out of memory while training", "lower --batch-size")
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    run_json("train", "--arch", "cnn", "--data", folder, "--epochs", 1, "--device", "cpu",
             "--out", tmp_path / "m.safetensors")
    assert resource.getrlimit(resource.RLIMIT_AS) == before


def test_a_containers_page_cache_is_memory_available(tmp_path, monkeypatch):
    """A container's memory.current counts the page cache, which it gives back on demand: one
    that had read its files (8 GiB allowed, 7.9 GiB 'used', 6 GiB of it inactive cache) left
    training its floor of 1 GiB, and an ordinary step failed as out of memory. The cgroup's
    files are stand-ins here (2 GiB allowed, 1.9 'used', 1.5 inactive: less than this machine
    has free, so the container's figure is the one given)."""
    from deepsigns_cli import memory

    for name, value in {"max": 2 << 30, "current": 1900 << 20}.items():
        (tmp_path / name).write_text(f"{value}\n")
    (tmp_path / "stat").write_text(f"anon 1000\nfile {1600 << 20}\ninactive_file {1536 << 20}\nactive_file 5\n")
    monkeypatch.setattr(memory, "_CGROUP_LIMITS", (str(tmp_path / "max"),))
    monkeypatch.setattr(memory, "_CGROUP_USAGE", (str(tmp_path / "current"),))
    monkeypatch.setattr(memory, "_CGROUP_STATS", ((str(tmp_path / "stat"), "inactive_file"),))
    assert memory.available_memory() == (2048 - 1900 + 1536) << 20
    monkeypatch.setattr(memory, "_CGROUP_STATS", ((str(tmp_path / "absent"), "inactive_file"),))
    assert memory.available_memory() == (2048 - 1900) << 20  # (no statistics: the usage as it is)


def test_image_size_applies_to_image_folders_only(tmp_path):
    _check_bad(tmp_path, ["train", "--arch", "mlp", "--data", "digits", "--image-size", 8,
                          "--out", tmp_path / "m.safetensors"], "--image-size applies to image folders")


@pytest.mark.parametrize(("spec", "needles"), [
    ("test_image_data:not_a_pair", ["must return two torch Datasets (train, test)", "TensorDataset"]),
    ("test_image_data:nothing_at_all", ["must return two torch Datasets", "got a tuple of 0: return"]),  # (of 0::)
    ("test_image_data:no_such_factory", ["cannot load data", "no_such_factory"]),
    ("no_such_module.data:make", ["cannot load data", "no_such_module"]),
    ("test_image_data:missing_column", ["data factory", "failed (KeyError: 'label')"]),
    ("test_image_data:exits", ["data factory", "failed (it called sys.exit(0))"]),
    # (a BaseException that is not an Exception had ended the command with a traceback, exit 1)
    ("test_image_data:panics", ["data factory", "failed (Panic: the library panicked)"]),
    # (it had said "(RuntimeError: )", its colon stray)
    ("test_image_data:fails_unsaid", ["data factory", "failed (RuntimeError): it is called"]),
    ("test_image_data:panicky_items", ["Dataset failed on item", "Panic: item"]),
    ("test_image_data:broken_items", ["the train Dataset failed on item 0", "ZeroDivisionError"]),
    ("test_image_data:bad_targets", ["the train Dataset's .targets failed", "labels are loaded lazily"]),
    ("test_image_data:huge_label", ["train item 0 has label 1180591620717411303424", "from 0 to"]),  # (exit 3)
    ("test_image_data:huge_length", ["claims 1000000000000 items", "at most that many"]),  # (exit 3: 7 TiB)
    # (exit 3, each: the user's code failing in our message, or as what the factory returned was read)
    ("test_image_data:unprintable_failure", ["failed (_Unprintable: <a _Unprintable that cannot be printed>)"]),
    ("test_image_data:label_of_its_own", ["the data it returned failed as they were read", "repr failed"]),
    ("test_image_data:splits_without_length", ["the data it returned failed as they were read", "len failed"]),
])
def test_bad_factories(tmp_path, spec, needles):
    _check_bad(tmp_path, ["train", "--arch", "cnn", "--data", spec, "--out", tmp_path / "m.safetensors"],
               *needles)


@pytest.mark.parametrize("field", [{"std": [0, 1, 1]}, {"std": [1e-8, 1, 1]}, {"std": [2, 1, 1]},
                                   {"mean": [999999.0, -999999.0, 999999.0]}, {"mean": [0.5, 0.5, -0.1]}],
                         ids=["std-0", "std-tiny", "std-2", "mean-millions", "mean-negative"])
def test_damaged_preprocessing_record(trained, folder, tmp_path, field):
    """A checkpoint's record is data from a file: checked field by field before it is used. A
    mean or std no pixels in [0, 1] have (a mean of 1e6) had normalised samples to millions,
    and keygen wrote GradSigns keys that embed refused as a damaged bundle."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(trained), framework="pt") as fh:
        meta, state = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    record = json.loads(meta["preprocess"])
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata={**meta, "preprocess": json.dumps({**record, **field})})
    _check_bad(tmp_path, ["keygen", "--model", bad, "--data", folder, "--scheme", "gradsigns", "--out",
                          tmp_path / "k.dskey"], "bad.safetensors", "image preprocessing", *field)


@pytest.mark.parametrize("lost", [ConnectionResetError(104, "Connection reset by peer"), EOFError()],
                         ids=["reset", "eof"])
def test_a_lost_connection_to_a_loader_process_is_its_death(lost):
    """Under load, a loader process killed after it had sent a batch surfaced as the connection
    to it lost (the batch's shared memory is fetched from the process that made it): exit 3, an
    internal error, with torch's own "DataLoader worker ... killed" as a second line. Without
    loader processes, such an error is not theirs."""
    from deepsigns_cli.training import TrainConfig, _machine_failure

    err = _machine_failure(lost, TrainConfig(workers=1))
    assert err is not None and "a data-loading process (--workers 1) ended" in str(err)
    assert _machine_failure(lost, TrainConfig(workers=0)) is None


def bn_net(input_shape, num_classes):
    """An --arch that normalises over the batch (BatchNorm1d)."""
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, num_classes))


def test_a_tail_batch_of_one_sample_trains_a_batchnorm_model(tmp_path):
    """The 1,348 training digits in batches of 449 left a last batch of one sample, which a
    BatchNorm layer cannot train on: an internal error (exit 3). It is topped up to two."""
    report = api.train("test_image_data:bn_net", tmp_path / "m.safetensors", epochs=1, batch_size=449, device="cpu")
    assert report.epochs == 1 and api.inspect(tmp_path / "m.safetensors").kind == "checkpoint"


def test_batches_of_one_sample_for_a_batchnorm_model_are_one_line(tmp_path):
    proc = run_proc("train", "--arch", "test_image_data:bn_net", "--data", "digits", "--batch-size", 1, "--epochs", 1,
                    "--device", "cpu", "--out", tmp_path / "m.safetensors",
                    env={"PYTHONPATH": str(Path(__file__).parent)})
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout, "normalises over the batch", "--batch-size of at least 2")
    assert list(tmp_path.iterdir()) == []


def test_a_forward_pass_outside_training_takes_large_samples_a_few_at_a_time():
    """The test set's accuracy, the keys' activations and gradients ran 1,024 samples at a time
    whatever their size: 300 test images of 96 x 96 cost the CNN 1.7 GiB more at the end of an
    epoch, and --batch-size could not lower it."""
    from deepsigns_cli.training import loss_gradient, predict
    from deepsigns_cli.zoo import CNN, EVAL_VALUES, activations

    torch.manual_seed(0)
    model, rows = CNN((3, 64, 64), 10), []
    model.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    x = np.random.default_rng(0).random((200, 3, 64, 64), dtype=np.float32)
    assert predict(model, x).shape == (200, 10)
    assert activations(model, "fc1", x).shape == (200, 128)
    assert loss_gradient(model, x[:20], 0).shape == (20, 3, 64, 64)
    assert max(rows) == EVAL_VALUES // (3 * 64 * 64) < 200 and sum(rows) == 420
    small, rows[:] = CNN((1, 8, 8), 10), []
    small.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    predict(small, np.zeros((3000, 1, 8, 8), np.float32))
    assert rows == [1024, 1024, 952]  # (small samples: as many as before)


def test_loader_processes_beyond_the_open_file_limit_are_one_line(tmp_path):
    """At `ulimit -n 24` --workers 2 had given the loader processes' tracebacks and an internal
    error, and at 20 a command that never ended (its loader processes streaming tracebacks). A
    soft limit below what they need is raised to it; a hard one is one line, nothing written."""
    import resource

    def limit(soft: int, hard: int):
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    out = tmp_path / "m.safetensors"
    argv = [*deepsigns_argv(), "train", "--arch", "mlp", "--epochs", "1", "--workers", "2", "--out", str(out)]
    proc = subprocess.run(argv, env=process_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit(24, 24))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert_one_error_line(proc.stderr, proc.stdout, "--workers 2 needs about", "ulimit -n", "fewer --workers")
    assert list(tmp_path.iterdir()) == []
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 128:
        return  # (this machine's own hard limit leaves no room to raise the soft one)
    proc = subprocess.run(argv, env=process_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit(24, hard))
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-2000:]
