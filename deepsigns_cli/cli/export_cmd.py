import click

from .. import api
from . import render
from .common import arch_options, common_options, data_option, emit, force_option, parse_arch_kwargs


@click.command("export")
@click.argument("checkpoint")
@click.option("--out", required=True, help="The ONNX file to write.")
@arch_options
@data_option(default=None, help="Data giving a .pt's input shape, and parity inputs: 'digits', an .npz, an "
                                "image folder or package.module:factory.")
@force_option
@common_options(random=False)
def command(checkpoint, out, arch, arch_kwargs, data_spec, force, seed, json_):
    """Export a checkpoint to ONNX (opset 17, dynamic batch), checked for parity with torch.

    \b
    deepsigns export marked.safetensors --out marked.onnx
    """
    report = api.export(checkpoint, out, data=data_spec, arch=arch,
                        arch_kwargs=parse_arch_kwargs(arch_kwargs), force=force)
    emit(report, json_, render.export)
