import click

from .common import (
    common_options,
    data_option,
    device_option,
    emit,
    force_option,
    keys_option,
    kv_table,
    load_model,
    model_option,
    open_keys,
    progress_bar,
)


@click.command("embed")
@model_option
@data_option
@keys_option
@click.option("--out", required=True, help="The watermarked checkpoint to write (.safetensors).")
@click.option("--onnx", "onnx_out", default=None, help="Also export the marked model to this ONNX file.")
@click.option("--epochs", type=click.IntRange(1), default=None,
              help="Fine-tuning epochs (hidden: default 10; output: a cap, default 200, "
                   "it stops once 99% of the candidate keys are learnt).")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=None,
              help="Learning rate (default: the one the model's training ended with); the output "
                   "scheme fine-tunes at a tenth of it.")
@force_option
@device_option
@common_options
def command(model_path, arch, arch_kwargs, data_spec, keys_path, passphrase_file, out, onnx_out,
            epochs, lr, force, device, seed, json_):
    """Embed the bundle's watermarks by fine-tuning a model.

    The bundle is updated in place (final keys, marked model's fingerprint), atomically.

    \b
    deepsigns embed --model base.safetensors --data digits --keys owner.dskey --out marked.safetensors
    """
    from ..api import embed_keys
    from ..bundle import commitment, write_bundle
    from ..checkpoint import export_onnx, save_checkpoint
    from ..data import load_data
    from ..fileio import check_output

    inputs = {"--model": model_path, "--keys": keys_path, "--passphrase-file": passphrase_file,
              "--data": data_spec}
    check_output(out, force, inputs=inputs)
    if onnx_out:
        check_output(onnx_out, force, inputs={**inputs, "--out": out})
    bundle, passphrase = open_keys(keys_path, passphrase_file)
    data = load_data(data_spec)
    model, info = load_model(model_path, arch, arch_kwargs, data=data)
    with progress_bar() as progress:
        model, info, bundle, report = embed_keys(model, info, data, bundle, epochs=epochs, lr=lr,
                                                 seed=seed or 0, device=device, progress=progress)
    save_checkpoint(model, info, out, force=force)
    report["out"] = out
    # the bundle right after the checkpoint: a failed ONNX export must not leave a marked
    # model whose final keys were never saved
    write_bundle(bundle, keys_path, passphrase, force=True)
    report["keys"] = keys_path
    report["commitment"] = commitment(keys_path)
    if onnx_out:
        report["onnx"] = onnx_out
        report["onnx_max_abs_diff"] = export_onnx(model, info, onnx_out, force=force,
                                                  check_inputs=data.x_test[:64])["max_abs_diff"]

    def render(c, r):
        rows = [("accuracy before", f"{r['accuracy_before']:.2f}%"),
                ("accuracy after", f"{r['accuracy_after']:.2f}%")]
        for name, s in r["schemes"].items():
            rows.append((f"{name}: epochs", s["epochs"]))
        rows += [("written", r["out"])] + ([("ONNX", r["onnx"])] if "onnx" in r else [])
        rows += [("keys updated", r["keys"]), ("new commitment", r["commitment"])]
        c.print(kv_table("watermark embedded", rows))

    emit(report, json_, render)
