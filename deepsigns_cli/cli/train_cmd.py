import click

from .common import (
    common_options,
    data_option,
    device_option,
    emit,
    force_option,
    kv_table,
    parse_arch_kwargs,
    progress_bar,
)


@click.command("train")
@click.option("--arch", required=True, help="mlp, cnn, resnet, or package.module:factory.")
@click.option("--arch-kwargs", default=None, help="JSON keyword arguments for the architecture.")
@data_option
@click.option("--epochs", type=click.IntRange(1), default=30, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--out", required=True, help="Output checkpoint (.safetensors).")
@force_option
@device_option
@common_options
def command(arch, arch_kwargs, data_spec, epochs, lr, batch_size, out, force, device, seed, json_):
    """Train a plain (unmarked) baseline model.

    \b
    deepsigns train --arch mlp --data digits --epochs 30 --seed 0 --out base.safetensors
    """
    from ..api import train_baseline
    from ..checkpoint import save_checkpoint
    from ..data import load_data
    from ..fileio import check_output

    check_output(out, force, inputs={"--data": data_spec})
    data = load_data(data_spec)
    with progress_bar() as progress:
        model, info, report = train_baseline(
            arch, data, arch_kwargs=parse_arch_kwargs(arch_kwargs), epochs=epochs, lr=lr,
            batch_size=batch_size, seed=seed or 0, device=device, progress=progress)
    save_checkpoint(model, info, out, force=force)
    report["out"] = out
    emit(report, json_, lambda c, r: c.print(kv_table("trained", [
        ("architecture", r["arch"]), ("data", r["data"]), ("epochs", r["epochs"]),
        ("test accuracy", f"{r['test_accuracy']:.2f}%"),
        ("seconds / epoch", f"{r['seconds_per_epoch']:.3f}"), ("written", r["out"])])))
