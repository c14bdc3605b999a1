"""Bad input: exit 2, one line "error: ..." naming the problem, no traceback, nothing written.

Every case runs in its own tmp_path holding copies of its inputs; the folder must be exactly
as it was afterwards (no output, no *.part temp file, no input modified).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    ENV,
    assert_bad_input,
    assert_one_error_line,
    copy,
    deepsigns_argv,
    default_sigint,
    partial_files,
    reaped,
    run_cli,
    run_json,
    run_proc,
)

from deepsigns_cli import api
from deepsigns_cli.data import load_data

# ----------------------------------------------------------------------------- helpers


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under folder (hidden ones too) -> SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class Case:
    """The inputs of one bad-input case, copied into tmp_path."""

    def __init__(self, tmp_path: Path, marked):
        self.dir = tmp_path
        self.base = copy(marked.base, tmp_path / "base.safetensors")
        self.keys = copy(marked.keys, tmp_path / "owner.dskey")
        self.out_model = tmp_path / "out.safetensors"
        self.out_onnx = tmp_path / "out.onnx"
        self.out_keys = tmp_path / "new.dskey"

    def file(self, name: str, content: bytes) -> Path:
        path = self.dir / name
        path.write_bytes(content)
        return path

    def state_dict(self, name: str = "base.pt") -> Path:
        from deepsigns_cli.checkpoint import load_checkpoint

        model, _ = load_checkpoint(self.base)
        path = self.dir / name
        torch.save(model.state_dict(), path)
        return path

    def truncated(self) -> Path:
        data = self.base.read_bytes()
        return self.file("half.safetensors", data[: len(data) // 2])

    def flipped(self, offset: int) -> Path:
        data = bytearray(self.keys.read_bytes())
        data[offset % len(data)] ^= 0x01
        return self.file("flipped.dskey", bytes(data))

    def wide_npz(self) -> Path:
        """Samples with 20 features: no model of ours on 8x8 digits takes them."""
        rng = np.random.default_rng(0)
        path = self.dir / "wide.npz"
        np.savez(path, x=rng.random((120, 20), dtype=np.float32), y=rng.integers(0, 10, 120))
        return path

    # commands that read a model, each writing its output into the case folder
    def with_model(self, command: str, model: Path, *extra) -> list:
        return {
            "extract": ["extract", "--model", model, "--keys", self.keys],
            "export": ["export", model, "--out", self.out_onnx],
            "keygen": ["keygen", "--model", model, "--out", self.out_keys, "--seed", 0],
            "embed": ["embed", "--model", model, "--keys", self.keys, "--out", self.out_model,
                      "--epochs", 1],
        }[command] + list(extra)


def check_bad_input(tmp_path: Path, args: list, *needles: str, env: dict | None = None) -> str:
    before = snapshot(tmp_path)
    result = run_cli(*args, code=None, env=env)
    line = assert_bad_input(result, *needles)
    assert snapshot(tmp_path) == before, "a failed command wrote, removed or modified a file"
    assert partial_files(tmp_path) == []
    return line


MODEL_COMMANDS = ["extract", "export", "keygen", "embed"]

# ----------------------------------------------------------------------------- model files


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_missing_model_file(tmp_path, marked, command):
    case = Case(tmp_path, marked)
    check_bad_input(tmp_path, case.with_model(command, tmp_path / "nowhere.safetensors"),
                    "not found", "nowhere.safetensors")


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_text_file_is_not_a_checkpoint(tmp_path, marked, command):
    case = Case(tmp_path, marked)
    notes = case.file("notes.txt", b"my model is great\n")
    check_bad_input(tmp_path, case.with_model(command, notes), "notes.txt", "not a checkpoint")


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_random_bytes_named_safetensors(tmp_path, marked, command):
    case = Case(tmp_path, marked)
    noise = case.file("noise.safetensors", np.random.default_rng(0).bytes(4096))
    check_bad_input(tmp_path, case.with_model(command, noise), "noise.safetensors",
                    "not a readable .safetensors")


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_truncated_safetensors(tmp_path, marked, command):
    case = Case(tmp_path, marked)
    check_bad_input(tmp_path, case.with_model(command, case.truncated()), "half.safetensors",
                    "truncated")


@pytest.mark.parametrize("meta", [{}, {"arch": "mlp", "input_shape": "5", "num_classes": "10"},
                                  {"arch": "mlp", "input_shape": "[1, 8, 8]", "num_classes": "ten"}],
                         ids=["none", "shape-not-a-list", "classes-not-a-number"])
def test_safetensors_without_our_metadata(tmp_path, marked, meta):
    from safetensors.torch import save_file

    case = Case(tmp_path, marked)
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(path), metadata=meta)
    check_bad_input(tmp_path, case.with_model("extract", path), "foreign.safetensors",
                    "without deepsigns metadata", "--arch")
    line = check_bad_input(tmp_path, ["inspect", path], "foreign.safetensors", "without deepsigns metadata")
    assert "--arch" not in line  # (inspect has none to offer)


def test_random_bytes_named_onnx(tmp_path, marked):
    case = Case(tmp_path, marked)
    noise = case.file("noise.onnx", np.random.default_rng(1).bytes(4096))
    check_bad_input(tmp_path, case.with_model("extract", noise), "noise.onnx", "not an ONNX model")


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_state_dict_without_arch(tmp_path, marked, command):
    case = Case(tmp_path, marked)
    extra = ["--data", "digits"] if command == "export" else []
    check_bad_input(tmp_path, case.with_model(command, case.state_dict(), *extra), "base.pt",
                    "--arch")


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_state_dict_with_wrong_arch(tmp_path, marked, command):
    """Saved from an MLP, loaded as a CNN."""
    case = Case(tmp_path, marked)
    extra = ["--arch", "cnn"] + (["--data", "digits"] if command == "export" else [])
    check_bad_input(tmp_path, case.with_model(command, case.state_dict(), *extra),
                    "do not fit architecture 'cnn'", "--arch")


def test_state_dict_with_pickled_objects_is_refused(tmp_path, marked):
    """weights_only=True: a .pt holding arbitrary objects is refused, never unpickled."""
    case = Case(tmp_path, marked)
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "note": _Unpicklable()}, path)
    line = check_bad_input(tmp_path, case.with_model("extract", path, "--arch", "mlp"),
                           "evil.pt", "weights_only=True")
    assert "\x1b" not in line  # torch colours its message; ours is plain text


class _Unpicklable:
    def __reduce__(self):
        return (os.getpid, ())


def test_export_state_dict_needs_data_for_its_shape(tmp_path, marked):
    case = Case(tmp_path, marked)
    check_bad_input(tmp_path,
                    ["export", case.state_dict(), "--arch", "mlp", "--out", case.out_onnx],
                    "--data")


# ----------------------------------------------------------------------------- key bundles


@pytest.mark.parametrize("command", ["extract", "embed"])
def test_wrong_passphrase(tmp_path, marked, command):
    case = Case(tmp_path, marked)
    check_bad_input(tmp_path, case.with_model(command, case.base), "owner.dskey",
                    "wrong passphrase", "DEEPSIGNS_PASSPHRASE",
                    env={"DEEPSIGNS_PASSPHRASE": "nope"})


def test_wrong_passphrase_from_file(tmp_path, marked):
    case = Case(tmp_path, marked)
    pw = case.file("pw.txt", b"not the passphrase\n")
    check_bad_input(tmp_path, case.with_model("extract", case.base, "--passphrase-file", pw),
                    "wrong passphrase", env={"DEEPSIGNS_PASSPHRASE": None})


def test_passphrase_file_that_is_not_text(tmp_path, marked):
    case = Case(tmp_path, marked)
    pw = case.file("pw.bin", b"\xff\xfe\x00\x81")
    check_bad_input(tmp_path, case.with_model("extract", case.base, "--passphrase-file", pw),
                    "pw.bin", "UTF-8")


@pytest.mark.parametrize("command", ["extract", "keygen"])
def test_passphrase_variable_that_is_not_text(tmp_path, marked, command):
    """Bytes that are not UTF-8 (they reach Python as surrogates): keygen ended with an internal
    error, extract blamed the bundle's KDF parameters."""
    case = Case(tmp_path, marked)
    check_bad_input(tmp_path, case.with_model(command, case.base), "DEEPSIGNS_PASSPHRASE is not UTF-8",
                    env={"DEEPSIGNS_PASSPHRASE": "a\udcff\udcfeb"})


def test_missing_passphrase_file(tmp_path, marked):
    """(its name is not shown: test_contract's passphrase typed where the file's name belongs)"""
    case = Case(tmp_path, marked)
    check_bad_input(tmp_path, case.with_model("extract", case.base, "--passphrase-file",
                                              tmp_path / "pw.txt"), "not found", "--passphrase-file")


@pytest.mark.parametrize("kind", ["a folder", "a huge file"])
def test_a_passphrase_file_that_is_no_such_file(tmp_path, marked, kind):
    """A folder had been reported as 'not found'; a 2 GiB file was read whole (6 GB of memory,
    then an internal error). (A FIFO is read: tests/test_passphrase.py.)"""
    import tempfile

    case = Case(tmp_path, marked)
    with tempfile.TemporaryDirectory() as elsewhere:  # (not in tmp_path, whose files the check reads)
        pw = Path(elsewhere) / "pw"
        if kind == "a folder":
            pw.mkdir()
        else:
            with pw.open("wb") as f:  # (sparse: it costs nothing on disk)
                f.truncate(2**31)
        needle = {"a folder": "not a regular file", "a huge file": "64 KiB"}[kind]
        check_bad_input(tmp_path, case.with_model("extract", case.base, "--passphrase-file", pw),
                        "pw", needle, "--passphrase-file", env={"DEEPSIGNS_PASSPHRASE": None})


@pytest.mark.parametrize("command", ["extract", "keygen"])
def test_an_empty_passphrase_file_path_is_named(tmp_path, marked, command):
    """`--passphrase-file "$UNSET"`: extract had opened the bundle with DEEPSIGNS_PASSPHRASE instead,
    keygen had refused its output as 'inside the --passphrase-file folder' (the path '.')."""
    case = Case(tmp_path, marked)
    check_bad_input(tmp_path, case.with_model(command, case.base, "--passphrase-file", ""),
                    "--passphrase-file is empty")


def test_no_passphrase_with_stdin_closed(tmp_path, marked):
    """No passphrase and no stdin at all (Python's sys.stdin is None): exit 3 before."""
    case = Case(tmp_path, marked)
    proc = subprocess.run([*deepsigns_argv(), *map(str, case.with_model("extract", case.base))],
                          env={k: v for k, v in {**os.environ, **ENV}.items() if k != "DEEPSIGNS_PASSPHRASE"},
                          capture_output=True, text=True, preexec_fn=lambda: os.close(0), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout, "no passphrase", "or pass --passphrase-file")


def test_no_attacker_passphrase_names_the_option_that_gives_it(tmp_path, marked):
    """attack overwrite had said "pass --passphrase-file", which it then refused (that option
    goes with --sweep): the attacker's passphrase comes through --attacker-passphrase-file."""
    out = tmp_path / "over.safetensors"
    proc = subprocess.run([*deepsigns_argv(), "attack", "overwrite", "--model", str(marked.marked),
                           "--attacker-keys", str(tmp_path / "thief.dskey"), "--out", str(out)],
                          env={k: v for k, v in {**os.environ, **ENV}.items() if k != "DEEPSIGNS_PASSPHRASE"},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout, "no passphrase", "or pass --attacker-passphrase-file")
    assert not out.exists() and not (tmp_path / "thief.dskey").exists()


def _header_offsets(path: Path) -> dict[str, int]:
    """Byte offsets (in the sealed file) of places inside the public header."""
    data = path.read_bytes()
    (n,) = struct.unpack(">I", data[8:12])
    header = json.loads(data[12 : 12 + n])
    return {
        "magic": 2,
        "length": 10,
        "opening-brace": 12,
        "field-name": data.index(b'"cipher"') + 2,
        "key-id": data.index(header["key_id"].encode()) + 3,
        "salt": data.index(header["kdf"]["salt"].encode()) + 2,
        "kdf-n": data.index(b'"n": ') + 6,  # the second digit of scrypt's cost
        "schemes": data.index(b'"hidden"') + 2,
        "nonce": 12 + n + 3,
    }


HEADER_PLACES = ["magic", "length", "opening-brace", "field-name", "key-id", "salt", "kdf-n",
                 "schemes", "nonce"]


@pytest.mark.parametrize("place", HEADER_PLACES)
@pytest.mark.parametrize("command", ["extract", "embed"])
def test_bundle_with_a_flipped_header_byte(tmp_path, marked, place, command):
    case = Case(tmp_path, marked)
    flipped = case.flipped(_header_offsets(case.keys)[place])
    args = case.with_model(command, case.base)
    args[args.index(case.keys)] = flipped
    line = check_bad_input(tmp_path, args, "flipped.dskey")
    assert re.search(r"tampered|damaged", line), line


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("command", ["extract", "embed"])
def test_bundle_with_a_flipped_ciphertext_byte(tmp_path, marked, where, command):
    case = Case(tmp_path, marked)
    data = case.keys.read_bytes()
    (n,) = struct.unpack(">I", data[8:12])
    start = 12 + n + 12  # after the header and the nonce
    offset = {"first": start, "middle": (start + len(data)) // 2, "last": len(data) - 1}[where]
    flipped = case.flipped(offset)
    args = case.with_model(command, case.base)
    args[args.index(case.keys)] = flipped
    check_bad_input(tmp_path, args, "flipped.dskey", "wrong passphrase or tampered bundle")


def _with_header(path: Path, edit) -> bytes:
    """The sealed file with its (public) header edited and re-framed; the seal is not redone."""
    data = path.read_bytes()
    (n,) = struct.unpack(">I", data[8:12])
    header = json.loads(data[12 : 12 + n])
    edit(header)
    head = json.dumps(header, sort_keys=True).encode()
    return data[:8] + struct.pack(">I", len(head)) + head + data[12 + n :]


@pytest.mark.parametrize("kdf", [{"n": 2**24}, {"r": 1024}, {"p": 64}, {"length": 4096},
                                 {"name": "pbkdf2"}, {"n": "32768"}],
                         ids=["n", "r", "p", "length", "name", "type"])
def test_bundle_header_asking_for_a_ruinous_kdf(tmp_path, marked, kdf):
    """A tampered KDF cost is refused before any work: no minutes-long, gigabyte-hungry scrypt
    (n = 2^24 takes over a minute and 16 GiB) just to find the seal broken."""
    case = Case(tmp_path, marked)
    path = case.file("costly.dskey", _with_header(case.keys, lambda h: h["kdf"].update(kdf)))
    args = case.with_model("extract", case.base)
    args[args.index(case.keys)] = path
    check_bad_input(tmp_path, args, "costly.dskey", "KDF parameters are damaged")


@pytest.mark.parametrize("place", ["field-name", "opening-brace", "magic"])
def test_inspect_bundle_with_a_damaged_header(tmp_path, marked, place):
    """inspect reads the public header only, and still refuses one that is damaged."""
    case = Case(tmp_path, marked)
    flipped = case.flipped(_header_offsets(case.keys)[place])
    check_bad_input(tmp_path, ["inspect", flipped], "flipped.dskey")


def test_file_that_is_not_a_bundle(tmp_path, marked):
    case = Case(tmp_path, marked)
    args = case.with_model("extract", case.base)
    args[args.index(case.keys)] = case.base
    check_bad_input(tmp_path, args, "base.safetensors", "not a deepsigns key bundle")


def test_embed_with_keys_made_for_another_architecture(tmp_path, marked, cnn):
    case = Case(tmp_path, marked)
    other = copy(cnn[0], tmp_path / "cnn.safetensors")
    check_bad_input(tmp_path, case.with_model("embed", other),
                    "the keys were made for architecture 'mlp', this model is 'cnn': embed into the model")


@pytest.mark.parametrize("command", ["extract", "keygen", "embed"])
def test_no_passphrase_and_no_terminal(tmp_path, marked, command):
    case = Case(tmp_path, marked)
    check_bad_input(tmp_path, case.with_model(command, case.base), "no passphrase",
                    "DEEPSIGNS_PASSPHRASE", env={"DEEPSIGNS_PASSPHRASE": None})


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("command", ["keygen", "embed", "export"])
def test_data_that_does_not_fit_the_model(tmp_path, marked, command):
    case = Case(tmp_path, marked)
    args = case.with_model(command, case.base, "--data", case.wide_npz())
    check_bad_input(tmp_path, args, "wide", "[20]", "[1, 8, 8]")


def test_image_architecture_on_flat_data(tmp_path):
    np.savez(tmp_path / "wide.npz", x=np.zeros((40, 20), np.float32), y=np.arange(40) % 4)
    check_bad_input(tmp_path, ["train", "--arch", "cnn", "--data", tmp_path / "wide.npz",
                               "--epochs", 1, "--out", tmp_path / "m.safetensors"],
                    "[20]", "--arch mlp")


def test_test_labels_beyond_the_model_classes(tmp_path, marked):
    case = Case(tmp_path, marked)
    rng = np.random.default_rng(0)
    x = rng.random((80, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "labels.npz", x_train=x, y_train=np.arange(80) % 10, x_test=x[:20],
             y_test=np.arange(20) % 13)
    args = case.with_model("keygen", case.base, "--data", tmp_path / "labels.npz")
    check_bad_input(tmp_path, args, "labels up to 12", "10 classes")


def test_embed_on_data_without_the_keys_target_classes(tmp_path, marked):
    """The hidden mark is taught on the batches' own samples of the keys' target classes: data
    without them ran every epoch, rewrote the bundle and wrote a model that reads as unmarked."""
    case = Case(tmp_path, marked)
    data = load_data("digits")
    two = tmp_path / "two-classes.npz"
    keep_train, keep_test = data.y_train < 2, data.y_test < 2  # (the keys hold 3 target classes)
    np.savez(two, x_train=data.x_train[keep_train], y_train=data.y_train[keep_train],
             x_test=data.x_test[keep_test], y_test=data.y_test[keep_test])
    check_bad_input(tmp_path, case.with_model("embed", case.base, "--data", two), "hold no sample of class",
                    "the data the keys were made with")


def test_npz_without_the_expected_arrays(tmp_path):
    np.savez(tmp_path / "odd.npz", features=np.zeros((10, 4), np.float32))
    check_bad_input(tmp_path, ["train", "--arch", "mlp", "--data", tmp_path / "odd.npz",
                               "--out", tmp_path / "m.safetensors"], "odd.npz", "x_train", "x, y")


def test_missing_data_file(tmp_path):
    check_bad_input(tmp_path, ["train", "--arch", "mlp", "--data", tmp_path / "none.npz",
                               "--out", tmp_path / "m.safetensors"], "none.npz", "not found")


# ----------------------------------------------------------------------------- options


def test_layer_that_does_not_exist(tmp_path, marked):
    from deepsigns_cli.checkpoint import load_checkpoint
    from deepsigns_cli.zoo import layer_names

    case = Case(tmp_path, marked)
    line = check_bad_input(tmp_path, case.with_model("keygen", case.base, "--layer", "fc9"),
                           "'fc9'", "--layer")
    listed = line.split("--layer from", 1)[1]
    names = layer_names(load_checkpoint(case.base)[0])
    assert {"fc1", "fc2", "head", "head:input"} <= set(names)
    assert [n.strip() for n in listed.split(",")] == names


def test_a_layer_no_weight_computes_is_no_carrier(tmp_path, marked):
    """The model's input cannot be marked (keygen had taken it; embed then trained to its cap and
    read half the bits wrong)."""
    case = Case(tmp_path, marked)
    check_bad_input(tmp_path, case.with_model("keygen", case.base, "--layer", "fc1:input"),
                    "layer 'fc1:input' is computed by no trainable weight", "--layer")


def test_empty_message(tmp_path, marked):
    """An empty --message is a mistake, not a request for random bits."""
    case = Case(tmp_path, marked)
    check_bad_input(tmp_path, case.with_model("keygen", case.base, "--message", ""),
                    "--message is empty")


def test_more_bits_than_the_layer_carries(tmp_path, marked):
    case = Case(tmp_path, marked)
    check_bad_input(tmp_path, case.with_model("keygen", case.base, "--bits", 1000),
                    "1000 bits", "512 units", "--bits")


def test_message_longer_than_the_layer_carries(tmp_path, marked):
    case = Case(tmp_path, marked)
    check_bad_input(tmp_path, case.with_model("keygen", case.base, "--message", "x" * 65),
                    "520 bits", "--message")


def test_the_default_classes_on_a_model_of_three_classes(tmp_path):
    """The default of 3 target classes on a 3-class model was refused as "--classes must be
    between 1 and 2, got 3", an option the user never gave."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "three.npz", x=rng.random((90, 8), dtype=np.float32), y=np.arange(90) % 3)
    api.train("mlp", tmp_path / "m.safetensors", data=str(tmp_path / "three.npz"), epochs=1, seed=0, device="cpu")
    check_bad_input(tmp_path, ["keygen", "--model", tmp_path / "m.safetensors", "--data", tmp_path / "three.npz",
                               "--out", tmp_path / "k.dskey"],
                    "--classes (default 3) must be between 1 and 2 for a model of 3 classes", "--classes 2 or fewer")


def test_unknown_architecture(tmp_path):
    check_bad_input(tmp_path, ["train", "--arch", "transformer9000", "--epochs", 1,
                               "--out", tmp_path / "m.safetensors"], "transformer9000", "mlp")


def test_user_architecture_module_with_a_syntax_error(tmp_path, monkeypatch):
    (tmp_path / "broken_arch_mod.py").write_text("def make(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    check_bad_input(tmp_path, ["train", "--arch", "broken_arch_mod:make", "--epochs", 1,
                               "--out", tmp_path / "m.safetensors"],
                    "broken_arch_mod:make", "invalid syntax")


ODD_LAYERS = """
import torch
from torch import nn

class Pair(nn.Module):
    def forward(self, x):
        return x, x * 2

class Model(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc1, self.pair, self.head = nn.Linear(64, 64), Pair(), nn.Linear(64, num_classes)
        self.aux = nn.Linear(64, 64)  # the last Linear registered, never run

    def forward(self, x):
        a, b = self.pair(torch.relu(self.fc1(x.flatten(1))))
        return self.head(a + b)
"""


@pytest.mark.parametrize("layer, needles", [
    (None, ("layer 'aux:input' is not run by the model's forward pass", "choose another --layer")),
    ("aux", ("layer 'aux' is not run",)),
    ("pair", ("layer 'pair' gives a tuple, not one tensor", "choose another --layer")),
])
def test_a_layer_the_model_does_not_run_or_that_gives_no_tensor(tmp_path, monkeypatch, layer, needles):
    """(keygen had exited 3: KeyError 'act', or a tuple has no attribute 'flatten')"""
    (tmp_path / "odd_layer_mod.py").write_text(ODD_LAYERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    api.train("odd_layer_mod:Model", tmp_path / "m.safetensors", epochs=1, seed=0, device="cpu")
    args = ["keygen", "--model", tmp_path / "m.safetensors", "--arch", "odd_layer_mod:Model", "--scheme", "hidden",
            "--bits", 16, "--out", tmp_path / "k.dskey"]
    check_bad_input(tmp_path, args + (["--layer", layer] if layer else []), *needles)


NO_ONNX = """
import os

import torch
from torch import nn

class Model(nn.Module):  # torch.fft has no form in ONNX opset 17
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc1, self.head = nn.Linear(64, 64), nn.Linear(64, num_classes)

    def forward(self, x):
        if self.training and os.environ.get("NO_ONNX_TRAINED"):
            open(os.environ["NO_ONNX_TRAINED"], "w").close()
        return torch.fft.fft(self.head(torch.relu(self.fc1(x.flatten(1))))).real
"""


def test_a_model_that_cannot_be_exported_is_one_line_and_embed_fails_before_training(tmp_path, monkeypatch):
    """(export had exited 3 after torch's exporter printed its graph, 16 lines; embed --onnx did so
    after the whole fine-tuning)"""
    from helpers import PASSPHRASE

    (tmp_path / "no_onnx_mod.py").write_text(NO_ONNX)
    monkeypatch.syspath_prepend(str(tmp_path))
    env = {**ENV, "PYTHONPATH": str(tmp_path)}
    base, keys = tmp_path / "m.safetensors", tmp_path / "k.dskey"
    api.train("no_onnx_mod:Model", base, epochs=1, seed=0, device="cpu")
    api.keygen(base, keys, PASSPHRASE, schemes=["hidden"], options={"bits": 16}, arch="no_onnx_mod:Model")
    before = snapshot(tmp_path)
    proc = run_proc("export", base, "--arch", "no_onnx_mod:Model", "--out", tmp_path / "m.onnx", env=env)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout, "cannot be exported to ONNX", "aten::fft_fft")
    proc = run_proc("embed", "--model", base, "--arch", "no_onnx_mod:Model", "--keys", keys, "--device", "cpu",
                    "--out", tmp_path / "marked.safetensors", "--onnx", tmp_path / "marked.onnx",
                    env={**env, "NO_ONNX_TRAINED": str(tmp_path / "trained")})
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout, "cannot be exported to ONNX")
    assert snapshot(tmp_path) == before and partial_files(tmp_path) == []


BRANCHES = """
import torch
from torch import nn

class Model(nn.Module):  # one path for ordinary inputs, another for inputs the parity check never sends
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc1, self.head = nn.Linear(64, 64), nn.Linear(64, num_classes)

    def forward(self, x):
        h = torch.relu(self.fc1(x.flatten(1)))
        if x.sum() > 1e6:
            return self.head(h) * 1000
        return self.head(h)
"""


def test_an_export_that_traced_one_path_of_a_branching_forward_says_so(tmp_path, monkeypatch):
    """(written without a word: the ONNX file answered 1e3 apart from the checkpoint on inputs
    that took the other branch)"""
    (tmp_path / "branch_mod.py").write_text(BRANCHES)
    monkeypatch.syspath_prepend(str(tmp_path))
    api.train("branch_mod:Model", tmp_path / "m.safetensors", epochs=1, seed=0, device="cpu")
    result = run_cli("export", tmp_path / "m.safetensors", "--arch", "branch_mod:Model", "--out", tmp_path / "m.onnx",
                     "--json")
    (warning,) = json.loads(result.stdout)["warnings"]
    assert "follows the path the export's inputs took" in warning and f"warning: {warning[:40]}" in result.stderr
    assert (tmp_path / "m.onnx").exists()


TIED = """
import torch
from torch import nn

class Model(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 64), nn.Linear(64, 64)
        self.fc3 = self.fc2  # one layer under two names: its tensors are shared
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.head(torch.relu(self.fc3(torch.relu(self.fc2(x)))))
"""


TIED_WEIGHTS = """
from torch import nn

class Model(nn.Module):  # two layers, one weight
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.pre, self.enc = nn.Linear(64, 48), nn.Linear(48, 32)
        self.mid, self.mid2, self.head = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, num_classes)
        self.mid2.weight = self.mid.weight

    def forward(self, x):
        h = self.enc(self.pre(x.flatten(1)).relu()).relu()
        return self.head(self.mid2(self.mid(h).relu()).relu())
"""


def test_permute_leaves_the_units_of_tied_layers_alone(tmp_path, monkeypatch):
    """(it had shuffled a layer whose weight another layer shares, changed the model's function
    and exited 3)"""
    (tmp_path / "tied_weights_mod.py").write_text(TIED_WEIGHTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = tmp_path / "m.safetensors"
    api.train("tied_weights_mod:Model", base, epochs=1, seed=0, device="cpu")
    report = run_json("attack", "permute", "--model", base, "--arch", "tied_weights_mod:Model",
                      "--out", tmp_path / "p.safetensors")
    assert list(report["params"]["units_permuted"]) == ["pre"] and report["params"]["max_output_diff"] < 1e-3


def test_an_architecture_whose_layers_share_weights_trains_embeds_and_is_read(tmp_path, monkeypatch):
    """(train had exited 3: safetensors writes no tensor that shares memory with another)"""
    from helpers import PASSPHRASE

    from deepsigns_cli.checkpoint import load_checkpoint

    (tmp_path / "tied_mod.py").write_text(TIED)
    monkeypatch.syspath_prepend(str(tmp_path))
    base, keys, marked = tmp_path / "m.safetensors", tmp_path / "k.dskey", tmp_path / "marked.safetensors"
    api.train("tied_mod:Model", base, epochs=3, seed=0, device="cpu")
    api.keygen(base, keys, PASSPHRASE, schemes=["hidden"], options={"bits": 16}, seed=0, arch="tied_mod:Model")
    api.embed(base, keys, PASSPHRASE, marked, seed=0, device="cpu", arch="tied_mod:Model")
    model, _ = load_checkpoint(marked, arch="tied_mod:Model")
    assert model.fc3 is model.fc2 and torch.equal(model.fc3.weight, model.fc2.weight)
    assert run_json("extract", "--model", marked, "--arch", "tied_mod:Model", "--keys", keys)["detected"] is True


def test_int8_quantization_of_tied_weights_is_refused(tmp_path, monkeypatch):
    """onnxruntime's int8 quantizer transposed a shared square weight once per layer that uses
    it: one layer then computed W x for W^T x, the accuracy halved, and the report gave a weight
    change of 0.4% (int8 rounding, it said)."""
    from helpers import assert_bad_input

    monkeypatch.syspath_prepend(str(tmp_path))
    for module, source, layer in (("tied_mod", TIED, "fc3"), ("tied_weights_mod", TIED_WEIGHTS, "mid2")):
        (tmp_path / f"{module}.py").write_text(source)
        base, arch = tmp_path / f"{module}.safetensors", f"{module}:Model"
        api.train(arch, base, epochs=1, seed=0, device="cpu")
        out = tmp_path / f"{module}.onnx"
        assert_bad_input(run_cli("attack", "quantize", "--model", base, "--arch", arch, "--out", out, code=None),
                         "int8", "shared", layer, "--out .safetensors")
        assert not out.exists()
        run_cli("attack", "quantize", "--model", base, "--arch", arch, "--bits", 8,
                "--out", tmp_path / f"{module}-q.safetensors", code=0)


def test_a_process_forked_from_the_command_dies_of_sigterm_as_it_would_have():
    """A loader process (--workers) still starting when SIGTERM reached the whole process group
    ran the command's handler, inherited through fork, and printed "Process ...: Traceback
    ... Interrupted" before the command's one line."""
    from deepsigns_cli.cli import main

    pid = os.fork()
    if pid == 0:  # (the child: whatever happens, it ends here)
        try:
            signal.signal(signal.SIGTERM, main._terminate)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except BaseException:
            os._exit(7)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status


USER_MODELS = """
import torch
from torch import nn

class Scores(nn.Module):
    def __init__(self, input_shape, num_classes, width=None, fail=False, pair=False):
        super().__init__()
        self.fc = nn.Linear(64, width or num_classes)
        self.fail, self.pair = fail, pair

    def forward(self, x):
        if self.fail:
            raise ValueError("boom")
        out = self.fc(x.flatten(1))
        return (out, x) if self.pair else out

def boom(input_shape, num_classes):
    return Scores(input_shape, num_classes, fail=True)

def pair(input_shape, num_classes):
    return Scores(input_shape, num_classes, pair=True)

def seven(input_shape, num_classes):
    return Scores(input_shape, num_classes, width=7)

def twelve(input_shape, num_classes):
    return Scores(input_shape, num_classes, width=12)
"""


@pytest.mark.parametrize(("factory", "needles"), [
    ("boom", ["fails on a batch of inputs of shape [1, 8, 8]", "ValueError: boom", "fix its forward"]),
    ("pair", ["answers a batch of 2 inputs with tuple", "10 scores per input"]),
    ("seven", ["a tensor of shape [2, 7]", "[2, 10]"])])
def test_a_user_model_that_misbehaves_is_the_users_to_fix(tmp_path, monkeypatch, factory, needles):
    """Its forward raising, giving a tuple (logits, features) or the wrong number of scores had
    failed deep in training as an internal error of deepsigns (exit 3)."""
    (tmp_path / "user_models.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    check_bad_input(tmp_path, ["train", "--arch", f"user_models:{factory}", "--epochs", 1,
                               "--out", tmp_path / "m.safetensors"], f"user_models:{factory}", *needles)


def test_a_user_model_with_more_scores_than_classes_still_trains(tmp_path, monkeypatch):
    """A head wider than the data's classes (a factory that keeps its 1000-class head) trains
    and reads as it did before the probe of a factory's model."""
    (tmp_path / "user_models.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    report = run_json("train", "--arch", "user_models:twelve", "--epochs", 1, "--device", "cpu",
                      "--out", tmp_path / "m.safetensors")
    assert report["test_accuracy"] > 0 and (tmp_path / "m.safetensors").is_file()


def test_arch_kwargs_that_are_not_json(tmp_path):
    check_bad_input(tmp_path, ["train", "--arch", "mlp", "--arch-kwargs", "{hidden: 3}",
                               "--epochs", 1, "--out", tmp_path / "m.safetensors"],
                    "--arch-kwargs", "JSON")


# ----------------------------------------------------------------------------- outputs


def _output_cases(case: Case) -> dict[str, tuple[list, Path]]:
    """command -> (arguments, the output they write)."""
    return {
        "train": (["train", "--arch", "mlp", "--epochs", 1, "--out", case.out_model],
                  case.out_model),
        "keygen": (case.with_model("keygen", case.base), case.out_keys),
        "embed": (case.with_model("embed", case.base), case.out_model),
        "export": (case.with_model("export", case.base), case.out_onnx),
    }


@pytest.mark.parametrize("command", ["train", "keygen", "embed", "export"])
def test_existing_output_needs_force(tmp_path, marked, command):
    case = Case(tmp_path, marked)
    args, out = _output_cases(case)[command]
    out.write_bytes(b"precious\n")
    check_bad_input(tmp_path, args, out.name, "exists", "--force")
    assert out.read_bytes() == b"precious\n"


@pytest.mark.parametrize("command", ["train", "keygen", "embed", "export"])
def test_force_replaces_an_existing_output(tmp_path, marked, command):
    case = Case(tmp_path, marked)
    args, out = _output_cases(case)[command]
    out.write_bytes(b"precious\n")
    run_cli(*args, "--force")
    assert out.read_bytes() != b"precious\n"
    facts = json.loads(run_cli("inspect", out, "--json").stdout)  # a real file of ours now
    assert facts["kind"] == {".safetensors": "checkpoint", ".dskey": "key bundle",
                             ".onnx": "onnx"}[out.suffix]
    assert partial_files(tmp_path) == []


@pytest.mark.parametrize("command,option", [("export", "CHECKPOINT"), ("keygen", "--model"),
                                            ("embed", "--model"), ("embed", "--keys")])
def test_force_never_overwrites_an_input(tmp_path, marked, command, option):
    """"Inputs are never modified": not even --force may write the output over an input."""
    case = Case(tmp_path, marked)
    args = case.with_model(command, case.base)
    target = case.keys if option == "--keys" else case.base
    out_index = args.index("--out") + 1
    args[out_index] = target
    check_bad_input(tmp_path, [*args, "--force"], "input", "another output")


def test_output_folder_that_does_not_exist(tmp_path, marked):
    case = Case(tmp_path, marked)
    check_bad_input(tmp_path, ["export", case.base, "--out", tmp_path / "no" / "m.onnx"],
                    "does not exist")


# ----------------------------------------------------------------------------- real processes


@pytest.mark.parametrize("what", ["missing-model", "truncated", "wrong-passphrase",
                                  "wide-data", "no-passphrase"])
def test_bad_input_in_a_real_process(tmp_path, marked, what):
    """The same contract from the installed `deepsigns` script: nothing else on stderr
    (no warning, no progress residue), exit 2, nothing written."""
    case = Case(tmp_path, marked)
    args, env, needles = {
        "missing-model": (case.with_model("extract", tmp_path / "gone.safetensors"), {},
                          ["not found"]),
        "truncated": (case.with_model("embed", case.truncated()), {}, ["truncated"]),
        "wrong-passphrase": (case.with_model("extract", case.base),
                             {"DEEPSIGNS_PASSPHRASE": "nope"}, ["wrong passphrase"]),
        "wide-data": (case.with_model("embed", case.base, "--data", case.wide_npz()), {},
                      ["[20]"]),
        "no-passphrase": (case.with_model("keygen", case.base), {"DEEPSIGNS_PASSPHRASE": None},
                          ["no passphrase"]),
    }[what]
    before = snapshot(tmp_path)
    proc = run_proc(*args, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert_one_error_line(proc.stderr, proc.stdout, *needles)
    assert snapshot(tmp_path) == before


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_python_runs_a_finaliser_still_stops_the_command(tmp_path, signum):
    """A signal's exception raised while Python runs a callback (a finaliser; those it runs
    around os.fork, which an attack sweep does for every ONNX reading) cannot be raised there:
    Python printed it, "Exception ignored in" and a traceback, and the command went on to the
    end (exit 0). The signal is sent again, and stops the command where it can."""
    out = tmp_path / "m.safetensors"
    env = {**os.environ, **ENV, "PYTHONPATH": str(Path(__file__).parent), "DEEPSIGNS_TEST_SIGNAL": str(int(signum))}
    proc = subprocess.run([*deepsigns_argv(), "train", "--arch", "mlp", "--data", "dying_model:signal_in_a_finaliser",
                           "--epochs", "50", "--device", "cpu", "--out", str(out)], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300, preexec_fn=default_sigint)
    assert proc.returncode == 128 + signum, proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout, "interrupted: no output was written")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_interrupted_embed_leaves_nothing_behind(tmp_path, marked):
    """Ctrl-C in the middle of training: exit 130, no traceback, no output, bundle unchanged."""
    case = Case(tmp_path, marked)
    before = snapshot(tmp_path)
    # TTY_COMPATIBLE: rich draws its progress bar into the pipe as on a terminal, so we can
    # see training really run before we interrupt it
    env = {**os.environ, **ENV, "TTY_COMPATIBLE": "1", "COLUMNS": "120"}
    proc = subprocess.Popen(
        [*deepsigns_argv(), *map(str, case.with_model("embed", case.base)[:-2]),
         "--epochs", "100000", "--seed", "0"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=default_sigint)
    chunks: list[bytes] = []
    def read_stderr():
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            chunks.append(chunk)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    with reaped(proc):
        deadline = time.monotonic() + 180
        # a full epoch done: it is training. Any epoch from 2 on: the bar redraws ~10 times a
        # second and an epoch takes ~0.1 s, so it may skip straight from epoch 1 to epoch 3
        while not re.search(rb"epoch ([2-9]|[1-9][0-9]+)/100000", b"".join(chunks)):
            assert proc.poll() is None, b"".join(chunks).decode(errors="replace")
            assert time.monotonic() < deadline, "embed never started training"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        stdout = proc.stdout.read()
    reader.join(timeout=10)
    stderr = _ANSI.sub("", b"".join(chunks).decode(errors="replace"))
    assert code == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stdout == b""
    assert stderr.rstrip().splitlines()[-1].startswith("error: interrupted"), stderr
    assert not case.out_model.exists()
    assert partial_files(tmp_path) == []
    assert snapshot(tmp_path) == before  # the bundle too: same bytes


@pytest.mark.parametrize("failure, needle", [
    (MemoryError(), "not enough memory"), (RuntimeError("std::bad_alloc"), "not enough memory"),
    (ImportError("libtorch_cpu.so: failed to map segment from shared object"), "not enough memory"),
    (OSError(24, "Too many open files"), "too many open files")])
def test_a_limit_of_the_machine_is_one_line_not_a_bug(marked, monkeypatch, failure, needle):
    """Under `ulimit -v` or `ulimit -n` a library's exception had been reported as an internal
    error of deepsigns (exit 3), where a full disk was one line (exit 2)."""
    from deepsigns_cli import api

    def fails(*args, **kwargs):
        raise failure

    monkeypatch.setattr(api, "extract", fails)
    result = run_cli("extract", "--model", marked.marked, "--keys", marked.keys, code=2)
    line = assert_one_error_line(result.stderr, result.stdout, needle)
    assert "bug" not in line


class _Panic(BaseException):  # (as pyo3's PanicException: not an Exception)
    pass


@pytest.mark.parametrize("after", [MemoryError(), None], ids=["memory ran out", "a bug"])
def test_a_librarys_base_exception_is_one_line(marked, monkeypatch, after):
    """safetensors, out of memory as it serialised, raised pyo3's PanicException, a BaseException:
    it ended the command with a Rust and a Python traceback, exit 1 ("not detected"). After a
    MemoryError it is the machine's limit (exit 2); otherwise a bug of ours (exit 3)."""
    from deepsigns_cli import api

    def fails(*args, **kwargs):
        try:
            if after is not None:
                raise after
            raise _Panic("PyObject pointer is null")
        except MemoryError:
            raise _Panic("PyObject pointer is null") from None  # (its context stays: raised while handling it)

    monkeypatch.setattr(api, "extract", fails)
    result = run_cli("extract", "--model", marked.marked, "--keys", marked.keys, code=2 if after else 3)
    assert_one_error_line(result.stderr, result.stdout, "not enough memory" if after else "internal error")


@pytest.mark.parametrize("limit", [600 << 20, 760 << 20, 3 << 30])
def test_an_address_space_too_small_for_the_libraries_is_one_line(marked, limit):
    """Under ulimit -v of 740-770 MB, OpenBLAS ended extract with exit 1 (read as "not detected")
    and one line of its own; lower, torch's import could spin deaf to SIGTERM. A limit below 2 GiB
    is refused before any library loads (--help still answers); above it, the command runs."""
    import resource

    from helpers import deepsigns_argv, process_env

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))

    def run(*args):
        return subprocess.run([*deepsigns_argv(), *map(str, args)], env=process_env(), preexec_fn=limited,
                              capture_output=True, text=True, timeout=300)

    proc = run("extract", "--model", marked.marked, "--keys", marked.keys, "--json")
    if limit < 2 << 30:
        assert proc.returncode == 2, proc.stderr
        assert_one_error_line(proc.stderr, proc.stdout, f"limited to {limit >> 20} MiB (ulimit -v)",
                              "at least 2048 MiB", "ulimit -v 2097152")
        assert run("extract", "--help").returncode == 0
    else:
        assert proc.returncode == 0 and json.loads(proc.stdout)["detected"], proc.stderr


def test_memory_that_runs_out_while_a_checkpoint_is_read_is_not_blamed_on_the_file(marked, monkeypatch):
    """Under ulimit -v, safetensors' "Cannot allocate memory (os error 12)" had been reported as
    "not a readable .safetensors file ... re-export it": a good file the user was sent to rebuild."""
    from safetensors import SafetensorError

    from deepsigns_cli import checkpoint

    def no_memory(path):
        raise SafetensorError("Error while deserializing header: Cannot allocate memory (os error 12)")

    monkeypatch.setattr(checkpoint, "_safe_open", no_memory)
    result = run_cli("extract", "--model", marked.marked, "--keys", marked.keys, code=2)
    line = assert_one_error_line(result.stderr, result.stdout, "not enough memory", "ulimit -v")
    assert "re-export" not in line and "bug" not in line


def test_a_checkpoint_that_may_not_be_read_says_so(marked, monkeypatch):
    """Another user's file (mode 600, read as root in this suite, so the refusal is the system's
    as _safe_open meets it): it had been called "not a readable .safetensors file ... it may be
    truncated; re-export it"."""
    from deepsigns_cli import checkpoint

    def refused(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoint, "_safe_open", refused)
    result = run_cli("extract", "--model", marked.marked, "--keys", marked.keys, code=2)
    line = assert_one_error_line(result.stderr, result.stdout, "cannot open", "Permission denied", "permissions")
    assert "truncated" not in line
