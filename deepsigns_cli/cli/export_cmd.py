import click

from .common import common_options, emit, force_option, kv_table, load_model


@click.command("export")
@click.argument("checkpoint")
@click.option("--out", required=True, help="The ONNX file to write.")
@click.option("--arch", default=None, help="Architecture of a .pt/.pth state dict.")
@click.option("--arch-kwargs", default=None, help="JSON keyword arguments of --arch.")
@click.option("--data", "data_spec", default=None, help="Data giving a .pt's input shape, and parity inputs.")
@force_option
@common_options
def command(checkpoint, out, arch, arch_kwargs, data_spec, force, seed, json_):
    """Export a checkpoint to ONNX (opset 17, dynamic batch), checked for parity with torch.

    \b
    deepsigns export marked.safetensors --out marked.onnx
    """
    from ..checkpoint import ONNX_OPSET, export_onnx
    from ..data import load_data
    from ..fileio import check_output

    check_output(out, force, inputs={"CHECKPOINT": checkpoint, "--data": data_spec})
    data = load_data(data_spec) if data_spec else None
    model, info = load_model(checkpoint, arch, arch_kwargs, data=data)
    if data is not None:
        data.check_fits(info.input_shape, info.num_classes)
    result = export_onnx(model, info, out, force=force,
                         check_inputs=data.x_test[:64] if data is not None else None)
    report = {"command": "export", "out": out, "opset": ONNX_OPSET,
              "max_abs_diff": result["max_abs_diff"], "input_shape": ["batch", *info.input_shape]}
    emit(report, json_, lambda c, r: c.print(kv_table("exported", [
        ("written", r["out"]), ("opset", r["opset"]), ("input", r["input_shape"]),
        ("max |onnx - torch|", f"{r['max_abs_diff']:.2e}"), ("checker", "clean")])))
