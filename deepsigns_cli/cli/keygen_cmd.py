import click

from .common import (
    common_options,
    data_option,
    emit,
    force_option,
    get_passphrase,
    kv_table,
    load_model,
)
from .common import info as info_line


@click.command("keygen")
@click.option("--model", "model_path", required=True, help="The model to protect (.safetensors).")
@click.option("--arch", default=None, help="Architecture of a .pt/.pth state dict.")
@click.option("--arch-kwargs", default=None, help="JSON keyword arguments of --arch.")
@data_option
@click.option("--scheme", "schemes", default="hidden", show_default=True,
              help="Comma-separated schemes: hidden (white-box), output (black-box).")
@click.option("--bits", type=click.IntRange(1), default=None, help="hidden: random signature of N bits (default 32).")
@click.option("--message", default=None, help="hidden: the owner's message as the signature (UTF-8 bits).")
@click.option("--layer", default=None, help="hidden: carrier layer (default: input of the last linear layer).")
@click.option("--classes", type=click.IntRange(1), default=None,
              help="hidden: number of secret target classes (default 1).")
@click.option("--key-size", type=click.IntRange(1), default=None, help="output: number of key inputs K (default 20).")
@click.option("--out", required=True, help="The sealed key bundle to write (.dskey).")
@click.option("--passphrase-file", default=None,
              help="File holding the passphrase (else $DEEPSIGNS_PASSPHRASE, else a prompt).")
@force_option
@common_options
def command(model_path, arch, arch_kwargs, data_spec, schemes, bits, message, layer, classes,
            key_size, out, passphrase_file, force, seed, json_):
    """Create a sealed key bundle with fresh watermark secrets.

    \b
    deepsigns keygen --model base.safetensors --data digits --scheme hidden --bits 32 --out owner.dskey
    """
    from ..api import make_keys
    from ..bundle import commitment, write_bundle
    from ..data import load_data
    from ..errors import InputError
    from ..fileio import check_output
    from ..schemes import SCHEME_NAMES

    if bits is not None and message is not None:
        raise InputError("give --bits or --message, not both")
    if message is not None and not message:
        raise InputError("--message is empty: give the owner's message, or leave it out for "
                         "random --bits")
    names = [s.strip() for s in schemes.split(",") if s.strip()]
    for name in names:
        if name not in SCHEME_NAMES:
            raise InputError(f"unknown scheme '{name}': use {', '.join(SCHEME_NAMES)} (comma-separated)")
    check_output(out, force, inputs={
        "--model": model_path, "--passphrase-file": passphrase_file,
        "--data": data_spec})
    passphrase = get_passphrase(passphrase_file, confirm=True)
    data = load_data(data_spec)
    model, info = load_model(model_path, arch, arch_kwargs, data=data)
    options = {"hidden": {"bits": bits, "message": message, "layer": layer, "classes": classes},
               "output": {"key_size": key_size}}
    bundle = make_keys(model, info, data, names, options, seed=seed)
    if "hidden" in bundle.schemes:
        hp = bundle.schemes["hidden"]["params"]
        if hp["n_bits"] > hp["width"] // 4:
            info_line(f"[yellow]warning:[/] {hp['n_bits']} bits on a {hp['width']}-unit layer: "
                      f"beyond about {hp['width'] // 4} bits (a quarter of the width) some bits may "
                      "not embed error-free; detection still holds while BER stays low")
    write_bundle(bundle, out, passphrase, force=force)
    report = {"command": "keygen", "out": out, "schemes": names, "key_id": bundle.key_id,
              "commitment": commitment(out)}
    emit(report, json_, lambda c, r: c.print(kv_table("key bundle sealed", [
        ("schemes", ", ".join(r["schemes"])), ("key id", r["key_id"]), ("written", r["out"]),
        ("commitment (SHA-256)", r["commitment"])])))
