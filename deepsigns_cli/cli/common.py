"""Options shared by every command, error translation, passphrases, rendering."""

from __future__ import annotations

import functools
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from ..errors import DeepSignsError

EXIT_OK, EXIT_NOT_DETECTED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
PASSPHRASE_ENV = "DEEPSIGNS_PASSPHRASE"


class State:
    quiet = False


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, quiet=State.quiet)


def fail(message: str, code: int = EXIT_BAD_INPUT):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """Domain errors become one line on stderr and exit 2; Ctrl-C exits 130, nothing written."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DeepSignsError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail("interrupted: no output was written; run the command again", EXIT_INTERRUPTED)

    return wrapper


# ------------------------------------------------------------------ shared options


def common_options(fn):
    """--json, --quiet, --seed: on every command."""

    def set_quiet(ctx, param, value):
        State.quiet = value
        return value

    fn = click.option("--json", "json_", is_flag=True, help="Print one JSON object on stdout.")(fn)
    fn = click.option("--quiet", "-q", is_flag=True, callback=set_quiet, expose_value=False,
                      is_eager=True, help="Silence progress and warnings on stderr.")(fn)
    fn = click.option("--seed", type=int, default=None,
                      help="Seed for a reproducible run (default 0; keygen: fresh randomness).")(fn)
    return handle_errors(fn)


def device_option(fn):
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                        show_default=True, help="auto = CUDA when torch sees a GPU.")(fn)


def provider_option(fn):
    return click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                        show_default=True,
                        help="onnxruntime provider (auto = CUDA when really usable).")(fn)


def force_option(fn):
    return click.option("--force", is_flag=True, help="Replace existing outputs.")(fn)


def model_option(fn, help="Model: .safetensors checkpoint (or .pt with --arch)."):
    fn = click.option("--arch-kwargs", default=None,
                      help="JSON keyword arguments of --arch, e.g. '{\"hidden\": [256, 256]}'.")(fn)
    fn = click.option("--arch", default=None,
                      help="Architecture of a .pt/.pth state dict: mlp, cnn, resnet or module:factory.")(fn)
    return click.option("--model", "model_path", required=True, help=help)(fn)


def data_option(fn):
    return click.option("--data", "data_spec", default="digits", show_default=True,
                        help="'digits' or an .npz with x_train, y_train, x_test, y_test (or x, y).")(fn)


def keys_option(fn):
    fn = click.option("--passphrase-file", type=str, default=None,
                      help=f"File holding the passphrase (else ${PASSPHRASE_ENV}, else a prompt).")(fn)
    return click.option("--keys", "keys_path", required=True, help="The sealed key bundle (.dskey).")(fn)


def alpha_option(fn):
    return click.option("--alpha", type=click.FloatRange(0, 1, min_open=True), default=1e-3,
                        show_default=True, help="Significance: detected when p-value <= alpha.")(fn)


def parse_arch_kwargs(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"--arch-kwargs is not JSON ({exc.msg}): e.g. '{{\"hidden\": [256, 256]}}'")
    if not isinstance(value, dict):
        fail("--arch-kwargs must be a JSON object, e.g. '{\"hidden\": [256, 256]}'")
    return value


# ------------------------------------------------------------------ passphrases


def get_passphrase(passphrase_file: str | None, *, confirm: bool = False) -> str:
    if passphrase_file:
        path = Path(passphrase_file)
        if not path.is_file():
            fail(f"passphrase file not found: {path}: check --passphrase-file")
        try:
            text = path.read_text(encoding="utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            fail(f"passphrase file {path} is not UTF-8 text: write the passphrase into it as text")
        if not text:
            fail(f"passphrase file {path} is empty: write the passphrase into it")
        return text
    env = os.environ.get(PASSPHRASE_ENV)
    if env:
        return env
    if sys.stdin.isatty():
        return click.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm, err=True)
    fail(f"no passphrase: set {PASSPHRASE_ENV} or pass --passphrase-file")


# ------------------------------------------------------------------ output


def _plain(value):
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def emit(report: dict, json_: bool, render) -> None:
    """JSON on stdout for machines, or a rich rendering on stdout for people."""
    if json_:
        click.echo(json.dumps(_plain(report), indent=2, sort_keys=False))
        return
    from rich.console import Console

    render(Console(), report)


def emit_decision(report: dict, json_: bool, render=None) -> None:
    """Print a detection report (the decision table unless `render` says more); exit 0 when
    detected, 1 when not: the contract a release pipeline reads."""
    emit(report, json_, render or (lambda c, r: c.print(decision_table(r))))
    sys.exit(EXIT_OK if report["detected"] else EXIT_NOT_DETECTED)


def info(message: str) -> None:
    stderr_console().print(message, highlight=False)


@contextmanager
def progress_bar():
    """A rich progress bar on stderr; yields the callback the library calls."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    console = stderr_console()
    # off when stderr is not a terminal: rich would only print a blank line there, which breaks
    # the one-line error contract and clutters CI logs
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True,
                  disable=State.quiet or not console.is_terminal) as bar:
        tasks: dict[str, int] = {}

        def update(done: int, total: int, description: str) -> None:
            key = description.split(" epoch")[0]
            if key not in tasks:
                tasks[key] = bar.add_task(description, total=total)
            bar.update(tasks[key], completed=done, total=total, description=description)

        yield update


def fmt_p(p: float) -> str:
    return f"{p:.3g}"


def kv_table(title: str, rows: list[tuple[str, object]]):
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, str(v))
    return table


# ------------------------------------------------------------------ loading


def load_model(model_path: str, arch: str | None, arch_kwargs: str | None, *, data=None, bundle=None):
    """A checkpoint from the command line; .pt shapes come from --data or the bundle."""
    from ..checkpoint import load_checkpoint

    shape = classes = None
    if data is not None:
        shape, classes = data.input_shape, data.num_classes
    elif bundle is not None:
        shape, classes = tuple(bundle.info["input_shape"]), bundle.info["num_classes"]
    return load_checkpoint(model_path, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs),
                           input_shape=shape, num_classes=classes)


def open_keys(keys_path: str, passphrase_file: str | None):
    """(bundle, passphrase): the passphrase too, for commands that seal the bundle again."""
    from ..bundle import open_bundle, read_header

    read_header(keys_path)  # a missing or foreign file fails before the passphrase prompt
    passphrase = get_passphrase(passphrase_file)
    return open_bundle(keys_path, passphrase), passphrase


def decision_table(report: dict):
    from rich.table import Table

    verdict = "[bold green]DETECTED[/]" if report["detected"] else "[bold red]NOT DETECTED[/]"
    table = Table(title=f"{verdict}  p = {fmt_p(report['p_value'])}  (alpha = {report['alpha']:g})",
                  title_justify="left")
    for col in ("scheme", "where", "evidence", "p-value", "decision"):
        table.add_column(col)
    for r in report["results"]:
        table.add_row(r["scheme"], *_evidence(r), fmt_p(r["p_value"]),
                      "detected" if r["detected"] else "not detected")
    return table


def _evidence(r: dict) -> tuple[str, str]:
    """(where, evidence) columns of one scheme's result."""
    if r["scheme"] == "output":
        return (f"{r['queries']} queries",
                f"{r['matches']}/{r['keys']} keys match; {r['mismatches']} mismatches "
                f"(at most {r['max_mismatches']} allowed)")
    if r.get("candidates", 1) > 1:
        where = f"{r.get('tensor')} (best of {r['candidates']} tensors)"
    else:
        where = str(r.get("tensor") or r.get("layer", ""))
    if not r.get("bits"):
        return where or "-", r.get("note", "no carrier found")
    return where, f"{r['bit_errors']}/{r['n_bits']} bits wrong (BER {r['ber']:.3f})"
