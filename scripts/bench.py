"""`make bench`: what embedding costs at scale (issue 10), each figure from the code the CLI runs.

    .venv/bin/python scripts/bench.py [overhead] [floor] [term] [every] [threads] [scaling] [memory] [optimizer] [gpu]
                                      [--repeats 11]
                                      [--out figures/bench]

- overhead: seconds per epoch of the hidden-layer embedding against plain fine-tuning of the
  same model, data and batch size, interleaved epoch by epoch in one process (medians; and the
  median of the ratios round by round, with its quartiles, which a load that drifts over the
  run moves less): the digits MLP and CNN, and the ResNet on a generated 32x32 image folder. A
  third side is a step in the style of the published PyTorch port (`PortStyle`: the paper's two
  terms on the ordinary batch, through autograd), the loop the issue's target is set against.
- floor (not run by default): the same for the MLP and the CNN, with a further side, the
  objective with a term of zero: what the embedding costs before any loss is computed.
- scaling: samples per second of `deepsigns embed` on the ResNet (32x32 images) with 1 and with
  2 processes (`--nproc 2`, one thread each), at --batch-size 128 (64 samples per process and
  step; also at the default 64 with `scaling --batch-size 64`).
- term (not run by default): what the hidden embedding's step term costs alone, and after a
  forward and backward pass of the model, as the loop calls it (in numpy and in torch; the
  digits MLP and CNN).
- every (not run by default): a term on every k-th step only, k times as heavy (`every_k`), tried
  as a way to the overhead target and not taken: seconds per epoch as in overhead (k = 1, 2, 4,
  8; the digits MLP and CNN), then on the digits MLP (30-epoch baselines, seeds 0-4) the epochs
  the embedding runs before it reads every bit back, its seconds, and its bit errors.
- threads (not run by default): plain fine-tuning and the embedding (digits MLP and CNN) at
  torch's default threads, with numpy's BLAS at its default and on one thread, as the loop
  holds it (each in processes of its own): what the loop's BLAS limit is worth.
- optimizer: seconds per epoch of plain fine-tuning and of the embedding (the digits MLP and
  CNN, Adam) with torch's default optimiser (a loop over the tensors on the CPU) and with the
  fused one the loop uses, interleaved as above.
- gpu (not run by default; needs CUDA): samples per second of plain fine-tuning, the embedding
  and the port-style step on the GPU, fp32 and bf16, interleaved as in overhead (`gpu`).
- memory: peak RSS of one `deepsigns embed` process (the CNN, one epoch) on generated 32x32
  image folders of 2,000 and of 20,000 images (the larger must need less than 1.2x the smaller).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PASSPHRASE = "bench-passphrase"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DEEPSIGNS_PASSPHRASE": PASSPHRASE}


def _folder(out: Path, count: int, size: int = 32) -> Path:
    from make_image_folder import make_image_folder

    path = out / f"images-{count}-{size}"
    if not (path / "train").is_dir():
        make_image_folder(path, count, size, seed=0)
    return path


def _cli(*args, env=None) -> dict:
    exe = Path(sys.executable).with_name("deepsigns")
    proc = subprocess.run([str(exe), *map(str, args), "--json"], capture_output=True, text=True,
                          env=env or ENV, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"deepsigns {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def _owner(out: Path, arch: str, data: str, tag: str, epochs: int = 3, seed: int = 0,
           device: str = "cpu") -> tuple[Path, Path]:
    base, keys = out / f"{tag}-base.safetensors", out / f"{tag}.dskey"
    if not base.exists():
        _cli("train", "--arch", arch, "--data", data, "--epochs", epochs, "--seed", seed, "--device", device,
             "--out", base, "--force")
    if not keys.exists():
        _cli("keygen", "--model", base, "--data", data, "--scheme", "hidden", "--seed", seed, "--out", keys,
             "--force")
    return base, keys


def port_style(keys, objective):
    """An objective in the style of the published PyTorch port of DeepSigns, as a yardstick: the
    paper's two terms (eqs. 2 and 3) on the ordinary batch, written as torch operations that autograd
    differentiates: every activation pulled to its class centre, the target centres pushed from
    the others, and each target class's mean activation in the batch through its columns of A
    against the bits by binary cross-entropy. It has none of our own additions (the line-up
    reading, the pin, the end-of-epoch line-up and read); it starts from `objective`'s centres
    and scale, on the same keys."""
    import torch
    from torch import nn

    from deepsigns_cli.objective import Objective
    from deepsigns_cli.zoo import capture

    params, arrays = keys.params, keys.arrays
    classes, n = [int(c) for c in arrays["classes"]], int(params["n_bits"])

    class PortStyle(Objective):
        def __init__(self):
            self.state = nn.Module()
            self.state.centres = nn.Parameter(objective.state.centres.detach().clone())
            self.state.register_buffer("A", torch.as_tensor(arrays["A"]))
            self.state.register_buffer("bits", torch.as_tensor(arrays["bits"], dtype=torch.float32))
            self._ctx = self.store = None

        def setup(self, model):
            self._ctx = capture(model, params["layer"])
            self.store = self._ctx.__enter__()

        def teardown(self):
            self._ctx.__exit__(None, None, None)

        def loss(self, batch):
            act, y = self.store["act"][: batch.n_train], batch.y[: batch.n_train]
            centres, scale = self.state.centres, objective.scale
            pull = ((act - centres[y]) ** 2).sum(1).mean() / scale
            push = torch.exp(-torch.cdist(centres[classes], centres) ** 2 / scale).mean()
            project = act.new_zeros(())
            for k, c in enumerate(classes):
                mine = y == c
                if mine.any():
                    mean = act[mine].mean(0)
                    project = project + nn.functional.binary_cross_entropy_with_logits(
                        mean @ self.state.A[:, k * n: (k + 1) * n], self.state.bits[k])
            return params["lambda1"] * (pull + push) + params["lambda2"] * project

    return PortStyle()


def every_k(objective, k: int):
    """The hidden embedding's `objective` with its term on every k-th step only, k times as
    heavy, and on the other steps nothing but its watch of the probes (the end of an epoch still
    reads them as they passed): the issue's "a term every k steps". Not what the CLI runs."""
    loss, steps = objective.loss, itertools.count()

    def sparse(batch):
        if next(steps) % k == 0:
            return loss(batch) * k
        if objective.watch is not None:
            objective.watch.see(objective.store["act"][: batch.n_train], batch.rows.numpy())
        return None

    objective.loss = sparse
    return objective


def _interleaved(out: Path, arch: str, repeats: int, sides: dict, threads: int | None = 1,
                 blas_threads: int | None = 1, device: str = "cpu", precision: str = "fp32", batch_size: int = 64,
                 copies: int = 1, rounds: dict | None = None) -> tuple[dict, int]:
    """({side: median seconds per epoch}, training samples): one epoch of fine-tuning a fresh
    copy of the owner's `arch` model per side and round, in one process, the sides rotated
    round by round (drifting load favours none). A side is (what its objectives are: none,
    "embed", "port", "floor" or "every<k>"; torch's default optimiser instead of the loop's).
    torch on `threads` threads (None: its default), numpy's BLAS on `blas_threads` while the loop
    runs (TrainConfig.blas_threads; None: numpy's default). On `device` at `precision` and
    `batch_size`; `copies` > 1: the training set decoded into memory and repeated that many times
    (epochs long enough to time on a GPU; the keys' rows are those of the first copy). `rounds`,
    where given, takes each side's seconds round by round."""
    import torch

    from deepsigns_cli.training import TrainConfig, fit

    if threads is not None:
        torch.set_num_threads(threads)
    model, info, data, scheme, keyset = _overhead_owner(out, arch, device)
    x, y = data.x_train, data.y_train
    if copies > 1:
        x, y = np.concatenate([np.asarray(x)] * copies), np.concatenate([y] * copies)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for i in range(repeats + 1):  # the first round warms up (allocator, kernels), not counted
        for name in names[i % len(names):] + names[: i % len(names)]:
            kind, torch_default = sides[name]
            net = copy.deepcopy(model)
            objectives = [] if kind is None else [scheme.objective(net, info, data, keyset)]
            if kind == "port":
                objectives = [port_style(keyset, objectives[0])]
            if kind == "floor":
                objectives[0]._terms = lambda act, centres, *_: (act.new_zeros(()), torch.zeros_like(act),
                                                                 torch.zeros_like(centres))
            if kind is not None and kind.startswith("every"):
                every_k(objectives[0], int(kind[len("every"):]))
            history = fit(net, x, y, TrainConfig(epochs=1, batch_size=batch_size, lr=info.lr, seed=i, device=device,
                                                 precision=precision, fused=not torch_default,
                                                 blas_threads=blas_threads), objectives)
            if i:
                seconds[name].append(history["epoch_seconds"][0])
    if rounds is not None:
        rounds.update(seconds)
    return {name: float(np.median(values)) for name, values in seconds.items()}, len(y)


def _overhead_owner(out: Path, arch: str, device: str = "cpu"):
    """(model, info, data, scheme, keys) of the owner the overhead figures embed into: `arch`
    trained on digits (the ResNet on 2,000 generated 32x32 images), its hidden-layer keys
    checked."""
    from deepsigns_cli import api
    from deepsigns_cli.bundle import open_bundle
    from deepsigns_cli.checkpoint import load_checkpoint
    from deepsigns_cli.registry import load_scheme

    data_spec = str(_folder(out, 2000)) if arch == "resnet" else "digits"
    base, keys = _owner(out, arch, data_spec, f"overhead-{arch}", device=device)
    model, info = load_checkpoint(base, arch=None)
    data = api.load_dataset(data_spec, base)  # an image folder as the checkpoint recorded it
    scheme = load_scheme("hidden")
    return model, info, data, scheme, scheme.check(open_bundle(keys, PASSPHRASE).schemes["hidden"])


def _round_ratios(rounds: dict, side: str) -> tuple[float, float, float]:
    """The median of `side`'s seconds over plain fine-tuning's, round by round (the two ran
    minutes apart at most: a drifting load moves both), and its quartiles."""
    ratios = np.array(rounds[side]) / np.array(rounds["plain"])
    return tuple(float(q) for q in np.percentile(ratios, (50, 25, 75)))


def overhead(out: Path, repeats: int, archs=("mlp", "cnn", "resnet"), floor: bool = False) -> dict:
    """Plain fine-tuning, our embedding and a step in the style of the published port
    (`port_style`). With `floor`, a fourth side: the objective with a term of zero (its hook,
    its bookkeeping of rows, its end-of-epoch line-up and its class centres in the optimiser,
    but no loss): what the hidden embedding costs before its loss is computed at all."""
    result = {}
    for arch in archs:
        sides = {"plain": (None, False), "embed": ("embed", False), "port": ("port", False),
                 **({"floor": ("floor", False)} if floor else {})}
        rounds: dict = {}
        median, samples = _interleaved(out, arch, repeats, sides, rounds=rounds)
        plain, embed, port = median["plain"], median["embed"], median["port"]
        by_round = {side: _round_ratios(rounds, side) for side in ("embed", "port")}
        result[arch] = {"plain_s_per_epoch": plain, "embed_s_per_epoch": embed, "ratio": embed / plain,
                        "port_style_ratio": port / plain, "samples": samples,
                        "ratio_by_round": by_round["embed"], "port_style_ratio_by_round": by_round["port"]}
        line = (f"overhead {arch}: plain {plain:.3f} s/epoch, embed {embed:.3f} s/epoch, ratio {embed / plain:.2f}x; "
                f"the port's style {port / plain:.2f}x; round by round (median, quartiles) "
                + ", ".join(f"{side} {m:.2f}x ({lo:.2f}-{hi:.2f})" for side, (m, lo, hi) in by_round.items()))
        if floor:
            result[arch]["floor_ratio"] = median["floor"] / plain
            line += f"; with a term of zero {result[arch]['floor_ratio']:.2f}x"
        print(line, flush=True)
    return result


def gpu(out: Path, repeats: int, device: str = "cuda") -> dict:
    """On CUDA: samples per second of plain fine-tuning, of our embedding and of the port-style
    step, interleaved as in overhead, at fp32 and under bf16 autocast: the digits MLP and CNN
    (1,348 training rows, batches of 64) and the ResNet (the 2,000 generated 32x32 images, decoded once
    and repeated 5 times: 10,000 rows an epoch; batches of 64 and of 256). (`device` cpu: a
    rehearsal of the figure, scripts/device_check.sh's)"""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench gpu: torch sees no GPU here")
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__}
    sides = {"plain": (None, False), "embed": ("embed", False), "port": ("port", False)}
    for arch, batch_size, copies in (("mlp", 64, 1), ("cnn", 64, 1), ("resnet", 64, 5), ("resnet", 256, 5)):
        for precision in ("fp32", "bf16") if device == "cuda" else ("fp32",):
            median, samples = _interleaved(out, arch, repeats, sides, threads=None, device=device,
                                           precision=precision, batch_size=batch_size, copies=copies)
            rates = {side: samples / s for side, s in median.items()}
            result[f"{arch} {batch_size} {precision}"] = {"samples_per_second": rates,
                                                          "ratio": median["embed"] / median["plain"],
                                                          "port_style_ratio": median["port"] / median["plain"]}
            print(f"gpu ({name}) {arch} --batch-size {batch_size} {precision}: samples/s plain "
                  f"{rates['plain']:.0f}, embed {rates['embed']:.0f}, port style {rates['port']:.0f}; embed / plain "
                  f"{median['embed'] / median['plain']:.2f}x, port style {median['port'] / median['plain']:.2f}x",
                  flush=True)
    return result


def term(out: Path, calls: int = 300) -> dict:
    """The hidden embedding's step term (`HiddenObjective._terms`, on a step's 64 training rows,
    its pinned rows and line-up as the loop gives them), in microseconds per call: alone, called
    again and again (warm caches; the fastest call), and right after a forward and backward pass
    of the model on those rows, as the training loop calls it (the median call); in numpy (the
    CPU's) and in torch (every other device's, here on the CPU). The digits MLP and CNN, torch
    and numpy on one thread."""
    import torch
    from threadpoolctl import threadpool_limits

    from deepsigns_cli.schemes import hidden_objective

    torch.set_num_threads(1)
    result: dict = {}
    with threadpool_limits(1):
        for arch in ("mlp", "cnn"):
            pass_then_call = _term_calls(out, arch)
            result[arch] = {}
            try:
                for side, host in (("numpy", {"cpu"}), ("torch", set())):
                    hidden_objective.HOST_DEVICES = host
                    alone = min(pass_then_call(first=False) for _ in range(calls))
                    after = float(np.median([pass_then_call() for _ in range(calls)]))
                    result[arch][side] = {"alone_us": alone * 1e6, "after_a_pass_us": after * 1e6}
            finally:
                hidden_objective.HOST_DEVICES = {"cpu"}
            print(f"term {arch}: " + "; ".join(f"{side} {r['alone_us']:.0f} us alone, {r['after_a_pass_us']:.0f} us "
                                                 "after a forward and backward pass"
                                                 for side, r in result[arch].items()), flush=True)
    return result


def _term_calls(out: Path, arch: str):
    """A function that times one call of the owner's `arch` model's embedding term, on one
    step's rows, after a forward and backward pass of the model on them (first=False: without)."""
    import torch

    from deepsigns_cli.zoo import captured

    model, info, data, scheme, keyset = _overhead_owner(out, arch)
    objective = scheme.objective(model, info, data, keyset)
    objective.setup(model)
    rows = np.random.default_rng(0).choice(len(data.y_train), 64, replace=False)
    x, y = torch.as_tensor(data.x_train[rows]), torch.as_tensor(data.y_train[rows])
    model.train()
    model(x)
    act = captured(objective.store, objective.layer, model).detach()
    pin = objective._pin_own(torch.as_tensor(rows))

    def timed(first: bool = True) -> float:
        if first:
            model(x).sum().backward()
            objective.store.clear()
        started = time.perf_counter()
        objective._terms(act, objective.state.centres.detach(), y, slice(0, len(y)), pin, 1.0)
        return time.perf_counter() - started

    return timed


def every(out: Path, repeats: int, ks=(2, 4, 8), seeds=range(5)) -> dict:
    """A term every k steps (`every_k`): what an epoch costs, and what the embedding then needs
    in epochs and seconds to read every bit back (both readings, as it decides to stop). torch
    on one thread, as `_interleaved` left it."""
    from deepsigns_cli import api
    from deepsigns_cli.bundle import open_bundle
    from deepsigns_cli.checkpoint import load_checkpoint
    from deepsigns_cli.registry import SCHEMES, load_scheme
    from deepsigns_cli.suspect import TorchSuspect
    from deepsigns_cli.training import TrainConfig, evaluate, fit

    result: dict = {}
    for arch in ("mlp", "cnn"):
        sides = {"plain": (None, False), "every1": ("embed", False),
                 **{f"every{k}": (f"every{k}", False) for k in ks}}
        median, _ = _interleaved(out, arch, repeats, sides)
        result[arch] = {k: median[f"every{k}"] / median["plain"] for k in (1, *ks)}
        print(f"every {arch}: embed / plain, s/epoch: "
              + ", ".join(f"k={k} {ratio:.2f}x" for k, ratio in result[arch].items()), flush=True)
    scheme, data = load_scheme("hidden"), api.load_dataset("digits", None)
    stops: dict = {k: [] for k in (1, *ks)}
    for seed in seeds:
        base, keys = _owner(out, "mlp", "digits", f"every-mlp-{seed}", epochs=30, seed=seed)
        keyset = scheme.check(open_bundle(keys, PASSPHRASE).schemes["hidden"])
        for k in stops:
            net, info = load_checkpoint(base, arch=None)
            objective = scheme.objective(net, info, data, keyset)
            objective.stop_when_read = True  # as embed runs it
            cfg = TrainConfig(epochs=SCHEMES["hidden"].default_epochs, lr=info.lr, seed=seed, device="cpu")
            started = time.perf_counter()
            history = fit(net, data.x_train, data.y_train, cfg, [every_k(objective, k) if k > 1 else objective])
            seconds = time.perf_counter() - started
            read = scheme.read(TorchSuspect(net), keyset)
            stops[k].append({"epochs": history["epochs"], "seconds": seconds, "bit_errors": read.bit_errors,
                             "accuracy": evaluate(net, data.x_test, data.y_test)})
    for k, runs in stops.items():
        print(f"every mlp k={k}: epochs {[r['epochs'] for r in runs]} (cap {SCHEMES['hidden'].default_epochs}), "
              f"seconds {sum(r['seconds'] for r in runs) / len(runs):.2f} on average, "
              f"bit errors {[r['bit_errors'] for r in runs]}, "
              f"test accuracy {[round(r['accuracy'], 1) for r in runs]}", flush=True)
    result["mlp_stops"] = stops
    return result


def threads(out: Path, repeats: int, rounds: int = 2) -> dict:
    """Plain fine-tuning and the embedding of the digits MLP and CNN with torch's default threads
    (one per core), as `deepsigns` runs when nothing is set, and numpy's BLAS at its own default
    or on one thread, as the loop holds it (TrainConfig.blas_threads). Each BLAS setting runs in
    processes of its own, `rounds` each, alternating: BLAS threads spin for a while after their
    last product, so the two settings cannot share a process; within a process of numpy's default,
    they spin into the plain epochs too, so plain fine-tuning (no numpy in its loop) is taken
    from the processes of one thread. Medians over the rounds."""
    limits = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in limits}
    result = {}
    for arch in ("mlp", "cnn"):
        runs: dict[str, list[dict]] = {"default": [], "one": []}
        for _ in range(rounds):
            for blas in runs:
                proc = subprocess.run([sys.executable, __file__, f"sides:{arch}:{blas}", "--repeats", str(repeats),
                                       "--out", str(out)], capture_output=True, text=True, env=env, check=False)
                if proc.returncode != 0:
                    raise SystemExit(f"the {blas} side of {arch} failed:\n{proc.stderr}")
                runs[blas].append(json.loads(proc.stdout.splitlines()[-1].split("] ", 1)[1])[f"sides:{arch}:{blas}"])
        result[arch] = {blas: {side: float(np.median([r[side] for r in rs])) for side in ("plain", "embed", "threads")}
                        for blas, rs in runs.items()}
        m = result[arch]
        plain = m["one"]["plain"]  # (beside the other side's embedding, plain epochs pay for its spinning threads)
        print(f"threads {arch} (torch on {m['one']['threads']:.0f} threads): plain {plain * 1e3:.0f} ms/epoch; embed "
              f"{m['default']['embed'] * 1e3:.0f} ms/epoch with numpy's BLAS at its default "
              f"({m['default']['embed'] / plain:.2f}x), {m['one']['embed'] * 1e3:.0f} ms/epoch on one thread as the "
              f"loop holds it ({m['one']['embed'] / plain:.2f}x); plain beside the former: "
              f"{m['default']['plain'] * 1e3:.0f} ms/epoch", flush=True)
    return result


def _sides(out: Path, repeats: int, arch: str, blas: str) -> dict:
    """One process of `threads`: plain and embedding epochs, interleaved, at torch's default threads."""
    import torch

    median, _ = _interleaved(out, arch, repeats, {"plain": (None, False), "embed": ("embed", False)}, threads=None,
                             blas_threads=None if blas == "default" else 1)
    return {**median, "threads": torch.get_num_threads()}


def optimizer(out: Path, repeats: int) -> dict:
    """Plain fine-tuning and our embedding of the digits MLP and CNN (Adam), each with torch's
    default optimiser (on the CPU a loop over the tensors, several operations each) and with
    the fused one the training loop uses (TrainConfig.fused), interleaved."""
    result = {}
    for arch in ("mlp", "cnn"):
        sides = {f"{kind or 'plain'} {'default' if default else 'fused'}": (kind, default)
                 for kind in (None, "embed") for default in (True, False)}
        median, _ = _interleaved(out, arch, repeats, sides)
        result[arch] = median
        line = ", ".join(f"{name} {median[name]:.3f}" for name in sides)
        print(f"optimizer {arch}, s/epoch: {line}; embed/plain: torch's default "
              f"{median['embed default'] / median['plain default']:.2f}x, fused "
              f"{median['embed fused'] / median['plain fused']:.2f}x", flush=True)
    return result


def scaling(out: Path, epochs: int = 2, repeats: int = 2, batch_size: int = 128) -> dict:
    """The faster of `repeats` runs each way (a run is short, and a moment of load elsewhere on
    the machine slows a 2-process run most); 1 and 2 processes alternate. A step of 2 processes
    waits for their gradient exchange, a fixed cost per step: at the default 64 samples per step
    (32 per process) it is a third of what a process computes, so the figure is taken at 128."""
    images = _folder(out, 2000)
    base, keys = _owner(out, "resnet", str(images), "scaling")
    seconds: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for nproc in (1, 2):
            marked = out / f"scaling-{nproc}.safetensors"
            extra = ["--nproc", nproc] if nproc > 1 else []
            report = _cli("embed", "--model", base, "--data", images, "--keys", keys, "--out", marked, "--epochs",
                          epochs, "--batch-size", batch_size, "--device", "cpu", "--force", *extra)
            seconds[nproc].append(report["schemes"]["hidden"]["seconds_per_epoch"])
            keys.unlink()  # embed updated it: the next run starts from fresh keys
            _owner(out, "resnet", str(images), "scaling")
    result = {}
    for nproc in (1, 2):
        s = min(seconds[nproc])
        result[nproc] = {"seconds_per_epoch": s, "samples_per_second": report_samples(images) / s}
        print(f"scaling: {nproc} process(es): {result[nproc]['samples_per_second']:.0f} samples/s", flush=True)
    result["ratio"] = result[2]["samples_per_second"] / result[1]["samples_per_second"]
    result["batch_size"] = batch_size
    print(f"scaling: 2 processes / 1 process = {result['ratio']:.2f}x (--batch-size {batch_size})", flush=True)
    return result


def report_samples(images: Path) -> int:
    return sum(1 for _ in (images / "train").glob("*/*.png"))


PEAK = r"""
import resource, sys
from deepsigns_cli.cli.main import cli
try:
    cli.main(args=sys.argv[1:], prog_name="deepsigns", standalone_mode=False)
finally:
    sys.stderr.write("PEAK_RSS_KB %d\n" % resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def memory(out: Path, epochs: int = 1) -> dict:
    result = {}
    for count in (2000, 20000):
        images = _folder(out, count)
        base, keys = _owner(out, "cnn", str(images), f"memory-{count}", epochs=1)
        args = ["embed", "--model", base, "--data", images, "--keys", keys, "--epochs", epochs,
                "--out", out / f"memory-{count}.safetensors", "--device", "cpu", "--force", "--json"]
        proc = subprocess.run([sys.executable, "-c", PEAK, *map(str, args)], capture_output=True, text=True, env=ENV,
                              check=False)
        peak = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
        if proc.returncode != 0 or not peak:
            raise SystemExit(f"embed on {count} images failed:\n{proc.stderr}")
        result[count] = peak[0] / 1024.0
        print(f"memory: embed on {count} images: peak RSS {result[count]:.0f} MiB", flush=True)
    result["ratio"] = result[20000] / result[2000]
    print(f"memory: 20,000 / 2,000 images = {result['ratio']:.2f}x", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("figures", nargs="*", default=["overhead", "scaling", "memory", "optimizer"])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--batch-size", type=int, default=128, help="of the scaling figure")
    parser.add_argument("--out", type=Path, default=ROOT / "figures" / "bench")
    parser.add_argument("--device", default="cuda", help="of the gpu figure")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    started, body = time.perf_counter(), {}
    figures = {"overhead": lambda: overhead(args.out, args.repeats),
               "floor": lambda: overhead(args.out, args.repeats, ("mlp", "cnn"), floor=True),
               "every": lambda: every(args.out, args.repeats),
               "term": lambda: term(args.out),
               "gpu": lambda: gpu(args.out, args.repeats, args.device),
               "threads": lambda: threads(args.out, args.repeats),
               "scaling": lambda: scaling(args.out, batch_size=args.batch_size),
               "memory": lambda: memory(args.out),
               "optimizer": lambda: optimizer(args.out, args.repeats)}
    for name in args.figures:
        if name.startswith("sides:"):  # (one process of `threads`)
            body[name] = _sides(args.out, args.repeats, *name.split(":")[1:])
            continue
        body[name] = figures[name]()
    (args.out / "bench.json").write_text(json.dumps(body, indent=1))
    print(f"[{time.perf_counter() - started:.0f} s] {json.dumps(body)}")


if __name__ == "__main__":
    main()
