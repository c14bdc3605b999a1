import click

from .. import api
from . import render
from .common import (
    alpha_option,
    commitment_option,
    common_options,
    emit_decision,
    keys_option,
    passphrase_from,
    provider_option,
    timeout_option,
)


@click.command("verify")
@click.option("--model", "model_path", required=True, help="Suspect ONNX model (only its outputs are used).")
@click.option("--output", "output_name", default=None, metavar="NAME",
              help="ONNX output to read (default: scores or probabilities if the model has them, else labels).")
@keys_option
@commitment_option
@alpha_option
@provider_option
@timeout_option
@common_options
def command(model_path, output_name, keys_path, passphrase_file, commitment, alpha, provider, timeout, seed, json_):
    """Black-box: decide ownership from an ONNX model's answers alone.

    Exit code 0 when detected (p-value <= alpha), 1 when not, 2 on bad input.

    \b
    deepsigns verify --model suspect.onnx --keys owner.dskey
    """
    report = api.verify(model_path, keys_path, passphrase_from(passphrase_file), alpha=alpha,
                        provider=provider, timeout=timeout, commitment=commitment, output=output_name)
    emit_decision(report, json_, lambda c, r: c.print(render.decision_table(r)))
