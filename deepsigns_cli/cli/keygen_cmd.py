import click

from .. import api
from . import render
from .common import (
    arch_options,
    common_options,
    data_option,
    emit,
    force_option,
    parse_arch_kwargs,
    passphrase_from,
    progress_bar,
    registry_option,
)


def scheme_options(fn):
    """One click option per keygen option of the registry (--bits serves several schemes)."""
    for option, takers in reversed(api.keygen_options()):
        fn = registry_option(option, f"{'/'.join(takers)}: ")(fn)
    return fn


@click.command("keygen")
@click.option("--model", "model_path", required=True,
              help="The model to protect: .safetensors checkpoint (or .pt with --arch).")
@arch_options
@data_option
@click.option("--scheme", "schemes", default=",".join(api.DEFAULT_SCHEMES), show_default=True,
              help="Comma-separated schemes: " + ", ".join(f"{n} ({e.summary.split(':')[0]})"
                                                           for n, e in api.SCHEMES.items()) + ".")
@scheme_options
@click.option("--out", required=True, help="The sealed key bundle to write (.dskey).")
@click.option("--passphrase-file", default=None,
              help="File holding the passphrase (else $DEEPSIGNS_PASSPHRASE, else a prompt).")
@force_option
@common_options(fresh=True)
def command(model_path, arch, arch_kwargs, data_spec, schemes, out, passphrase_file, force, seed,
            json_, **options):
    """Create a sealed key bundle with fresh watermark secrets.

    \b
    deepsigns keygen --model base.safetensors --data digits --scheme hidden --bits 32 --out owner.dskey
    """
    if options.get("bits") is not None and options.get("message") is not None:
        raise click.UsageError("give --bits or --message, not both")
    with progress_bar() as progress:
        report = api.keygen(model_path, out, passphrase_from(passphrase_file, confirm=True),
                            data=data_spec, schemes=schemes.split(","), options=options, arch=arch,
                            arch_kwargs=parse_arch_kwargs(arch_kwargs), seed=seed, force=force,
                            also_inputs={"--passphrase-file": passphrase_file}, progress=progress)
    emit(report, json_, render.keygen)
