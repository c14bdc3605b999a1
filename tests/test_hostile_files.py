"""Hostile input files: checkpoints, state dicts, key bundles and data sets made by someone who
wants the tool to fail, or to run their code.

A file is data, never an instruction (SPEC, "The adversary"): every case below exits 2 with
one line "error: ..." naming the file and the problem, prints no traceback and no warning,
writes nothing, and runs no code the file names.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import pickle
import shlex
import struct
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PASSPHRASE, assert_bad_input, copy, partial_files, run_cli

# ----------------------------------------------------------------------------- helpers


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under folder (hidden ones too) -> SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def check_bad_input(folder: Path, args: list, *needles: str) -> str:
    """Exit 2, one error line holding every needle, the folder exactly as it was."""
    before = snapshot(folder)
    line = assert_bad_input(run_cli(*args, code=None), *needles)
    assert snapshot(folder) == before, "a failed command wrote, removed or modified a file"
    assert partial_files(folder) == []
    return line


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def metadata_of(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata())


def checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


class Case:
    """Copies of the seed-0 run's files in tmp_path, and the commands that read a model."""

    def __init__(self, tmp_path: Path, marked):
        self.dir = tmp_path
        self.base = copy(marked.base, tmp_path / "base.safetensors")
        self.keys = copy(marked.keys, tmp_path / "owner.dskey")
        self.onnx = copy(marked.onnx, tmp_path / "marked.onnx")
        self.tensors = tensors_of(self.base)
        self.meta = metadata_of(self.base)

    def hostile(self, name: str = "hostile.safetensors", tensors=None, **changes) -> Path:
        """The baseline's tensors under its metadata with `changes` (None deletes a field)."""
        meta = {**self.meta, **changes}
        meta = {k: v for k, v in meta.items() if v is not None}
        return checkpoint(self.dir / name, self.tensors if tensors is None else tensors, meta)

    def with_model(self, command: str, model: Path, *extra) -> list:
        return {
            "extract": ["extract", "--model", model, "--keys", self.keys],
            "export": ["export", model, "--out", self.dir / "out.onnx"],
            "keygen": ["keygen", "--model", model, "--out", self.dir / "new.dskey", "--seed", 0],
            "embed": ["embed", "--model", model, "--keys", self.keys, "--out",
                      self.dir / "out.safetensors", "--epochs", 1, "--device", "cpu"],
        }[command] + list(extra)


MODEL_COMMANDS = ["extract", "export", "keygen", "embed"]

# ----------------------------------------------------------------------------- 1. code execution


def _canary_kwargs(arch: str, folder: Path) -> dict:
    touch = f"touch {shlex.quote(str(folder / 'pwned'))}"
    return {"os:system": {"command": touch},
            "subprocess:getoutput": {"cmd": touch},
            "shutil:rmtree": {"path": str(folder / "victim")}}[arch]


CANARY_ARCHS = ["os:system", "subprocess:getoutput", "shutil:rmtree"]


@pytest.mark.parametrize("arch", CANARY_ARCHS)
@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_checkpoint_naming_code_to_run_is_refused(tmp_path, marked, command, arch):
    """The worst defect: metadata `arch = "os:system"` ran a shell command. A file may name
    built-in architectures only; a module:factory is imported when the user types it."""
    case = Case(tmp_path, marked)
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "precious.txt").write_text("keep me\n")
    model = case.hostile(arch=arch, arch_kwargs=json.dumps(_canary_kwargs(arch, tmp_path)))
    check_bad_input(tmp_path, case.with_model(command, model), "hostile.safetensors",
                    f"names architecture '{arch}'", "not built in", f"--arch {arch}")
    assert not (tmp_path / "pwned").exists(), "the file's command ran"
    assert (tmp_path / "victim" / "precious.txt").read_text() == "keep me\n"


@pytest.mark.parametrize("arch", CANARY_ARCHS)
def test_inspect_shows_a_hostile_architecture_without_running_it(tmp_path, marked, arch):
    """inspect reports what the file says (its public facts, as data: a user's own factory is
    shown the same way) and runs nothing."""
    case = Case(tmp_path, marked)
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "precious.txt").write_text("keep me\n")
    model = case.hostile(arch=arch, arch_kwargs=json.dumps(_canary_kwargs(arch, tmp_path)))
    result = run_cli("inspect", model, "--json", code=0)
    assert json.loads(result.stdout)["arch"] == arch and result.stderr == ""
    assert not (tmp_path / "pwned").exists(), "the file's command ran"
    assert (tmp_path / "victim" / "precious.txt").read_text() == "keep me\n"


USER_MODULE = """
import math

from torch import nn


def make(input_shape, num_classes, hidden=(512, 512)):
    layers, width = [nn.Flatten()], math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, num_classes))
"""


def test_user_factory_runs_only_when_the_user_names_it(tmp_path, marked, monkeypatch):
    """A checkpoint naming the user's own factory: refused (and never imported) without --arch;
    loaded, with the file's arguments and shapes, when the user types that --arch."""
    module = "hostile_files_userarch"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / f"{module}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.delitem(sys.modules, module, raising=False)
    case = Case(tmp_path, marked)
    names = {"fc1": "1", "fc2": "3", "head": "5"}
    tensors = {f"{names[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in case.tensors.items()}
    arch = f"{module}:make"
    model = case.hostile("user.safetensors", tensors, arch=arch, arch_kwargs='{"hidden": [512, 512]}')

    check_bad_input(tmp_path, case.with_model("export", model), "user.safetensors",
                    f"'{arch}'", "not built in", f"--arch {arch}")
    assert module not in sys.modules, "a module named by a file was imported"

    out = tmp_path / "user.onnx"
    result = run_cli("export", model, "--arch", arch, "--out", out, "--json", code=0)
    assert json.loads(result.stdout)["max_abs_diff"] <= 1e-4 and out.exists()
    assert result.stderr == ""


@pytest.mark.parametrize("arch,needles", [
    (":make", ["not spelt package.module:factory"]),
    (".relative:make", ["not spelt package.module:factory"]),
    ("os:sep", ["not a factory"]),
    ("no_such_module_xyz:make", ["cannot load architecture", "PYTHONPATH"]),
    # the user's code may fail in any way (an exit, a KeyError): theirs to fix, not a bug of ours
    ("sys:exit", ["cannot build 'sys:exit'", "it called sys.exit(None)"]),
    ("test_image_data:missing_column", ["cannot build 'test_image_data:missing_column'", "KeyError: 'label'"]),
], ids=["empty-module", "relative-module", "not-callable", "missing-module", "exits", "raises"])
def test_bad_user_architecture_on_the_command_line(tmp_path, arch, needles):
    check_bad_input(tmp_path, ["train", "--arch", arch, "--epochs", 1,
                               "--out", tmp_path / "m.safetensors"], *needles)


# ----------------------------------------------------------------------------- 2. metadata

DEEP = "[" * 30_000 + "]" * 30_000  # under the field-size cap, over Python's recursion limit

# field -> hostile value, and what the one error line must say
BAD_METADATA = {
    "arch-empty-module": ({"arch": ":f"}, ["neither"]),
    "arch-relative-module": ({"arch": ".x:f"}, ["neither"]),
    "arch-empty": ({"arch": ""}, ["neither"]),
    "arch-missing": ({"arch": None}, ["no 'arch'"]),
    "arch-control-chars": ({"arch": "mlp\n\x1b[31m"}, ["neither"]),
    "kwargs-list": ({"arch_kwargs": "[1, 2]"}, ["'arch_kwargs' must be a JSON object"]),
    "kwargs-string": ({"arch_kwargs": '"abc"'}, ["'arch_kwargs' must be a JSON object"]),
    "kwargs-number": ({"arch_kwargs": "5"}, ["'arch_kwargs' must be a JSON object"]),
    "kwargs-invalid-json": ({"arch_kwargs": "{hidden: 3"}, ["'arch_kwargs' is not JSON"]),
    "kwargs-deep": ({"arch_kwargs": DEEP}, ["'arch_kwargs' is nested too deeply"]),
    "kwargs-huge": ({"arch_kwargs": '{"a": "' + "x" * 100_000 + '"}'}, ["longer than"]),
    "shape-negative": ({"input_shape": "[-1, 8, 8]"}, ["input shape", "positive integers"]),
    "shape-zero": ({"input_shape": "[0, 8, 8]"}, ["input shape", "positive integers"]),
    "shape-huge": ({"input_shape": "[1, 1000000000, 1000000000]"}, ["features, more than"]),
    "shape-floats": ({"input_shape": "[1.0, 8, 8]"}, ["positive integers"]),
    "shape-bools": ({"input_shape": "[true, 8, 8]"}, ["positive integers"]),
    "shape-strings": ({"input_shape": '["1", "8", "8"]'}, ["positive integers"]),
    "shape-empty": ({"input_shape": "[]"}, ["positive integers"]),
    "shape-too-many-dims": ({"input_shape": "[1, 1, 1, 8, 8]"}, ["1 to 4"]),
    "shape-number": ({"input_shape": "64"}, ["'input_shape' must be a list"]),
    "shape-deep": ({"input_shape": DEEP}, ["nested too deeply"]),
    "classes-negative": ({"num_classes": "-3"}, ["'num_classes' is not a whole number"]),
    "classes-zero": ({"num_classes": "0"}, ["class count", "from 2 to"]),
    "classes-one": ({"num_classes": "1"}, ["class count", "from 2 to"]),
    "classes-huge": ({"num_classes": str(10**12)}, ["class count", "1000000000000"]),
    "classes-over-cap": ({"num_classes": "100001"}, ["class count"]),
    "classes-float": ({"num_classes": "10.0"}, ["'num_classes' is not a whole number"]),
    "lr-nan": ({"lr": "nan"}, ["'lr' must be a finite number above 0"]),
    "lr-inf": ({"lr": "inf"}, ["'lr' must be a finite number above 0"]),
    "lr-negative": ({"lr": "-0.001"}, ["'lr' must be a finite number above 0"]),
    "lr-zero": ({"lr": "0"}, ["'lr' must be a finite number above 0"]),
    "lr-text": ({"lr": "fast"}, ["'lr' is not a number"]),
    "lr-underscore": ({"lr": "1_0"}, ["'lr' is not a number: 1_0"]),  # (float() reads it as 10)
    "extra-not-json": ({"producer": "{oops"}, ["'producer' is not JSON"]),
    "extra-deep": ({"producer": DEEP}, ["nested too deeply"]),
}


@pytest.mark.parametrize("changes,needles", BAD_METADATA.values(), ids=BAD_METADATA.keys())
def test_hostile_checkpoint_metadata(tmp_path, marked, changes, needles):
    case = Case(tmp_path, marked)
    model = case.hostile(**changes)
    check_bad_input(tmp_path, case.with_model("export", model), "hostile.safetensors",
                    "without deepsigns metadata", *needles)


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_hostile_metadata_in_every_command(tmp_path, marked, command):
    case = Case(tmp_path, marked)
    model = case.hostile(input_shape="[1, 1000000000, 1000000000]")
    check_bad_input(tmp_path, case.with_model(command, model), "hostile.safetensors",
                    "without deepsigns metadata", "features")


def test_metadata_values_that_are_not_strings(tmp_path, marked):
    """safetensors itself refuses a metadata map of numbers: one line, no traceback."""
    case = Case(tmp_path, marked)
    head = json.dumps({"__metadata__": {"arch": "mlp", "input_shape": [1, 8, 8], "num_classes": 10},
                       "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    model = case.dir / "numbers.safetensors"
    model.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 4)
    check_bad_input(tmp_path, case.with_model("export", model), "numbers.safetensors",
                    "not a readable .safetensors")


@pytest.mark.parametrize("command", ["extract", "export"])
def test_a_tensor_named_twice_in_the_header_is_refused(tmp_path, marked, command):
    """Readers differ on which copy of a name they keep (safetensors keeps the last): neither is
    read. Here the second copy reads the first's bytes as twice as many fp16 numbers, which
    safetensors accepts (every byte is still some tensor's)."""
    case = Case(tmp_path, marked)
    tensors = {k: v.contiguous() for k, v in case.tensors.items()}
    entries, offset = [], 0
    for key, value in tensors.items():
        size = value.numel() * 4
        entry = {"dtype": "F32", "shape": list(value.shape), "data_offsets": [offset, offset + size]}
        entries.append(f'"{key}": {json.dumps(entry)}')
        if key == "fc1.bias":
            twin = {"dtype": "F16", "shape": [2 * value.numel()], "data_offsets": [offset, offset + size]}
        offset += size
    entries.append(f'"fc1.bias": {json.dumps(twin)}')
    head = ("{" + ", ".join([f'"__metadata__": {json.dumps(case.meta)}', *entries]) + "}").encode()
    body = b"".join(v.float().numpy().tobytes() for v in tensors.values())
    model = case.dir / "twice.safetensors"
    model.write_bytes(struct.pack("<Q", len(head)) + head + body)
    check_bad_input(tmp_path, case.with_model(command, model), "twice.safetensors", "names fc1.bias twice")


def test_a_header_larger_than_any_checkpoint_needs_is_not_parsed(tmp_path, marked):
    """A 32 MB header of junk JSON cost safetensors 2 s and 1.4 GB before it refused it (and up
    to 100 MB is within its own limit)."""
    case = Case(tmp_path, marked)
    head = b'{"x":[' + b",".join([b'{"a":0}'] * (3 << 20)) + b"]}"
    model = case.dir / "junk.safetensors"
    model.write_bytes(struct.pack("<Q", len(head)) + head)
    check_bad_input(tmp_path, case.with_model("extract", model), "junk.safetensors", "more than the 16 MiB")


# a built-in architecture's arguments, from the file: refused on the meta device, before any
# memory is taken (a hidden size of 10**12 would be terabytes)
BAD_KWARGS = {
    "negative-width": ("mlp", {"hidden": [-5]}, ["'hidden' widths must be integers"]),
    "zero-width": ("mlp", {"hidden": [0]}, ["'hidden' widths must be integers"]),
    "huge-width": ("mlp", {"hidden": [10**12]}, ["'hidden' widths must be integers"]),
    "huge-model": ("mlp", {"hidden": [2**20, 2**20]}, ["parameters for inputs of shape [1, 8, 8], more than"]),
    "unknown-argument": ("mlp", {"bogus": 1}, ["takes no argument \"bogus\""]),
    "classes-as-argument": ("mlp", {"num_classes": 10**12}, ["takes no argument \"num_classes\""]),
    "widths-text": ("resnet", {"widths": "abc"}, ["'widths' must be a list"]),
    "hidden-not-a-list": ("mlp", {"hidden": 5}, ["'hidden' must be a list"]),
    "cnn-one-channel-list": ("cnn", {"channels": [4]}, ["'channels' must be a list of 2"]),
    "cnn-on-flat-input": ("cnn", {}, ["needs image inputs"]),
}


@pytest.mark.parametrize("arch,kwargs,needles", BAD_KWARGS.values(), ids=BAD_KWARGS.keys())
def test_hostile_builtin_arguments_in_a_file(tmp_path, marked, arch, kwargs, needles):
    case = Case(tmp_path, marked)
    shape = "[64]" if arch == "cnn" and not kwargs else "[1, 8, 8]"
    model = case.hostile(arch=arch, arch_kwargs=json.dumps(kwargs), input_shape=shape)
    check_bad_input(tmp_path, case.with_model("export", model), "hostile.safetensors",
                    "cannot be built", *needles)


@pytest.mark.parametrize("kwargs,needles", [
    ({"hidden": [-5]}, ["'hidden' widths must be integers", "--arch-kwargs"]),
    ({"hidden": [10**12]}, ["'hidden' widths must be integers", "--arch-kwargs"]),
    ({"bogus": 1}, ["takes no argument", "--arch-kwargs"]),
    ({"hidden": [2**20, 2**20]}, ["parameters for inputs of shape", "more than", "--arch-kwargs"]),
], ids=["negative", "huge-width", "unknown", "huge-model"])
def test_hostile_builtin_arguments_typed_by_the_user(tmp_path, kwargs, needles):
    """The same checks for --arch-kwargs: an InputError, before any memory is taken."""
    check_bad_input(tmp_path, ["train", "--arch", "mlp", "--arch-kwargs", json.dumps(kwargs),
                               "--epochs", 1, "--out", tmp_path / "m.safetensors"], *needles)


def test_file_arguments_that_do_not_match_its_weights(tmp_path, marked):
    """hidden [4096, 4096] in the metadata, 512-wide tensors in the file: refused from the
    shapes alone, the 4096-wide model is never allocated."""
    case = Case(tmp_path, marked)
    model = case.hostile(arch_kwargs='{"hidden": [4096, 4096]}')
    check_bad_input(tmp_path, case.with_model("export", model), "do not fit architecture 'mlp'",
                    "[512, 64]", "[4096, 64]")


def _edit(tensors, key, value):
    return {**tensors, key: value} if value is not None else {k: v for k, v in tensors.items()
                                                             if k != key}


@pytest.mark.parametrize("name,make,needles", [
    ("int", lambda t: t.to(torch.int32), ["int32 values", "float32"]),
    ("bool", lambda t: t > 0, ["bool values"]),
    ("complex", lambda t: t.to(torch.complex64), ["complex64 values"]),
    ("shape", lambda t: torch.zeros(512, 65), ["do not fit", "[512, 65]"]),
    ("missing", lambda t: None, ["do not fit", "missing fc1.weight"]),
], ids=["int", "bool", "complex", "shape", "missing"])
def test_tensor_of_an_unexpected_dtype_or_shape(tmp_path, marked, name, make, needles):
    case = Case(tmp_path, marked)
    tensors = _edit(case.tensors, "fc1.weight", make(case.tensors["fc1.weight"]))
    model = case.hostile(tensors=tensors)
    check_bad_input(tmp_path, case.with_model("export", model), "hostile.safetensors", *needles)


def test_unexpected_extra_tensor(tmp_path, marked):
    case = Case(tmp_path, marked)
    model = case.hostile(tensors={**case.tensors, "evil\nname": torch.zeros(1)})
    check_bad_input(tmp_path, case.with_model("export", model), "do not fit", "unexpected",
                    "evil\\nname")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_floating_point_weights_of_another_precision_are_converted(tmp_path, marked, dtype):
    """float64 / float16 / bfloat16 weights load as float32: no crash, no warning."""
    case = Case(tmp_path, marked)
    model = case.hostile(tensors={k: v.to(dtype) for k, v in case.tensors.items()})
    out = tmp_path / "out.onnx"
    result = run_cli(*case.with_model("export", model), "--json", code=0)
    assert result.stderr == "" and out.exists()


# ----------------------------------------------------------------------------- .pt state dicts


def _pt(tmp_path: Path, name: str, obj, **kwargs) -> Path:
    path = tmp_path / name
    torch.save(obj, path, **kwargs)
    return path


def _export_pt(case: Case, path: Path) -> list:
    return ["export", path, "--arch", "mlp", "--data", "digits", "--out", case.dir / "out.onnx"]


@pytest.mark.parametrize("make,needles", [
    (lambda t: {**t, "note": 3}, ["not hold a state dict of tensors", "'note'", "int"]),
    (lambda t: {"fc1": {"weight": t["fc1.weight"]}}, ["not hold a state dict of tensors", "dict"]),
    (lambda t: {1: t["fc1.weight"]}, ["not hold a state dict of tensors", "a key is a int"]),
    (lambda t: list(t.values()), ["holds a list"]),
    (lambda t: {**t, "fc1.weight": torch.zeros(1).expand(10**12)}, ["do not fit", "[1000000000000]"]),
    (lambda t: {**t, "fc1.weight": t["fc1.weight"].to(torch.complex64)}, ["complex64 values"]),
], ids=["non-tensor-value", "nested-dict", "int-key", "list", "huge-expanded-shape", "complex"])
def test_hostile_state_dict(tmp_path, marked, make, needles):
    case = Case(tmp_path, marked)
    path = _pt(tmp_path, "hostile.pt", make(case.tensors))
    check_bad_input(tmp_path, _export_pt(case, path), "hostile.pt", *needles)


def test_legacy_pickle_protocol_4_prints_no_warning(tmp_path, marked):
    """torch warns "Detected pickle protocol 4" on such files: the user sees one error line."""
    case = Case(tmp_path, marked)
    path = _pt(tmp_path, "legacy.pt", case.tensors, _use_new_zipfile_serialization=False,
               pickle_protocol=4)
    line = check_bad_input(tmp_path, _export_pt(case, path), "legacy.pt", "weights_only=True")
    assert "Detected pickle protocol" not in line


def test_state_dict_archive_with_compressed_records(tmp_path, marked):
    """torch.save writes stored records; a deflated one (a zip bomb of sorts) is not unpacked."""
    case = Case(tmp_path, marked)
    plain = _pt(tmp_path, "plain.pt", case.tensors)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    plain.unlink()
    check_bad_input(tmp_path, _export_pt(case, bomb), "bomb.pt", "compressed records")


def test_state_dict_that_is_random_bytes_in_a_zip(tmp_path, marked):
    case = Case(tmp_path, marked)
    path = tmp_path / "junk.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("junk/data.pkl", b"\x80\x02garbage")
    check_bad_input(tmp_path, _export_pt(case, path), "junk.pt", "not a plain PyTorch state dict")


# ----------------------------------------------------------------------------- 3. bundle headers


def _reframed(keys: Path, head: bytes, length: int | None = None) -> bytes:
    """The sealed file with its header bytes replaced (the seal is not redone)."""
    data = keys.read_bytes()
    (n,) = struct.unpack(">I", data[8:12])
    length = len(head) if length is None else length
    return data[:8] + struct.pack(">I", length) + head + data[12 + n:]


def _header(keys: Path) -> dict:
    data = keys.read_bytes()
    (n,) = struct.unpack(">I", data[8:12])
    return json.loads(data[12:12 + n])


def _edited(keys: Path, **fields) -> bytes:
    header = {**_header(keys), **fields}
    header = {k: v for k, v in header.items() if v is not None}
    return _reframed(keys, json.dumps(header, sort_keys=True).encode())


BAD_HEADERS = {
    "nested-200000": (lambda k: _reframed(k, b"[" * 200_000 + b"]" * 200_000), ["more than"]),
    "nested-30000": (lambda k: _reframed(k, b"[" * 30_000 + b"]" * 30_000), ["nested too deeply"]),
    "length-gigabytes": (lambda k: _reframed(k, json.dumps(_header(k)).encode(), 0xFFFFFFF0),
                         ["more than"]),
    "cut-inside-header": (lambda k: k.read_bytes()[:12 + 100], ["ends inside it"]),
    "not-json": (lambda k: _reframed(k, b"\xff\xfe{"), ["not JSON"]),
    "a-list": (lambda k: _reframed(k, b"[1, 2]"), ["not a JSON object"]),
    "salt-not-base64": (lambda k: _edited(k, kdf={**_header(k)["kdf"], "salt": "!!not base64!!"}),
                        ["KDF parameters are damaged"]),
    "salt-a-number": (lambda k: _edited(k, kdf={**_header(k)["kdf"], "salt": 5}),
                      ["KDF parameters are damaged"]),
    "kdf-cost-text": (lambda k: _edited(k, kdf={**_header(k)["kdf"], "n": "32768"}),
                      ["KDF parameters are damaged"]),
    "kdf-a-list": (lambda k: _edited(k, kdf=[1]), ["'kdf'"]),
    "schemes-numbers": (lambda k: _edited(k, schemes=[1, 2]), ["'schemes'"]),
    "schemes-empty": (lambda k: _edited(k, schemes=[]), ["'schemes'"]),
    "schemes-text": (lambda k: _edited(k, schemes="hidden"), ["'schemes'"]),
    "created-number": (lambda k: _edited(k, created=1234), ["'created'"]),
    "created-control-chars": (lambda k: _edited(k, created="2026\x1b[2J"), ["'created'"]),
    "updated-list": (lambda k: _edited(k, updated=[]), ["'updated'"]),
    "version-bool": (lambda k: _edited(k, version=True), ["version true"]),
    "version-2": (lambda k: _edited(k, version=2), ["version 2"]),
    "format-missing": (lambda k: _edited(k, format=None), ["not a deepsigns-keys header"]),
    "cipher-other": (lambda k: _edited(k, cipher="ROT13"), ["'cipher'"]),
    "key-id-escape": (lambda k: _edited(k, key_id="\x1b[31mabcdef12"), ["'key_id'"]),
    "key-id-number": (lambda k: _edited(k, key_id=7), ["'key_id'"]),
    "no-payload": (lambda k: k.read_bytes()[:12 + struct.unpack(">I", k.read_bytes()[8:12])[0]],
                   ["ends before its sealed payload"]),
}


def _bundle_args(command: str, case: Case, keys: Path) -> list:
    return {
        "inspect": ["inspect", keys],
        "extract": ["extract", "--model", case.base, "--keys", keys],
        "verify": ["verify", "--model", case.onnx, "--keys", keys],
    }[command]


@pytest.mark.parametrize("make,needles", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
@pytest.mark.parametrize("command", ["inspect", "extract", "verify"])
def test_hostile_bundle_header(tmp_path, marked, command, make, needles):
    case = Case(tmp_path, marked)
    keys = tmp_path / "hostile.dskey"
    keys.write_bytes(make(case.keys))
    line = check_bad_input(tmp_path, _bundle_args(command, case, keys), "hostile.dskey", *needles)
    assert "\x1b" not in line


def _sealed_with_payload(keys: Path, plaintext: bytes) -> bytes:
    """A bundle whose (authentic) header seals `plaintext`: what only the passphrase holder, or
    a bug, could write. The reader must still refuse it with one line."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from deepsigns_cli.bundle import _derive

    data = keys.read_bytes()
    (n,) = struct.unpack(">I", data[8:12])
    header = json.loads(data[12:12 + n])
    header["sealed_bytes"] = 12 + len(plaintext) + 16
    head = json.dumps(header).encode()
    prefix = data[:8] + struct.pack(">I", len(head)) + head
    key = _derive(PASSPHRASE, header["kdf"])
    nonce = b"\0" * 12
    return prefix + nonce + AESGCM(key).encrypt(nonce, plaintext, prefix)


def _safetensors_blob(meta: dict) -> bytes:
    from safetensors.numpy import save

    return save({"hidden/A": np.zeros((2, 2), np.float32)}, metadata=meta)


@pytest.mark.parametrize("plaintext", [
    b"not a safetensors blob",
    b"\xff" * 8 + b"{}",
    _safetensors_blob({"info": "{}"}),  # no params
    _safetensors_blob({"info": "{}", "params": "[1, 2]"}),
    _safetensors_blob({"info": "not json", "params": "{}"}),
    _safetensors_blob({"info": "{}", "params": '{"hidden": 5}'}),
    _safetensors_blob({"info": "[" * 5000 + "]" * 5000, "params": "{}"}),
], ids=["garbage", "huge-length", "no-params", "params-list", "info-not-json", "params-number",
        "info-deep"])
def test_sealed_payload_that_is_malformed(tmp_path, marked, plaintext):
    case = Case(tmp_path, marked)
    keys = tmp_path / "odd.dskey"
    keys.write_bytes(_sealed_with_payload(case.keys, plaintext))
    check_bad_input(tmp_path, _bundle_args("extract", case, keys), "contents are unreadable")


# ----------------------------------------------------------------------------- 4. .npz data

RNG = np.random.default_rng(0)
X = RNG.random((40, 1, 8, 8), dtype=np.float32)
Y = np.arange(40) % 10


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _lying_npz(shape: tuple, dtype: str = "<f4") -> bytes:
    """x.npy's header claims `shape`, the record holds 16 bytes."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": dtype, "fortran_order": False, "shape": shape})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.npy", head.getvalue() + b"\0" * 16)
        z.writestr("y.npy", _npy(Y))
    return buf.getvalue()


def _bomb_npz(rows: int, features: int = 16, labels: bool = False) -> bytes:
    """x.npy of (rows, features) int8 zeros, deflated (2.3 MB of file for 512 MiB, 2 GiB as
    float32); with `labels`, y.npy too, (rows,) int8 zeros (int64 once loaded)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, shape in (("x", (rows, features)), ("y", (rows,) if labels else None)):
            if shape is None:
                z.writestr("y.npy", _npy(Y))
                continue
            head = io.BytesIO()
            np.lib.format.write_array_header_1_0(head, {"descr": "|i1", "fortran_order": False, "shape": shape})
            with z.open(f"{name}.npy", "w", force_zip64=True) as fh:
                fh.write(head.getvalue())
                zeros, size = bytes(1 << 24), math.prod(shape)
                for start in range(0, size, len(zeros)):
                    fh.write(zeros[: size - start])
    return buf.getvalue()


def _with_value(arr, index, value):
    arr = arr.astype(np.float64).copy()
    arr[index] = value
    return arr


BAD_DATA = {
    "lengths-differ": (lambda: _npz(x=X, y=Y[:30]), ["x has 40 samples", "y has 30 labels"]),
    "split-lengths-differ": (lambda: _npz(x_train=X, y_train=Y[:39], x_test=X[:10], y_test=Y[:10]),
                             ["x_train has 40 samples", "y_train has 39"]),
    "x-0d": (lambda: _npz(x=np.float32(3), y=Y), ["x has shape []", "samples x features"]),
    "x-1d": (lambda: _npz(x=np.zeros(40, np.float32), y=Y), ["x has shape [40]", "samples x features"]),
    "x-too-many-dims": (lambda: _npz(x=np.zeros((40, 1, 1, 1, 2, 2), np.float32), y=Y),
                        ["1 to 4 dimensions"]),
    "x-empty-sample": (lambda: _npz(x=np.zeros((40, 0), np.float32), y=Y), ["samples of shape [0]"]),
    "x-structured": (lambda: _npz(x=np.zeros(40, dtype=[("a", "f4"), ("b", "f4")]), y=Y),
                     ["x has shape [40]"]),
    "x-structured-2d": (lambda: _npz(x=np.zeros((40, 2), dtype=[("a", "f4")]), y=Y), ["structured"]),
    "x-object": (lambda: _npz(x=np.array([[1, "a"]] * 40, dtype=object), y=Y), ["object"]),
    "x-complex": (lambda: _npz(x=X.astype(np.complex64), y=Y), ["x holds complex64 values"]),
    "x-bool": (lambda: _npz(x=X > 0.5, y=Y), ["x holds bool values"]),
    "x-strings": (lambda: _npz(x=X.astype(str), y=Y), ["x holds <U", "real numbers"]),
    "x-nan": (lambda: _npz(x_train=_with_value(X, (3, 0, 1, 1), np.nan), y_train=Y, x_test=X[:10],
                           y_test=Y[:10]), ["x_train holds NaN", "sample 3"]),
    "x-inf": (lambda: _npz(x_train=X, y_train=Y, x_test=_with_value(X[:10], (2, 0, 0, 0), -np.inf),
                           y_test=Y[:10]), ["x_test holds NaN or infinite", "sample 2"]),
    "x-beyond-float32": (lambda: _npz(x=_with_value(X, (5, 0, 0, 0), 1e300), y=Y),
                         ["too large for float32"]),
    "x-huge-sample": (lambda: _lying_npz((1, 4097, 4097)), ["samples of shape [4097, 4097]"]),
    "x-lying-header": (lambda: _lying_npz((10**6, 10**6)), ["claims shape", "holds less data"]),
    "x-zip-bomb": (lambda: _bomb_npz(2**25 + 1), ["array x of shape [33554433, 16]", "2.0 GiB in memory",
                                                  "image folder"]),
    # each array under the limit, the two together over it (x 1 GiB as float32, y 2 GiB as int64)
    "xy-zip-bomb": (lambda: _bomb_npz(2**28, 1, labels=True), ["array y of shape [268435456]",
                                                               "3.0 GiB in memory"]),
    "shapes-differ": (lambda: _npz(x_train=X, y_train=Y, x_test=X[:10, :, :4], y_test=Y[:10]),
                      ["x_train has samples of shape [1, 8, 8]", "x_test of shape [1, 4, 8]"]),
    "labels-huge": (lambda: _npz(x=X, y=np.full(40, 10**12)), ["label 1000000000000"]),
    "labels-uint64": (lambda: _npz(x=X, y=np.full(40, 2**63 + 5, dtype=np.uint64)),
                      [f"label {2**63 + 5}"]),
    "labels-negative": (lambda: _npz(x=X, y=Y - 1), ["label -1"]),
    "labels-float": (lambda: _npz(x=X, y=Y.astype(np.float64)), ["y holds float64", "astype"]),
    "labels-bool": (lambda: _npz(x=X, y=Y > 4), ["y holds bool"]),
    "labels-one-hot": (lambda: _npz(x=X, y=np.eye(10, dtype=np.int64)[Y]), ["argmax"]),
    "one-class": (lambda: _npz(x=X, y=np.zeros(40, np.int64)), ["1 class", "at least 2"]),
    "empty-split": (lambda: _npz(x_train=X, y_train=Y, x_test=X[:0], y_test=Y[:0]),
                    ["x_test is empty"]),
    "too-few-to-split": (lambda: _npz(x=X[:2], y=Y[:2]), ["too few to split"]),
    "npy-renamed": (lambda: _npy(X), ["single .npy array"]),
    "pickle-renamed": (lambda: pickle.dumps({"x": X, "y": Y}), ["not a zip archive"]),
    "empty-file": (lambda: b"", ["not a zip archive"]),
    "member-not-npy": (lambda: _zip({"x.npy": b"hello", "y.npy": _npy(Y)}), ["x is not a numpy array"]),
}


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("make,needles", BAD_DATA.values(), ids=BAD_DATA.keys())
def test_hostile_npz(tmp_path, make, needles):
    data = tmp_path / "hostile.npz"
    data.write_bytes(make())
    check_bad_input(tmp_path, ["train", "--arch", "mlp", "--data", data, "--epochs", 1,
                               "--out", tmp_path / "m.safetensors"], "hostile.npz", *needles)


@pytest.mark.parametrize("command", ["keygen", "embed", "export"])
def test_hostile_npz_in_every_command(tmp_path, marked, command):
    case = Case(tmp_path, marked)
    data = tmp_path / "hostile.npz"
    data.write_bytes(_npz(x=_with_value(X, (0, 0, 0, 0), np.nan), y=Y))
    check_bad_input(tmp_path, case.with_model(command, case.base, "--data", data), "hostile.npz",
                    "x holds NaN")


def test_npz_with_integer_images_and_unsigned_labels_loads(tmp_path):
    """What real data sets look like (uint8 pixels, uint8 labels): accepted, as float32/int64."""
    from deepsigns_cli.data import load_data

    path = tmp_path / "u8.npz"
    np.savez(path, x=(X * 255).astype(np.uint8), y=Y.astype(np.uint8))
    data = load_data(str(path))
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert data.num_classes == 10 and data.input_shape == (1, 8, 8)


def test_num_classes_counts_classes_without_samples(tmp_path):
    """Labels 0, 1 and 5: num_classes is 6 (one more than the largest label)."""
    from deepsigns_cli.data import load_data

    path = tmp_path / "gaps.npz"
    np.savez(path, x=X, y=np.array([0, 1, 5, 1] * 10))
    assert load_data(str(path)).num_classes == 6


@pytest.mark.parametrize(("arrays", "needles"), [
    # a stray label (99999 marking 'unknown') made a model of 100,000 outputs, 206 MB, unsaid
    ({"x_train": X[:40], "y_train": np.r_[np.arange(39) % 4, 99999], "x_test": X[:8], "y_test": np.arange(8) % 4},
     ["the largest label, 99999, makes 100000 classes", "samples of 5 of them", "give labels from 0 up"]),
    # a class in the test split alone (train/ of an image folder is refused so)
    ({"x_train": X[:40], "y_train": np.arange(40) % 4, "x_test": X[:8], "y_test": np.r_[np.arange(7) % 4, 7]},
     ["the test split holds class 7", "training split holds no sample"]),
    # split by us at random: the only sample of class 9 fell in the test split
    ({"x": np.concatenate([X, X[:1]]), "y": np.r_[np.arange(40) % 4, 9]},
     ["the test split holds class 9", "x and y are split at random", "x_train, y_train, x_test, y_test"]),
], ids=["stray-label", "test-only-class", "split-test-only-class"])
def test_data_that_leave_classes_without_training_samples_train_no_model(tmp_path, arrays, needles):
    """Classes below the largest label may lack samples (above), but not most of them, and not a
    class the model is tested on: train refuses such data with one line, exit 2. They load (an
    attacker's data may hold some of a model's classes only: below)."""
    from deepsigns_cli.data import _split, load_data

    if "x" in arrays:  # (the seeded split puts the one sample of class 9 in the test split)
        assert 9 in _split(arrays["x"], arrays["y"])[3]
    path = tmp_path / "labels.npz"
    np.savez(path, **arrays)
    load_data(str(path))
    assert_bad_input(run_cli("train", "--arch", "mlp", "--data", path, "--out", tmp_path / "m.safetensors",
                             code=None), *needles)
    assert not (tmp_path / "m.safetensors").exists()


def test_an_attackers_data_of_some_of_the_classes_attack_the_model(marked, digits, tmp_path):
    """Digits 6-9 only, with the model's own labels, and digits 0-4 tested on all ten (how much
    fine-tuning forgets): both attack the model (for a while the refusals meant for train's
    data refused them)."""
    high, low = digits.y_train >= 6, digits.y_train < 5
    np.savez(tmp_path / "high.npz", x_train=digits.x_train[high], y_train=digits.y_train[high],
             x_test=digits.x_test[digits.y_test >= 6], y_test=digits.y_test[digits.y_test >= 6])
    np.savez(tmp_path / "low.npz", x_train=digits.x_train[low], y_train=digits.y_train[low],
             x_test=digits.x_test, y_test=digits.y_test)
    for name in ("high", "low"):
        report = json.loads(run_cli("attack", "finetune", "--model", marked.marked, "--data", tmp_path / f"{name}.npz",
                                    "--epochs", 1, "--device", "cpu", "--out", tmp_path / f"{name}.safetensors",
                                    "--json").stdout)
        assert report["accuracy_after"] > 50 and (tmp_path / f"{name}.safetensors").is_file()


def test_keys_of_another_input_shape_in_a_sealed_bundle(blackbox, tmp_path):
    """A bundle is sealed, but in a dispute the other side seals theirs: output keys of shape
    (3, 8, 8) for a (1, 8, 8) model ended extract with a matrix product's error, exit 3."""
    import dataclasses

    from deepsigns_cli.bundle import seal

    bundle = blackbox["bundle"]
    keys = bundle.schemes["output"]
    wrong = dataclasses.replace(keys, arrays={**keys.arrays, "x": np.zeros((len(keys.arrays["x"]), 3, 8, 8),
                                                                          np.float32)})
    forged = tmp_path / "forged.dskey"
    forged.write_bytes(seal(dataclasses.replace(bundle, schemes={"output": wrong}, header={}), PASSPHRASE))
    result = run_cli("extract", "--model", blackbox["marked_path"], "--keys", forged, code=None)
    assert_bad_input(result, "takes inputs of shape [1, 8, 8]", "keys are samples of shape [3, 8, 8]")


def test_base64_helper_matches_what_keygen_writes(marked):
    """The header check accepts every salt keygen writes (16 random bytes, base64)."""
    from deepsigns_cli.bundle import read_header

    salt = read_header(marked.keys)["kdf"]["salt"]
    assert len(base64.b64decode(salt, validate=True)) == 16
