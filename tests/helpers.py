"""Helpers shared by the tests: run the CLI in-process or as a real process, check errors."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result

from deepsigns_cli.cli.main import cli

PASSPHRASE = "correct horse battery staple"
SEEDS = (0, 1, 2)  # quality claims hold for each of these
MESSAGE = "ACME 2026"  # 72 bits: the owner's message, read back by extract
ENV = {"DEEPSIGNS_PASSPHRASE": PASSPHRASE}
# a CI that forces colours would make rich draw progress bars into captured stderr
NOT_A_TERMINAL = {"FORCE_COLOR": None, "TTY_COMPATIBLE": None}


def _describe(args, result_code, stdout, stderr, extra="") -> str:
    return (f"deepsigns {' '.join(map(str, args))} -> exit {result_code}\n"
            f"--- stdout\n{stdout}\n--- stderr\n{stderr}{extra}")


def run_cli(*args, code: int | None = 0, env: dict | None = None,
            input: str | None = None) -> Result:
    """Invoke `deepsigns ARGS` in-process with click's CliRunner; check the exit code."""
    result = CliRunner().invoke(cli, [str(a) for a in args],
                                env={**NOT_A_TERMINAL, **ENV, **(env or {})},
                                input=input, catch_exceptions=True)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(*result.exc_info))
        raise AssertionError(_describe(args, result.exit_code, result.stdout, result.stderr,
                                       f"\n--- uncaught exception\n{tb}"))
    if code is not None:
        assert result.exit_code == code, _describe(args, result.exit_code, result.stdout,
                                                   result.stderr)
    return result


def run_json(*args, code: int | None = 0, env: dict | None = None) -> dict:
    """Invoke with --json and parse stdout (which must be exactly one JSON object)."""
    result = run_cli(*args, "--json", code=code, env=env)
    return json.loads(result.stdout)


def default_sigint() -> None:
    """preexec_fn for a child that a test interrupts: SIGINT back to its default. A test run
    started in the background of a non-interactive shell inherits SIGINT ignored, and Python
    then installs no KeyboardInterrupt handler (so Ctrl-C would never reach the child)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def deepsigns_argv() -> list[str]:
    """The installed console script (a real `deepsigns` process)."""
    script = Path(sys.executable).with_name("deepsigns")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from deepsigns_cli.cli.main import main; main()"]


def process_env(env: dict | None = None) -> dict:
    """The environment of a real deepsigns process: no terminal colours and the passphrase (one
    thread comes with os.environ: tests/conftest.py sets it for every process of the suite)."""
    full_env = {**os.environ, **NOT_A_TERMINAL, **ENV, **(env or {})}
    return {k: v for k, v in full_env.items() if v is not None}


@contextlib.contextmanager
def reaped(proc: subprocess.Popen):
    """The block's process, killed and waited for if it is still running when the block ends
    (a failed assertion included)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_proc(*args, env: dict | None = None, timeout: float = 300, cwd=None):
    """Run `deepsigns ARGS` as a real process with no terminal on stdin."""
    return subprocess.run([*deepsigns_argv(), *map(str, args)], env=process_env(env), cwd=cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(stderr: str, stdout: str, *needles: str) -> str:
    """stderr is exactly one line "error: ..." naming the problem; no traceback anywhere."""
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and stderr.endswith("\n"), f"want one line on stderr, got:\n{stderr!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    return line


def assert_bad_input(result: Result, *needles: str) -> str:
    """Exit 2 with one clear error line (CliRunner result)."""
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
    assert result.stdout == "", result.stdout
    return assert_one_error_line(result.stderr, result.stdout, *needles)


def partial_files(folder: Path) -> list[str]:
    """Temporary files an interrupted or failed write would leave behind."""
    return sorted(name for name in os.listdir(folder) if name.endswith(".part"))


def copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def imports_torch(model: Path, keys: Path, passphrase: str, command: str = "verify") -> bool:
    """Run `deepsigns COMMAND` (verify, or extract on an ONNX file: it must detect, exit 0) in a
    fresh interpreter; whether it imported torch. Release pipelines run them on every artifact:
    onnxruntime alone must do (torch's import alone takes 1.7 s)."""
    code = (
        "import sys\n"
        "from deepsigns_cli.cli.main import cli\n"
        "try:\n"
        f"    cli([{command!r}, '--model', {str(model)!r}, '--keys', {str(keys)!r}, '--json'], standalone_mode=False)\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          env={**os.environ, "DEEPSIGNS_PASSPHRASE": passphrase})
    assert proc.returncode == 0, proc.stderr
    return not proc.stdout.strip().endswith("NO-TORCH")
