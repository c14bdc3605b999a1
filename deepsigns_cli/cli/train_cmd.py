import click

from .. import api
from . import render
from .common import (
    Number,
    batch_size_option,
    common_options,
    data_option,
    device_option,
    emit,
    force_option,
    int_range,
    parse_arch_kwargs,
    progress_bar,
    warn,
)
from .launch import is_main, nproc_option, precision_option, relaunch, workers_option


@click.command("train")
@click.option("--arch", required=True, help="mlp, cnn, resnet, or package.module:factory.")
@click.option("--arch-kwargs", default=None, help="JSON keyword arguments for the architecture.")
@data_option
@click.option("--epochs", type=int_range("epochs"), default=30, show_default=True)
@click.option("--lr", type=Number(), default=1e-3, show_default=True, help="Learning rate (Adam).")
@batch_size_option
@click.option("--out", required=True, help="Output checkpoint (.safetensors).")
@force_option
@device_option
@nproc_option
@workers_option
@precision_option
@common_options
def command(arch, arch_kwargs, data_spec, epochs, lr, batch_size, out, force, device, nproc, workers, precision, seed,
            json_):
    """Train a plain (unmarked) baseline model.

    \b
    deepsigns train --arch mlp --data digits --epochs 30 --seed 0 --out base.safetensors
    """
    if nproc is not None:
        relaunch(nproc, device)
    with api.process_group(device, waiting=warn), progress_bar() as progress:
        report = api.train(arch, out, data=data_spec, arch_kwargs=parse_arch_kwargs(arch_kwargs),
                           epochs=epochs, lr=lr, batch_size=batch_size, seed=seed or 0,
                           device=device, force=force, progress=progress, workers=workers,
                           precision=precision)
    if is_main():
        emit(report, json_, render.train)
