import click

from .common import alpha_option, common_options, emit_decision, keys_option, open_keys, provider_option


@click.command("verify")
@click.option("--model", "model_path", required=True, help="Suspect ONNX model (only its outputs are used).")
@keys_option
@alpha_option
@provider_option
@common_options
def command(model_path, keys_path, passphrase_file, alpha, provider, seed, json_):
    """Black-box: decide ownership from an ONNX model's answers alone.

    Exit code 0 when detected (p-value <= alpha), 1 when not, 2 on bad input.

    \b
    deepsigns verify --model suspect.onnx --keys owner.dskey
    """
    from ..api import verify_ownership
    from ..errors import InputError
    from ..runtime import OnnxModel

    if not model_path.lower().endswith(".onnx"):
        raise InputError(f"{model_path}: verify reads ONNX models; export a checkpoint first "
                         "with 'deepsigns export', or use 'deepsigns extract'")
    bundle, _ = open_keys(keys_path, passphrase_file)
    report = verify_ownership(OnnxModel(model_path, provider=provider), bundle, alpha=alpha)
    report = {"command": "verify", "model": model_path, "key_id": bundle.key_id, **report}
    emit_decision(report, json_)
