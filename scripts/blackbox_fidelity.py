"""Fidelity and fine-tune robustness of the output-layer scheme at today's defaults (digits, CPU,
one thread): issue 8's check that the sturdier black-box mark keeps issue 3's fidelity target.

    ARCH=cnn SEEDS=1,2,3,4,5 ROBUST=1,2,3 OPTS='{"settle_epochs": 30}' \
        .venv/bin/python scripts/blackbox_fidelity.py

For every seed: train the baseline as scripts/blackbox_figures.py does (30 epochs, the seed),
make output-scheme keys (defaults, K=100, unless OPTS says otherwise), embed, print baseline
acc, marked acc, drop. For the ROBUST seeds: the finetune attack (Adam at the model's training
rate, 30 epochs, all layers, all the data) run in process exactly as `api.attack` runs it, then
the key matches (detected at >= 35 of 100 for alpha 1e-9).
OPTS: JSON overrides of deepsigns_cli.schemes.output.DEFAULTS (set on the module, so that
options keygen does not record, settle_epochs for one, take effect too).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

torch.set_num_threads(int(os.environ.get("THREADS", "1")))  # 1: the machine is shared

from deepsigns_cli import api, stats  # noqa: E402
from deepsigns_cli.attacks import AttackContext  # noqa: E402
from deepsigns_cli.data import load_data  # noqa: E402
from deepsigns_cli.registry import load_attack  # noqa: E402
from deepsigns_cli.schemes import output as output_scheme  # noqa: E402
from deepsigns_cli.training import evaluate, predict, seed_everything  # noqa: E402

ARCH = os.environ.get("ARCH", "cnn")
SEEDS = [int(s) for s in os.environ.get("SEEDS", "1,2,3,4,5").split(",") if s]
ROBUST = [int(s) for s in os.environ.get("ROBUST", "1,2,3").split(",") if s]
OPTS = json.loads(os.environ.get("OPTS", "{}"))
output_scheme.DEFAULTS.update(OPTS)


def finetune(marked, info, data, seed):
    """`deepsigns attack finetune --epochs 30` (Adam at the victim's rate), in process."""
    victim = copy.deepcopy(marked)
    ctx = AttackContext(info=info, data=data, options={"epochs": 30}, rng=np.random.default_rng(seed),
                        seed=seed, device="cpu", progress=None, out_kind="checkpoint",
                        add_output=None)
    seed_everything(seed)
    attacked, params = load_attack("finetune").run(victim, ctx)
    assert params["optimizer"] == "adam" and params["lr"] == info.lr and params["epochs"] == 30
    return attacked


def main() -> None:
    data = load_data("digits")
    print(f"arch={ARCH} seeds={SEEDS} robust={ROBUST} opts={OPTS}", flush=True)
    drops, dets, t_all = [], [], time.perf_counter()
    for seed in SEEDS:
        t0 = time.perf_counter()
        base, info, _ = api.train_model(ARCH, data, epochs=30, seed=seed, device="cpu")
        t_train = time.perf_counter() - t0
        bundle = api.make_keys(base, info, data, ["output"], {"output": {}}, seed=seed)
        marked = copy.deepcopy(base)
        t1 = time.perf_counter()
        marked, minfo, bundle, report = api.embed_keys(marked, info, data, bundle, seed=seed,
                                                       device="cpu")
        t_embed = time.perf_counter() - t1
        p = bundle.schemes["output"].params
        keys = bundle.schemes["output"].arrays
        k = len(keys["y"])
        before, after = report["accuracy_before"], report["accuracy_after"]
        drop = before - after
        drops.append(drop)
        line = (f"seed {seed}: base {before:.2f} marked {after:.2f} drop {drop:+.2f} | embed "
                f"{report['schemes']['output']['epochs']} ep, learnt {p['candidates_learnt']:.3f}, "
                f"qualified {p['qualified']}, lasting {p['lasting']} | train {t_train:.0f}s "
                f"embed {t_embed:.0f}s")
        if seed in ROBUST:
            t2 = time.perf_counter()
            attacked = finetune(marked, minfo, data, seed)
            m = int((predict(attacked, keys["x"]).argmax(1) == keys["y"]).sum())
            pv = stats.matches_p_value(m, k, p["num_classes"] - 1)
            det = pv <= api.DEFAULT_ALPHA
            dets.append(det)
            line += (f" | finetune: acc {evaluate(attacked, data.x_test, data.y_test):.2f}, "
                     f"matches {m}/{k} p={pv:.2g} {'DETECTED' if det else 'missed'} "
                     f"({time.perf_counter() - t2:.0f}s)")
        print(line, flush=True)
    print(f"SUMMARY arch={ARCH} opts={OPTS}: drops {' '.join(f'{d:+.2f}' for d in drops)}; mean "
          f"{np.mean(drops):+.3f}; detected after finetune {sum(dets)}/{len(dets)}; total "
          f"{time.perf_counter() - t_all:.0f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
