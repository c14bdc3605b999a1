import click

from .. import api
from . import render
from .common import (
    EXIT_NOT_DETECTED,
    EXIT_OK,
    alpha_option,
    arch_options,
    common_options,
    emit,
    output_option,
    parse_arch_kwargs,
    passphrase_from,
    provider_option,
    queries_option,
    timeout_option,
)


@click.command("dispute")
@click.option("--party", "parties", multiple=True, required=True, nargs=3,
              metavar="KEYS PASSPHRASE_FILE MODEL",
              help="One party: their bundle, the file holding its passphrase, and their model "
                   "(checkpoint or ONNX). Give it twice.")
@click.option("--name", "names", multiple=True, help="The parties' names, in order (default A, B).")
@click.option("--control", "controls", multiple=True, metavar="MODEL",
              help="A model neither party made (e.g. one you train): keys that detect it prove nothing, "
                   "and that party's claim is void. May be given more than once.")
@click.option("--commitment", "commitments", multiple=True, metavar="SHA256",
              help="The commitment each party published, in --party order (give it twice, or not at "
                   "all): a bundle other than the one published is refused.")
@output_option
@arch_options
@alpha_option
@provider_option
@timeout_option
@queries_option
@common_options(random=False)
def command(parties, names, controls, commitments, output_name, arch, arch_kwargs, alpha, provider, timeout,
            queries, seed, json_):
    """Two parties claim one model: every party's keys are read (white-box) from every
    party's model, and the matrix says who marked first.

    The party whose mark is in the other's model while the other's mark is not in theirs
    marked first. Exit code 0 when the reading names a party, 1 when it cannot, 2 on bad input.

    \b
    deepsigns dispute --party owner.dskey owner.pass owner.safetensors \\
                      --party thief.dskey thief.pass thief.safetensors
    """
    import sys

    for flag, given in (("--name", names), ("--commitment", commitments)):
        if given and len(given) != len(parties):
            raise click.BadParameter(f"give one {flag} per --party ({len(parties)}), or none", param_hint=flag)
    # (a party's passphrase file is the second word of its --party: errors name it so)
    report = api.dispute([(keys, passphrase_from(pfile, option=f"the PASSPHRASE_FILE of --party {i + 1}"), model)
                          for i, (keys, pfile, model) in enumerate(parties)],
                         alpha=alpha, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs),
                         provider=provider, timeout=timeout, names=list(names) or None, controls=list(controls),
                         commitments=list(commitments) or None, output=output_name, queries=queries)
    emit(report, json_, render.dispute)
    sys.exit(EXIT_OK if report.detected else EXIT_NOT_DETECTED)
