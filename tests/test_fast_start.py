"""`deepsigns --help` and every `--help` start fast: torch (nor onnx/onnxruntime) is not imported.

Each check runs in a fresh interpreter, since this test process has torch loaded already.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import deepsigns_argv

COMMANDS = ["train", "keygen", "embed", "export", "extract", "verify", "attack", "inspect"]
HEAVY = ("torch", "onnx", "onnxruntime")

# Runs the CLI in-process (standalone_mode=False: no sys.exit) and reports what got imported.
PROBE = r"""
import json, sys
{preload}
from deepsigns_cli.cli.main import cli
try:
    code = cli.main(args=json.loads(sys.argv[1]), prog_name="deepsigns", standalone_mode=False)
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})
sys.stderr.write(json.dumps({{"code": code, "heavy": heavy}}) + "\n")
"""


def probe(args: list[str], preload: str = "") -> tuple[str, dict]:
    code = PROBE.format(preload=preload, heavy=HEAVY)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, json.loads(proc.stderr.strip().splitlines()[-1])


@pytest.mark.parametrize("command", [None, *COMMANDS, "attack noise"])
def test_help_does_not_import_torch(command):
    args = [*command.split(), "--help"] if command else ["--help"]
    out, seen = probe(args)
    assert seen["code"] in (0, None)
    assert out.startswith(f"Usage: deepsigns {command or ''}".rstrip())
    assert seen["heavy"] == [], f"deepsigns {' '.join(args)} imported {seen['heavy'][:5]}"


def test_the_probe_sees_torch_when_it_is_imported():
    """The check above can fail: a module that imports torch at load is caught."""
    _, seen = probe(["--help"], preload="import deepsigns_cli.checkpoint")
    assert "torch" in seen["heavy"]


@pytest.mark.parametrize("args", [["--help"], ["embed", "--help"], ["--version"]],
                         ids=["group", "embed", "version"])
def test_installed_script_starts_without_torch(args):
    """The real entry point, with Python's own import log (-X importtime)."""
    script = deepsigns_argv()
    if script[0] == sys.executable:  # no console script installed: run main() directly
        cmd = [sys.executable, "-X", "importtime", *script[1:], *args]
    else:
        cmd = [sys.executable, "-X", "importtime", script[0], *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0]
                for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "click" in imported  # the log is really there
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
