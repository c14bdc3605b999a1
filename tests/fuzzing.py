"""Fuzzing: mutated inputs run through every command in-process, judged by one oracle.

Shared by tests/test_fuzz.py (a short run inside `make test`) and scripts/fuzz.py (`make fuzz`,
a long campaign). Every case is reproducible from (seed, index): the generator draws all of its
choices from `random.Random(f"deepsigns-fuzz:{seed}:{index}")` and mutates a fixed set of base
artefacts (a tiny MLP trained on digits, its key bundles, its ONNX exports, a small .npz).

The oracle, per case:
- exit 0 or 1: stdout is exactly one JSON object (NaN/Infinity are not JSON), no traceback on
  stderr; extract/verify reports say `detected` exactly when the exit code is 0;
- exit 2: stdout empty, stderr exactly one line starting with "error: ";
- exit 3 is the CLI's "internal error (a bug)": a failure of its own kind; any other exit code
  or an exception escaping the command is a "traceback";
- it ends within its wall-clock budget (SIGALRM in the worker; a supervisor kills a worker
  stuck in C code);
- no *.part or other new file remains after a failure, and on success only the command's
  declared outputs appear; every input is byte-for-byte unchanged (embed may rewrite --keys
  when it succeeds);
- no canary: files whose metadata or pickles name code to run (os:system, subprocess:run,
  builtins:open, shutil:rmtree on a sacrificial folder, ...) must never get to run it;
- no child process (an ONNX sandbox, say) outlives the command.

Cases run in a worker process (this file run as a script) that imports deepsigns once and
invokes the CLI in-process with click's CliRunner. The parent (`run_campaign`) restarts a
worker that crashes (a segfault in a native library) or hangs where SIGALRM cannot reach it
(inside onnxruntime), and counts that case as a "crash" or a "hang". A worker's address
space is limited (RLIMIT_AS) so that a file asking for terabytes fails in the library
rather than in the machine.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import pickle
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from helpers import ENV, NOT_A_TERMINAL, PASSPHRASE  # noqa: E402

__all__ = [
    "FAMILIES",
    "FAILURE_KINDS",
    "build_artefacts",
    "run_campaign",
    "format_summary",
    "format_failures",
]

SMALL_KW = '{"hidden": [32, 32]}'
TINY_KW = '{"hidden": [8]}'
DEFAULT_BUDGET = 20.0  # seconds per case
GRACE = 10.0  # the supervisor's extra wait before it kills a worker stuck in native code
MEMORY_LIMIT = 8 << 30  # RLIMIT_AS of a worker
ONNX_TIMEOUT = "5"  # passed as --timeout to extract/verify when they take it

FAILURE_KINDS = (
    "traceback",
    "internal error",
    "hang",
    "crash",
    "bad output",
    "unexpected exit",
    "partial output",
    "changed input",
    "code executed",
    "leaked process",
    "generator error",
)
OUTCOMES = ("exit 0", "exit 1", "exit 2", "exit 3", "other exit", "exception", "hang", "crash",
            "not run")


# =============================================================================== base artefacts

ARTEFACTS = ("base.safetensors", "base.pt", "base.onnx", "marked.safetensors", "marked.onnx",
             "owner.dskey", "fresh.dskey", "hidden.dskey", "data.npz")


def _invoke(argv: list[str], runner_kwargs: dict | None = None):
    from click.testing import CliRunner

    from deepsigns_cli.cli.main import cli

    return CliRunner(**(runner_kwargs or {})).invoke(
        cli, argv, env={**NOT_A_TERMINAL, **ENV}, catch_exceptions=True)


def build_artefacts(folder: Path) -> Path:
    """The files every case mutates, made once (a few seconds): a tiny MLP on digits (base),
    the same model watermarked with hidden+output keys (marked, owner.dskey), unembedded key
    bundles for embed (fresh: hidden+output, hidden: hidden only), ONNX exports, a state dict
    and a small .npz in the digits' shape."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ready = folder / "READY"
    if ready.exists():
        return folder
    steps = [
        ["train", "--arch", "mlp", "--arch-kwargs", SMALL_KW, "--data", "digits", "--epochs", "5",
         "--seed", "0", "--device", "cpu", "--out", "base.safetensors"],
        ["keygen", "--model", "base.safetensors", "--data", "digits", "--scheme", "hidden,output",
         "--bits", "16", "--key-size", "8", "--seed", "0", "--out", "fresh.dskey"],
        ["keygen", "--model", "base.safetensors", "--data", "digits", "--scheme", "hidden",
         "--bits", "8", "--seed", "1", "--out", "hidden.dskey"],
        ["keygen", "--model", "base.safetensors", "--data", "digits", "--scheme", "hidden,output",
         "--bits", "16", "--key-size", "8", "--seed", "0", "--out", "owner.dskey"],
        # the output scheme trains until 99% of its candidates are learnt: a higher learning
        # rate gets there in a couple of seconds
        ["embed", "--model", "base.safetensors", "--data", "digits", "--keys", "owner.dskey",
         "--out", "marked.safetensors", "--lr", "0.01", "--seed", "0", "--device", "cpu"],
        ["export", "marked.safetensors", "--out", "marked.onnx"],
        ["export", "base.safetensors", "--out", "base.onnx"],
    ]
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for argv in steps:
            result = _invoke([*argv, "--json", "--quiet"])
            if result.exit_code != 0 or result.exception is not None and not isinstance(
                    result.exception, SystemExit):
                raise RuntimeError(f"fuzz artefacts: deepsigns {' '.join(argv)} -> exit "
                                   f"{result.exit_code}\n{result.stderr}\n{result.exception!r}")
    finally:
        os.chdir(cwd)
    import numpy as np
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "base.safetensors")), folder / "base.pt")
    from deepsigns_cli.data import load_data

    d = load_data("digits")
    np.savez(folder / "data.npz", x_train=d.x_train[:240], y_train=d.y_train[:240],
             x_test=d.x_test[:80], y_test=d.y_test[:80])
    ready.write_text("ok\n")
    return folder


# =============================================================================== raw formats

ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
             "I8": "i1", "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?"}


def st_parse(blob: bytes):
    """(metadata, {name: numpy array}) of a safetensors blob (our own reader: no library)."""
    import numpy as np

    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    meta = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, spec in header.items():
        a, b = spec["data_offsets"]
        tensors[name] = np.frombuffer(data[a:b], dtype=ST_DTYPES[spec["dtype"]]).reshape(spec["shape"]).copy()
    return meta, tensors


def st_build(tensors: dict, metadata: dict | None, *, raw: dict | None = None) -> bytes:
    """A safetensors blob. `tensors`: name -> numpy array, or (dtype, shape, bytes) to write
    any header at all. `raw` entries are merged into the header as they are."""
    import numpy as np

    rev = {np.dtype(v).str: k for k, v in ST_DTYPES.items()}
    rev[np.dtype("?").str] = "BOOL"
    header, chunks, offset = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, value in tensors.items():
        if isinstance(value, tuple):
            dtype, shape, payload = value
        else:
            arr = np.ascontiguousarray(value)
            dtype, shape, payload = rev[arr.dtype.str], list(arr.shape), arr.tobytes()
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(payload)]}
        chunks.append(payload)
        offset += len(payload)
    header.update(raw or {})
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def st_frame(head: bytes, body: bytes = b"", length: int | None = None) -> bytes:
    return struct.pack("<Q", len(head) if length is None else length) + head + body


def bundle_split(blob: bytes) -> tuple[bytes, bytes, bytes]:
    """(magic, header JSON bytes, nonce+ciphertext) of a sealed .dskey."""
    (n,) = struct.unpack(">I", blob[8:12])
    return blob[:8], blob[12:12 + n], blob[12 + n:]


def bundle_frame(magic: bytes, head: bytes, rest: bytes, length: int | None = None) -> bytes:
    return magic + struct.pack(">I", len(head) if length is None else length) + head + rest


class Evil:
    """Pickles into a call of `fn(*args)` at load time: a canary for unpickling."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def short(value, limit: int = 60) -> str:
    """repr() that stays short: '[' * 200000 instead of the string."""
    if isinstance(value, str) and len(value) > limit:
        for unit in (value[:1], value[:2], value[:8]):
            if unit and unit * (len(value) // len(unit)) == value:
                return f"{unit!r} * {len(value) // len(unit)}"
        return f"{value[:limit]!r}... ({len(value)} chars)"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def show_argv(argv: list[str]) -> str:
    import shlex

    return "deepsigns " + " ".join(
        shlex.quote(a) if len(a) <= 100 and "\x00" not in a and not _has_surrogate(a) else short(a)
        for a in argv)


def _has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


# =============================================================================== cases


@dataclass
class Case:
    family: str
    mutation: str
    argv: list[str]
    outputs: list[str] = field(default_factory=list)  # may appear on exit 0
    rewrites: list[str] = field(default_factory=list)  # inputs that may change on exit 0
    expect: tuple[int, ...] | None = None  # exit codes the contract fixes for this case


class Base:
    """The artefacts as bytes and parsed structures, loaded once per worker."""

    def __init__(self, folder: Path):
        import numpy as np
        import onnx

        self.folder = Path(folder)
        self.bytes = {name: (self.folder / name).read_bytes() for name in ARTEFACTS}
        self.st = {name: st_parse(self.bytes[name]) for name in ("base.safetensors", "marked.safetensors")}
        self.onnx = {name: onnx.load_from_string(self.bytes[name]) for name in ("base.onnx", "marked.onnx")}
        with np.load(self.folder / "data.npz") as z:
            self.npz = {k: z[k] for k in z.files}
        self._keys: dict[str, bytes] = {}
        self.timeout = {cmd: _takes_timeout(cmd) for cmd in ("extract", "verify")}

    def aead_key(self, name: str) -> bytes:
        """The AES key of one of our bundles (we know the passphrase)."""
        if name not in self._keys:
            from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

            kdf = json.loads(bundle_split(self.bytes[name])[1])["kdf"]
            self._keys[name] = Scrypt(salt=base64.b64decode(kdf["salt"]), length=kdf["length"],
                                      n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(PASSPHRASE.encode())
        return self._keys[name]


def _takes_timeout(command: str) -> bool:
    """Whether `deepsigns COMMAND --help` lists --timeout (DEEPSIGNS_FUZZ_NO_TIMEOUT=1: never
    pass it, to see what a suspect does without the limit)."""
    if os.environ.get("DEEPSIGNS_FUZZ_NO_TIMEOUT") == "1":
        return False
    result = _invoke([command, "--help"])
    return "--timeout" in result.stdout


class Ctx:
    """One case being generated: its rng, its folder, the base artefacts."""

    def __init__(self, rng: random.Random, base: Base, folder: Path):
        self.rng, self.base, self.dir = rng, base, folder
        self.canary = str(folder / "CANARY")
        self.canary_dir = str(folder / "CANARY.d")
        self.sacrificial = str(folder / "sacrificial")

    def choice(self, seq):
        return self.rng.choice(list(seq))

    def pick(self, weighted: dict):
        keys = list(weighted)
        return self.rng.choices(keys, weights=[weighted[k] for k in keys])[0]

    def np_rng(self):
        import numpy as np

        return np.random.default_rng(self.rng.getrandbits(32))

    def put(self, name: str, data: bytes) -> str:
        (self.dir / name).write_bytes(data)
        return name

    def copy(self, artefact: str, name: str | None = None) -> str:
        return self.put(name or artefact, self.base.bytes[artefact])

    # ---------------------------------------------------------------- command lines

    def onnx_flags(self, command: str) -> list[str]:
        return ["--timeout", ONNX_TIMEOUT] if self.base.timeout.get(command) else []

    def tail(self) -> list[str]:
        return ["--json"] + (["--quiet"] if self.rng.random() < 0.2 else [])

    def inspect(self, path: str, extra=()) -> list[str]:
        return ["inspect", path, *extra, *self.tail()]

    def extract(self, model: str, keys: str, extra=()) -> list[str]:
        return ["extract", "--model", model, "--keys", keys, *self.onnx_flags("extract"), *extra,
                *self.tail()]

    def verify(self, model: str, keys: str, extra=()) -> list[str]:
        return ["verify", "--model", model, "--keys", keys, *self.onnx_flags("verify"), *extra,
                *self.tail()]

    def keygen(self, model: str, data: str = "digits", extra=(), out: str = "new.dskey",
               scheme: str | None = None) -> list[str]:
        if scheme is None:
            scheme = self.choice(["hidden", "hidden", "output", "hidden,output"])
        sizes = []
        if "hidden" in scheme and "--bits" not in extra and "--message" not in extra:
            sizes += ["--bits", "8"]
        if "output" in scheme and "--key-size" not in extra:
            sizes += ["--key-size", "4"]
        return ["keygen", "--model", model, "--data", data, "--scheme", scheme, *sizes,
                "--seed", "0", *extra, "--out", out, *self.tail()]

    def embed(self, model: str, keys: str, data: str = "digits", extra=(), out: str = "out.safetensors",
              onnx: str | None = None) -> list[str]:
        epochs = [] if "--epochs" in extra else ["--epochs", "1"]
        return ["embed", "--model", model, "--data", data, "--keys", keys, *epochs,
                "--device", "cpu", *extra, "--out", out, *(["--onnx", onnx] if onnx else []),
                *self.tail()]

    def export(self, ckpt: str, extra=(), out: str = "out.onnx") -> list[str]:
        return ["export", ckpt, *extra, "--out", out, *self.tail()]

    def train(self, data: str = "digits", extra=(), out: str = "out.safetensors") -> list[str]:
        arch = [] if "--arch" in extra else ["--arch", "mlp", "--arch-kwargs", TINY_KW]
        epochs = [] if "--epochs" in extra else ["--epochs", "1"]
        return ["train", *arch, "--data", data, *epochs, "--device", "cpu", *extra,
                "--out", out, *self.tail()]

    # ---------------------------------------------------------------- canaries

    def canaries(self) -> list[tuple[str, dict, str]]:
        """(arch, arch_kwargs, description): factories that would run code if a file could
        choose them."""
        script = self.dir / "payload.py"
        script.write_text(f"open({self.canary!r}, 'w').close()\n")
        code = f"open({self.canary!r}, 'w').close()"
        return [
            ("os:system", {"command": f"touch {self.canary}"}, "os:system touch CANARY"),
            ("subprocess:getoutput", {"cmd": f"touch {self.canary}"}, "subprocess:getoutput touch"),
            ("subprocess:run", {"args": ["touch", self.canary]}, "subprocess:run touch"),
            ("shutil:rmtree", {"path": self.sacrificial}, "shutil:rmtree the sacrificial folder"),
            ("os:remove", {"path": f"{self.sacrificial}/keep.txt"}, "os:remove a sacrificial file"),
            ("builtins:open", {"file": self.canary, "mode": "w"}, "builtins:open CANARY for writing"),
            ("os:makedirs", {"name": self.canary_dir}, "os:makedirs CANARY.d"),
            ("builtins:exec", {"source": code}, "builtins:exec code that writes CANARY"),
            ("builtins:eval", {"source": code}, "builtins:eval code that writes CANARY"),
            ("runpy:run_path", {"path_name": str(script)}, "runpy:run_path a script that writes CANARY"),
        ]

    def evil(self):
        """A pickle that would create the canary when loaded."""
        return Evil(os.system, f"touch {self.canary}")


# ------------------------------------------------------------------------------- value pools

WRONG_TYPES = [None, True, False, 0, -1, 1.5, 2**64, "", "x", [], {}, [1, 2], {"a": 1},
               float("nan"), float("inf"), "x" * 100000]
HUGE_INTS = [0, -1, 10**15, 2**63, 2**64, 10**30]


def deep(n: int = 200000, opener: str = "[") -> str:
    return opener * n


# =============================================================================== families


def gen_bundle(ctx: Ctx) -> Case:
    """A sealed key bundle mutated at the byte level or in its public header."""
    rng = ctx.rng
    cmd = ctx.pick({"inspect": 4, "extract": 2, "verify": 2, "embed": 1})
    src = "fresh.dskey" if cmd == "embed" else "owner.dskey"
    blob = ctx.base.bytes[src]
    magic, head, rest = bundle_split(blob)
    header = json.loads(head)
    kind = ctx.pick({"flip": 4, "truncate": 2, "extend": 1, "field": 4, "kdf": 4, "missing": 2,
                     "nesting": 2, "length": 2, "raw": 3, "whole": 1})
    if kind == "flip":
        region = ctx.choice(["magic", "length", "header", "nonce", "ciphertext", "tag", "anywhere"])
        lo, hi = {"magic": (0, 8), "length": (8, 12), "header": (12, 12 + len(head)),
                  "nonce": (12 + len(head), 24 + len(head)),
                  "ciphertext": (24 + len(head), len(blob) - 16), "tag": (len(blob) - 16, len(blob)),
                  "anywhere": (0, len(blob))}[region]
        data = bytearray(blob)
        n = rng.choice([1, 1, 2, 8])
        for _ in range(n):
            data[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
        out, desc = bytes(data), f"{n} bit flip(s) in the {region}"
    elif kind == "truncate":
        cut = ctx.choice([0, 1, 7, 8, 11, 12, 12 + len(head) // 2, 12 + len(head), 24 + len(head),
                          len(blob) - 16, len(blob) - 1, rng.randrange(len(blob))])
        out, desc = blob[:cut], f"truncated to {cut} of {len(blob)} bytes"
    elif kind == "extend":
        extra = ctx.choice([b"\x00", b"\x00" * 4096, bytes(rng.getrandbits(8) for _ in range(64)), blob])
        out, desc = blob + extra, f"extended by {len(extra)} bytes"
    elif kind in ("field", "kdf", "missing"):
        h = json.loads(head)
        if kind == "field":
            key = ctx.choice(["format", "version", "schemes", "created", "updated", "kdf", "cipher",
                              "key_id", "extra"])
            value = ctx.choice(WRONG_TYPES + [["hidden", 1], ["evil"], [None], "deepsigns-keys", 2,
                                              {"n": 1}, deep(1000)])
            h[key] = value
            desc = f"header {key} = {short(value)}"
        elif kind == "kdf":
            key = ctx.choice(["n", "r", "p", "length", "name", "salt"])
            value = ctx.choice({
                "n": [2**40, 2**31, 2**20, 2**62, 2**17, 0, -1, 3, 2**15 + 1, 1.5, "32768", None, True],
                "r": [2**20, 10**9, 0, -8, 8.0, "8", None],
                "p": [2**30, 5, 0, -1, 1.0, None],
                "length": [0, 16, 64, 10**9, -32, "32", None],
                "name": ["argon2", "", None, 1, "SCRYPT"],
                "salt": ["", "!!!", "A", 12, None, "A" * 400000, base64.b64encode(b"x" * 3).decode()],
            }[key])
            h["kdf"] = dict(h["kdf"], **{key: value})
            desc = f"header kdf.{key} = {short(value)}"
        else:
            group = ctx.choice(["header", "kdf"])
            if group == "header":
                key = ctx.choice(sorted(h))
                del h[key]
            else:
                key = ctx.choice(sorted(h["kdf"]))
                del h["kdf"][key]
            desc = f"header without {'kdf.' if group == 'kdf' else ''}{key}"
        out = bundle_frame(magic, json.dumps(h, sort_keys=True).encode(), rest)
    elif kind == "nesting":
        where = ctx.choice(["header", "kdf", "schemes", "unclosed"])
        text = {"header": deep() + "]" * 200000, "unclosed": deep(),
                "kdf": json.dumps(dict(header, kdf="@")).replace('"@"', deep() + "]" * 200000),
                "schemes": json.dumps(dict(header, schemes="@")).replace(
                    '"@"', deep(100000, '{"a":') + "1" + "}" * 100000)}[where]
        out, desc = bundle_frame(magic, text.encode(), rest), f"header nested 200000 deep ({where})"
    elif kind == "length":
        value = ctx.choice([0, 1, len(head) - 1, len(head) + 1, 2**31, 2**32 - 1, len(blob)])
        out, desc = bundle_frame(magic, head, rest, length=value), f"header length field = {value}"
    elif kind == "raw":
        variant = ctx.choice(["not utf-8", "bom", "nan", "big int", "duplicate", "null", "list",
                              "number", "empty", "trailing", "megabyte string"])
        text = {
            "not utf-8": head.replace(b'"deepsigns-keys"', b'"deepsigns-\xff\xfe"'),
            "bom": b"\xef\xbb\xbf" + head,
            "nan": head.replace(b'"n": 32768', b'"n": NaN').replace(b'"version": 1', b'"version": Infinity'),
            "big int": head.replace(b'"n": 32768', b'"n": ' + b"9" * 5000),
            "duplicate": head[:-1] + b', "version": 2, "version": 1}',
            "null": b"null", "list": b"[]", "number": b"1", "empty": b"",
            "trailing": head + b" x",
            "megabyte string": head[:-1] + b', "pad": "' + b"A" * (1 << 20) + b'"}',
        }[variant]
        out, desc = bundle_frame(magic, text, rest), f"header raw text: {variant}"
    else:
        variant = ctx.choice(["empty", "random", "magic only", "a checkpoint", "an onnx model"])
        out = {"empty": b"", "random": bytes(rng.getrandbits(8) for _ in range(4096)), "magic only": magic,
               "a checkpoint": ctx.base.bytes["base.safetensors"],
               "an onnx model": ctx.base.bytes["marked.onnx"]}[variant]
        desc = f"whole file: {variant}"
    keys = ctx.put("keys.dskey", out)
    if cmd == "inspect":
        argv = ctx.inspect(keys)
    elif cmd == "extract":
        model = ctx.copy(ctx.choice(["marked.onnx", "marked.safetensors"]))
        argv = ctx.extract(model, keys)
    elif cmd == "verify":
        argv = ctx.verify(ctx.copy("marked.onnx"), keys)
    else:
        argv = ctx.embed(ctx.copy("base.safetensors"), keys)
        return Case("bundle", desc, argv, outputs=["out.safetensors"], rewrites=[keys])
    return Case("bundle", desc, argv)


def gen_sealed(ctx: Ctx) -> Case:
    """An authentic bundle (right passphrase, intact seal) whose sealed payload is damaged:
    what a buggy writer or an old version could leave. Still must end in exit 0/1/2."""
    import numpy as np
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    cmd = ctx.pick({"extract": 3, "verify": 2, "embed": 1, "inspect": 1})
    src = "fresh.dskey" if cmd == "embed" else "owner.dskey"
    blob = ctx.base.bytes[src]
    magic, head, rest = bundle_split(blob)
    prefix = blob[: 12 + len(head)]
    key = ctx.base.aead_key(src)
    plain = AESGCM(key).decrypt(rest[:12], rest[12:], prefix)
    meta, tensors = st_parse(plain)
    params, info = json.loads(meta["params"]), json.loads(meta["info"])
    kind = ctx.pick({"param": 4, "info": 3, "array": 4, "scheme": 2, "meta": 2})
    if kind == "param":
        scheme = ctx.choice(sorted(params))
        name = ctx.choice(sorted(params[scheme]))
        if ctx.rng.random() < 0.25:
            del params[scheme][name]
            desc = f"params[{scheme}] without {name}"
        else:
            value = ctx.choice(WRONG_TYPES + [10**12, -10**12, deep(100000)])
            params[scheme][name] = value
            desc = f"params[{scheme}].{name} = {short(value)}"
    elif kind == "info":
        name = ctx.choice(["arch", "arch_kwargs", "input_shape", "num_classes", "embedded",
                           "marked_fingerprint", "base_fingerprint"])
        value = ctx.choice(WRONG_TYPES + [[-1, 8, 8], [0], [10**12], "os:system", {"hidden": [10**12]}])
        info[name] = value
        desc = f"info.{name} = {short(value)}"
    elif kind == "array":
        name = ctx.choice(sorted(tensors))
        arr = tensors[name]
        op = ctx.choice(["drop", "dtype", "flatten", "empty", "nan", "extra row", "scalar", "huge values"])
        if op == "drop":
            del tensors[name]
        elif op == "dtype":
            tensors[name] = arr.astype(ctx.choice([np.float16, np.int8, np.bool_, np.uint64, np.float64]))
        elif op == "flatten":
            tensors[name] = arr.reshape(-1)
        elif op == "empty":
            tensors[name] = arr[:0]
        elif op == "nan":
            tensors[name] = np.full(arr.shape, np.nan, dtype=np.float32)
        elif op == "extra row":
            tensors[name] = np.concatenate([arr, arr[:1]]) if arr.ndim and len(arr) else arr
        elif op == "scalar":
            tensors[name] = np.asarray(arr.reshape(-1)[:1].reshape(()) if arr.size else 0)
        else:
            tensors[name] = np.full(arr.shape, 1e30 if arr.dtype.kind == "f" else np.iinfo(np.int64).max,
                                    dtype=arr.dtype if arr.dtype.kind in "fi" else np.int64)
        desc = f"array {name} ({arr.dtype}{list(arr.shape)}): {op}"
    elif kind == "scheme":
        op = ctx.choice(["unknown", "drop", "no arrays", "gradsigns"])
        if op == "unknown":
            params["evil"] = {}
        elif op == "gradsigns":
            params["gradsigns"] = dict(params[ctx.choice(sorted(params))])
        elif op == "drop":
            params.pop(ctx.choice(sorted(params)))
        else:
            tensors = {}
        desc = f"schemes: {op}"
    else:
        op = ctx.choice(["params not JSON", "info not JSON", "params deep", "info list", "no metadata"])
        meta = dict(meta)
        if op == "params not JSON":
            meta["params"] = "{"
        elif op == "info not JSON":
            meta["info"] = "NaN("
        elif op == "params deep":
            meta["params"] = deep()
        elif op == "info list":
            meta["info"] = "[]"
        else:
            meta = {}
        desc = f"sealed metadata: {op}"
        plain = st_build(tensors, meta or None)
    if kind != "meta":
        plain = st_build(tensors, {"params": json.dumps(params), "info": json.dumps(info)})
    nonce = os.urandom(12)
    keys = ctx.put("keys.dskey", prefix + nonce + AESGCM(key).encrypt(nonce, plain, prefix))
    if cmd == "extract":
        argv = ctx.extract(ctx.copy(ctx.choice(["marked.onnx", "marked.safetensors"])), keys)
    elif cmd == "verify":
        argv = ctx.verify(ctx.copy("marked.onnx"), keys)
    elif cmd == "inspect":
        argv = ctx.inspect(keys)
    else:
        return Case("sealed", desc, ctx.embed(ctx.copy("base.safetensors"), keys),
                    outputs=["out.safetensors"], rewrites=[keys])
    return Case("sealed", desc, argv)


def gen_checkpoint(ctx: Ctx) -> Case:
    """A .safetensors checkpoint with mutated metadata, tensors, or bytes."""
    import numpy as np

    rng = ctx.rng
    cmd = ctx.pick({"inspect": 3, "keygen": 2, "export": 2, "extract": 2, "embed": 1})
    src = "marked.safetensors" if cmd == "extract" else "base.safetensors"
    meta, tensors = ctx.base.st[src]
    meta, tensors = dict(meta), dict(tensors)
    raw_blob = None
    kind = ctx.pick({"canary": 5, "arch": 2, "arch_kwargs": 3, "input_shape": 2, "num_classes": 2,
                     "lr": 1, "extra": 2, "missing": 1, "tensor": 4, "bytes": 3, "raw": 3})
    if kind == "canary":
        arch, kwargs, what = ctx.choice(ctx.canaries())
        meta["arch"], meta["arch_kwargs"] = arch, json.dumps(kwargs)
        if rng.random() < 0.3:  # a factory that also receives the shapes
            meta["input_shape"] = json.dumps([1, 8, 8])
        desc = f"metadata arch canary: {what}"
    elif kind == "arch":
        value = ctx.choice(["mlp", "cnn", "resnet", "", ":", "os:", ":system", "os:system:x", "garbage",
                            "MLP", " mlp", "mlp\n", "deepsigns_cli.zoo:MLP", "deepsigns_cli.zoo:nope",
                            "no_such_module_xyz:f", "collections:OrderedDict", "math:inf", "..:x",
                            "x" * 100000, "\x00", "torch.nn:Linear"])
        meta["arch"] = value
        desc = f"metadata arch = {short(value)}"
    elif kind == "arch_kwargs":
        value = ctx.choice(["[]", "1", '"x"', "null", "NaN", "{", "", deep(), '{"hidden": ' + deep(),
                            '{"hidden": [-1]}', '{"hidden": [0]}', '{"hidden": [1000000000000]}',
                            '{"hidden": [4294967296, 4294967296]}', '{"hidden": [32.5, 32]}',
                            '{"hidden": "32"}', '{"hidden": [true]}', '{"hidden": null}', '{"evil": 1}',
                            '{"input_shape": [-1]}', '{"input_shape": [0, 8, 8]}',
                            '{"num_classes": 1000000000000}', '{"num_classes": -5}', '{"hidden": []}',
                            '{"hidden": [32, 32], "channels": [1]}', '{"hidden": [NaN]}',
                            '{"hidden": [Infinity]}'])
        meta["arch_kwargs"] = value
        desc = f"metadata arch_kwargs = {short(value)}"
    elif kind == "input_shape":
        value = ctx.choice(["[-1, 8, 8]", "[0]", "[0, 8, 8]", "[1000000000000]", "[1, 8, 100000000000]",
                            '"x"', "5", "[1.5, 8, 8]", "[]", "[[1]]", "null", "{}", deep(), "[64]",
                            "[1, 64]", "[NaN]", "[true, 8, 8]", "[1, 8, 8, 1, 1, 1, 1, 1]"])
        meta["input_shape"] = value
        desc = f"metadata input_shape = {short(value)}"
    elif kind == "num_classes":
        value = ctx.choice(["0", "1", "-1", "1000000000000", "x", "1.5", "NaN", "", " 10", "10.0",
                            "9" * 5000, "2", "11", "inf"])
        meta["num_classes"] = value
        desc = f"metadata num_classes = {short(value)}"
    elif kind == "lr":
        value = ctx.choice(["nan", "inf", "-inf", "-1", "0", "x", "1e400", "1e308", "", "1e-320"])
        meta["lr"] = value
        desc = f"metadata lr = {value!r}"
    elif kind == "extra":
        name = ctx.choice(["producer", "test_accuracy", "seed", "data", "schemes", "key_id", "zzz"])
        value = ctx.choice(["{", "NaN", "Infinity", deep(), '"x"', "1e400", "9" * 5000, "[" * 100 + "]" * 100,
                            '"\\ud800"', "null", '"' + "A" * 200000 + '"'])
        meta[name] = value
        desc = f"metadata {name} = {short(value)}"
    elif kind == "missing":
        name = ctx.choice(["arch", "arch_kwargs", "input_shape", "num_classes", "lr", "format", "__all__"])
        if name == "__all__":
            meta = {}
        else:
            meta.pop(name, None)
        desc = f"metadata without {name}"
    elif kind == "tensor":
        name = ctx.choice(sorted(tensors))
        arr = tensors[name]
        op = ctx.choice(["dtype", "shape", "transpose", "drop", "add", "nan", "inf", "empty", "scalar", "bf16"])
        if op == "dtype":
            dt = ctx.choice([np.float16, np.float64, np.int64, np.int8, np.uint8, np.bool_, np.int32, np.uint64])
            tensors[name] = arr.astype(dt)
            op = f"dtype {np.dtype(dt).name}"
        elif op == "shape":
            tensors[name] = np.concatenate([arr, arr]) if arr.ndim else arr.reshape(1)
        elif op == "transpose":
            tensors[name] = np.ascontiguousarray(arr.T) if arr.ndim > 1 else arr.reshape(1, -1)
        elif op == "drop":
            del tensors[name]
        elif op == "add":
            tensors["evil.weight"] = np.zeros((3, 3), dtype=np.float32)
        elif op == "nan":
            tensors = {k: np.full(v.shape, np.nan, dtype=v.dtype) for k, v in tensors.items()}
            op = "every weight NaN"
        elif op == "inf":
            tensors[name] = np.full(arr.shape, np.inf, dtype=arr.dtype)
        elif op == "empty":
            tensors[name] = arr.reshape(-1)[:0]
        elif op == "scalar":
            tensors[name] = np.float32(0.0).reshape(())
        else:
            payload = arr.astype(np.float32).view(np.uint16).reshape(-1, 2)[:, 1].tobytes()
            tensors[name] = ("BF16", list(arr.shape), payload)
        desc = f"tensor {name}: {op}"
    elif kind == "bytes":
        blob = bytearray(st_build(tensors, meta))
        (n,) = struct.unpack("<Q", bytes(blob[:8]))
        op = ctx.choice(["flip header", "flip data", "flip length", "truncate", "extend"])
        if op.startswith("flip"):
            lo, hi = {"flip header": (8, 8 + n), "flip data": (8 + n, len(blob)), "flip length": (0, 8)}[op]
            for _ in range(rng.choice([1, 2, 8])):
                blob[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
        elif op == "truncate":
            blob = blob[: rng.choice([0, 4, 8, 8 + n // 2, 8 + n, rng.randrange(len(blob))])]
        else:
            blob += b"\x00" * rng.choice([1, 7, 4096])
        raw_blob, desc = bytes(blob), f"file bytes: {op}"
    else:
        name = ctx.choice(sorted(tensors))
        arr = tensors[name]
        nbytes = arr.nbytes
        good = {k: v for k, v in tensors.items() if k != name}
        op = ctx.choice(["offsets past the end", "overlapping offsets", "reversed offsets", "unknown dtype",
                         "negative shape", "huge shape", "shape of 2**64", "metadata not strings",
                         "metadata nested", "header not JSON", "header deep", "length 2**63",
                         "length 0", "header 100 MB claimed"])
        spec = ("F32", list(arr.shape), arr.tobytes())

        def at(a: int, b: int) -> dict:
            return {name: {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [a, b]}}

        if op == "offsets past the end":
            blob = st_build(good, meta, raw=at(0, nbytes * 1000))
        elif op == "overlapping offsets":
            blob = st_build(good, meta, raw=at(0, nbytes))
        elif op == "reversed offsets":
            blob = st_build(good, meta, raw=at(nbytes, 0))
        elif op == "unknown dtype":
            blob = st_build({**good, name: ("F128", spec[1], spec[2])}, meta)
        elif op == "negative shape":
            blob = st_build({**good, name: ("F32", [-1, *spec[1][1:]], spec[2])}, meta)
        elif op == "huge shape":
            blob = st_build({**good, name: ("F32", [2**40, 2**20], spec[2])}, meta)
        elif op == "shape of 2**64":
            blob = st_build({**good, name: ("F32", [2**64], spec[2])}, meta)
        elif op == "metadata not strings":
            blob = st_build(tensors, {**meta, "num_classes": 10, "input_shape": [1, 8, 8]})
        elif op == "metadata nested":
            blob = st_build(tensors, {**meta, "arch_kwargs": {"hidden": [32, 32]}})
        elif op == "header not JSON":
            blob = st_frame(b"{not json}" + b" " * 6)
        elif op == "header deep":
            blob = st_frame(deep().encode())
        elif op == "length 2**63":
            blob = st_frame(b"{}      ", length=2**63)
        elif op == "length 0":
            blob = st_frame(b"", b"{}")
        else:
            blob = st_frame(b'{"__metadata__": {}}', length=100_000_000)
        raw_blob, desc = blob, f"safetensors header: {op}"
    data = raw_blob if raw_blob is not None else st_build(tensors, meta)
    model = ctx.put("model.safetensors", data)
    return _checkpoint_case(ctx, "checkpoint", desc, cmd, model)


def _checkpoint_case(ctx: Ctx, family: str, desc: str, cmd: str, model: str, pt: bool = False) -> Case:
    arch = ["--arch", "mlp", "--arch-kwargs", SMALL_KW] if pt else []
    if cmd == "inspect":
        return Case(family, desc, ctx.inspect(model))
    if cmd == "keygen":
        return Case(family, desc, ctx.keygen(model, extra=arch), outputs=["new.dskey"])
    if cmd == "export":
        data = ["--data", "digits"] if pt or ctx.rng.random() < 0.3 else []
        return Case(family, desc, ctx.export(model, extra=[*arch, *data]), outputs=["out.onnx"])
    if cmd == "extract":
        return Case(family, desc, ctx.extract(model, ctx.copy("owner.dskey"), extra=arch[:2]))
    keys = ctx.copy(ctx.choice(["fresh.dskey", "hidden.dskey"]), "keys.dskey")
    return Case(family, desc, ctx.embed(model, keys, extra=arch), outputs=["out.safetensors"],
                rewrites=[keys])


def gen_pt(ctx: Ctx) -> Case:
    """A .pt/.pth state dict: odd containers, non-tensors, pickled objects, damaged bytes."""
    import numpy as np
    import torch

    cmd = ctx.pick({"keygen": 2, "export": 2, "extract": 2, "embed": 1, "inspect": 1})
    _, arrays = ctx.base.st["marked.safetensors" if cmd == "extract" else "base.safetensors"]
    state = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    name = ctx.choice(sorted(state))
    kind = ctx.pick({"container": 3, "values": 3, "pickle": 4, "tensors": 3, "bytes": 2, "other file": 1})
    legacy = False
    if kind == "container":
        op = ctx.choice(["nested", "state_dict of junk", "list", "tensor", "int", "empty", "None", "tuple",
                         "string keys of ints", "deep nesting"])
        obj = {"nested": {"model": state}, "state_dict of junk": {"state_dict": {"a": {"b": state[name]}}},
               "list": list(state.values()), "tensor": state[name], "int": 7, "empty": {}, "None": None,
               "tuple": tuple(state.items()), "string keys of ints": {1: state[name]},
               "deep nesting": _nest(200)}[op]
    elif kind == "values":
        op = ctx.choice(["int", "str", "list", "None", "dict", "float", "numpy array", "bytes"])
        value = {"int": 1, "str": "x", "list": [state[name]], "None": None, "dict": {"w": state[name]},
                 "float": float("nan"), "numpy array": np.zeros(3), "bytes": b"\x00"}[op]
        obj = {**state, name: value}
        op = f"{name} = {op}"
    elif kind == "pickle":
        op = ctx.choice(["canary object", "canary as a value", "canary in a legacy file",
                         "canary in a raw pickle", "a torch module", "a lambda-free class instance",
                         "canary rmtree"])
        if op == "canary object":
            obj = ctx.evil()
        elif op == "canary as a value":
            obj = {**state, name: ctx.evil()}
        elif op == "canary in a legacy file":
            obj, legacy = ctx.evil(), True
        elif op == "canary rmtree":
            obj = {**state, name: Evil(shutil.rmtree, ctx.sacrificial)}
        elif op == "canary in a raw pickle":
            obj = None
        elif op == "a torch module":
            obj = torch.nn.Linear(2, 2)
        else:
            obj = {"opt": torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)}
    elif kind == "tensors":
        op = ctx.choice(["int64", "complex", "bool", "float16", "float64", "transposed", "missing", "extra",
                         "nan", "meta device", "sparse", "non-contiguous", "requires grad parameter",
                         "zero-size"])
        t = state[name]
        obj = dict(state)
        if op in ("int64", "bool", "float16", "float64"):
            obj[name] = t.to(getattr(torch, op))
        elif op == "complex":
            obj[name] = t.to(torch.complex64)
        elif op == "transposed":
            obj[name] = t.T.contiguous() if t.ndim > 1 else t.reshape(1, -1)
        elif op == "missing":
            del obj[name]
        elif op == "extra":
            obj["evil.weight"] = torch.zeros(2)
        elif op == "nan":
            obj = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
        elif op == "meta device":
            obj[name] = torch.empty(t.shape, device="meta")
        elif op == "sparse":
            obj[name] = t.to_sparse() if t.ndim else t
        elif op == "non-contiguous":
            obj[name] = t.T if t.ndim > 1 else t
        elif op == "requires grad parameter":
            obj[name] = torch.nn.Parameter(t)
        else:
            obj[name] = t.reshape(-1)[:0]
        op = f"{name}: {op}"
    elif kind == "bytes":
        obj = state
        op = ctx.choice(["flip", "truncate", "extend"])
    else:
        op = ctx.choice(["a safetensors file", "an onnx file", "a key bundle", "text", "empty"])
        obj = None
    desc = f"state dict {kind}: {op}"
    if kind == "other file":
        data = {"a safetensors file": ctx.base.bytes["base.safetensors"],
                "an onnx file": ctx.base.bytes["base.onnx"], "a key bundle": ctx.base.bytes["owner.dskey"],
                "text": b"hello\n", "empty": b""}[op]
    elif kind == "pickle" and op == "canary in a raw pickle":
        data = pickle.dumps(ctx.evil(), protocol=2)
    else:
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
        data = buf.getvalue()
        if kind == "bytes":
            blob = bytearray(data)
            rng = ctx.rng
            if op == "flip":
                for _ in range(rng.choice([1, 4, 16])):
                    blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
            elif op == "truncate":
                blob = blob[: rng.randrange(len(blob))]
            else:
                blob += bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 100, 4096])))
            data = bytes(blob)
    suffix = ctx.choice([".pt", ".pt", ".pth", ".bin"])
    model = ctx.put(f"model{suffix}", data)
    return _checkpoint_case(ctx, "pt", desc, cmd, model, pt=True)


def _nest(n: int):
    obj: dict = {}
    for _ in range(n):
        obj = {"x": obj}
    return obj


# ------------------------------------------------------------------------------- ONNX


def _external(tensor, location, offset=None, length=None) -> None:
    from onnx import TensorProto

    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", offset), ("length", length)):
        if v is not None:
            tensor.external_data.add(key=k, value=str(v))


def _clf_hidden_external(where: str, location: str):
    """The classifier with its first weight in external data that only a deeper look finds:
    an If branch's initializer, a Constant node's attribute, or a sparse initializer."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    model, w1 = _clf()
    g = model.graph
    w = numpy_helper.from_array(np.zeros((64, 32), np.float32), "w_ext")
    _external(w, location)
    if where == "an If branch":
        then = helper.make_graph([helper.make_node("MatMul", ["flat", "w_ext"], ["h_then"])], "then", [],
                                 [helper.make_tensor_value_info("h_then", TensorProto.FLOAT, None)],
                                 initializer=[w])
        other = helper.make_graph([helper.make_node("MatMul", ["flat", "w1"], ["h_else"])], "else", [],
                                  [helper.make_tensor_value_info("h_else", TensorProto.FLOAT, None)])
        g.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
        node = helper.make_node("If", ["cond"], ["h"], then_branch=then, else_branch=other)
    elif where == "a Constant attribute":
        node = helper.make_node("Constant", [], ["w_const"], value=w)
        for n in g.node:
            if list(n.output) == ["h"]:
                n.input[1] = "w_const"  # MatMul(flat, w_const)
        g.node.insert(0, node)
        return model
    else:
        indices = numpy_helper.from_array(np.array([0], np.int64), "w_idx")
        sparse = helper.make_sparse_tensor(w, indices, [64 * 32])
        w.dims[:] = [1]
        g.sparse_initializer.append(sparse)
        return model
    for i, n in enumerate(g.node):  # the If replaces MatMul(flat, w1) -> h
        if list(n.output) == ["h"]:
            g.node.remove(n)
            g.node.insert(i, node)
            break
    return model


def _clf(*, elem=None, batch="batch", opset=17, in_shape=(1, 8, 8), out="logits", ext=None,
         loop=False, inputs=1, outputs=1, hidden=32, ir=None, nan=False, batch_dims=True):
    """A small classifier graph (flatten, 64x32, relu, 32x10) with the requested oddity."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.FLOAT if elem is None else elem
    rng = np.random.default_rng(0)
    width = int(np.prod(in_shape))
    w1 = numpy_helper.from_array(rng.standard_normal((width, hidden)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, 10)).astype(np.float32), "w2")
    nodes, inits = [], [w1, w2]
    x = "x"
    if elem != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [x], ["xf"], to=TensorProto.FLOAT))
        x = "xf"
    if inputs > 1:
        nodes.append(helper.make_node("Add", [x, "x2"], ["xs"]))
        x = "xs"
    nodes += [helper.make_node("Flatten", [x], ["flat"], axis=1),
              helper.make_node("MatMul", ["flat", "w1"], ["h"]),
              helper.make_node("Relu", ["h"], ["hr"]),
              helper.make_node("MatMul", ["hr", "w2"], ["y0"])]
    y = "y0"
    if nan:
        inits.append(numpy_helper.from_array(np.full((10,), np.nan, dtype=np.float32), "nanc"))
        nodes.append(helper.make_node("Add", [y, "nanc"], ["ynan"]))
        y = "ynan"
    if loop:
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
             helper.make_node("Identity", ["v_in"], ["v_out"])],
            "body",
            [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
        inits += [numpy_helper.from_array(np.array(2**62, dtype=np.int64), "trip"),
                  numpy_helper.from_array(np.array(True), "cond")]
        nodes.append(helper.make_node("Loop", ["trip", "cond", y], ["yloop"], body=body))
        y = "yloop"
    out_type, out_shape = TensorProto.FLOAT, ([batch, 10] if batch_dims else [10])
    if out == "string":
        nodes.append(helper.make_node("Cast", [y], ["ys"], to=TensorProto.STRING))
        y, out_type = "ys", TensorProto.STRING
    elif out == "no batch":
        nodes.append(helper.make_node("ReduceMean", [y], ["ym"], axes=[0], keepdims=0))
        y, out_shape = "ym", [10]
    elif out == "ignores batch":
        nodes.append(helper.make_node("ReduceMean", [y], ["ym"], axes=[0], keepdims=1))
        y, out_shape = "ym", [1, 10]
    elif out == "scalar":
        nodes.append(helper.make_node("ReduceSum", [y], ["ym"], keepdims=0))
        y, out_shape = "ym", []
    elif out == "int64 labels":
        nodes.append(helper.make_node("ArgMax", [y], ["ya"], axis=1, keepdims=0))
        y, out_type, out_shape = "ya", TensorProto.INT64, [batch]
    elif out == "double":
        nodes.append(helper.make_node("Cast", [y], ["yd"], to=TensorProto.DOUBLE))
        y, out_type = "yd", TensorProto.DOUBLE
    elif out == "huge":
        inits.append(numpy_helper.from_array(np.array([2**40, 10], dtype=np.int64), "bigshape"))
        nodes.append(helper.make_node("ConstantOfShape", ["bigshape"], ["big"]))
        nodes.append(helper.make_node("Add", [y, "big"], ["yb"]))
        y, out_shape = "yb", [2**40, 10]
    elif out == "one per class":
        nodes.append(helper.make_node("Split", [y], [f"c{i}" for i in range(10)], axis=1))
    elif out == "wide":  # 2**24 copies of the logits: 640 MiB per sample
        inits.append(numpy_helper.from_array(np.array([1, 2**24], dtype=np.int64), "reps"))
        nodes.append(helper.make_node("Tile", [y, "reps"], ["yw"]))
        y, out_shape = "yw", [batch, 10 * 2**24]
    if out == "one per class":
        graph_outputs = [helper.make_tensor_value_info(f"c{i}", out_type, [batch, 1]) for i in range(10)]
    else:
        graph_outputs = [helper.make_tensor_value_info(y, out_type, out_shape)]
    if outputs > 1:
        graph_outputs.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [batch, hidden]))
        if outputs > 2:
            graph_outputs.insert(0, helper.make_tensor_value_info("hr", TensorProto.FLOAT, [batch, hidden]))
    shape = [batch, *in_shape] if batch_dims else list(in_shape)
    graph_inputs = [helper.make_tensor_value_info("x", elem, shape)]
    if inputs > 1:
        graph_inputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, shape))
    if ext is not None:
        _external(w1, *ext)
    graph = helper.make_graph(nodes, "fuzz", graph_inputs, graph_outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fuzz")
    if ir is not None:
        model.ir_version = ir
    elif opset <= 17:
        model.ir_version = 8
    return model, w1


def gen_onnx(ctx: Ctx) -> Case:
    """Damaged real exports and odd graphs made with onnx.helper."""
    import numpy as np
    import onnx
    from onnx import TensorProto

    rng = ctx.rng
    cmd = ctx.pick({"verify": 4, "extract": 3, "inspect": 2})
    kind = ctx.pick({"bytes": 3, "proto": 5, "elem type": 2, "batch": 2, "opset": 1, "external": 4,
                     "outputs": 3, "loop": 0.25, "nan": 1, "io count": 2, "empty": 1, "metadata": 2})
    expect = None
    model = None
    if kind == "bytes":
        blob = bytearray(ctx.base.bytes["marked.onnx"])
        op = ctx.choice(["flip", "flip many", "truncate", "extend", "zero a block"])
        if op == "flip":
            blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        elif op == "flip many":
            for _ in range(32):
                blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        elif op == "truncate":
            blob = blob[: rng.randrange(len(blob))]
        elif op == "extend":
            blob += bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 16, 1024])))
        else:
            at = rng.randrange(len(blob))
            blob[at:at + 256] = b"\x00" * len(blob[at:at + 256])
        data, desc = bytes(blob), f"real export, bytes: {op}"
    else:
        if kind == "proto":
            model = onnx.ModelProto()
            model.CopyFrom(ctx.base.onnx["marked.onnx"])
            g = model.graph
            op = ctx.choice(["initializer dims", "initializer dtype", "raw_data truncated", "drop a node",
                             "unknown op", "custom domain op", "rename output", "input elem string",
                             "input dims 0", "input dims 2**40", "input dims -1", "ir_version 0",
                             "ir_version huge", "opset 10**6", "duplicate output", "output elem string",
                             "node input undefined", "inflated initializer", "initializer renamed like input",
                             "cycle", "empty node names", "carrier renamed", "layer names shuffled"])
            init = g.initializer[rng.randrange(len(g.initializer))]
            if op == "initializer dims":
                init.dims[0] = init.dims[0] + rng.choice([1, -1, 1000])
            elif op == "initializer dtype":
                init.data_type = ctx.choice([TensorProto.DOUBLE, TensorProto.INT8, TensorProto.STRING,
                                             TensorProto.BOOL, 0, 99])
            elif op == "raw_data truncated":
                init.raw_data = init.raw_data[: len(init.raw_data) // 2]
            elif op == "drop a node":
                del g.node[rng.randrange(len(g.node))]
            elif op == "unknown op":
                g.node[rng.randrange(len(g.node))].op_type = "NoSuchOp"
            elif op == "custom domain op":
                g.node[rng.randrange(len(g.node))].domain = "com.evil"
                model.opset_import.add(domain="com.evil", version=1)
            elif op == "rename output":
                g.output[0].name = "nowhere"
            elif op.startswith("input elem"):
                g.input[0].type.tensor_type.elem_type = TensorProto.STRING
            elif op.startswith("input dims"):
                value = {"input dims 0": 0, "input dims 2**40": 2**40, "input dims -1": -1}[op]
                dim = g.input[0].type.tensor_type.shape.dim[rng.randrange(len(g.input[0].type.tensor_type.shape.dim))]
                dim.dim_value = value
            elif op == "ir_version 0":
                model.ir_version = 0
            elif op == "ir_version huge":
                model.ir_version = 2**62
            elif op == "opset 10**6":
                model.opset_import[0].version = 10**6
            elif op == "duplicate output":
                g.output.append(g.output[0])
            elif op == "output elem string":
                g.output[0].type.tensor_type.elem_type = TensorProto.STRING
            elif op == "node input undefined":
                g.node[rng.randrange(len(g.node))].input[0] = "undefined_tensor"
            elif op == "inflated initializer":
                init.dims[:] = [2**20, 2**20]
            elif op == "initializer renamed like input":
                init.name = g.input[0].name
            elif op == "cycle":
                g.node[0].input[0] = g.node[-1].output[0]
            elif op == "empty node names":
                for n in g.node:
                    n.name = ""
                    n.output[0] = n.output[0] if n.output[0] == g.output[0].name else ""
            elif op == "carrier renamed":
                for n in g.node:
                    for i, o in enumerate(n.output):
                        if o == "head:input":
                            n.output[i] = "renamed"
                    for i, o in enumerate(n.input):
                        if o == "head:input":
                            n.input[i] = "renamed"
            else:
                outs = [o for n in g.node for o in n.output if o != g.output[0].name]
                perm = outs[:]
                rng.shuffle(perm)
                mapping = dict(zip(outs, perm, strict=True))
                for n in g.node:
                    n.output[:] = [mapping.get(o, o) for o in n.output]
                    n.input[:] = [mapping.get(o, o) for o in n.input]
            desc = f"real export, proto: {op}"
        elif kind == "elem type":
            name = ctx.choice(["STRING", "BOOL", "UINT8", "INT64", "DOUBLE", "FLOAT16", "INT8", "COMPLEX64"])
            model, _ = _clf(elem=getattr(TensorProto, name))
            desc = f"graph: input element type {name.lower()}"
        elif kind == "batch":
            value = ctx.choice([1, 2, 2**40, 0, -1, "N", ""])
            model, _ = _clf(batch=value)
            desc = f"graph: batch dimension fixed at {value!r}"
        elif kind == "opset":
            value = ctx.choice([1, 6, 9, 13])
            model, _ = _clf(opset=value, ir=3 if value < 9 else 7)
            desc = f"graph: opset {value}"
        elif kind == "external":
            op = ctx.choice(["negative offset", "non-numeric offset", "NUL in location", "../ escape",
                             "absolute path", "absolute path inside", "huge offset", "length too long",
                             "no location", "location is a folder", "location is a fifo",
                             "symlink leaving the folder", "location is the model", "missing file",
                             "good", "long location", "length negative", "deep ../ escape",
                             "an If branch", "a Constant attribute", "a sparse initializer"])
            payload = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32).tobytes()
            ctx.put("w.bin", payload)
            location, offset, length = "w.bin", None, None
            if op == "negative offset":
                offset = -64
            elif op == "non-numeric offset":
                offset = "abc"
            elif op == "NUL in location":
                location = "w.bin\x00.txt"
            elif op == "../ escape":
                location = "../w.bin"
            elif op == "deep ../ escape":
                location = "../" * 40 + "etc/hostname"
            elif op == "absolute path":
                location = "/etc/hostname"
            elif op == "absolute path inside":
                location = str(ctx.dir / "w.bin")
            elif op == "huge offset":
                offset = 2**62
            elif op == "length too long":
                length = 2**40
            elif op == "length negative":
                length = -1
            elif op == "no location":
                location = None
            elif op == "location is a folder":
                location = "sacrificial"
            elif op == "location is a fifo":
                os.mkfifo(ctx.dir / "fifo.bin")
                location = "fifo.bin"
            elif op == "symlink leaving the folder":
                os.symlink("/etc/hostname", ctx.dir / "link.bin")
                location = "link.bin"
            elif op == "location is the model":
                location = "model.onnx"
            elif op == "missing file":
                location = "absent.bin"
            elif op == "long location":
                location = "a" * 5000
            if op in ("an If branch", "a Constant attribute", "a sparse initializer"):
                location = ctx.choice(["../w.bin", "/etc/hostname", "link.bin"])
                if location == "link.bin":
                    os.symlink("/etc/hostname", ctx.dir / "link.bin")
                model = _clf_hidden_external(op, location)
                op = f"in {op}, location {location}"
            else:
                model, _ = _clf(ext=(location, offset, length))
            desc = f"graph: external data, {op}"
            if any(k in op for k in ("escape", "absolute path", "symlink leaving", "location ../",
                                     "location /", "link.bin")) and "inside" not in op:
                expect = (2,)  # external data outside the model's folder is refused
        elif kind == "outputs":
            value = ctx.choice(["string", "no batch", "ignores batch", "scalar", "int64 labels", "double",
                                "huge", "one per class", "wide"])
            model, _ = _clf(out=value)
            desc = f"graph: output {value}"
        elif kind == "loop":
            model, _ = _clf(loop=True)
            desc = "graph: Loop with trip count 2**62"
            if ctx.base.timeout.get(cmd):
                expect = (2,)
        elif kind == "nan":
            model, _ = _clf(nan=True)
            desc = "graph: NaN outputs"
        elif kind == "io count":
            value = ctx.choice(["two inputs", "two outputs", "three outputs, hidden first", "no batch dims"])
            model, _ = {"two inputs": lambda: _clf(inputs=2), "two outputs": lambda: _clf(outputs=2),
                        "three outputs, hidden first": lambda: _clf(outputs=3),
                        "no batch dims": lambda: _clf(batch_dims=False)}[value]()
            desc = f"graph: {value}"
        elif kind == "empty":
            from onnx import helper

            value = ctx.choice(["no nodes", "no outputs", "nothing"])
            x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])
            outs = [] if value != "no nodes" else [x]
            graph = helper.make_graph([], "empty", [] if value == "nothing" else [x], outs)
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            model.ir_version = 8
            desc = f"graph: empty ({value})"
        else:
            model = onnx.ModelProto()
            model.CopyFrom(ctx.base.onnx["marked.onnx"])
            key = ctx.choice(["deepsigns.input_shape", "deepsigns.layers", "deepsigns.num_classes",
                              "deepsigns.arch"])
            value = ctx.choice(["[[[[", "NaN", "Infinity", deep(), "null", "[-1]", "os:system", "\x00",
                                "\u2028", '{"a": NaN}'])
            for p in model.metadata_props:
                if p.key == key:
                    p.value = value
            desc = f"real export, metadata {key} = {short(value)}"
        data = model.SerializeToString()
    onnx_name = ctx.put("model.onnx", data)
    if cmd == "inspect":
        argv = ctx.inspect(onnx_name)
    elif cmd == "extract":
        argv = ctx.extract(onnx_name, ctx.copy("owner.dskey"))
    else:
        argv = ctx.verify(onnx_name, ctx.copy("owner.dskey"))
    return Case("onnx", desc, argv, expect=expect)


# ------------------------------------------------------------------------------- .npz


def gen_npz(ctx: Ctx) -> Case:
    """Data files: odd shapes, dtypes, labels, containers."""
    import numpy as np

    cmd = ctx.pick({"train": 3, "keygen": 2, "embed": 1, "export": 1})
    base = {k: v.copy() for k, v in ctx.base.npz.items()}
    raw = None
    kind = ctx.pick({"lengths": 2, "dims": 2, "dtype": 4, "values": 2, "labels": 4, "splits": 2,
                     "container": 3})
    if kind == "lengths":
        op = ctx.choice(["x_train longer", "y_test longer", "x, y of different lengths"])
        if op == "x_train longer":
            base["x_train"] = np.concatenate([base["x_train"], base["x_train"][:5]])
        elif op == "y_test longer":
            base["y_test"] = np.concatenate([base["y_test"], base["y_test"][:5]])
        else:
            base = {"x": base["x_train"], "y": base["y_train"][:-7]}
    elif kind == "dims":
        op = ctx.choice(["0-d x", "1-d x", "x sample shape differs", "2-d labels", "0-d labels", "5-d x",
                         "x of zero-size samples"])
        if op == "0-d x":
            base["x_train"] = np.float32(1.0)
        elif op == "1-d x":
            base["x_train"] = base["x_train"].reshape(-1)[: len(base["y_train"])]
        elif op == "x sample shape differs":
            base["x_test"] = base["x_test"].reshape(len(base["x_test"]), -1)
        elif op == "2-d labels":
            base["y_train"] = base["y_train"].reshape(-1, 1)
        elif op == "0-d labels":
            base["y_test"] = np.int64(3)
        elif op == "5-d x":
            base["x_train"] = base["x_train"].reshape(len(base["x_train"]), 1, 1, 8, 8)
        else:
            base["x_train"] = np.zeros((len(base["y_train"]), 0), np.float32)
            base["x_test"] = np.zeros((len(base["y_test"]), 0), np.float32)
    elif kind == "dtype":
        op = ctx.choice(["structured x", "complex x", "bool x", "string x", "bytes x", "datetime x",
                         "float16 x", "uint8 x", "float64 x", "object x (pickled canary)", "void x"])
        x = base["x_train"]
        if op == "structured x":
            s = np.zeros(x.shape, dtype=[("a", "<f4"), ("b", "<i4")])
            s["a"] = x
            base["x_train"] = s
        elif op == "complex x":
            base["x_train"] = x.astype(np.complex64)
        elif op == "bool x":
            base["x_train"] = x > 0.5
        elif op == "string x":
            base["x_train"] = x.astype("U8")
        elif op == "bytes x":
            base["x_train"] = x.astype("S8")
        elif op == "datetime x":
            base["x_train"] = x.astype(np.int64).astype("datetime64[s]")
        elif op == "float16 x":
            base["x_train"] = x.astype(np.float16)
        elif op == "uint8 x":
            base["x_train"] = (x * 255).astype(np.uint8)
        elif op == "float64 x":
            base["x_train"] = x.astype(np.float64)
        elif op == "void x":
            base["x_train"] = x.view(np.dtype("V4"))
        else:
            arr = np.empty(2, dtype=object)
            arr[0], arr[1] = ctx.evil(), 1
            base["x_train"] = arr
    elif kind == "values":
        op = ctx.choice(["NaN x", "inf x", "-inf x", "1e38 x", "huge float64 x"])
        x = base["x_train"]
        if op == "huge float64 x":
            base["x_train"] = np.full(x.shape, 1e300)
        else:
            x[:] = {"NaN x": np.nan, "inf x": np.inf, "-inf x": -np.inf, "1e38 x": 1e38}[op]
    elif kind == "labels":
        op = ctx.choice(["huge labels", "uint64 labels", "uint64 max label", "negative labels", "float labels",
                         "float labels with NaN", "one class only", "bool labels", "string labels",
                         "labels above 10 in test", "int8 labels", "labels 2**31", "object labels"])
        y = base["y_train"]
        if op == "huge labels":
            y[0] = 10**12
        elif op == "uint64 labels":
            base["y_train"] = y.astype(np.uint64)
        elif op == "uint64 max label":
            base["y_train"] = y.astype(np.uint64)
            base["y_train"][0] = np.iinfo(np.uint64).max
        elif op == "negative labels":
            y[0] = -1
        elif op == "float labels":
            base["y_train"] = y.astype(np.float32) + 0.5
        elif op == "float labels with NaN":
            base["y_train"] = y.astype(np.float32)
            base["y_train"][0] = np.nan
        elif op == "one class only":
            base["y_train"][:] = 0
            base["y_test"][:] = 0
        elif op == "bool labels":
            base["y_train"] = y > 4
        elif op == "string labels":
            base["y_train"] = y.astype("U2")
        elif op == "labels above 10 in test":
            base["y_test"][0] = 10
        elif op == "int8 labels":
            base["y_train"] = y.astype(np.int8)
        elif op == "labels 2**31":
            y[0] = 2**31
        else:
            base["y_train"] = y.astype(object)
    elif kind == "splits":
        op = ctx.choice(["empty train", "empty test", "empty x, y", "one sample", "x, y only"])
        if op == "empty train":
            base["x_train"], base["y_train"] = base["x_train"][:0], base["y_train"][:0]
        elif op == "empty test":
            base["x_test"], base["y_test"] = base["x_test"][:0], base["y_test"][:0]
        elif op == "empty x, y":
            base = {"x": base["x_train"][:0], "y": base["y_train"][:0]}
        elif op == "one sample":
            base = {"x": base["x_train"][:1], "y": base["y_train"][:1]}
        else:
            base = {"x": base["x_train"], "y": base["y_train"]}
    else:
        op = ctx.choice([".npy renamed .npz", "zip of text", "missing keys", "truncated", "flipped bytes",
                         "empty file", "compressed", "extra keys", "a pickle", "x is a folder-like name"])
        if op == ".npy renamed .npz":
            buf = io.BytesIO()
            np.save(buf, base["x_train"])
            raw = buf.getvalue()
        elif op == "zip of text":
            import zipfile

            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as z:
                z.writestr("x_train.txt", "hello")
            raw = buf.getvalue()
        elif op == "missing keys":
            base = {"x_train": base["x_train"], "y_train": base["y_train"]}
        elif op in ("truncated", "flipped bytes"):
            buf = io.BytesIO()
            np.savez(buf, **base)
            blob = bytearray(buf.getvalue())
            if op == "truncated":
                blob = blob[: ctx.rng.randrange(len(blob))]
            else:
                for _ in range(8):
                    blob[ctx.rng.randrange(len(blob))] ^= 1 << ctx.rng.randrange(8)
            raw = bytes(blob)
        elif op == "empty file":
            raw = b""
        elif op == "compressed":
            buf = io.BytesIO()
            np.savez_compressed(buf, **base)
            raw = buf.getvalue()
        elif op == "extra keys":
            base["evil"] = np.zeros(3)
        elif op == "a pickle":
            raw = pickle.dumps(ctx.evil(), protocol=2)
        else:
            base = {"x_train/": base["x_train"], "y_train": base["y_train"]}
    desc = f"npz {kind}: {op}"
    if raw is None:
        buf = io.BytesIO()
        np.savez(buf, **base)
        raw = buf.getvalue()
    data = ctx.put("data.npz", raw)
    if cmd == "train":
        return Case("npz", desc, ctx.train(data), outputs=["out.safetensors"])
    if cmd == "keygen":
        return Case("npz", desc, ctx.keygen(ctx.copy("base.safetensors"), data), outputs=["new.dskey"])
    if cmd == "export":
        return Case("npz", desc, ctx.export(ctx.copy("base.safetensors"), extra=["--data", data]),
                    outputs=["out.onnx"])
    keys = ctx.copy(ctx.choice(["fresh.dskey", "hidden.dskey"]), "keys.dskey")
    return Case("npz", desc, ctx.embed(ctx.copy("base.safetensors"), keys, data), outputs=["out.safetensors"],
                rewrites=[keys])


# ------------------------------------------------------------------------------- arguments

INT_VALUES = ["0", "-1", str(10**15), str(2**63), str(2**64), "1.5", "x", ""]
SEED_VALUES = ["-1", str(2**64), str(10**30), str(2**63), str(2**32), "0x10", "nan"]
LR_VALUES = ["nan", "inf", "-inf", "1e308", "-1", "0", "1e-320", "1e400", "x"]
ALPHA_VALUES = ["nan", "inf", "0", "1", "-1", "1e-300", "5e-324", "1e-400", "x", "0.5", "-0", "NaN"]


def gen_args(ctx: Ctx) -> Case:
    """Extreme option values for every command."""
    cmd = ctx.pick({"train": 3, "keygen": 4, "embed": 2, "extract": 3, "verify": 3, "export": 1, "inspect": 1})
    rng = ctx.rng
    if cmd == "train":
        opt = ctx.pick({"--epochs": 1, "--batch-size": 2, "--lr": 3, "--seed": 2, "--arch": 2,
                        "--arch-kwargs": 3, "--device": 1})
        value = {
            "--epochs": INT_VALUES, "--batch-size": INT_VALUES + ["1"], "--lr": LR_VALUES,
            "--seed": SEED_VALUES, "--device": ["cuda", "tpu", ""],
            "--arch": ["", ":", "os:", "mlp ", "transformer", "no_such_module_xyz:f", "collections:OrderedDict",
                       "math:sqrt", "deepsigns_cli.zoo:MLP", "deepsigns_cli.zoo:", "cnn", "resnet",
                       "\x00", "x" * 10000],
            "--arch-kwargs": ["x", "[]", "null", '{"hidden": [-1]}', '{"hidden": [0]}', deep(),
                              '{"hidden": ' + deep(), '{"hidden": [1000000000000]}', '{"hidden": [NaN]}',
                              '{"input_shape": [-1]}', '{"num_classes": 0}', '{"hidden": [8], "x": 1}',
                              '{"hidden": [Infinity]}', "NaN"],
        }[opt]
        value = ctx.choice(value)
        extra = [opt, value]
        if opt == "--arch-kwargs":
            extra = ["--arch", "mlp", *extra]
        argv, outputs = ctx.train(extra=extra), ["out.safetensors"]
    elif cmd == "keygen":
        opt = ctx.pick({"--bits": 2, "--key-size": 2, "--classes": 2, "--seed": 1, "--message": 3,
                        "--layer": 2, "--scheme": 2, "--passphrase-file": 1, "--arch": 1})
        scheme = {"--key-size": "output", "--bits": "hidden", "--classes": "hidden", "--message": "hidden",
                  "--layer": "hidden"}.get(opt)
        if opt in ("--bits", "--key-size", "--classes"):
            value = ctx.choice(INT_VALUES + (["33", "64", "10", "11", "2**31"] if opt != "--key-size" else ["100000"]))
            value = str(2**31) if value == "2**31" else value
        elif opt == "--seed":
            value = ctx.choice(SEED_VALUES)
        elif opt == "--message":
            value = ctx.choice(["\ud800", "", "x" * 100000, "\x00", "a\x00b", "\udfff\ud800", "é" * 3,
                                "\U0001f600", "A" * 4, "\n"])
        elif opt == "--layer":
            value = ctx.choice(["", ":", "head:output", "x" * 10000, "fc1:input", "head", "flat", "act1",
                                "fc1", "head:input:x", "\x00", "fc1\n"])
        elif opt == "--scheme":
            value = ctx.choice(["", ",", "hidden,hidden", "output,hidden", "gradsigns", "HIDDEN", " hidden ",
                                "hidden,,output", "\x00"])
            scheme = value
        elif opt == "--arch":
            value = ctx.choice(["cnn", "mlp", "resnet", "", "os:"])
        else:
            value = _passphrase_file(ctx)
        extra = [opt, value] if opt != "--scheme" else []
        if opt == "--arch":
            extra += ["--arch-kwargs", SMALL_KW]
        argv = ctx.keygen(ctx.copy("base.safetensors"), extra=extra, scheme=scheme)
        outputs = ["new.dskey"]
    elif cmd == "embed":
        opt = ctx.pick({"--epochs": 1, "--batch-size": 1, "--lr": 3, "--seed": 2, "--passphrase-file": 1,
                        "--arch-kwargs": 1})
        value = ctx.choice({"--epochs": ["0", "-1", str(2**64), "x"], "--batch-size": INT_VALUES,
                            "--lr": LR_VALUES, "--seed": SEED_VALUES,
                            "--arch-kwargs": [deep(), "[]", '{"hidden": [32, 32]}']}.get(opt, [None]))
        if opt == "--passphrase-file":
            value = _passphrase_file(ctx)
        extra = [opt, value]
        if opt == "--arch-kwargs":
            extra = ["--arch", "mlp", *extra]
        keys = ctx.copy(ctx.choice(["hidden.dskey", "fresh.dskey"]), "keys.dskey")
        argv = ctx.embed(ctx.copy("base.safetensors"), keys, extra=extra)
        return Case("args", f"embed {opt} {short(value)}", argv, outputs=["out.safetensors"], rewrites=[keys])
    elif cmd in ("extract", "verify"):
        opt = ctx.pick({"--alpha": 4, "--seed": 2, "--provider": 1, "--passphrase-file": 2, "--arch": 1})
        if cmd == "verify" and opt == "--arch":
            opt = "--alpha"
        value = ctx.choice({"--alpha": ALPHA_VALUES, "--seed": SEED_VALUES, "--provider": ["cuda", "gpu", ""],
                            "--arch": ["mlp", "cnn", "os:system", ""]}.get(opt, [None]))
        if opt == "--passphrase-file":
            value = _passphrase_file(ctx)
        models = ["marked.onnx", "base.onnx"] + (["marked.safetensors"] if cmd == "extract" else [])
        model = ctx.copy(ctx.choice(models))
        keys = ctx.copy("owner.dskey")
        argv = (ctx.extract if cmd == "extract" else ctx.verify)(model, keys, extra=[opt, value])
        outputs = []
    elif cmd == "export":
        opt = ctx.pick({"--seed": 1, "--arch": 2, "--data": 1})
        value = ctx.choice({"--seed": SEED_VALUES, "--arch": ["cnn", "resnet", "mlp", "os:"],
                            "--data": ["digits", "DIGITS", "", "/dev/zero", "/dev/null", "."]}[opt])
        argv, outputs = ctx.export(ctx.copy("base.safetensors"), extra=[opt, value]), ["out.onnx"]
    else:
        opt, value = "--seed", ctx.choice(SEED_VALUES)
        argv, outputs = ctx.inspect(ctx.copy(ctx.choice(["owner.dskey", "base.safetensors", "marked.onnx"])),
                                    extra=[opt, value]), []
    del rng
    return Case("args", f"{cmd} {opt} {short(value)}", argv, outputs=outputs)


def _passphrase_file(ctx: Ctx) -> str:
    op = ctx.choice(["missing", "empty", "not utf-8", "a folder", "/dev/null", "wrong passphrase",
                     "right passphrase with CRLF", "huge", "NUL inside", "/dev/zero"])
    if op == "missing":
        return "absent.txt"
    if op == "a folder":
        return "sacrificial"
    if op in ("/dev/null", "/dev/zero"):
        return op
    content = {"empty": b"", "not utf-8": b"\xff\xfe\xfa", "wrong passphrase": b"not the passphrase\n",
               "right passphrase with CRLF": PASSPHRASE.encode() + b"\r\n", "huge": b"a" * (8 << 20),
               "NUL inside": PASSPHRASE.encode() + b"\x00"}[op]
    return ctx.put("pass.txt", content)


# ------------------------------------------------------------------------------- paths


def gen_paths(ctx: Ctx) -> Case:
    """Odd input and output paths: newlines, NUL, long names, unwritable places, aliases."""
    cmd = ctx.pick({"train": 2, "keygen": 2, "export": 2, "embed": 2, "extract": 1, "verify": 1, "inspect": 1})
    kind = ctx.pick({"out": 5, "alias": 3, "input": 3})
    expect = None
    if kind == "out":
        op = ctx.choice(["newline", "NUL", "long name", "long path", "/proc", "/sys", "/proc existing",
                         "parent is a file", "existing folder", "missing folder", "empty", "trailing slash",
                         "dash", "dangling symlink", "tab and escape", "unicode"])
        out_name = {
            "newline": "out\nname", "NUL": "out\x00name", "long name": "a" * 300,
            "long path": "/".join(["d" * 200] * 25),
            "/proc": "/proc/deepsigns-fuzz", "/sys": "/sys/deepsigns-fuzz", "/proc existing": "/proc/self/status",
            "parent is a file": "model.bin/out", "existing folder": "sacrificial", "missing folder": "nope/out",
            "empty": "", "trailing slash": "outdir/", "dash": "-", "dangling symlink": "dangling",
            "tab and escape": "out\t\x1b[31mred", "unicode": "ünï\u2028",
        }[op]
        if op == "parent is a file":
            ctx.put("model.bin", b"x")
        if op == "dangling symlink":
            os.symlink(str(ctx.dir / "nowhere" / "x"), ctx.dir / "dangling")
        force = ["--force"] if op in ("/proc existing", "existing folder") and ctx.rng.random() < 0.5 else []
        desc = f"--out {op}{' --force' if force else ''}"
        ext = {"train": ".safetensors", "keygen": ".dskey", "export": ".onnx", "embed": ".safetensors"}.get(cmd)
        if ext is None:
            cmd = "train"
            ext = ".safetensors"
        out = out_name + (ext if op not in ("existing folder", "empty", "trailing slash", "/proc existing", "dash",
                                            "dangling symlink") else "")
        argv, rewrites = _with_out(ctx, cmd, out, force)
        return Case("paths", desc, argv, outputs=[out], rewrites=rewrites)
    elif kind == "alias":
        op = ctx.choice(["out is the input", "out is ./input", "out is a symlink to the input",
                         "out is a hard link to the input", "out X --onnx X", "onnx is the input",
                         "onnx is the keys", "out is the keys", "out is the data"])
        if op in ("out X --onnx X", "onnx is the input", "onnx is the keys", "out is the keys"):
            cmd = "embed"
        elif op == "out is the data":
            cmd = ctx.choice(["train", "keygen", "export", "embed"])
        else:
            cmd = ctx.choice(["keygen", "export", "embed"])
        force = ["--force"] if ctx.rng.random() < 0.5 else []
        model = ctx.copy("base.safetensors")
        data = ctx.copy("data.npz") if op == "out is the data" else "digits"
        keys = ctx.copy(ctx.choice(["fresh.dskey", "hidden.dskey"]), "keys.dskey") if cmd == "embed" else None
        if op == "out is the input":
            out, onnx = model, None
        elif op == "out is ./input":
            out, onnx = "./" + model, None
        elif op == "out is a symlink to the input":
            os.symlink(model, ctx.dir / "alias.safetensors")
            out, onnx = "alias.safetensors", None
        elif op == "out is a hard link to the input":
            os.link(ctx.dir / model, ctx.dir / "alias.safetensors")
            out, onnx = "alias.safetensors", None
        elif op == "out X --onnx X":
            out, onnx = "same.bin", "same.bin"
        elif op == "onnx is the input":
            out, onnx = "out.safetensors", model
        elif op == "onnx is the keys":
            out, onnx = "out.safetensors", keys
        elif op == "out is the keys":
            out, onnx = keys, None
        else:
            out, onnx = data, None
        desc = f"{op}{' --force' if force else ''}"
        expect = (2,)
        outputs = []
        if cmd == "train":
            argv = ctx.train(data, extra=force, out=out)
        elif cmd == "keygen":
            argv = ctx.keygen(model, data, extra=force, out=out)
        elif cmd == "export":
            argv = ctx.export(model, extra=[*force, *(["--data", data] if data != "digits" else [])], out=out)
        else:
            argv = ctx.embed(model, keys, data, extra=force, out=out, onnx=onnx)
        return Case("paths", desc, argv, outputs=outputs, expect=expect)
    else:
        op = ctx.choice(["newline in the name", "NUL in the name", "long name", "a folder", "a fifo",
                         "missing with a newline", "/dev/zero", "/dev/null", "/proc/self/mem", "empty",
                         "symlink loop", "unreadable escape codes"])
        art = {"train": "data.npz", "keygen": "base.safetensors", "export": "base.safetensors",
               "embed": "base.safetensors", "extract": "marked.onnx", "verify": "marked.onnx",
               "inspect": "owner.dskey"}[cmd]
        suffix = Path(art).suffix
        name = {"newline in the name": f"in\nput{suffix}", "NUL in the name": f"in\x00put{suffix}",
                "long name": "a" * 300 + suffix, "a folder": f"folder{suffix}", "a fifo": f"fifo{suffix}",
                "missing with a newline": f"miss\ning{suffix}", "/dev/zero": "/dev/zero", "/dev/null": "/dev/null",
                "/proc/self/mem": "/proc/self/mem", "empty": "", "symlink loop": f"loop{suffix}",
                "unreadable escape codes": f"\x1b]0;x\x07{suffix}"}[op]
        if op in ("newline in the name", "unreadable escape codes"):
            ctx.copy(art, name)
        elif op == "a folder":
            (ctx.dir / name).mkdir()
        elif op == "a fifo":
            os.mkfifo(ctx.dir / name)
        elif op == "symlink loop":
            os.symlink(name, ctx.dir / name)
        desc = f"input {op} ({cmd})"
        if cmd == "train":
            argv, outputs = ctx.train(name), ["out.safetensors"]
        elif cmd == "keygen":
            argv, outputs = ctx.keygen(name), ["new.dskey"]
        elif cmd == "export":
            argv, outputs = ctx.export(name), ["out.onnx"]
        elif cmd == "embed":
            keys = ctx.copy("hidden.dskey", "keys.dskey")
            return Case("paths", desc, ctx.embed(name, keys), outputs=["out.safetensors"], rewrites=[keys])
        elif cmd == "extract":
            argv, outputs = ctx.extract(name, ctx.copy("owner.dskey")), []
        elif cmd == "verify":
            argv, outputs = ctx.verify(name, ctx.copy("owner.dskey")), []
        else:
            argv, outputs = ctx.inspect(name), []
    return Case("paths", desc, argv, outputs=outputs, expect=expect)


def _with_out(ctx: Ctx, cmd: str, out: str, force: list[str]) -> tuple[list[str], list[str]]:
    if cmd == "train":
        return ctx.train(extra=force, out=out), []
    if cmd == "keygen":
        return ctx.keygen(ctx.copy("base.safetensors"), extra=force, out=out), []
    if cmd == "export":
        return ctx.export(ctx.copy("base.safetensors"), extra=force, out=out), []
    keys = ctx.copy("hidden.dskey", "keys.dskey")
    return ctx.embed(ctx.copy("base.safetensors"), keys, extra=force, out=out), [keys]


SELFTESTS = (  # (what the oracle must report, argv maker): cases that are bad on purpose
    # --arch on the command line is the user's choice of code: it runs, and the canary shows it
    (("code executed",), lambda c: c.train(extra=["--arch", "os:system", "--arch-kwargs",
                                                   json.dumps({"command": f"touch {c.canary}"})])),
    (("code executed", "changed input"), lambda c: c.train(extra=[
        "--arch", "shutil:rmtree", "--arch-kwargs", json.dumps({"path": c.sacrificial})])),
    (("partial output",), lambda c: c.train(extra=["--arch", "builtins:open", "--arch-kwargs",
                                                    json.dumps({"file": "out.safetensors.part", "mode": "w"})])),
    (("changed input",), lambda c: c.train(data=c.copy("data.npz"), extra=[
        "--arch", "builtins:open", "--arch-kwargs", json.dumps({"file": "data.npz", "mode": "w"})])),
    (("hang",), lambda c: c.train(extra=["--arch", "subprocess:run", "--arch-kwargs",
                                          json.dumps({"args": ["sleep", "60"]})])),
    ((), lambda c: c.inspect(c.copy("base.safetensors"))),
    (("leaked process",), lambda c: c.train(extra=["--arch", "subprocess:Popen", "--arch-kwargs",
                                                    json.dumps({"args": ["sleep", "30"]})])),
    # slow ones (the supervisor must step in): a hang in native code, a dying worker
    (("hang",), lambda c: c.train(extra=["--arch", "os:system", "--arch-kwargs",
                                          json.dumps({"command": "sleep 60"})])),
    (("crash",), lambda c: c.train(extra=["--arch", "os:abort"])),
)


def gen_selftest(ctx: Ctx, index: int) -> Case:
    want, make = SELFTESTS[index % len(SELFTESTS)]
    argv = make(ctx)
    return Case("selftest", "must report: " + (", ".join(want) or "nothing"), argv,
                outputs=["out.safetensors"] if argv[0] == "train" else [])


FAMILIES = {  # name -> (generator, weight)
    "bundle": (gen_bundle, 16),
    "sealed": (gen_sealed, 4),
    "checkpoint": (gen_checkpoint, 20),
    "pt": (gen_pt, 9),
    "onnx": (gen_onnx, 20),
    "npz": (gen_npz, 11),
    "args": (gen_args, 13),
    "paths": (gen_paths, 9),
}


def case_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"deepsigns-fuzz:{seed}:{index}")


def make_case(seed: int, index: int, base: Base, folder: Path, families: list[str] | None = None) -> Case:
    rng = case_rng(seed, index)
    if families == ["selftest"]:
        return gen_selftest(Ctx(rng, base, folder), index)
    names = families or list(FAMILIES)
    family = rng.choices(names, weights=[FAMILIES[n][1] for n in names])[0]
    return FAMILIES[family][0](Ctx(rng, base, folder))


# =============================================================================== the oracle


class CaseTimeout(BaseException):
    """Raised by SIGALRM in the middle of a case: a BaseException, so that no `except
    Exception` in the code under test can swallow it."""


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under folder -> a digest (files: SHA-256; links: target; others: kind).
    Never opens anything but regular files (a FIFO would block)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            st = os.lstat(path)
            if os.path.islink(path):
                out[rel] = "link:" + os.readlink(path)
            elif os.path.isdir(path):
                out[rel] = "dir"
            elif os.path.isfile(path):
                with open(path, "rb") as fh:
                    out[rel] = hashlib.sha256(fh.read()).hexdigest()
            else:
                out[rel] = f"special:{st.st_mode:o}"
    return out


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _frame_of(tb_frames) -> str:
    """The innermost frame inside deepsigns_cli (else the innermost), as file:line in func."""
    frames = list(tb_frames)
    ours = [f for f in frames if "deepsigns_cli" in f.filename]
    f = (ours or frames or [None])[-1]
    if f is None:
        return "?"
    path = f.filename
    if "deepsigns_cli" in path:
        path = "deepsigns_cli" + path.split("deepsigns_cli", 1)[1]
    else:
        path = os.path.basename(path)
    return f"{path}:{f.lineno} in {f.name}"


def _first_line(text: str, limit: int = 160) -> str:
    for line in text.splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[:limit] + "..."
    return ""


def _traceback_summary(text: str) -> str:
    """The exception line of a traceback printed on stderr."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("Traceback")), 0)
    tail = lines[start:]
    exc = next((ln for ln in reversed(tail) if not ln.startswith(" ")), tail[-1] if tail else "")
    where = [ln.strip() for ln in tail if ln.strip().startswith('File "') and "deepsigns_cli" in ln]
    return _first_line(exc) + (f"  [{where[-1]}]" if where else "")


def judge(case: Case, code, stdout: str, stderr: str, exc, exc_tb, timed_out: bool, hang_where: str,
          before: dict, after: dict, folder: Path) -> tuple[str, list[str], str]:
    """(outcome, failure kinds, detail) of one finished case."""
    failures: list[str] = []
    details: list[str] = []
    command = case.argv[0]
    if timed_out:
        outcome = "hang"
        failures.append("hang")
        details.append(f"no result within the budget; was at {hang_where}")
    elif exc is not None and not isinstance(exc, SystemExit):
        outcome = "exception"
        failures.append("traceback")
        details.append(f"{type(exc).__name__}: {_first_line(str(exc), 120)}  [{_frame_of(exc_tb)}]")
    else:
        outcome = f"exit {code}" if code in (0, 1, 2, 3) else "other exit"
        if code == 3:
            failures.append("internal error")
            details.append("exit 3: " + (_traceback_summary(stderr) if "Traceback" in stderr else _first_line(stderr)))
        elif code not in (0, 1, 2):
            failures.append("traceback")
            details.append(f"exit {code}: {_first_line(stderr)}")
        if "Traceback" in stderr or "Traceback" in stdout:
            if "traceback" not in failures and "internal error" not in failures:
                failures.append("traceback")
                details.append("traceback printed: " + _traceback_summary(stderr + stdout))
        if code in (0, 1):
            problem = None
            try:
                report = json.loads(stdout, parse_constant=_reject_constant)
                if not isinstance(report, dict):
                    problem = f"stdout is JSON but not an object: {short(stdout, 60)}"
                elif command in ("extract", "verify"):
                    if report.get("detected") is not (code == 0):
                        problem = f"exit {code} but detected = {report.get('detected')!r}"
                    elif not (isinstance(report.get("p_value"), (int, float))
                              and 0 <= report["p_value"] <= 1):
                        problem = f"p_value = {report.get('p_value')!r}"
            except ValueError as err:
                problem = f"stdout is not one JSON object ({_first_line(str(err), 80)}): {short(stdout, 80)}"
            if problem:
                failures.append("bad output")
                details.append(problem)
        elif code == 2:
            lines = stderr.splitlines()
            if stdout:
                failures.append("bad output")
                details.append(f"exit 2 with stdout: {short(stdout, 60)}")
            elif len(lines) != 1 or not stderr.endswith("\n") or not lines[0].startswith("error: "):
                failures.append("bad output")
                first = lines[0] if lines else ""
                details.append(f"exit 2, stderr has {len(lines)} line(s), not one 'error: ' line: "
                               f"{short(first, 90)}" + (f" / {short(lines[-1], 90)}" if len(lines) > 1 else ""))
    if case.expect is not None and not timed_out and code not in case.expect and outcome.startswith("exit"):
        failures.append("unexpected exit")
        details.append(f"exit {code}, the contract says {' or '.join(map(str, case.expect))}")
    # ---------------------------------------------------------------- files
    ok_exit = code == 0 and not timed_out and outcome == "exit 0"
    allowed_new = set(case.outputs) if ok_exit else set()
    allowed_new = {os.path.normpath(p) for p in allowed_new}
    allowed_change = {os.path.normpath(p) for p in (case.rewrites + case.outputs)} if ok_exit else set()
    new = [p for p in after if p not in before]
    canaries = [p for p in new if "CANARY" in p]
    stray = [p for p in new if p not in allowed_new and "CANARY" not in p]
    if stray:
        failures.append("partial output")
        parts = [p for p in stray if p.endswith(".part")]
        details.append(("left *.part: " if parts else f"new files after exit {code}: ") + short(sorted(stray), 120))
    changed = [p for p in before if p in after and before[p] != after[p] and p not in allowed_change]
    removed = [p for p in before if p not in after]
    if changed or removed:
        failures.append("changed input")
        details.append("inputs " + ", ".join(
            [f"changed: {short(changed, 80)}"] * bool(changed) + [f"removed: {short(removed, 80)}"] * bool(removed)))
    if canaries or not (folder / "sacrificial" / "keep.txt").exists():
        failures.append("code executed")
        details.append(f"canary: {canaries or 'sacrificial/keep.txt gone'}")
    if ok_exit and case.outputs and not case.outputs[0].startswith("/"):
        out = os.path.normpath(case.outputs[0])
        if out not in after and out != ".":
            failures.append("bad output")
            details.append(f"exit 0 but the output {short(case.outputs[0], 60)} is missing")
    return outcome, failures, " | ".join(details)


def run_case(seed: int, index: int, base: Base, work: Path, budget: float, keep: bool,
             families: list[str] | None = None, runner_kwargs: dict | None = None) -> dict:
    """Generate case (seed, index) in its own folder under `work`, run it, judge it."""
    folder = work / f"case-{index:06d}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    (folder / "sacrificial").mkdir()
    (folder / "sacrificial" / "keep.txt").write_text("keep\n")
    record = {"seed": seed, "index": index, "family": "?", "mutation": "?", "argv": [], "code": None,
              "outcome": "not run", "failures": [], "detail": "", "secs": 0.0, "folder": str(folder)}
    try:
        case = make_case(seed, index, base, folder, families)
    except Exception as exc:  # a bug of ours, never the library's: shown as such
        record.update(outcome="not run", failures=["generator error"],
                      detail=f"{type(exc).__name__}: {exc}  [{_frame_of(traceback.extract_tb(exc.__traceback__))}]")
        return record
    record.update(family=case.family, mutation=case.mutation, argv=case.argv, command=show_argv(case.argv))
    before = snapshot(folder)
    work_before = set(os.listdir(work))
    children_before = _children()
    cwd = os.getcwd()
    os.chdir(folder)
    state = {"timed_out": False, "where": ""}

    def on_alarm(signum, frame):
        state["timed_out"] = True
        state["where"] = _frame_of(traceback.extract_stack(frame))
        raise CaseTimeout()

    from click.testing import CliRunner

    from deepsigns_cli.cli.main import cli

    old = signal.signal(signal.SIGALRM, on_alarm)
    start = time.monotonic()
    code, stdout, stderr, exc, exc_tb = None, "", "", None, []
    try:
        signal.setitimer(signal.ITIMER_REAL, budget)
        result = CliRunner(**(runner_kwargs or {})).invoke(
            cli, case.argv, env={**NOT_A_TERMINAL, **ENV}, catch_exceptions=True, prog_name="deepsigns")
        signal.setitimer(signal.ITIMER_REAL, 0)
        code, exc = result.exit_code, result.exception
        stdout = _text(result, "stdout")
        stderr = _text(result, "stderr")
        if result.exc_info is not None and exc is not None and not isinstance(exc, SystemExit):
            exc_tb = traceback.extract_tb(result.exc_info[2])
        # the result holds the command's frames (through exc_info): what they hold, such as an
        # ONNX sandbox process, lives as long as they do
        del result
    except CaseTimeout:
        state["timed_out"] = True
    except BaseException as err:  # escaped CliRunner itself (KeyboardInterrupt, a BaseException)
        signal.setitimer(signal.ITIMER_REAL, 0)
        exc, exc_tb = err, traceback.extract_tb(err.__traceback__)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        os.chdir(cwd)
    record["secs"] = round(time.monotonic() - start, 3)
    if isinstance(exc, CaseTimeout):
        state["timed_out"], exc = True, None
    after = snapshot(folder)
    outcome, failures, detail = judge(case, code, stdout, stderr, exc, exc_tb, state["timed_out"],
                                      state["where"], before, after, folder)
    left = _children() - children_before
    if left:  # what only garbage (a reference cycle) still holds is released by a collection
        import gc

        exc = None
        gc.collect()
        time.sleep(0.05)  # a child that is just exiting
        left &= _children()
    if left:
        failures.append("leaked process")
        detail += (" | " if detail else "") + f"{len(left)} child process(es) still running or unreaped after " \
                                               "the command returned"
        _kill_children(left)
    outside = sorted(set(os.listdir(work)) - work_before - {folder.name})
    if outside:
        failures.append("partial output")
        detail += f" | new files outside the case folder: {outside}"
        for name in outside:
            p = work / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    record.update(code=code, outcome=outcome, failures=failures, detail=detail,
                  stderr=stderr[:2000], stdout=stdout[:500])
    if not failures or not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return record


def _children() -> set[int]:
    """Processes this one started that still exist (zombies too)."""
    pids: set[int] = set()
    me = os.getpid()
    try:
        tasks = os.listdir(f"/proc/{me}/task")
    except OSError:
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/{me}/task/{tid}/children") as fh:
                pids.update(int(p) for p in fh.read().split())
        except OSError:
            pass
    return pids


def _kill_children(pids: set[int]) -> None:
    """Children the code under test left behind: ours to end, by pid."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _text(result, attr: str) -> str:
    try:
        return getattr(result, attr)
    except (UnicodeDecodeError, ValueError):
        raw = getattr(result, f"{attr}_bytes", b"")
        return raw.decode("utf-8", "replace")


# =============================================================================== worker + supervisor


def worker_main(config_path: str) -> None:
    """Run the configured cases in this process; report each on the result pipe."""
    import faulthandler
    import resource

    config = json.loads(Path(config_path).read_text())
    out = os.fdopen(config["fd"], "w", buffering=1)
    faulthandler.enable(file=sys.stderr)
    limit = config.get("memory_limit") or 0
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    torch.set_num_threads(1)
    base = Base(Path(config["artefacts"]))
    work = Path(config["work"])
    runner_kwargs = {"capture": "fd"} if "capture" in _runner_params() else {}
    out.write(json.dumps({"ready": True, "timeout": base.timeout}) + "\n")
    for index in config["indices"]:
        out.write(json.dumps({"start": index}) + "\n")
        record = run_case(config["seed"], index, base, work, config["budget"], config["keep"],
                          config.get("families"), runner_kwargs)
        out.write(json.dumps({"result": record}, default=str) + "\n")
    out.close()


def _runner_params() -> set[str]:
    import inspect

    from click.testing import CliRunner

    return set(inspect.signature(CliRunner.__init__).parameters)


class _Worker:
    def __init__(self, wid: int, indices: list[int], settings: dict, work: Path):
        self.wid, self.todo, self.settings, self.work = wid, list(indices), settings, work
        self.proc = None
        self.buf = b""
        self.current: int | None = None
        self.started = 0.0
        self.ready = False

    def start(self) -> None:
        r, w = os.pipe()
        config = dict(self.settings, fd=w, indices=self.todo, work=str(self.work / f"w{self.wid}"))
        (self.work / f"w{self.wid}").mkdir(exist_ok=True)
        path = self.work / f"worker-{self.wid}.json"
        path.write_text(json.dumps(config))
        log = open(self.work / f"worker-{self.wid}.log", "ab")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(path)],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(w,),
                                     env=env, cwd=str(self.work))
        log.close()
        os.close(w)
        self.fd = r
        self.buf = b""
        self.current = None
        self.started = time.monotonic()
        self.ready = False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()  # our own worker, by its pid
        if self.proc:
            self.proc.wait()
        try:
            os.close(self.fd)
        except OSError:
            pass

    def log_tail(self, n: int = 6) -> str:
        path = self.work / f"worker-{self.wid}.log"
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " / ".join(ln.strip() for ln in lines[-n:])


def run_campaign(seed: int, indices, artefacts: Path, work: Path, *, budget: float = DEFAULT_BUDGET,
                 workers: int = 1, keep: bool = False, families: list[str] | None = None,
                 memory_limit: int = MEMORY_LIMIT, on_result=None, startup_timeout: float = 180.0,
                 grace: float = GRACE) -> list[dict]:
    """Run cases `indices` of `seed` in worker processes; return one record per case."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    indices = list(indices)
    workers = max(1, min(workers, len(indices) or 1))
    settings = {"seed": seed, "artefacts": str(artefacts), "work": str(work), "budget": budget, "keep": keep,
                "families": families, "memory_limit": memory_limit}
    pool = [_Worker(w, indices[w::workers], settings, work) for w in range(workers)]
    results: dict[int, dict] = {}
    for w in pool:
        if w.todo:
            w.start()
    live = [w for w in pool if w.todo]

    def record(rec: dict) -> None:
        results[rec["index"]] = rec
        if on_result:
            on_result(rec)

    def lost(w: _Worker, kind: str, detail: str) -> None:
        """The worker died or hung on its current case: count it, restart after it."""
        index = w.current
        w.kill()
        if index is not None:
            rec = {"seed": seed, "index": index, "family": "?", "mutation": "?", "argv": [], "code": None,
                   "outcome": kind, "failures": [kind], "detail": detail, "secs": budget,
                   "folder": str(work / f"w{w.wid}" / f"case-{index:06d}")}
            # the generator is deterministic: describe the case without running it
            rec.update(_describe_case(seed, index, artefacts, work, families))
            record(rec)
            if not keep:
                shutil.rmtree(work / f"w{w.wid}" / f"case-{index:06d}", ignore_errors=True)
            w.todo = [i for i in w.todo if i not in results]
        elif not w.ready:
            raise RuntimeError(f"fuzz worker {w.wid} failed to start: {w.log_tail(20)}")
        if w.todo:
            w.start()
        else:
            live.remove(w)

    while live:
        fds = {w.fd: w for w in live}
        readable, _, _ = select.select(list(fds), [], [], 0.5)
        for fd in readable:
            w = fds[fd]
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                w.proc.wait()
                code = w.proc.returncode
                if w.current is not None or w.todo:
                    how = f"signal {-code}" if code and code < 0 else f"exit {code}"
                    lost(w, "crash", f"worker died ({how}): {w.log_tail()}")
                else:
                    w.kill()
                    live.remove(w)
                continue
            w.buf += chunk
            while b"\n" in w.buf:
                line, w.buf = w.buf.split(b"\n", 1)
                msg = json.loads(line)
                if "ready" in msg:
                    w.ready = True
                elif "start" in msg:
                    w.current, w.started = msg["start"], time.monotonic()
                elif "result" in msg:
                    rec = msg["result"]
                    record(rec)
                    w.current = None
                    w.todo = [i for i in w.todo if i != rec["index"]]
        now = time.monotonic()
        for w in list(live):
            if w.current is not None and now - w.started > budget + grace:
                lost(w, "hang", f"no result after {budget + grace:.0f}s (stuck in native code: SIGALRM "
                                f"could not interrupt it); worker killed")
            elif not w.ready and now - w.started > startup_timeout:
                w.current = None
                w.kill()
                raise RuntimeError(f"fuzz worker {w.wid} did not start in {startup_timeout}s: {w.log_tail(20)}")
    return [results[i] for i in indices if i in results]


def _describe_case(seed, index, artefacts, work, families) -> dict:
    """Family, mutation and command of a case, generated again in a scratch folder."""
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"describe-{index}-", dir=work))
        (folder / "sacrificial").mkdir()
        case = make_case(seed, index, _base_for_describe(artefacts), folder, families)
        shutil.rmtree(folder, ignore_errors=True)
        return {"family": case.family, "mutation": case.mutation, "argv": case.argv,
                "command": show_argv(case.argv)}
    except Exception as exc:  # only a label is lost
        return {"mutation": f"(could not describe: {exc})"}


_BASES: dict[str, Base] = {}


def _base_for_describe(artefacts) -> Base:
    key = str(artefacts)
    if key not in _BASES:
        _BASES[key] = Base(Path(artefacts))
    return _BASES[key]


# =============================================================================== reports


def failure_signature(rec: dict) -> tuple:
    """Failures that are one defect share a signature: kinds, command, family, mutation kind,
    and the detail with numbers and paths blurred."""
    import re

    detail = re.sub(r"case-\d+", "case-N", rec.get("detail", ""))
    detail = re.sub(r"\d+", "N", detail)[:140]
    command = rec["argv"][0] if rec.get("argv") else "?"
    return tuple(rec["failures"]), command, detail


def format_summary(results: list[dict], seconds: float | None = None) -> str:
    outcomes = Counter(r["outcome"] for r in results)
    kinds = Counter(k for r in results for k in set(r["failures"]))
    families = Counter(r["family"] for r in results)
    failing = Counter(r["family"] for r in results if r["failures"])
    lines = [f"fuzz: {len(results)} cases" + (f" in {seconds:.1f} s" if seconds is not None else "")
             + f", {sum(1 for r in results if r['failures'])} failing"]
    shown = [o for o in OUTCOMES if outcomes.get(o) or o in ("exit 0", "exit 1", "exit 2")]
    lines.append("  outcome     " + "  ".join(f"{o}: {outcomes.get(o, 0)}" for o in shown))
    lines.append(f"  {'failure':<16}{'cases':>6}")
    for k in FAILURE_KINDS:
        lines.append(f"  {k:<16}{kinds.get(k, 0):>6}")
    lines.append(f"  {'family':<16}{'cases':>6}{'failing':>9}")
    for f in sorted(families):
        lines.append(f"  {f:<16}{families[f]:>6}{failing.get(f, 0):>9}")
    return "\n".join(lines)


def format_failures(results: list[dict], limit: int = 30) -> str:
    """The first failing case of each distinct signature, with how to run it again."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r["failures"]:
            groups.setdefault(failure_signature(r), []).append(r)
    lines = [f"{len(groups)} distinct failure(s):"]
    for sig, recs in list(groups.items())[:limit]:
        r = recs[0]
        lines.append(f"- [{', '.join(sig[0])}] x{len(recs)}  seed {r['seed']} case {r['index']} "
                     f"({r['family']}: {r['mutation']})")
        lines.append(f"    $ {r.get('command') or show_argv(r.get('argv') or [])}")
        lines.append(f"    {r['detail'][:400]}")
    if len(groups) > limit:
        lines.append(f"... and {len(groups) - limit} more")
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    worker_main(sys.argv[2])
