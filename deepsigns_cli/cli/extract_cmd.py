import click

from . import render
from .common import (
    alpha_option,
    arch_options,
    commitment_option,
    common_options,
    keys_option,
    models_option,
    output_option,
    parse_arch_kwargs,
    passphrase_from,
    provider_option,
    queries_option,
    read_suspects,
    timeout_option,
)


@click.command("extract")
@models_option("Suspect: .safetensors, .pt (with --arch) or .onnx.")
@output_option
@arch_options
@keys_option
@commitment_option
@alpha_option
@provider_option
@timeout_option
@queries_option
@common_options(random=False)
def command(models, output_name, arch, arch_kwargs, keys_path, passphrase_file, commitment, alpha,
            provider, timeout, queries, seed, json_):
    """White-box: read the watermark from checkpoints or ONNX files.

    Exit code 0 when detected (p-value <= alpha), 1 when not, 2 on bad input; with several
    suspects, 2 when any could not be read (before all else), else 0 when any is detected.

    \b
    deepsigns extract --model marked.onnx --keys owner.dskey
    deepsigns extract --model downloads/ --keys owner.dskey
    """
    read_suspects("extract", models, keys_path, passphrase_from(passphrase_file), json_, render.decision,
                  alpha=alpha, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs), provider=provider,
                  timeout=timeout, commitment=commitment, output=output_name,
                  queries=queries)
