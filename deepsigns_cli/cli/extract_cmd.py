import click

from .. import api
from . import render
from .common import (
    alpha_option,
    arch_options,
    commitment_option,
    common_options,
    emit_decision,
    keys_option,
    parse_arch_kwargs,
    passphrase_from,
    provider_option,
    timeout_option,
)


@click.command("extract")
@click.option("--model", "model_path", required=True, help="Suspect: .safetensors, .pt (with --arch) or .onnx.")
@click.option("--output", "output_name", default=None, metavar="NAME",
              help="ONNX output to read (default: scores or probabilities if the model has them, else labels).")
@arch_options
@keys_option
@commitment_option
@alpha_option
@provider_option
@timeout_option
@common_options
def command(model_path, output_name, arch, arch_kwargs, keys_path, passphrase_file, commitment, alpha,
            provider, timeout, seed, json_):
    """White-box: read the watermark from a checkpoint or ONNX file.

    Exit code 0 when detected (p-value <= alpha), 1 when not, 2 on bad input.

    \b
    deepsigns extract --model marked.onnx --keys owner.dskey
    """
    report = api.extract(model_path, keys_path, passphrase_from(passphrase_file), alpha=alpha,
                         arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs), provider=provider,
                         timeout=timeout, commitment=commitment, output=output_name)
    emit_decision(report, json_, render.decision)
