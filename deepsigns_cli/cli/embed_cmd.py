import click

from .. import api
from . import render
from .common import (
    Number,
    asks_passphrase,
    batch_size_option,
    common_options,
    data_option,
    device_option,
    emit,
    force_option,
    int_range,
    keys_option,
    model_option,
    parse_arch_kwargs,
    passphrase_from,
    progress_bar,
    warn,
)
from .launch import is_main, nproc_option, precision_option, relaunch, workers_option


@click.command("embed")
@model_option
@data_option
@keys_option
@click.option("--out", required=True, help="The watermarked checkpoint to write (.safetensors).")
@click.option("--onnx", "onnx_out", default=None, help="Also export the marked model to this ONNX file.")
@click.option("--epochs", type=int_range("epochs"), default=None,
              help="Fine-tuning epochs per scheme (default: each scheme's own cap). The hidden and "
                   "gradsigns schemes stop once their mark reads back; output trains until 99% of its "
                   "candidate keys are learnt, then 60 epochs more (see the README).")
@click.option("--lr", type=Number(), default=None,
              help="Learning rate (default: the one the model's training ended with).")
@batch_size_option
@force_option
@device_option
@nproc_option
@workers_option
@precision_option
@common_options
def command(model_path, arch, arch_kwargs, data_spec, keys_path, passphrase_file, out, onnx_out,
            epochs, lr, batch_size, force, device, nproc, workers, precision, seed, json_):
    """Embed the bundle's watermarks by fine-tuning a model.

    The bundle is updated in place (final keys, marked model's fingerprint), atomically, and
    together with the outputs: all are written, or none.

    \b
    deepsigns embed --model base.safetensors --data digits --keys owner.dskey --out marked.safetensors
    deepsigns embed --nproc 2 --model base.safetensors --data digits --keys owner.dskey --out marked.safetensors
    """
    if nproc is not None:
        relaunch(nproc, device, asks=asks_passphrase(passphrase_file), passphrase_file=passphrase_file)
    with api.process_group(device, waiting=warn), progress_bar() as progress:
        report = api.embed(model_path, keys_path, passphrase_from(passphrase_file), out,
                           data=data_spec, onnx=onnx_out, epochs=epochs, lr=lr, batch_size=batch_size,
                           seed=seed or 0, device=device, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs),
                           force=force, progress=progress,
                           also_inputs={"--passphrase-file": passphrase_file}, workers=workers,
                           precision=precision)
    if is_main():
        emit(report, json_, render.embed)
