#!/usr/bin/env python3
"""Quality figures for the DeepSigns hidden-layer scheme (SPEC "Scheme 1") on `digits`, CPU.

Every figure runs in-process through the library API (deepsigns_cli.api), prints a table
and writes <out-dir>/<figure>.json. Everything is seeded: the same command on the same
machine (same torch build and thread count) prints the same numbers.

    .venv/bin/python scripts/figures.py fidelity      # accuracy kept, MLP and CNN, default bits
    .venv/bin/python scripts/figures.py reliability   # BER of marked MLPs, checkpoint vs ONNX
    .venv/bin/python scripts/figures.py integrity     # unmarked models are never claimed
    .venv/bin/python scripts/figures.py capacity      # BER and accuracy for N = 32 .. 512
    .venv/bin/python scripts/figures.py all

Seed s means: the baseline is trained with seed s, the keys are drawn with seed s, and the
embedding runs with seed s. Baseline epochs, embed epochs and the scheme's lambda1/lambda2/
margin/trigger_batch are the library defaults unless overridden on the command line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deepsigns_cli import stats
from deepsigns_cli.api import embed_keys, make_keys, read_keys, train_model
from deepsigns_cli.checkpoint import export_onnx, save_checkpoint
from deepsigns_cli.data import load_data
from deepsigns_cli.errors import SchemeError
from deepsigns_cli.registry import SCHEMES, embed_order
from deepsigns_cli.results import BitsResult
from deepsigns_cli.schemes import hidden as hidden_mod
from deepsigns_cli.suspect import OnnxSuspect, Suspect, TorchSuspect, open_suspect
from deepsigns_cli.training import TrainConfig, evaluate, fit

ROOT = Path(__file__).resolve().parent.parent
ALPHA = 1e-3


# ----------------------------------------------------------------------------- helpers


class Lab:
    """Shared state for one invocation: data, options, a cache of trained baselines."""

    def __init__(self, args):
        self.args = args
        self.data = load_data("digits")
        self.device = "cpu"
        self._baselines: dict = {}

    # baselines are deterministic in (arch, kwargs, seed): train once, hand out copies
    def baseline(self, arch: str, seed: int, arch_kwargs: dict | None = None):
        key = (arch, json.dumps(arch_kwargs or {}, sort_keys=True), seed)
        if key not in self._baselines:
            model, info, report = train_model(
                arch, self.data, arch_kwargs=arch_kwargs, epochs=self.args.baseline_epochs,
                seed=seed, device=self.device)
            self._baselines[key] = (model, info, report)
        model, info, report = self._baselines[key]
        return copy.deepcopy(model), copy.deepcopy(info), dataclasses.replace(report)

    def hidden_options(self, n_bits: int) -> dict:
        opts = {"bits": n_bits}
        for name in ("lambda1", "lambda2", "margin", "trigger_batch"):
            value = getattr(self.args, name)
            if value is not None:
                opts[name] = value
        return {"hidden": opts}

    def marked(self, arch: str, seed: int, n_bits: int, arch_kwargs: dict | None = None):
        """(baseline acc, marked model, info, bundle, embed report) for one seed."""
        model, info, base = self.baseline(arch, seed, arch_kwargs)
        bundle = make_keys(model, info, self.data, ["hidden"], self.hidden_options(n_bits), seed=seed)
        model, info, bundle, report = embed_keys(
            model, info, self.data, bundle, epochs=self.args.embed_epochs, seed=seed,
            device=self.device)
        return base.test_accuracy, model, info, bundle, report

    def finetune_control(self, arch: str, seed: int, epochs: int, arch_kwargs: dict | None = None):
        """The same baseline fine-tuned exactly like embed does (epochs, lr, batch, seed), no watermark."""
        model, info, _ = self.baseline(arch, seed, arch_kwargs)
        cfg = TrainConfig(epochs=epochs, lr=info.lr, seed=seed, device=self.device,
                          description="control")
        history = fit(model, self.data.x_train, self.data.y_train, cfg)
        model.cpu()
        return evaluate(model, self.data.x_test, self.data.y_test), history


def extract(suspect, bundle) -> BitsResult:
    """White-box read of every scheme of the bundle (as `deepsigns extract`); the hidden result.

    `suspect`: a torch model in memory, or a suspect.Suspect (checkpoint or ONNX file)."""
    if not isinstance(suspect, Suspect):
        suspect = TorchSuspect(suspect)
    decision = read_keys(suspect, bundle, embed_order(bundle.schemes), alpha=ALPHA,
                         command="extract")
    (result,) = [r for r in decision.results if r.scheme == "hidden"]
    return result


def extract_file(path: Path, bundle) -> BitsResult:
    """`extract` from a checkpoint or ONNX file (opened with the shapes the keys were made for)."""
    suspect = open_suspect(path, shapes=(tuple(bundle.info["input_shape"]), bundle.info["num_classes"]))
    try:
        return extract(suspect, bundle)
    finally:
        if isinstance(suspect, OnnxSuspect):
            suspect.onnx.close()  # its onnxruntime worker process


def meta(lab: Lab, figure: str, started: float) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "deepsigns_cli"],
                                    cwd=ROOT, capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    d = lab.data
    return {
        "figure": figure,
        "command": " ".join(["scripts/figures.py", *sys.argv[1:]]),
        "data": {"name": d.name, "train": len(d.x_train), "test": len(d.x_test),
                 "one_test_sample_points": round(100.0 / len(d.x_test), 4)},
        "device": lab.device,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "git_commit": commit,
        "library_modified_since_commit": dirty,
        "baseline_epochs": lab.args.baseline_epochs,
        "embed_epochs": lab.args.embed_epochs or "library default",
        "hidden_defaults": dict(hidden_mod.DEFAULTS),
        "hidden_overrides": {k: getattr(lab.args, k) for k in
                             ("lambda1", "lambda2", "margin", "trigger_batch")
                             if getattr(lab.args, k) is not None},
        "alpha": ALPHA,
        "seconds": round(time.time() - started, 1),
    }


def table(title: str, header: list[str], rows: list[list]) -> None:
    def cell(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
                return f"{v:.2e}"
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"
        return "-" if v is None else str(v)

    body = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in body:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))


def verdict(name: str, met: bool, detail: str) -> dict:
    print(f"TARGET {name}: {'MET' if met else 'NOT MET'} ({detail})")
    return {"name": name, "met": met, "detail": detail}


def write(lab: Lab, figure: str, started: float, body: dict) -> Path:
    out = Path(lab.args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{figure}.json"
    path.write_text(json.dumps({"meta": meta(lab, figure, started), **body}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def mean(xs):
    return _r(float(statistics.fmean(xs))) if xs else None


def _r(v: float) -> float:
    """Accuracy differences are multiples of 100/449: drop float noise (2.8e-15 -> 0)."""
    return round(v, 9)


# ----------------------------------------------------------------------------- figures


def fig_fidelity(lab: Lab) -> dict:
    from deepsigns_cli.schemes.hidden import DEFAULTS

    started, rows, summary = time.time(), [], {}
    n_bits = DEFAULTS["bits"]  # the default operating point (at DEFAULTS["classes"] class centres)
    for arch in ("mlp", "cnn"):
        for seed in range(lab.args.seeds):
            base_acc, model, _, bundle, rep = lab.marked(arch, seed, n_bits)
            epochs = rep["schemes"]["hidden"]["epochs"]
            ctrl_acc, _ = lab.finetune_control(arch, seed, epochs)
            ext = extract(model, bundle)
            rows.append({
                "arch": arch, "seed": seed, "n_bits": n_bits, "embed_epochs": epochs,
                "baseline_acc": base_acc, "marked_acc": rep["accuracy_after"],
                "drop": _r(base_acc - rep["accuracy_after"]),
                "finetuned_acc": ctrl_acc, "finetuned_drop": _r(base_acc - ctrl_acc),
                "marked_vs_finetuned": _r(ctrl_acc - rep["accuracy_after"]),
                "ber": ext.ber, "detected": ext.detected,
            })
        r = [x for x in rows if x["arch"] == arch]
        summary[arch] = {
            "baseline_acc": mean([x["baseline_acc"] for x in r]),
            "marked_acc": mean([x["marked_acc"] for x in r]),
            "finetuned_acc": mean([x["finetuned_acc"] for x in r]),
            "mean_drop": mean([x["drop"] for x in r]),
            "max_drop": max(x["drop"] for x in r),
            "mean_finetuned_drop": mean([x["finetuned_drop"] for x in r]),
            "mean_marked_vs_finetuned": mean([x["marked_vs_finetuned"] for x in r]),
            "mean_ber": mean([x["ber"] for x in r]),
        }
    table(f"FIDELITY: test accuracy (%), N={n_bits} bits, digits test set "
          f"({len(lab.data.x_test)} samples: one sample = {100 / len(lab.data.x_test):.3f} points)",
          ["arch", "seed", "baseline", "marked", "drop", "fine-tuned", "ft drop", "ft-marked", "BER"],
          [[x["arch"], x["seed"], x["baseline_acc"], x["marked_acc"], x["drop"], x["finetuned_acc"],
            x["finetuned_drop"], x["marked_vs_finetuned"], x["ber"]] for x in rows])
    table("FIDELITY summary (means over seeds; drop = baseline - marked; ft = plain fine-tuning, "
          "same epochs and lr, no watermark)",
          ["arch", "baseline", "marked", "fine-tuned", "mean drop", "max drop", "ft drop",
           "ft-marked", "mean BER"],
          [[a, s["baseline_acc"], s["marked_acc"], s["finetuned_acc"], s["mean_drop"],
            s["max_drop"], s["mean_finetuned_drop"], s["mean_marked_vs_finetuned"], s["mean_ber"]]
           for a, s in summary.items()])
    targets = [verdict(f"fidelity {a}: mean drop <= 0.5 points", s["mean_drop"] <= 0.5,
                       f"mean drop {s['mean_drop']:+.3f}") for a, s in summary.items()]
    body = {"rows": rows, "summary": summary, "targets": targets}
    write(lab, "fidelity", started, body)
    return body


def fig_reliability(lab: Lab) -> dict:
    started, rows, summary = time.time(), [], {}
    with tempfile.TemporaryDirectory(prefix="ds-figures-") as tmp:
        for n_bits in (32, 64):
            for seed in range(lab.args.seeds):
                base_acc, model, info, bundle, rep = lab.marked("mlp", seed, n_bits)
                ckpt = Path(tmp) / f"marked-{n_bits}-{seed}.safetensors"
                onnx_path = ckpt.with_suffix(".onnx")
                save_checkpoint(model, info, ckpt)
                export_onnx(model, info, onnx_path)
                from_ckpt = extract_file(ckpt, bundle)
                from_onnx = extract_file(onnx_path, bundle)
                in_memory = extract(model, bundle)
                rows.append({
                    "n_bits": n_bits, "seed": seed,
                    "baseline_acc": base_acc, "marked_acc": rep["accuracy_after"],
                    "ber_checkpoint": from_ckpt.ber, "ber_onnx": from_onnx.ber,
                    "ber_in_memory": in_memory.ber,
                    "p_checkpoint": from_ckpt.p_value, "p_onnx": from_onnx.p_value,
                    "detected_checkpoint": from_ckpt.detected,
                    "detected_onnx": from_onnx.detected,
                    "onnx_tensor": from_onnx.tensor,
                    "onnx_candidates": from_onnx.candidates,
                    "identical_bits": from_ckpt.bits == from_onnx.bits == in_memory.bits,
                    "bits": from_ckpt.bits,
                    "warning": from_ckpt.warning,
                })
            r = [x for x in rows if x["n_bits"] == n_bits]
            summary[str(n_bits)] = {
                "seeds": len(r),
                "max_ber_checkpoint": max(x["ber_checkpoint"] for x in r),
                "max_ber_onnx": max(x["ber_onnx"] for x in r),
                "all_ber_zero": all(x["ber_checkpoint"] == 0 == x["ber_onnx"] for x in r),
                "all_identical": all(x["identical_bits"] for x in r),
                "all_detected": all(x["detected_checkpoint"] and x["detected_onnx"] for x in r),
                "worst_p": max(max(x["p_checkpoint"], x["p_onnx"]) for x in r),
            }
    table("RELIABILITY: marked MLP read back from its checkpoint and from its ONNX export",
          ["N", "seed", "marked acc", "BER ckpt", "BER onnx", "p ckpt", "p onnx", "detected",
           "same bits", "onnx tensor"],
          [[x["n_bits"], x["seed"], x["marked_acc"], x["ber_checkpoint"], x["ber_onnx"],
            x["p_checkpoint"], x["p_onnx"], x["detected_checkpoint"] and x["detected_onnx"],
            x["identical_bits"], x["onnx_tensor"]] for x in rows])
    table("RELIABILITY summary", ["N", "seeds", "max BER ckpt", "max BER onnx", "all BER 0",
                                  "all same bits", "all detected", "worst p"],
          [[n, s["seeds"], s["max_ber_checkpoint"], s["max_ber_onnx"], s["all_ber_zero"],
            s["all_identical"], s["all_detected"], s["worst_p"]] for n, s in summary.items()])
    targets = [verdict(f"reliability N={n}: BER 0 in every seed, identical bits ckpt/ONNX",
                       s["all_ber_zero"] and s["all_identical"],
                       f"max BER {max(s['max_ber_checkpoint'], s['max_ber_onnx']):.4f}, "
                       f"identical={s['all_identical']}") for n, s in summary.items()]
    body = {"rows": rows, "summary": summary, "targets": targets}
    write(lab, "reliability", started, body)
    return body


def _read(model, info, bundle, tmp: Path, tag: str) -> dict:
    """Extract from the torch model and from its ONNX export; a width mismatch is a result."""
    out = {}
    try:
        r = extract(model, bundle)
        out["torch"] = {"ber": r.ber, "bit_errors": r.bit_errors, "p_value": r.p_value,
                        "detected": r.detected, "candidates": r.candidates, "note": r.note}
    except SchemeError as exc:  # the library once raised here on a width mismatch
        out["torch"] = {"ber": None, "bit_errors": None, "p_value": None, "detected": False,
                        "note": f"SchemeError: {exc}"}
    path = tmp / f"{tag}.onnx"
    export_onnx(model, info, path)
    r = extract_file(path, bundle)
    out["onnx"] = {"ber": r.ber, "bit_errors": r.bit_errors, "p_value": r.p_value,
                   "detected": r.detected, "tensor": r.tensor, "candidates": r.candidates,
                   "note": r.note}
    return out


def fig_integrity(lab: Lab) -> dict:
    started, rows, summary = time.time(), [], {}
    owner_seed = lab.args.owner_seed
    others = [s for s in range(owner_seed + 1, owner_seed + 1 + lab.args.others)]
    cnn_seeds = others[: lab.args.cnns]
    suspects = [("own unmarked baseline", "mlp", None, owner_seed)]
    suspects += [("unmarked mlp", "mlp", None, s) for s in others]
    suspects += [("unmarked cnn (hidden=128)", "cnn", None, s) for s in cnn_seeds]
    suspects += [("unmarked cnn (hidden=512)", "cnn", {"hidden": 512}, s) for s in cnn_seeds]
    with tempfile.TemporaryDirectory(prefix="ds-figures-") as tmp:
        tmp = Path(tmp)
        for n_bits in (32, 64):
            # the owner's keys and, as a positive control, the owner's marked model
            _, marked, minfo, bundle, _ = lab.marked("mlp", owner_seed, n_bits)
            pos = _read(marked, minfo, bundle, tmp, f"owner-marked-{n_bits}")
            for kind, arch, kwargs, seed in suspects:
                model, info, _ = lab.baseline(arch, seed, kwargs)
                res = _read(model, info, bundle, tmp, f"{arch}-{seed}-{n_bits}")
                rows.append({"n_bits": n_bits, "suspect": kind, "arch": arch,
                             "arch_kwargs": kwargs or {}, "seed": seed, **res})
            r = [x for x in rows if x["n_bits"] == n_bits]
            readable = [x for x in r for v in (x["torch"], x["onnx"]) if v["ber"] is not None
                        and v.get("candidates", 1) != 0]
            pvals = [v["p_value"] for x in r for v in (x["torch"], x["onnx"])
                     if v["p_value"] is not None]
            bers = [v["ber"] for x in r for v in (x["torch"], x["onnx"])
                    if v["ber"] is not None and v.get("candidates", 1) != 0]
            summary[str(n_bits)] = {
                "suspects": len(r),
                "false_detections": sum(x["torch"]["detected"] or x["onnx"]["detected"] for x in r),
                "min_p_value": min(pvals),
                "min_ber": min(bers) if bers else None,
                "mean_ber": mean(bers),
                "max_bit_errors_detected_at_alpha": stats.max_bit_errors(n_bits, ALPHA),
                "readouts": len(readable),
                "positive_control": pos,
            }
    def shown(v):
        # no carrier of the keys' width: the library fills in BER 1.0 and p 1.0; show n/a
        return "n/a" if v["ber"] is None or v.get("candidates") == 0 else v["ber"]

    table(f"INTEGRITY: owner (MLP seed {owner_seed}) keys read from models that are not marked "
          f"(torch = in-memory model, onnx = its export; alpha={ALPHA:g})",
          ["N", "suspect", "seed", "BER torch", "p torch", "BER onnx", "p onnx", "detected", "note"],
          [[x["n_bits"], x["suspect"], x["seed"], shown(x["torch"]), x["torch"]["p_value"],
            shown(x["onnx"]), x["onnx"]["p_value"],
            x["torch"]["detected"] or x["onnx"]["detected"],
            _short(x["torch"]["note"] or x["onnx"]["note"])] for x in rows])
    table("INTEGRITY summary (positive control = the owner's marked MLP, same keys)",
          ["N", "suspects", "false detections", "min p", "min BER", "mean BER",
           "errors allowed", "marked: BER", "marked: p", "marked: detected"],
          [[n, s["suspects"], s["false_detections"], s["min_p_value"], s["min_ber"], s["mean_ber"],
            s["max_bit_errors_detected_at_alpha"], s["positive_control"]["onnx"]["ber"],
            s["positive_control"]["onnx"]["p_value"],
            s["positive_control"]["torch"]["detected"] and s["positive_control"]["onnx"]["detected"]]
           for n, s in summary.items()])
    notes = sorted({x["torch"]["note"] for x in rows if x["torch"]["note"]}
                   | {x["onnx"]["note"] for x in rows if x["onnx"]["note"]})
    for note in notes:
        print(f"note: {note}")
    targets = [verdict(f"integrity N={n}: no unmarked model detected at alpha={ALPHA:g}",
                       s["false_detections"] == 0,
                       f"{s['false_detections']} false detections of {s['suspects']}, "
                       f"min p {s['min_p_value']:.3g}") for n, s in summary.items()]
    body = {"rows": rows, "summary": summary, "notes": notes, "targets": targets}
    write(lab, "integrity", started, body)
    return body


def _short(note):
    if not note:
        return None
    return "width differs: no 512-unit carrier" if "512" in note else note[:40]


def fig_capacity(lab: Lab) -> dict:
    started, rows, summary = time.time(), [], {}
    sizes = [int(n) for n in lab.args.sizes.split(",")]
    for n_bits in sizes:
        for seed in range(lab.args.seeds):
            base_acc, model, _, bundle, rep = lab.marked("mlp", seed, n_bits)
            ext = extract(model, bundle)
            rows.append({"n_bits": n_bits, "seed": seed, "baseline_acc": base_acc,
                         "marked_acc": rep["accuracy_after"],
                         "drop": _r(base_acc - rep["accuracy_after"]), "ber": ext.ber,
                         "bit_errors": ext.bit_errors, "p_value": ext.p_value,
                         "detected": ext.detected})
        r = [x for x in rows if x["n_bits"] == n_bits]
        s = {"seeds": len(r), "max_ber": max(x["ber"] for x in r),
             "mean_ber": mean([x["ber"] for x in r]),
             "mean_drop": mean([x["drop"] for x in r]), "max_drop": max(x["drop"] for x in r),
             "all_detected": all(x["detected"] for x in r)}
        s["ok"] = s["max_ber"] == 0 and s["mean_drop"] <= 1.0
        summary[str(n_bits)] = s
    ok = [n for n in sizes if summary[str(n)]["ok"]]
    capacity = max(ok) if ok else None
    table("CAPACITY: marked MLP (carrier 'head:input', 512 units) per seed",
          ["N", "seed", "baseline", "marked", "drop", "BER", "errors", "p", "detected"],
          [[x["n_bits"], x["seed"], x["baseline_acc"], x["marked_acc"], x["drop"], x["ber"],
            x["bit_errors"], x["p_value"], x["detected"]] for x in rows])
    table("CAPACITY summary (ok = BER 0 in every seed and mean drop <= 1 point)",
          ["N", "seeds", "max BER", "mean BER", "mean drop", "max drop", "all detected", "ok"],
          [[n, s["seeds"], s["max_ber"], s["mean_ber"], s["mean_drop"], s["max_drop"],
            s["all_detected"], s["ok"]] for n, s in summary.items()])
    print(f"capacity: {capacity} bits" if capacity else "capacity: none of the sizes qualifies")
    body = {"rows": rows, "summary": summary, "capacity_bits": capacity,
            "targets": [verdict("capacity", capacity is not None,
                                f"largest qualifying N = {capacity} of {sizes}")]}
    write(lab, "capacity", started, body)
    return body


HELP = {
    "fidelity": "test accuracy of baseline, marked and plainly fine-tuned MLP and CNN (N=32)",
    "reliability": "BER of marked MLPs (N=32, 64) from the checkpoint and from its ONNX export",
    "integrity": "the owner's keys on unmarked MLPs and CNNs: BER, p-value, never detected",
    "capacity": "BER and accuracy drop for N = 32 .. 512 bits on the 512-unit MLP carrier",
}

RUNNERS = {"fidelity": fig_fidelity, "reliability": fig_reliability, "integrity": fig_integrity,
           "capacity": fig_capacity}


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out-dir", default=str(ROOT / "figures"),
                        help="where <figure>.json goes (default: figures/ in the repository)")
    common.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (fixed, so that runs repeat exactly; default 1: "
                             "these models are tiny, and 2 threads on a busy 2-core machine run "
                             "10x slower from spinning)")
    common.add_argument("--baseline-epochs", type=int, default=30,
                        help="epochs of every baseline (train_model / `deepsigns train` default 30)")
    common.add_argument("--embed-epochs", type=int, default=None,
                        help="embed epochs (default: the library's, registry.SCHEMES['hidden'].default_epochs, "
                             f"now {SCHEMES['hidden'].default_epochs})")
    for name, kind in (("lambda1", float), ("lambda2", float), ("margin", float),
                       ("trigger_batch", int)):
        common.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
                            help=f"override hidden.DEFAULTS['{name}'] "
                                 f"(now {hidden_mod.DEFAULTS[name]})")

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="figure", required=True)
    specs = {
        "fidelity": [("--seeds", 5)],
        "reliability": [("--seeds", 5)],
        "integrity": [("--owner-seed", 0), ("--others", 10), ("--cnns", 3)],
        "capacity": [("--seeds", 3)],
    }
    for fig, opts in specs.items():
        p = sub.add_parser(fig, parents=[common], help=HELP[fig], description=HELP[fig])
        for flag, default in opts:
            p.add_argument(flag, type=int, default=default, help=f"default {default}")
        if fig == "capacity":
            p.add_argument("--sizes", default="32,64,128,256,512", help="bit counts N")
    p = sub.add_parser("all", parents=[common], help="every figure, with its defaults")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    figures = tuple(RUNNERS) if args.figure == "all" else (args.figure,)  # (what embedding costs: bench.py)
    failed = []
    for fig in figures:
        fig_args = args
        if args.figure == "all":  # each figure with its own defaults
            fig_args = argparse.Namespace(**vars(args))
            for flag, default in specs[fig]:
                setattr(fig_args, flag.lstrip("-").replace("-", "_"), default)
            if fig == "capacity":
                fig_args.sizes = "32,64,128,256,512"
        lab = Lab(fig_args) if args.figure != "all" else _shared(fig_args)
        print(f"\n=== {fig} ===", flush=True)
        t0 = time.time()
        body = RUNNERS[fig](lab)
        print(f"({fig}: {time.time() - t0:.1f} s)", flush=True)
        failed += [t["name"] for t in body.get("targets", []) if not t["met"]]
    if failed:
        print("\ntargets not met: " + "; ".join(failed))
    return 0


_LAB: Lab | None = None


def _shared(args) -> Lab:
    """`all` shares one baseline cache across figures (baselines depend only on arch and seed)."""
    global _LAB
    if _LAB is None:
        _LAB = Lab(args)
    _LAB.args = args
    return _LAB


if __name__ == "__main__":
    sys.exit(main())
