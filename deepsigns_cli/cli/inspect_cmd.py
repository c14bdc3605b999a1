import click

from .common import common_options, emit, kv_table


@click.command("inspect")
@click.argument("file")
@common_options
def command(file, seed, json_):
    """Show the public facts of a checkpoint, bundle or ONNX file (never a secret).

    \b
    deepsigns inspect owner.dskey
    """
    from ..describe import describe

    report = describe(file)

    def render(c, r):
        c.print(kv_table(f"{r['kind']}: {r['path']}",
                         [(k, v) for k, v in r.items() if k not in ("kind", "path")]))

    emit(report, json_, render)
