#!/usr/bin/env python3
"""A forger's key search: draw many random hidden-scheme key sets with the library's own
keygen (`api.make_keys`) and read each against a model it was never embedded in with the
library's own read-out (`api.read_keys`), exactly as `keygen --seed S` then `extract` would.
Prints how many key sets "claim" the model at each operating point.

    .venv/bin/python scripts/key_search.py --key-sets 20000
"""

from __future__ import annotations

import argparse
import time

import torch

from deepsigns_cli import api, stats
from deepsigns_cli.checkpoint import load_checkpoint
from deepsigns_cli.data import load_data
from deepsigns_cli.defaults import DEFAULT_ALPHA
from deepsigns_cli.suspect import TorchSuspect

# (bits per class, target classes, alpha)
POINTS = {"defaults": (64, 3, DEFAULT_ALPHA), "old defaults": (32, 1, 1e-3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sample_models/digits-mlp.safetensors", help="an unmarked model")
    ap.add_argument("--key-sets", type=int, default=20000)
    ap.add_argument("--first-seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_data("digits")
    model, info = load_checkpoint(args.model)
    suspect = TorchSuspect(model, args.model)
    print(f"model {args.model} (never marked); {args.key_sets} key sets per operating point, "
          f"seeds {args.first_seed}..{args.first_seed + args.key_sets - 1}")
    print(f"{'operating point':<14} {'bits':>8} {'alpha':>7} {'claims':>6} {'expected':>9} "
          f"{'smallest p':>10} {'best seed':>9} {'seconds':>7}")
    for name, (bits, classes, alpha) in POINTS.items():
        start, claims, best = time.perf_counter(), 0, (2.0, None)
        for seed in range(args.first_seed, args.first_seed + args.key_sets):
            bundle = api.make_keys(model, info, data, ["hidden"], {"hidden": {"bits": bits, "classes": classes}},
                                   seed=seed)
            decision = api.read_keys(suspect, bundle, ["hidden"], alpha=alpha)
            claims += decision.detected
            best = min(best, (decision.p_value, seed))
        total = bits * classes  # every class's copy is read through its own projection
        per_set = stats.bits_p_value(stats.max_bit_errors(total, alpha), total)
        print(f"{name:<14} {f'{bits}x{classes}':>8} {alpha:>7.0e} {claims:>6} {per_set * args.key_sets:>9.2g} "
              f"{best[0]:>10.2g} {best[1]:>9} {time.perf_counter() - start:>7.0f}")


if __name__ == "__main__":
    main()
