"""The README is the user's manual: every `bash` block runs, in order, as a newcomer would."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def bash_blocks() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    # the set-up block (make demo / make test) is what runs this suite: not run from here
    return [b for b in blocks if not re.search(r"^make ", b, flags=re.M)]


def test_readme_opens_with_the_two_commands():
    first = re.search(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert first and "make demo" in first.group(1) and "make test" in first.group(1)


def test_readme_has_an_example_for_every_command():
    from deepsigns_cli.cli.main import COMMANDS

    text = "\n".join(bash_blocks())
    for name in COMMANDS:
        assert re.search(rf"deepsigns {name}\b", text), f"no README example runs '{name}'"


@pytest.mark.slow
def test_readme_examples_run(tmp_path):
    script = "set -euo pipefail\n" + "\n".join(bash_blocks())
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("DEEPSIGNS_PASSPHRASE", None)  # the README sets it itself
    shutil.copytree(ROOT / "sample_models", tmp_path / "sample_models")
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")  # (an example runs one of them)
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, check=False, timeout=900)
    assert proc.returncode == 0, f"README examples failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "DETECTED" in proc.stdout and "not detected" in proc.stdout
    for made in ("base.safetensors", "owner.dskey", "marked.safetensors", "marked.onnx",
                 "bb-marked.onnx", "bb-guarded.onnx", "gs-guarded.onnx"):
        assert (tmp_path / made).is_file(), made
