"""The `deepsigns` command group. Subcommands are imported only when used (fast --help)."""

from __future__ import annotations

import importlib

import click

from .. import __version__

COMMANDS = {
    "train": "Train a plain (unmarked) baseline model.",
    "keygen": "Create a sealed key bundle with fresh watermark secrets.",
    "embed": "Embed the bundle's watermarks by fine-tuning a model.",
    "export": "Export a checkpoint to ONNX, checked for parity with torch.",
    "extract": "White-box: read the watermark from a checkpoint or ONNX file.",
    "verify": "Black-box: decide ownership from an ONNX model's answers alone.",
    "inspect": "Show the public facts of a checkpoint, bundle or ONNX file.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"deepsigns_cli.cli.{name}_cmd").command

    def format_commands(self, ctx, formatter):  # short help without importing every module
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, text in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deepsigns")
def cli():
    """Watermark neural networks and prove ownership later.

    Exit codes: 0 success or watermark detected, 1 not detected, 2 bad input.
    """


def main():
    cli(prog_name="deepsigns")
