"""`deepsigns attack NAME`: one subcommand per row of the registry's attack table, built from
the row (its options), so a new attack needs no CLI code."""

import click

from .. import api
from . import render
from .common import (
    DECIMAL,
    WHOLE,
    OnceGroup,
    alpha_option,
    arch_options,
    batch_size_option,
    commitment_option,
    common_options,
    data_option,
    device_option,
    emit,
    force_option,
    parse_arch_kwargs,
    passphrase_from,
    progress_bar,
    provider_option,
    queries_option,
    registry_option,
    timeout_option,
)
from .launch import precision_option, workers_option


def _parse_sweep(text: str) -> tuple[str, list]:
    """'rate=0.1,0.5,0.9' -> ("rate", [0.1, 0.5, 0.9]): numbers where they read as numbers."""
    param, sep, values = text.partition("=")
    if not sep or not param.strip() or not values.strip():
        raise click.UsageError(f"--sweep takes PARAM=v1,v2,... (e.g. rate=0.1,0.5,0.9), got {text!r}")

    def value(v: str):  # (in the digits 0-9: '1_0' is not 10, and 'nan' is a word, which the attack refuses)
        try:
            return int(v) if WHOLE.fullmatch(v) else float(v) if DECIMAL.fullmatch(v) else v
        except ValueError:  # (more digits than int() converts: a word too)
            return v

    return param.strip(), [value(v.strip()) for v in values.split(",") if v.strip()]


def _attack_command(name: str) -> click.Command:
    entry = api.ATTACKS[name]

    def run(model_path, arch, arch_kwargs, data_spec, out, force, device, seed, json_, sweep, keys_path,
            passphrase_file, commitment, output_name, queries, alpha, plot, provider, timeout,
            attacker_passphrase_file=None, **options):
        attacker = passphrase_from(attacker_passphrase_file, confirm=True,
                                   option="--attacker-passphrase-file") if entry.passphrase else None
        training = {k: options.pop(k) for k in ("batch_size", "workers", "precision") if k in options}
        kwargs = dict(data=data_spec, options=options, seed=seed or 0, device=device, arch=arch, **training,
                      arch_kwargs=parse_arch_kwargs(arch_kwargs), force=force, timeout=timeout, provider=provider,
                      also_inputs={"--passphrase-file": passphrase_file,  # (never overwritten, as every input)
                                   "--attacker-passphrase-file": attacker_passphrase_file})
        if sweep is None:  # (--alpha 5 or a passphrase file had been taken and ignored)
            ctx = click.get_current_context()
            for flag, param in (("--keys", "keys_path"), ("--plot", "plot"), ("--passphrase-file", "passphrase_file"),
                                ("--alpha", "alpha"), ("--commitment", "commitment"), ("--queries", "queries")):
                if ctx.get_parameter_source(param) not in (None, click.core.ParameterSource.DEFAULT):
                    raise click.UsageError(f"{flag} goes with --sweep (the owner's keys read in each attacked "
                                           "model); without it, attack only writes the attacked model")
            if out is None:
                raise click.UsageError("give --out, the attacked model to write (or --sweep with --keys)")
            with progress_bar() as progress:
                report = api.attack(name, model_path, out, passphrase=attacker, progress=progress,
                                    output=output_name, **kwargs)
            emit(report, json_, render.attack)
            return
        if keys_path is None:
            raise click.UsageError("--sweep needs --keys: the owner's bundle, read in each attacked model")
        param, values = _parse_sweep(sweep)
        with progress_bar() as progress:
            report = api.sweep(name, model_path, param, values, keys_path, passphrase_from(passphrase_file),
                               alpha=alpha, keep=out, plot=plot, attacker_passphrase=attacker,
                               commitment=commitment, output=output_name, queries=queries,
                               progress=progress, **kwargs)
        emit(report, json_, render.sweep)

    # applied bottom-up: the options appear in the help as listed from the last line up
    run = provider_option(timeout_option(force_option(device_option(common_options(run)))))
    if entry.trains:
        run = precision_option(workers_option(batch_size_option(run, parallel=False)))
    run = click.option("--plot", default=None, help="With --sweep: a PNG of accuracy and the watermarks' "
                       "evidence against strength.")(run)
    run = alpha_option(run)
    run = queries_option(commitment_option(run))  # (with --sweep: as extract and verify read)
    run = click.option("--output", "output_name", default=None, metavar="NAME",
                       help="The ONNX victim's output to attack and read the accuracy of (default: its first "
                            "class scores, else labels); with --sweep, also the output the owner's keys are "
                            "read from in the victim and in each attacked model that keeps it.")(run)
    run = click.option("--passphrase-file", default=None, help="With --sweep: file holding the owner's "
                       "passphrase (else $DEEPSIGNS_PASSPHRASE, else a prompt).")(run)
    run = click.option("--keys", "keys_path", default=None, help="With --sweep: the owner's bundle (.dskey), "
                       "read in every attacked model.")(run)
    numeric = [o.key for o in entry.options if o.kind in ("int", "float")]
    run = click.option("--sweep", default=None, metavar="PARAM=V1,V2,...",
                       help="Run the attack at each value of one of its options, then read the owner's keys "
                            "(extract and verify) in every result"
                            + (f", e.g. --sweep {numeric[0]}=V1,V2,V3 (PARAM: {', '.join(numeric)})." if numeric
                               else " (this attack has no option to sweep)."))(run)
    if entry.passphrase:
        run = click.option("--attacker-passphrase-file", default=None,
                           help="File holding the passphrase of the attacker's bundle this attack writes "
                                "(else $DEEPSIGNS_PASSPHRASE, else a prompt).")(run)
    for option in reversed(entry.options):
        run = registry_option(option)(run)
    outs = " or ".join({"checkpoint": ".safetensors", "onnx": ".onnx"}[w] for w in entry.writes)
    run = click.option("--out", default=None, help=f"The attacked model to write ({outs}); with --sweep, a "
                       "folder to keep every attacked model in (else none is kept).")(run)
    run = arch_options(data_option(run))
    takes = "" if entry.takes == "torch" else ", or an .onnx file"
    run = click.option("--model", "model_path", required=True,
                       help=f"The model to attack (.safetensors, or .pt with --arch{takes}).")(run)
    return click.command(name, help=f"{entry.summary[0].upper()}{entry.summary[1:]}.",
                         short_help=entry.summary)(run)


class AttackGroup(OnceGroup):
    def list_commands(self, ctx):
        return list(api.ATTACKS)

    def get_command(self, ctx, name):
        return _attack_command(name) if name in api.ATTACKS else None


@click.group("attack", cls=AttackGroup)
def command():
    """Attack a model the way a thief would; write the attacked model.

    \b
    deepsigns attack noise --model marked.safetensors --data digits --sigma 0.1 --out noisy.safetensors
    deepsigns attack prune --model marked.safetensors --sweep rate=0.5,0.9 --keys owner.dskey --plot prune.png
    """
