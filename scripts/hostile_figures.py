#!/usr/bin/env python3
"""Issue 7's uncooperative suspects, through the CLI of whichever deepsigns is imported:

    .venv/bin/python scripts/hostile_figures.py                    # this checkout
    git worktree add /tmp/before ce5dba6                            # the code before the fix
    PYTHONPATH=/tmp/before .venv/bin/python scripts/hostile_figures.py

1. decoy name: a marked hidden-scheme export whose carrier tensor is renamed, and whose layer
   name ("head:input") is given to a decoy of the same width (the carrier negated);
2. argmax head: an output-scheme marked model exported with an int64 label output;
3. scikit-learn: an unmarked LogisticRegression (skl2onnx: label + probabilities outputs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_models" / "digits-mlp.safetensors"


def ds(*args, check=True):
    env = {**os.environ, "DEEPSIGNS_PASSPHRASE": "figures"}
    proc = subprocess.run([sys.executable, "-m", "deepsigns_cli", *map(str, args)], capture_output=True, cwd="/",
                          text=True, env=env, check=False)
    if check and proc.returncode not in (0, 1):
        raise SystemExit(f"deepsigns {' '.join(map(str, args))}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def verdict(proc) -> str:
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return f"exit {proc.returncode}: {proc.stderr.strip()[:150]}"
    parts = []
    for r in report["results"]:
        if r["scheme"] == "hidden":
            parts.append(f"hidden {r.get('bit_errors')}/{r['n_bits']} bits wrong from "
                         f"{r.get('candidates')} candidate(s), tensor {r.get('tensor')!r}")
        else:
            parts.append(f"output {r['matches']}/{r['keys']} keys match"
                         + (f", read {r.get('output_kind')} from {r.get('output')!r}" if r.get("output") else "")
                         + (f", note: {r['note']}" if r.get("note") else ""))
    return f"exit {proc.returncode}, p = {report['p_value']:.3g}: " + "; ".join(parts)


def decoy(tmp: Path) -> str:
    ds("keygen", "--model", SAMPLE, "--data", "digits", "--scheme", "hidden", "--seed", 1, "--out", tmp / "h.dskey")
    ds("embed", "--model", SAMPLE, "--data", "digits", "--keys", tmp / "h.dskey", "--seed", 1,
       "--out", tmp / "h.safetensors", "--onnx", tmp / "h.onnx")
    honest = json.loads(ds("extract", "--model", tmp / "h.onnx", "--keys", tmp / "h.dskey", "--json").stdout)
    carrier = [r for r in honest["results"] if r["scheme"] == "hidden"][0]["tensor"]
    proto = onnx.load(str(tmp / "h.onnx"))
    g = proto.graph
    for node in g.node:
        for tensors in (node.input, node.output):
            for i, name in enumerate(tensors):
                if name == carrier:
                    tensors[i] = "renamed_carrier"
    for info in [*g.output, *g.value_info]:
        if info.name == carrier:
            info.name = "renamed_carrier"
    g.node.append(helper.make_node("Neg", ["renamed_carrier"], ["head:input"]))
    onnx.save(proto, str(tmp / "decoy.onnx"))
    return verdict(ds("extract", "--model", tmp / "decoy.onnx", "--keys", tmp / "h.dskey", "--json"))


def argmax_head(tmp: Path) -> str:
    from deepsigns_cli.checkpoint import load_checkpoint

    ds("keygen", "--model", SAMPLE, "--data", "digits", "--scheme", "output", "--key-size", 20, "--seed", 1,
       "--out", tmp / "o.dskey")
    ds("embed", "--model", SAMPLE, "--data", "digits", "--keys", tmp / "o.dskey", "--seed", 1,
       "--out", tmp / "o.safetensors")
    model, _ = load_checkpoint(tmp / "o.safetensors")

    class Argmax(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).argmax(1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Argmax(model.eval()), (torch.zeros(1, 1, 8, 8),), str(tmp / "argmax.onnx"),
                          input_names=["x"], output_names=["label"], dynamic_axes={"x": {0: "n"}, "label": {0: "n"}},
                          dynamo=False)
    return verdict(ds("verify", "--model", tmp / "argmax.onnx", "--keys", tmp / "o.dskey", "--json"))


def sklearn(tmp: Path) -> str:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    clf = LogisticRegression(max_iter=2000).fit((x / 16.0).astype(np.float32), y)
    (tmp / "sk.onnx").write_bytes(to_onnx(clf, (x[:1] / 16.0).astype(np.float32)).SerializeToString())
    return verdict(ds("verify", "--model", tmp / "sk.onnx", "--keys", tmp / "o.dskey", "--json"))


def main() -> None:
    import deepsigns_cli

    print(f"deepsigns from {Path(deepsigns_cli.__file__).parent}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("decoy name (marked, hidden):  ", decoy(tmp))
        print("argmax head (marked, output): ", argmax_head(tmp))
        print("scikit-learn (unmarked):       ", sklearn(tmp))


if __name__ == "__main__":
    main()
