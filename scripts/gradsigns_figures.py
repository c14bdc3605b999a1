"""Issue 9's figures: GradSigns on the digits MLP and CNN, 3 seeds, through the API that the
CLI runs (train, keygen, embed, verify, attack).

    .venv/bin/python scripts/gradsigns_figures.py fidelity     # N = 16, 32, 64; BER white- and black-box
    .venv/bin/python scripts/gradsigns_figures.py integrity    # verify on unmarked models, alpha 1e-3
    .venv/bin/python scripts/gradsigns_figures.py queries      # BER and p against the query budget
    .venv/bin/python scripts/gradsigns_figures.py robustness   # wrappers, int8, fine-tuning, pruning
    .venv/bin/python scripts/gradsigns_figures.py cost         # one verify process; embed vs plain epoch

Options: --seeds 1 2 3, --archs mlp cnn, --out figures/gradsigns (JSON of every row).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepsigns_cli import api  # noqa: E402

PASSPHRASE = "gradsigns-figures"
ALPHA_INTEGRITY = 1e-3


def _record(rows: list[dict], row: dict) -> None:
    """One figure row: kept for the table, and printed as it comes (a long run shows progress)."""
    rows.append(row)
    print(json.dumps(row), flush=True)


def _grad(decision):
    return next(r for r in decision.results if r.scheme == "gradsigns")


def owner(folder: Path, arch: str, seed: int, bits: int = 64, train_epochs: int = 30) -> dict:
    """Baseline (30 epochs, as the sample models), keygen (gradsigns, N bits), embed, ONNX."""
    folder.mkdir(parents=True, exist_ok=True)
    base, keys, marked = folder / "base.safetensors", folder / "owner.dskey", folder / "marked.safetensors"
    if not base.exists():
        api.train(arch, base, epochs=train_epochs, seed=seed, device="cpu", force=True)
        api.export(base, folder / "base.onnx", force=True)
    done = folder / "embed.json"  # an owner made by an earlier figure of this run is reused
    if done.exists():
        embed = json.loads(done.read_text())
    else:
        api.keygen(base, keys, PASSPHRASE, schemes=["gradsigns"], options={"bits": bits}, seed=seed, force=True)
        embed = api.report_json(api.embed(base, keys, PASSPHRASE, marked, onnx=folder / "marked.onnx", seed=seed,
                                          device="cpu", force=True))
        done.write_text(json.dumps(embed))
    return {"base": base, "keys": keys, "marked": marked, "onnx": folder / "marked.onnx",
            "base_onnx": folder / "base.onnx", "embed": embed}


def fidelity(out: Path, seeds, archs) -> list[dict]:
    rows = []
    for arch in archs:
        for bits in (16, 32, 64):
            for seed in seeds:
                o = owner(out / f"{arch}-s{seed}" / f"n{bits}", arch, seed, bits)
                white = _grad(api.extract(o["marked"], o["keys"], PASSPHRASE))
                black = _grad(api.verify(o["onnx"], o["keys"], PASSPHRASE))
                gs = o["embed"]["schemes"]["gradsigns"]
                _record(rows, {"arch": arch, "bits": bits, "seed": seed, "acc_before": o["embed"]["accuracy_before"],
                             "acc_after": o["embed"]["accuracy_after"], "epochs": gs["epochs"],
                             "ber_white": white.ber, "ber_black": black.ber, "queries": black.queries,
                             "p_black": black.p_value})
    print("\n| arch | N | accuracy before -> after (mean drop) | BER white-box | BER black-box (queries) |")
    print("|---|---|---|---|---|")
    for arch in archs:
        for bits in (16, 32, 64):
            rs = [r for r in rows if r["arch"] == arch and r["bits"] == bits]
            drop = np.mean([r["acc_after"] - r["acc_before"] for r in rs])
            print(f"| {arch} | {bits} | " + ", ".join(f"{r['acc_before']:.2f}->{r['acc_after']:.2f}" for r in rs)
                  + f" ({drop:+.2f}) | " + ", ".join(f"{r['ber_white']:.3f}" for r in rs) + " | "
                  + ", ".join(f"{r['ber_black']:.3f}" for r in rs) + f" ({rs[0]['queries']}) |")
    return rows


def _sklearn_onnx(folder: Path) -> Path:
    """An unmarked model from outside our code path: scikit-learn's MLP through skl2onnx."""
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    from deepsigns_cli.data import load_data

    data = load_data("digits")
    x = data.x_train.reshape(len(data.x_train), -1)
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0).fit(x, data.y_train)
    path = folder / "sklearn-mlp.onnx"
    onx = to_onnx(clf, x[:1].astype(np.float32), options={id(clf): {"zipmap": False}})
    # our keys hold (1, 8, 8) inputs: a Reshape in front, built by hand
    import onnx
    from onnx import helper

    graph = onx.graph
    old_input = graph.input[0].name
    shape = helper.make_tensor("shape", onnx.TensorProto.INT64, [2], [-1, 64])
    graph.initializer.append(shape)
    graph.node.insert(0, helper.make_node("Reshape", ["image", "shape"], [old_input]))
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["n", 1, 8, 8]))
    onnx.save(onx, path)
    return path


def integrity(out: Path, seeds, archs) -> list[dict]:
    """The keys of each owner on models that never saw them: 10+ unmarked models."""
    folder = out / "unmarked"
    folder.mkdir(parents=True, exist_ok=True)
    unmarked = []
    for arch in archs:
        for seed in (11, 12, 13, 14, 15):
            path = folder / f"{arch}-{seed}.onnx"
            if not path.exists():
                ckpt = folder / f"{arch}-{seed}.safetensors"
                api.train(arch, ckpt, epochs=30, seed=seed, device="cpu", force=True)
                api.export(ckpt, path, force=True)
            unmarked.append(path)
    unmarked.append(_sklearn_onnx(folder))
    rows = []
    for seed in seeds:
        o = owner(out / f"mlp-s{seed}" / "n64", "mlp", seed, 64)
        for path in [o["base_onnx"], *unmarked]:
            d = api.verify(path, o["keys"], PASSPHRASE, alpha=ALPHA_INTEGRITY)
            g = _grad(d)
            _record(rows, {"owner_seed": seed, "model": path.name, "bit_errors": g.bit_errors, "p": g.p_value,
                         "detected": g.detected})
    claims = sum(r["detected"] for r in rows)
    print(f"\n{len(rows)} readings ({len(unmarked) + 1} unmarked models x {len(seeds)} owners' keys): "
          f"{claims} claims at alpha = {ALPHA_INTEGRITY:g}; smallest p = {min(r['p'] for r in rows):.3g}; "
          f"bit errors {min(r['bit_errors'] for r in rows)}-{max(r['bit_errors'] for r in rows)} of 64")
    return rows


def queries(out: Path, seeds, archs) -> list[dict]:
    rows = []
    for arch in archs:
        for seed in seeds:
            o = owner(out / f"{arch}-s{seed}" / "n64", arch, seed, 64)
            for q in (128, 256, 512, 1000, 3250):
                g = _grad(api.verify(o["onnx"], o["keys"], PASSPHRASE, queries=q))
                _record(rows, {"arch": arch, "seed": seed, "budget": q, "queries": g.queries,
                             "key_inputs": g.key_inputs, "bit_errors": g.bit_errors, "p": g.p_value})
    print("\n| arch | queries (key inputs) | bit errors of 64 per seed | p-values |")
    print("|---|---|---|---|")
    for arch in archs:
        for q in (128, 256, 512, 1000, 3250):
            rs = [r for r in rows if r["arch"] == arch and r["budget"] == q]
            print(f"| {arch} | {rs[0]['queries']} ({rs[0]['key_inputs']}) | "
                  + ", ".join(str(r["bit_errors"]) for r in rs) + " | "
                  + ", ".join(f"{r['p']:.2g}" for r in rs) + " |")
    return rows


ROBUSTNESS = [  # (attack, swept option, values, other options)
    ("round-scores", "decimals", [4, 3, 2, 1], {}),
    ("noise-scores", "sigma", [0.001, 0.01, 0.05], {}),
    ("noise-inputs", "sigma", [0.01, 0.05, 0.1, 0.3], {}),
    ("quantize", "bits", [8], {}),  # int8 through onnxruntime (ONNX out)
    ("finetune", "epochs", [10, 30, 50], {}),
    ("prune", "rate", [0.3, 0.5, 0.7, 0.9], {}),
    ("prune", "rate", [0.5, 0.9], {"finetune_epochs": 10}),
]


def robustness(out: Path, seeds, archs) -> list[dict]:
    rows = []
    for arch in archs:
        for seed in seeds:
            o = owner(out / f"{arch}-s{seed}" / "n64", arch, seed, 64)
            for name, param, values, options in ROBUSTNESS:
                model = o["onnx"] if name in ("round-scores", "noise-scores", "noise-inputs") else o["marked"]
                if name == "quantize":
                    int8 = out / f"{arch}-s{seed}" / "int8.onnx"
                    rep = api.attack("quantize", o["marked"], int8, force=True, seed=seed, device="cpu")
                    g = _grad(api.verify(int8, o["keys"], PASSPHRASE))
                    _record(rows, {"arch": arch, "seed": seed, "attack": "int8", "value": 8,
                                 "accuracy": rep.accuracy_after, "bit_errors": g.bit_errors, "p": g.p_value,
                                 "detected": g.detected})
                    continue
                report = api.sweep(name, model, param, values, o["keys"], PASSPHRASE, options=options, seed=seed,
                                   device="cpu", force=True)
                label = name + ("+ft10" if options else "")
                for row in report.rows:
                    g = _grad(row.verify if row.verify is not None else row.extract)
                    _record(rows, {"arch": arch, "seed": seed, "attack": label, "value": row.value,
                                 "accuracy": row.accuracy, "bit_errors": g.bit_errors, "p": g.p_value,
                                 "detected": g.detected})
    print("\n| arch | attack | strength | accuracy per seed | bit errors of 64 (detected at 1e-9) |")
    print("|---|---|---|---|---|")
    for arch in archs:
        for key in dict.fromkeys((r["attack"], r["value"]) for r in rows if r["arch"] == arch):
            rs = [r for r in rows if r["arch"] == arch and (r["attack"], r["value"]) == key]
            print(f"| {arch} | {key[0]} | {key[1]} | " + ", ".join(f"{r['accuracy']:.1f}" for r in rs) + " | "
                  + ", ".join(f"{r['bit_errors']}{'Y' if r['detected'] else 'n'}" for r in rs) + " |")
    return rows


def cost(out: Path, seeds, archs) -> dict:
    """Wall time of one `deepsigns verify` process (median of 5), and the embedding's epoch
    against a plain fine-tuning epoch of the same model, data and batch size (one run, medians)."""
    from deepsigns_cli.checkpoint import load_checkpoint
    from deepsigns_cli.data import load_data
    from deepsigns_cli.schemes.gradsigns import GradSignsScheme
    from deepsigns_cli.training import TrainConfig, fit

    result = {}
    o = owner(out / f"mlp-s{seeds[0]}" / "n64", "mlp", seeds[0], 64)
    pw = out / "pass.txt"
    pw.write_text(PASSPHRASE)
    exe = Path(sys.executable).with_name("deepsigns")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    walls = []
    for _ in range(5):
        started = time.perf_counter()
        subprocess.run([str(exe), "verify", "--model", str(o["onnx"]), "--keys", str(o["keys"]),
                        "--passphrase-file", str(pw), "--json"], env=env, capture_output=True, check=True)
        walls.append(time.perf_counter() - started)
    result["verify_process_seconds"] = float(np.median(walls))
    data = load_data("digits")
    for arch in archs:
        oa = owner(out / f"{arch}-s{seeds[0]}" / "n64", arch, seeds[0], 64)
        from deepsigns_cli.bundle import open_bundle

        keys = open_bundle(oa["keys"], PASSPHRASE).schemes["gradsigns"]
        plain_s, embed_s = [], []
        for i in range(5):  # interleaved: plain epoch, embedding epoch
            for target, objectives in ((plain_s, []), (embed_s, None)):
                model, info = load_checkpoint(oa["base"])
                objs = objectives if objectives is not None else \
                    [GradSignsScheme().objective(model, info, data, keys)]
                hist = fit(model, data.x_train, data.y_train,
                           TrainConfig(epochs=1, lr=info.lr, seed=i, device="cpu"), objs)
                target.append(hist["epoch_seconds"][0])
        result[f"{arch}_plain_epoch"] = float(np.median(plain_s))
        result[f"{arch}_embed_epoch"] = float(np.median(embed_s))
        result[f"{arch}_ratio"] = result[f"{arch}_embed_epoch"] / result[f"{arch}_plain_epoch"]
    print(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("figure", choices=["fidelity", "integrity", "queries", "robustness", "cost"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--archs", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--out", type=Path, default=ROOT / "figures" / "gradsigns")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = globals()[args.figure](args.out, args.seeds, args.archs)
    (args.out / f"{args.figure}.json").write_text(json.dumps(rows, indent=1, default=str))
    print(f"[{time.perf_counter() - started:.0f} s]")


if __name__ == "__main__":
    main()
