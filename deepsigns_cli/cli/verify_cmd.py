import click

from . import render
from .common import (
    alpha_option,
    commitment_option,
    common_options,
    keys_option,
    models_option,
    output_option,
    passphrase_from,
    provider_option,
    queries_option,
    read_suspects,
    timeout_option,
)


@click.command("verify")
@models_option("Suspect ONNX model (only its outputs are used).")
@output_option
@keys_option
@commitment_option
@alpha_option
@provider_option
@timeout_option
@queries_option
@common_options(random=False)
def command(models, output_name, keys_path, passphrase_file, commitment, alpha, provider, timeout, queries, seed,
            json_):
    """Black-box: decide ownership from ONNX models' answers alone.

    Exit code 0 when detected (p-value <= alpha), 1 when not, 2 on bad input; with several
    suspects, 2 when any could not be read (before all else), else 0 when any is detected.

    \b
    deepsigns verify --model suspect.onnx --keys owner.dskey
    deepsigns verify --model a.onnx --model b.onnx --keys owner.dskey
    """
    read_suspects("verify", models, keys_path, passphrase_from(passphrase_file), json_,
                  lambda c, r: c.print(render.decision_table(r)),
                  alpha=alpha, provider=provider, timeout=timeout, commitment=commitment, output=output_name,
                  queries=queries)
