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


def test_the_alpha_table_is_what_the_statistics_give_at_the_defaults():
    """'Why alpha is 1e-9': each scheme's row, from its defaults and stats at alpha = 1e-9."""
    from deepsigns_cli import stats
    from deepsigns_cli.defaults import DEFAULT_ALPHA
    from deepsigns_cli.schemes import gradsigns, hidden, output

    def row(scheme: str) -> str:
        section = README.read_text(encoding="utf-8").split("#### Why alpha is 1e-9", 1)[1]
        found = re.search(rf"^\| `{scheme}` \|(.*)\|$", section, flags=re.M)
        assert found, f"no row for {scheme}"
        return found.group(1)

    assert DEFAULT_ALPHA == 1e-9
    bits = hidden.DEFAULTS["bits"] * hidden.DEFAULTS["classes"]  # read three ways: alpha / 3 each
    errors = stats.max_bit_errors(bits, DEFAULT_ALPHA / hidden.CHECKPOINT_READINGS)
    assert f"({bits} bits)" in row("hidden") and f"at most {errors} bit errors" in row("hidden")
    assert f"read {hidden.CHECKPOINT_READINGS} ways" in row("hidden")
    assert f"{hidden.CHECKPOINT_READINGS} x {stats.bits_p_value(errors, bits):.1e}" in row("hidden")
    bits = gradsigns.DEFAULTS["bits"]
    errors = stats.max_bit_errors(bits, DEFAULT_ALPHA)
    assert f"{bits} bits" in row("gradsigns") and f"at most {errors} bit errors" in row("gradsigns")
    assert f"{stats.bits_p_value(errors, bits):.1e}" in row("gradsigns")
    keys, candidates = output.DEFAULTS["key_size"], output.DEFAULTS["candidates"]
    chosen = (candidates, 3 * candidates // 4)  # the pool best_p_value assumes before embed
    # (the answers as given: 99% of alpha, stats.RELABEL_SHARE)
    least = min(m for m in range(keys + 1)
                if stats.as_answered(stats.matches_p_value(m, keys, 9, chosen)) <= DEFAULT_ALPHA)
    assert f"{keys} keys, 10 classes, drawn from {chosen[1]} of {candidates} candidates" in row("output")
    assert f"at least {least} of {keys} keys" in row("output")
    assert f"{stats.as_answered(stats.matches_p_value(least, keys, 9, chosen)):.1e}" in row("output")
    # ten keys reach alpha only from a pool of this many candidates (keygen assumes 3 in 4)
    pool = min(p for p in range(10, candidates)
               if stats.as_answered(stats.matches_p_value(10, 10, 9, (candidates, p))) <= DEFAULT_ALPHA)
    text = " ".join(README.read_text(encoding="utf-8").split())
    assert f"only if {pool} or more of the {candidates} candidates last" in text
