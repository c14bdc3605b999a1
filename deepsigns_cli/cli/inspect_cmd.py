import click

from .. import api
from . import render
from .common import common_options, emit


@click.command("inspect")
@click.argument("file")
@common_options(random=False)
def command(file, seed, json_):
    """Show the public facts of a checkpoint, bundle or ONNX file (never a secret).

    \b
    deepsigns inspect owner.dskey
    """
    emit(api.inspect(file), json_, render.inspect)
