"""Issue 8's figures: what each attack leaves of the owner's marks (digits MLP marked with both
schemes at the default settings; 3 seeds). Every attack runs through `api.sweep`, the code of
`deepsigns attack NAME --sweep ...`: attack, then extract and verify with the owner's keys.

    .venv/bin/python scripts/robustness.py [--seeds 1 2 3] [--out figures/robustness] [--only NAME ...]

Prints one markdown table per attack (every seed), and writes the pruning sweep's plot of the
first seed to docs/prune-sweep.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepsigns_cli import api  # noqa: E402

PASSPHRASE = "robustness-figures"

# (attack, swept option, values, other options)
SWEEPS = [
    ("finetune", "epochs", [30, 50, 100, 200], {}),
    ("finetune-sgd", "epochs", [30, 100], {"optimizer": "sgd"}),
    ("prune", "rate", [0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95], {}),
    ("prune-ft", "rate", [0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95], {"finetune_epochs": 10}),
    ("quantize", "bits", [8, 6, 4, 3], {}),
    ("noise", "sigma", [0.1, 0.3, 1.0], {}),
    ("permute", "scale", [1.0, 4.0], {}),
    ("distill", "epochs", [30], {}),
    ("overwrite", "epochs", [40], {}),
]
DEPLOY = [  # ONNX wrappers, read by verify
    ("round-scores", "decimals", [4, 3, 2, 1], {}),
    ("noise-inputs", "sigma", [0.1, 0.3], {}),
    ("noise-scores", "sigma", [0.01, 0.1], {}),
]


def owner(folder: Path, seed: int) -> tuple[Path, Path, Path]:
    """The owner's flow at the defaults: baseline (30 epochs, as the sample model), keygen with
    both schemes, embed."""
    base, keys, marked = folder / "base.safetensors", folder / "owner.dskey", folder / "marked.safetensors"
    api.train("mlp", base, epochs=30, seed=seed, device="cpu", force=True)
    api.keygen(base, keys, PASSPHRASE, schemes=["hidden", "output"], seed=seed, force=True)
    api.embed(base, keys, PASSPHRASE, marked, seed=seed, device="cpu", force=True)
    return base, keys, marked


def cell(row) -> str:
    out = [f"{row.accuracy:.1f}%"]
    for res in row.extract.results:
        out.append(f"{res.scheme} {res.brief()} {'Y' if res.detected else 'n'}")
    if row.verify is not None:
        out.append(f"verify {'Y' if row.verify.detected else 'n'}")
    return ", ".join(out)


def run_sweep(name, param, values, options, model, keys, folder, seed, plot=None):
    attack = name.split("-")[0] if name in ("finetune-sgd", "prune-ft") else name
    started = time.perf_counter()
    report = api.sweep(attack, model, param, values, keys, PASSPHRASE, options=options, seed=seed,
                       device="cpu", keep=folder / name, plot=plot, force=True,
                       attacker_passphrase="attacker-passphrase")
    return report, time.perf_counter() - started


def raw_hidden_errors(model_path: Path, keys: Path) -> int | None:
    """The hidden mark read without the line-up (the units as they are): what the reading
    would be with no defence against permutation."""
    from deepsigns_cli.bundle import open_bundle
    from deepsigns_cli.checkpoint import load_checkpoint
    from deepsigns_cli.schemes.hidden import read_bits
    from deepsigns_cli.zoo import activations

    k = open_bundle(keys, PASSPHRASE).schemes["hidden"]
    net, _ = load_checkpoint(model_path)
    trig = activations(net, k.params["layer"], k.arrays["trigger_x"]).numpy()
    return int((read_bits(trig, None, k.arrays) != k.arrays["bits"]).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--out", default="figures/robustness")
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = ROOT / args.out
    table: dict[str, dict[int, object]] = {}
    seconds: dict[str, list[float]] = {}
    extra: dict[int, dict] = {}
    for seed in args.seeds:
        folder = out / f"seed{seed}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        t = time.perf_counter()
        base, keys, marked = owner(folder, seed)
        print(f"seed {seed}: owner flow {time.perf_counter() - t:.0f} s", flush=True)
        victim_onnx = folder / "marked.onnx"
        api.export(marked, victim_onnx, force=True)
        for name, param, values, options in SWEEPS + DEPLOY:
            if args.only and name not in args.only:
                continue
            model = victim_onnx if (name, param, values, options) in DEPLOY else marked
            plot = ROOT / "docs" / "prune-sweep.png" if name == "prune-ft" and seed == args.seeds[0] else None
            if plot is not None:
                plot.parent.mkdir(exist_ok=True)
            report, secs = run_sweep(name, param, values, options, model, keys, folder, seed, plot)
            table.setdefault(name, {})[seed] = report
            seconds.setdefault(name, []).append(secs / len(values))
            print(f"  {name}: {secs:.0f} s", flush=True)
        extra[seed] = {}
        for name, source, out_name in (("quantize", marked, "int8.onnx"), ("label-only", victim_onnx, "label.onnx")):
            if args.only and name not in args.only:
                continue
            report = api.attack(name, source, folder / out_name, seed=seed, force=True)
            decision = api.verify(folder / out_name, keys, PASSPHRASE)
            white = api.extract(folder / out_name, keys, PASSPHRASE)
            extra[seed][name] = (f"acc {report.accuracy_after:.1f}%, verify "
                                 f"{'; '.join(r.brief() for r in decision.results)} "
                                 f"({'Y' if decision.detected else 'n'}), extract "
                                 f"{'; '.join(f'{r.scheme} {r.brief()}' for r in white.results)}, "
                                 f"{report.seconds:.1f} s")
        # permutation without the defence, and permutation then 30 epochs of fine-tuning
        if not args.only or "permute" in args.only:
            perm = folder / "permute" / "permute-scale-4.0.safetensors"
            tuned = folder / "perm-ft.safetensors"
            api.attack("finetune", perm, tuned, options={"epochs": 30}, seed=seed, device="cpu", force=True)
            decision = api.extract(tuned, keys, PASSPHRASE)
            hidden = next(r for r in decision.results if r.scheme == "hidden")
            output = next(r for r in decision.results if r.scheme == "output")
            extra[seed].update({
                "permute, read without the line-up": f"{raw_hidden_errors(perm, keys)} bits wrong",
                "permute then finetune 30": f"hidden {hidden.brief()} ({'Y' if hidden.detected else 'n'}), "
                                            f"output {output.brief()} ({'Y' if output.detected else 'n'})"})
    for name, per_seed in table.items():
        first = next(iter(per_seed.values()))
        print(f"\n### {name} (--{first.param.replace('_', '-')} swept; parameters {first.params})\n")
        print("| " + " | ".join(["value"] + [f"seed {s}" for s in per_seed]) + " |")
        print("| " + " | ".join(["---"] * (len(per_seed) + 1)) + " |")
        for i, row in enumerate(first.rows):
            label = "victim" if row.value is None else str(row.value)
            print("| " + " | ".join([label] + [cell(rep.rows[i]) for rep in per_seed.values()]) + " |")
        print(f"\nattack run time, mean per strength: {np.mean(seconds[name]):.1f} s")
    if extra:
        print("\n### int8 (onnxruntime), label-only, permutation without the defence, permutation then "
              "fine-tuning\n")
        print(json.dumps(extra, indent=1))


if __name__ == "__main__":
    main()
