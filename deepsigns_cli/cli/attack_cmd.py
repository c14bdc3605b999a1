"""`deepsigns attack NAME`: one subcommand per row of the registry's attack table, built from
the row (its options), so a new attack needs no CLI code."""

import click

from .. import api
from . import render
from .common import (
    arch_options,
    common_options,
    data_option,
    device_option,
    emit,
    force_option,
    parse_arch_kwargs,
    passphrase_from,
    progress_bar,
    registry_option,
)


def _attack_command(name: str) -> click.Command:
    entry = api.ATTACKS[name]

    def run(model_path, arch, arch_kwargs, data_spec, out, force, device, seed, json_,
            passphrase_file=None, **options):
        passphrase = passphrase_from(passphrase_file, confirm=True) if entry.passphrase else None
        with progress_bar() as progress:
            report = api.attack(name, model_path, out, data=data_spec, options=options,
                                seed=seed or 0, device=device, arch=arch,
                                arch_kwargs=parse_arch_kwargs(arch_kwargs), force=force,
                                passphrase=passphrase, progress=progress)
        emit(report, json_, render.attack)

    # applied bottom-up: the options appear in the help as listed from the last line up
    run = force_option(device_option(common_options(run)))
    if entry.passphrase:
        run = click.option("--passphrase-file", default=None,
                           help="File holding the passphrase of the bundle this attack writes "
                                "(else $DEEPSIGNS_PASSPHRASE, else a prompt).")(run)
    for option in reversed(entry.options):
        run = registry_option(option)(run)
    outs = " or ".join({"checkpoint": ".safetensors", "onnx": ".onnx"}[w] for w in entry.writes)
    run = click.option("--out", required=True, help=f"The attacked model to write ({outs}).")(run)
    run = arch_options(data_option(run))
    takes = "" if entry.takes == "torch" else ", or an .onnx file"
    run = click.option("--model", "model_path", required=True,
                       help=f"The model to attack (.safetensors, or .pt with --arch{takes}).")(run)
    return click.command(name, help=f"{entry.summary[0].upper()}{entry.summary[1:]}.",
                         short_help=entry.summary)(run)


class AttackGroup(click.Group):
    def list_commands(self, ctx):
        return list(api.ATTACKS)

    def get_command(self, ctx, name):
        return _attack_command(name) if name in api.ATTACKS else None


@click.group("attack", cls=AttackGroup)
def command():
    """Attack a model the way a thief would; write the attacked model.

    \b
    deepsigns attack noise --model marked.safetensors --data digits --sigma 0.1 --out noisy.safetensors
    """
