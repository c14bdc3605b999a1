"""Figures for the black-box (output-layer) watermark on digits, CPU.

    python scripts/blackbox_figures.py fidelity      # K=20 and K=30, MLP and CNN, 5 seeds
    python scripts/blackbox_figures.py integrity     # verify on unmarked models of every kind
    python scripts/blackbox_figures.py cost          # queries, process wall time vs onnxruntime time
    python scripts/blackbox_figures.py all

`fidelity` also reports reliability (matches out of K through onnxruntime, per seed) and the
rarely-explored test (neighbour counts of accepted keys, rejected candidates, test inputs).
Each writes figures/blackbox-<name>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from deepsigns_cli import api
from deepsigns_cli.bundle import write_bundle
from deepsigns_cli.checkpoint import export_onnx
from deepsigns_cli.data import load_data
from deepsigns_cli.registry import embed_order, scheme_entry
from deepsigns_cli.runtime import OnnxModel
from deepsigns_cli.suspect import OnnxSuspect

SEEDS = [0, 1, 2, 3, 4]
PASS = "figures-passphrase"


def _save(out: Path, name: str, payload) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"blackbox-{name}.json").write_text(json.dumps(payload, indent=2))


def _verify(path: Path, bundle):
    """Black-box read of an ONNX file, in process (as `deepsigns verify`): outputs only."""
    names = [n for n in embed_order(bundle.schemes) if scheme_entry(n).blackbox]
    with OnnxModel(path, provider="cpu", timeout=api.DEFAULT_TIMEOUT) as model:
        suspect = OnnxSuspect(model, blackbox_only=True)
        return api.read_keys(suspect, bundle, names, alpha=api.DEFAULT_ALPHA, command="verify")


def _owner(data, arch, seed, key_size, workdir: Path):
    base, info, _ = api.train_model(arch, data, epochs=30, seed=seed, device="cpu")
    bundle = api.make_keys(base, info, data, ["output"], {"output": {"key_size": key_size}},
                           seed=seed)
    marked = copy.deepcopy(base)
    t = time.perf_counter()
    marked, minfo, bundle, report = api.embed_keys(marked, info, data, bundle, seed=seed,
                                                   device="cpu")
    report["embed_seconds"] = time.perf_counter() - t
    path = workdir / f"{arch}-{seed}-{key_size}.onnx"
    export_onnx(marked, minfo, path)
    return base, info, marked, bundle, report, path


def fidelity(out: Path) -> dict:
    data = load_data("digits")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("mlp", "cnn"):
            for key_size in (20, 30):
                for seed in SEEDS:
                    _, _, _, bundle, report, path = _owner(data, arch, seed, key_size, Path(tmp))
                    verdict = _verify(path, bundle)
                    res = verdict.results[0]
                    params = bundle.schemes["output"].params
                    rows.append({
                        "arch": arch, "K": key_size, "seed": seed,
                        "acc_base": report["accuracy_before"], "acc_marked": report["accuracy_after"],
                        "drop": report["accuracy_before"] - report["accuracy_after"],
                        "matches": res.matches, "p_value": res.p_value,
                        "detected": verdict.detected,
                        "candidates_learnt": params["candidates_learnt"],
                        "embed_epochs": report["schemes"]["output"]["epochs"],
                        "embed_seconds": report["embed_seconds"],
                        "neighbour_counts": params["neighbour_counts"],
                        "epsilon": params["epsilon"], "threshold": params["threshold"],
                    })
                    r = rows[-1]
                    print(f"{arch} K={key_size} seed={seed}: acc {r['acc_base']:.2f} -> "
                          f"{r['acc_marked']:.2f} (drop {r['drop']:+.2f}), matches "
                          f"{r['matches']}/{key_size}, p={r['p_value']:.2g}, learnt "
                          f"{r['candidates_learnt']:.3f} in {r['embed_epochs']} epochs, "
                          f"{r['embed_seconds']:.1f}s", flush=True)
    summary = {}
    for arch in ("mlp", "cnn"):
        for key_size in (20, 30):
            sel = [r for r in rows if r["arch"] == arch and r["K"] == key_size]
            summary[f"{arch}-K{key_size}"] = {
                "mean_drop": float(np.mean([r["drop"] for r in sel])),
                "max_drop": float(np.max([r["drop"] for r in sel])),
                "all_K_of_K": all(r["matches"] == key_size for r in sel),
                "all_detected": all(r["detected"] for r in sel),
            }
    print("\nsummary (drop = baseline - marked, points):")
    for k, v in summary.items():
        print(f"  {k}: mean drop {v['mean_drop']:+.2f}, worst {v['max_drop']:+.2f}, "
              f"K of K in every seed: {v['all_K_of_K']}, detected in every seed: {v['all_detected']}")
    print("\nrarely-explored test (training neighbours within epsilon, PCA space):")
    for r in rows[:: len(SEEDS)]:
        nc = r["neighbour_counts"]
        print(f"  {r['arch']} K={r['K']} seed={r['seed']}: eps={r['epsilon']:.2f} threshold="
              f"{r['threshold']}; accepted mean {nc['accepted']['mean']:.2f} (p95 "
              f"{nc['accepted']['p95']:.0f}); rejected mean {nc['rejected'].get('mean', 0):.2f} "
              f"(n={nc['rejected']['n']}); test inputs mean {nc['test']['mean']:.2f} "
              f"(median {nc['test']['median']:.0f}); training points mean {nc['train']['mean']:.2f}")
    payload = {"rows": rows, "summary": summary}
    _save(out, "fidelity", payload)
    return payload


class _Foreign(torch.nn.Module):
    """A different architecture, trained by a plain loop here, exported by plain torch.onnx."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 200),
                                       torch.nn.Tanh(), torch.nn.Linear(200, 10))

    def forward(self, x):
        return torch.softmax(self.net(x), dim=-1)


def _foreign(data, path: Path) -> float:
    torch.manual_seed(123)
    model = _Foreign()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.tensor(data.x_train), torch.tensor(data.y_train)
    for _ in range(40):
        for i in range(0, len(x), 32):
            loss = torch.nn.functional.nll_loss(torch.log(model(x[i:i + 32]) + 1e-9), y[i:i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), input_names=["pixels"],
                      output_names=["p"], dynamic_axes={"pixels": {0: "b"}, "p": {0: "b"}},
                      dynamo=False)
    with torch.no_grad():
        return float((model(torch.tensor(data.x_test)).argmax(1).numpy() == data.y_test).mean() * 100)


def integrity(out: Path) -> dict:
    data = load_data("digits")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, _, _, bundle, _, _ = _owner(data, "mlp", 0, 20, tmp)
        suspects = [("mlp", s) for s in range(100, 110)] + [("cnn", 100), ("cnn", 101),
                                                            ("resnet", 100)]
        for arch, seed in suspects:
            model, info, _ = api.train_model(arch, data, epochs=30 if arch != "resnet" else 15,
                                             seed=seed, device="cpu")
            path = tmp / f"{arch}-{seed}.onnx"
            export_onnx(model, info, path)
            rows.append(_verify_row(f"{arch} seed {seed}", path, bundle))
        acc = _foreign(data, tmp / "foreign.onnx")
        rows.append(_verify_row(f"foreign tanh-MLP (own loop, plain export, acc {acc:.1f}%)",
                                tmp / "foreign.onnx", bundle))
    for r in rows:
        print(f"  {r['model']}: matches {r['matches']}/{r['keys']}, p={r['p_value']:.3g}, "
              f"{'DETECTED' if r['detected'] else 'not detected'}")
    false_claims = sum(r["detected"] for r in rows)
    print(f"false claims: {false_claims} of {len(rows)}")
    payload = {"rows": rows, "false_claims": false_claims}
    _save(out, "integrity", payload)
    return payload


def _verify_row(name, path, bundle) -> dict:
    verdict = _verify(path, bundle)
    res = verdict.results[0]
    return {"model": name, "keys": res.keys, "matches": res.matches,
            "p_value": res.p_value, "detected": verdict.detected}


def cost(out: Path) -> dict:
    data = load_data("digits")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, _, _, bundle, _, path = _owner(data, "mlp", 0, 20, tmp)
        write_bundle(bundle, tmp / "owner.dskey", PASS)
        env = {**os.environ, "DEEPSIGNS_PASSPHRASE": PASS}
        walls, onnx_times = [], []
        for _ in range(5):
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "deepsigns_cli", "verify", "--model",
                                   str(path), "--keys", str(tmp / "owner.dskey"), "--json"],
                                  capture_output=True, text=True, env=env, check=False)
            walls.append(time.perf_counter() - t)
            if proc.returncode not in (0, 1):  # 0 detected, 1 not; anything else is an error
                raise SystemExit(f"`deepsigns verify` failed (exit {proc.returncode}): "
                                 f"{proc.stderr.strip()}")
            report = json.loads(proc.stdout)
            onnx_times.append(report["results"][0]["onnx_seconds"])
        scan = _scan_throughput(path, tmp, env)
        model = OnnxModel(path, provider="cpu")
        keys = bundle.schemes["output"].arrays["x"]
        model.scores(keys)  # warm the session
        t = time.perf_counter()
        for _ in range(100):
            model.scores(keys)
        warm = (time.perf_counter() - t) / 100
    payload = {"queries": len(keys), "process_wall_seconds_median": float(np.median(walls)),
               "onnx_seconds_in_process_median": float(np.median(onnx_times)),
               "onnx_seconds_warm_session": warm, **scan}
    print(f"queries per verification: {payload['queries']} (one batch)")
    print(f"whole `deepsigns verify` process: {payload['process_wall_seconds_median']:.2f} s "
          f"(median of 5)")
    print(f"onnxruntime calls inside it (session creation + run): "
          f"{payload['onnx_seconds_in_process_median'] * 1000:.1f} ms")
    print(f"onnxruntime run on a warm session: {warm * 1000:.3f} ms")
    print(f"scan of {scan['scan_suspects']} suspects in one `deepsigns verify --model FOLDER`: "
          f"{scan['scan_suspects_per_second']:.1f} suspects/s inside the scan (bundle opened once), "
          f"{scan['scan_process_suspects_per_second']:.1f} suspects/s for the whole process")
    _save(out, "cost", payload)
    return payload


def _scan_throughput(path: Path, tmp: Path, env: dict, n: int = 60) -> dict:
    """One `deepsigns verify` process over a folder of n suspects (copies of the marked export)."""
    folder = tmp / "suspects"
    folder.mkdir()
    for i in range(n):
        shutil.copy(path, folder / f"suspect{i:03d}.onnx")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "deepsigns_cli", "verify", "--model", str(folder),
                           "--keys", str(tmp / "owner.dskey"), "--json"],
                          capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"the scan failed (exit {proc.returncode}): {proc.stderr.strip()}")
    report = json.loads(proc.stdout)
    assert len(report["detected"]) == n, "every copy of the marked model must be detected"
    return {"scan_suspects": n, "scan_suspects_per_second": n / report["seconds"],
            "scan_process_suspects_per_second": n / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", choices=["fidelity", "integrity", "cost", "all"])
    parser.add_argument("--out-dir", default="figures", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    for name in ("fidelity", "integrity", "cost"):
        if args.figure in (name, "all"):
            print(f"== {name}")
            globals()[name](args.out_dir)


if __name__ == "__main__":
    main()
