import click

from .common import alpha_option, common_options, decision_table, emit_decision, keys_option, open_keys, provider_option


@click.command("extract")
@click.option("--model", "model_path", required=True, help="Suspect: .safetensors, .pt (with --arch) or .onnx.")
@click.option("--arch", default=None, help="Architecture of a .pt/.pth state dict.")
@keys_option
@alpha_option
@provider_option
@common_options
def command(model_path, arch, keys_path, passphrase_file, alpha, provider, seed, json_):
    """White-box: read the watermark from a checkpoint or ONNX file.

    Exit code 0 when detected (p-value <= alpha), 1 when not.

    \b
    deepsigns extract --model marked.onnx --keys owner.dskey
    """
    from ..api import extract_watermarks, load_suspect

    bundle, _ = open_keys(keys_path, passphrase_file)
    suspect = load_suspect(model_path, bundle, arch=arch, provider=provider)
    report = extract_watermarks(suspect, bundle, alpha=alpha)
    report = {"command": "extract", "model": model_path, "key_id": bundle.key_id, **report}

    def render(c, r):
        c.print(decision_table(r))
        for res in r["results"]:
            # soft_wrap: a long bit string stays one line that can be copied whole
            if res.get("bits"):
                c.print(f"{res['scheme']} bits: {res['bits']}", soft_wrap=True, highlight=False)
            if res.get("message"):
                c.print(f"{res['scheme']} message: {res['message']!r}", soft_wrap=True)
            for key in ("warning", "note"):
                if res.get(key):
                    c.print(f"[yellow]{key}:[/] {res[key]}")

    emit_decision(report, json_, render)
