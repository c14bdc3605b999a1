"""The library's front door: every command is one function here, doing the whole job.

Each takes paths and options, checks every output before any work, writes every output
(committed as a group by fileio.Outputs), and returns a typed report (results.py). The CLI
only parses, resolves the passphrase, calls one of these, and renders. Data flows one way:
CLI -> api -> schemes/training/checkpoint -> torch/onnxruntime. Nothing here prints;
progress goes through a callback.

The model-level functions below the commands (`train_model`, `make_keys`, `embed_keys`,
`read_keys`) are what the commands are made of, for scripts that keep models in memory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .defaults import DEFAULT_ALPHA, DEFAULT_TIMEOUT, LIMITS, PRECISIONS
from .errors import DeepSignsError, InputError, SchemeError, one_line, shown, valid_text
from .registry import (
    ATTACKS,
    DEFAULT_SCHEMES,
    SCHEMES,
    attack_entry,
    embed_order,
    keygen_options,
    load_attack,
    load_scheme,
    scheme_entry,
)

if TYPE_CHECKING:
    from .bundle import Bundle
    from .checkpoint import ModelInfo
    from .data import Dataset, DataSpec
    from .results import (
        AttackReport,
        Decision,
        DisputeReport,
        EmbedReport,
        ExportReport,
        InspectReport,
        KeygenReport,
        ScanReport,
        SweepReport,
        SweepRow,
        TrainReport,
    )
    from .suspect import Suspect
    from .training import Progress

# torch comes in through checkpoint/training/zoo, imported inside the functions that need it:
# `verify` runs on onnxruntime alone and starts in a fraction of the time

__all__ = [
    "train",
    "keygen",
    "embed",
    "export",
    "extract",
    "verify",
    "scan",
    "suspect_files",
    "dispute",
    "attack",
    "inspect",
    "check_keys",
    "check_commitment",
    "check_bundle_name",
    "claim_record",
    "report_json",
    "SCHEMES",
    "ATTACKS",
    "DEFAULT_SCHEMES",
    "keygen_options",
    "train_model",
    "make_keys",
    "embed_keys",
    "read_keys",
    "LIMITS",
    "DEFAULT_ALPHA",
    "DEFAULT_TIMEOUT",
    "PRECISIONS",
    "Passphrase",
    "AsGiven",
    "data_spec",
    "load_dataset",
    "process_group",
    "parallel_slots",
    "is_main_process",
    "held_signals",
    "held_after_commit",
    "report_to",
    "refuse_the_report_file",
    "to_nowhere",
    "signal_again",
    "outputs_written",
    "world_size",
    "stop_with_parent",
    "run_by_agent",
    "sweep_run",
]

#: the passphrase, or a function that asks for it once the cheap checks have passed
Passphrase = str | Callable[[], str]


class AsGiven(str):
    """A passphrase given with a line ending that is no part of it (DEEPSIGNS_PASSPHRASE=$'pw\\n'
    is pw, as a file's line ending is), which also remembers it as given: bundles sealed before
    the ending was dropped were sealed with it, and are opened with it when the passphrase alone
    fails (sealed again, as embed does, they are sealed with the passphrase alone)."""

    given: str

    def __new__(cls, text: str, given: str) -> AsGiven:
        self = super().__new__(cls, text)
        self.given = given
        return self


def _check_int(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    lo, hi = LIMITS[name]
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InputError(f"{flag} must be a whole number from {lo} to {hi}, got {value!r}")
    return value


def _check_positive(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    lo, hi = LIMITS[name]  # (lo excluded when it is 0)
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not (0 < value if lo == 0 else lo <= value) or value > hi:
        bounds = f"above 0 and at most {hi:g}" if lo == 0 else f"from {lo:g} to {hi:g}"
        raise InputError(f"{flag} must be a number {bounds}, got {value!r}")
    return float(value)


def _check_provider(provider: str) -> str:
    """onnxruntime's `provider`, checked before anything is read: CUDA where it is not usable is
    refused whatever the suspect (a checkpoint, read through torch, had taken it without a word)."""
    if provider != "auto":
        from .runtime import resolve_provider

        resolve_provider(provider)
    return provider


# the smallest --alpha taken: no reading reaches a p-value near it (192 bits read without an
# error: 1.6e-58), and alpha shared out among a reading's tries stays a normal number above 0
MIN_ALPHA = 1e-300


def _check_alpha(alpha: float) -> float:
    from . import stats

    try:
        if stats.check_alpha(alpha) >= MIN_ALPHA:
            return float(alpha)
    except ValueError:
        pass
    raise InputError(f"--alpha must be a probability from {MIN_ALPHA:g} to below 1 (e.g. 1e-3), got {alpha!r}")


def _passphrase(passphrase: Passphrase) -> str:
    return passphrase() if callable(passphrase) else passphrase


def _load_model(path, arch: str | None, arch_kwargs: dict | None, *, data: Dataset | None = None,
                bundle: Bundle | None = None):
    """A checkpoint named by the user to work on (keygen, embed, export, attack: never a
    suspect, whose weights are what they are); a .pt's shapes come from the data or the keys.
    Weights that are not all finite numbers are refused here, once: the commands had each
    failed their own way (exit 3, "lower --lr", or a NaN model written with exit 0)."""
    import torch

    from .checkpoint import load_checkpoint
    from .errors import CheckpointError

    shape = classes = None
    if data is not None:
        shape, classes = data.input_shape, data.num_classes
    elif bundle is not None:
        shape, classes = bundle.shapes
    net, info = load_checkpoint(path, arch=arch, arch_kwargs=arch_kwargs, input_shape=shape, num_classes=classes)
    bad = next((name for name, t in net.state_dict().items()
                if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise CheckpointError(f"{shown(path)} holds weights that are not finite numbers (NaN or infinite, in "
                              f"'{one_line(bad, 60)}'): it is damaged; use a trained model")
    return net, info


def data_spec(source: str, *, image_size: int | None = None) -> DataSpec:
    """What --data names with the options that go with it (--image-size), as every command's
    `data` takes it (a plain string is the same without options)."""
    from .data import DataSpec

    return DataSpec(source, image_size=image_size)


def _reading(progress: Progress | None):
    """A context in which the passes over the data report to `progress` (data.reading); in the
    first process of a run only, as the training's epochs do."""
    from .data import reading

    return reading(progress if is_main_process() else None)


def load_dataset(data: str | DataSpec, model=None) -> Dataset:
    """The data set named by --data. An image folder reuses the preprocessing (image size,
    channels, mean, std, classes) that `train` recorded in the model's checkpoint, read before
    the data; a model without that record (a .pt, an ONNX file) loads the folder afresh."""
    from .data import load_data

    preprocess = None
    if model is not None and Path(str(data)).is_dir():
        from .checkpoint import recorded_preprocess

        preprocess = recorded_preprocess(model)
    return load_data(data, preprocess=preprocess)


# ============================================================================ commands


def train(arch: str, out: str | Path, *, data: str = "digits", arch_kwargs: dict | None = None,
          epochs: int = 30, lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
          device: str = "auto", force: bool = False, progress: Progress | None = None,
          workers: int = 0, precision: str = "fp32") -> TrainReport:
    """`deepsigns train`: a plain, unmarked baseline checkpoint. `workers`: data-loading processes;
    `precision`: fp32, or bf16/fp16 autocast."""
    from .checkpoint import save_checkpoint
    from .data import load_data
    from .fileio import Outputs

    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("seed", seed)):
        _check_int(name, value)
    _check_positive("lr", lr)
    with Outputs(force=force, inputs={"--data": data}) as outs, _reading(progress):
        tmp = outs.add(out, "--out", model="checkpoint")
        dataset = load_data(data)
        dataset.check_trainable()  # (the data make the model's classes)
        model, info, report = train_model(arch, dataset, arch_kwargs=arch_kwargs, epochs=epochs, lr=lr,
                                          batch_size=batch_size, seed=seed, device=device,
                                          progress=progress, workers=workers,
                                          precision=precision)
        save_checkpoint(model, info, tmp)
    return replace(report, out=str(out))


def keygen(model: str | Path, out: str | Path, passphrase: Passphrase, *, data: str = "digits",
           schemes: list[str] | tuple[str, ...] = DEFAULT_SCHEMES, options: dict | None = None,
           arch: str | None = None, arch_kwargs: dict | None = None, seed: int | None = None,
           force: bool = False, also_inputs: dict | None = None,
           progress: Progress | None = None) -> KeygenReport:
    """`deepsigns keygen`: a sealed bundle of fresh secrets for the given schemes.

    `options` maps option keys of the schemes' registry rows ("bits", "key_size", ...) to
    values; `also_inputs` names other files the caller read (never overwritten)."""
    from .bundle import BUNDLE_MODE, write_bundle
    from .fileio import Outputs

    names = _scheme_list(schemes)
    per_scheme = _split_options(names, options or {})
    _check_int("seed", seed)
    inputs = {"--model": model, "--data": data, **(also_inputs or {})}
    with Outputs(force=force, inputs=inputs) as outs, _reading(progress):
        tmp = outs.add(out, "--out", mode=BUNDLE_MODE)
        check_bundle_name(out, "--out")
        secret = _passphrase(passphrase)
        dataset = load_dataset(data, model)
        net, info = _load_model(model, arch, arch_kwargs, data=dataset)
        bundle = make_keys(net, info, dataset, names, per_scheme, seed=seed)
        commitment = write_bundle(bundle, tmp, secret)
        claim = claim_record(commitment, names, bundle.info["base_fingerprint"], {"model": (model, model)})
    from .results import KeygenReport

    return KeygenReport(str(out), names, bundle.key_id, commitment, claim, _keygen_warnings(bundle))


def embed(model: str | Path, keys: str | Path, passphrase: Passphrase, out: str | Path, *,
          data: str = "digits", onnx: str | Path | None = None, epochs: int | None = None,
          lr: float | None = None, batch_size: int = 64, seed: int = 0, device: str = "auto",
          arch: str | None = None, arch_kwargs: dict | None = None, force: bool = False,
          progress: Progress | None = None, also_inputs: dict | None = None, workers: int = 0,
          precision: str = "fp32") -> EmbedReport:
    """`deepsigns embed`: fine-tune with every watermark of the bundle; write the marked
    checkpoint (and ONNX), and update the bundle in place (final keys, fingerprint).

    The three files are committed together, the bundle first: a marked model never exists
    without the keys that prove it."""
    from .bundle import BUNDLE_MODE, open_bundle, write_bundle
    from .checkpoint import export_onnx, save_checkpoint
    from .fileio import Outputs
    from .results import EmbedReport

    _check_int("epochs", epochs)
    _check_int("batch_size", batch_size)
    _check_int("seed", seed)
    _check_positive("lr", lr)
    inputs = {"--model": model, "--keys": keys, "--data": data, **(also_inputs or {})}
    with Outputs(force=force, inputs=inputs) as outs, _reading(progress):
        check_keys(keys)  # a missing or foreign bundle fails before the passphrase is asked
        keys_tmp = outs.add(keys, "--keys", mode=BUNDLE_MODE, update=True)  # locked from here
        out_tmp = outs.add(out, "--out", model="checkpoint")
        onnx_tmp = outs.add(onnx, "--onnx", model="onnx") if onnx is not None else None  # ("" names no file)
        secret = _passphrase(passphrase)
        bundle = open_bundle(keys, secret)
        dataset = load_dataset(data, model)
        net, info = _load_model(model, arch, arch_kwargs, data=dataset)
        if onnx_tmp is not None:  # a model that cannot be exported fails before its training, not after
            dataset.check_fits(info.input_shape, info.num_classes)
            export_onnx(net, info, onnx_tmp, check_inputs=dataset.x_test[:64])
        net, info, bundle, report = embed_keys(net, info, dataset, bundle, epochs=epochs, lr=lr,
                                               batch_size=batch_size, seed=seed, device=device, progress=progress,
                                               workers=workers, precision=precision)
        save_checkpoint(net, info, out_tmp)
        diff, exported = None, {}
        if onnx_tmp is not None:
            exported = export_onnx(net, info, onnx_tmp, check_inputs=dataset.x_test[:64])
            diff = exported["max_abs_diff"]
        commitment = write_bundle(bundle, keys_tmp, secret)
        # from the temporary files, before the commit: nothing can fail after it
        files = {"model": (out, out_tmp), **({"onnx": (onnx, onnx_tmp)} if onnx_tmp is not None else {})}
        claim = claim_record(commitment, list(embed_order(bundle.schemes)), report["fingerprint"], files)
    warnings = [_not_claimable(name, s, bundle, dataset) for name, s in report["schemes"].items()
                if not s.get("detected", True)] + exported.get("warnings", [])
    return EmbedReport(report["accuracy_before"], report["accuracy_after"], report["schemes"],
                       report["fingerprint"], str(out), str(keys), commitment,
                       str(onnx) if onnx_tmp is not None else None, diff, claim, warnings)


def _not_claimable(name: str, read: dict, bundle: Bundle, data: Dataset) -> str:
    """The warning for a mark that the marked model itself does not carry to detection at the
    default alpha: one that did not take, or one that reads back in full with keys too few to
    claim anything at that alpha (keygen warned of those)."""
    said = f"({read['read_back']}, p = {read['read_back_p']:.2g})"
    if not read.get("took", True):
        return f"the {name} mark does not read back from the marked model {said}: {_again(bundle, data)}"
    return (f"the {name} mark reads back in full from the marked model {said}, but that p is above "
            f"{_default_share(len(bundle.schemes))}: "
            f"no model can be claimed with these keys at that alpha; make keys with more evidence "
            f"({load_scheme(name).more_evidence})")


def _again(bundle: Bundle, data: Dataset) -> str:
    """What to do about a mark that did not take: embed the same bundle again where every scheme
    of it takes its keys again (the output scheme does not: embed drew its keys from the
    candidates, so neither does a bundle that holds them)."""
    try:
        for name, keys in bundle.schemes.items():
            load_scheme(name).can_embed(keys, data)
    except DeepSignsError:
        return "make new keys (keygen) and embed them with more --epochs"
    return "embed again with more --epochs, or make new keys"


def export(checkpoint: str | Path, out: str | Path, *, data: str | None = None, arch: str | None = None,
           arch_kwargs: dict | None = None, force: bool = False) -> ExportReport:
    """`deepsigns export`: ONNX (opset 17, dynamic batch), checked for parity with torch."""
    from .checkpoint import ONNX_OPSET, export_onnx
    from .fileio import Outputs
    from .results import ExportReport

    with Outputs(force=force, inputs={"CHECKPOINT": checkpoint, "--data": data}) as outs:
        tmp = outs.add(out, "--out", model="onnx")  # (an ONNX file named .safetensors reads as a broken checkpoint)
        dataset = load_dataset(data, checkpoint) if data else None
        net, info = _load_model(checkpoint, arch, arch_kwargs, data=dataset)
        if dataset is not None:
            dataset.check_fits(info.input_shape, info.num_classes)
        result = export_onnx(net, info, tmp,
                             check_inputs=dataset.x_test[:64] if dataset is not None else None)
    return ExportReport(str(out), ONNX_OPSET, result["max_abs_diff"], ["batch", *info.input_shape],
                        warnings=result["warnings"])


def check_keys(keys: str | Path) -> dict:
    """The public header of a bundle: fails on a missing or foreign file, asks nothing."""
    from .bundle import read_header

    return read_header(keys)


def signal_again(signum: int, seconds: float) -> None:
    """Send `signum` to this process again, from a thread, `seconds` from now (fileio.signal_again)."""
    from .fileio import signal_again as again

    again(signum, seconds)


def refuse_the_report_file(path: str, what: str) -> None:
    """InputError when `path` is the file the report goes to (fileio.refuse_the_report_file)."""
    from .fileio import refuse_the_report_file as refuse

    refuse(path, what)


def to_nowhere(fd: int) -> None:
    """Descriptor `fd` writes to /dev/null from now on (fileio.to_nowhere)."""
    from .fileio import to_nowhere as nowhere

    nowhere(fd)


def report_to(fd: int | None) -> None:
    """The command's report goes to descriptor `fd` (None: it has ended): fileio.report_to."""
    from .fileio import report_to as to

    to(fd)


def check_bundle_name(path: str | Path, option: str) -> None:
    """A key bundle may not be named like a model: every command would read it as a broken one."""
    if Path(path).suffix.lower() in _SUFFIXES["extract"]:
        raise InputError(f"{option} {shown(path)} names a model: a key bundle's name ends in .dskey")


def check_commitment(keys: str | Path, published: str | None = None) -> str:
    """The bundle's commitment (SHA-256 of the sealed file); with `published`, the bundle must
    be the one whose commitment was published, or InputError. Asks for no passphrase."""
    import re

    from .bundle import commitment

    check_keys(keys)
    actual = commitment(keys)
    if published is not None:
        want = published.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", want):
            raise InputError("--commitment must be the 64 hex digits of a SHA-256 (as keygen and "
                             "embed print them)")
        if want != actual:
            raise InputError(f"the bundle's commitment is {actual[:16]}..., not the published "
                             f"{want[:16]}...: use the bundle whose commitment was published")
    return actual


def extract(model: str | Path, keys: str | Path, passphrase: Passphrase, *,
            alpha: float = DEFAULT_ALPHA, arch: str | None = None, arch_kwargs: dict | None = None,
            provider: str = "auto", timeout: float | None = DEFAULT_TIMEOUT,
            commitment: str | None = None, output: str | None = None, queries: int | None = None) -> Decision:
    """`deepsigns extract`: white-box, every scheme of the bundle read from a checkpoint or
    an ONNX file. `commitment`: the published one; any other bundle is refused. `output`:
    the ONNX output to read (None: scores or probabilities if it has them, else labels).
    `queries`: the most queries a GradSigns reading from ONNX scores may make (None: 1000)."""
    _check_queries_ask([model], queries)
    reader = _Reader("extract", keys, passphrase, alpha=alpha, commitment=commitment, arch=arch,
                     arch_kwargs=arch_kwargs, provider=provider, timeout=timeout, output=output,
                     queries=queries)
    return reader.read(model)


def _check_queries_ask(models, queries: int | None) -> None:
    """--queries where no suspect is asked: checkpoints alone (their gradients are read exactly;
    among ONNX suspects, a checkpoint is read so, and --queries is for the others)."""
    if queries is not None and not any(Path(m).suffix.lower() == ".onnx" for m in models):
        raise InputError("--queries sets what a reading from an ONNX model's scores may ask: leave it out for "
                         "checkpoints (their gradients are read exactly)")


def verify(model: str | Path, keys: str | Path, passphrase: Passphrase, *,
           alpha: float = DEFAULT_ALPHA, provider: str = "auto",
           timeout: float | None = DEFAULT_TIMEOUT, commitment: str | None = None,
           output: str | None = None, queries: int | None = None) -> Decision:
    """`deepsigns verify`: black-box, only the suspect ONNX model's outputs to the keys.
    `commitment`: the published one; any other bundle is refused. `output`: the graph output
    to read (None: every output that can be read, the best kept and all counted in p; the
    result says which was read). `queries`: the most queries the GradSigns reading may make (None: 1000)."""
    _check_onnx_path(model)
    reader = _Reader("verify", keys, passphrase, alpha=alpha, commitment=commitment,
                     provider=provider, timeout=timeout, output=output, queries=queries)
    return reader.read(model)


def scan(command: str, models: list[str | Path], keys: str | Path, passphrase: Passphrase, *,
         alpha: float = DEFAULT_ALPHA, arch: str | None = None, arch_kwargs: dict | None = None,
         provider: str = "auto", timeout: float | None = DEFAULT_TIMEOUT,
         commitment: str | None = None, output: str | None = None, queries: int | None = None,
         progress: Progress | None = None) -> ScanReport:
    """`extract` or `verify` over many suspects (files, or folders of them) with the bundle
    opened once: one row per suspect. A suspect that cannot be read is a row with its error
    (the others are still read); a missing path or a bad bundle fails the whole scan."""
    import time

    from .results import ScanReport, ScanRow

    if command not in ("extract", "verify"):
        raise InputError(f"scan runs extract or verify, not {command!r}")
    files = _suspects(models, command)
    _check_queries_ask(files, queries)
    started = time.perf_counter()
    reader = _Reader(command, keys, passphrase, alpha=alpha, commitment=commitment, arch=arch,
                     arch_kwargs=arch_kwargs, provider=provider, timeout=timeout, output=output,
                     queries=queries)
    _ = reader.bundle  # a bundle that cannot be opened fails the scan, not one row
    rows = []
    for i, (path, problem) in enumerate(files.items()):
        try:
            if problem is not None:  # (a FIFO would block the read, a device never end it)
                raise InputError(problem)
            rows.append(ScanRow(str(path), reader.read(path)))
        except DeepSignsError as exc:
            rows.append(ScanRow(str(path), error=str(exc)))
        if progress is not None:
            progress(i + 1, len(files), f"{command} suspects")
    return ScanReport(command, reader.bundle.key_id, reader.published, reader.alpha, rows,
                      seconds=time.perf_counter() - started)


def dispute(parties: list[tuple[str | Path, Passphrase, str | Path]], *, alpha: float = DEFAULT_ALPHA,
            arch: str | None = None, arch_kwargs: dict | None = None, provider: str = "auto",
            timeout: float | None = DEFAULT_TIMEOUT, names: list[str] | None = None,
            controls: list[str | Path] = (), commitments: list[str | None] | None = None,
            output: str | None = None, queries: int | None = None) -> DisputeReport:
    """`deepsigns dispute`: two parties' (bundle, passphrase, model); every party's keys read
    (white-box, as `extract`) from every party's model. The reading: a party whose mark is in
    the other's model while the other's mark is not in theirs marked first (the other model
    was made from theirs). Each party's own keys must detect their own model to be heard, and
    must detect none of the `controls`: models that neither party made. (A bundle is sealed by
    whoever holds its passphrase, and nothing in it proves that keygen drew its keys: keys
    sealed by hand, real samples under their true labels, claim every good classifier, the
    controls too; keygen's claim none they were not embedded in.) `commitments`: the one each
    party published, in order (a bundle other than the published one is refused); `output`,
    `queries`: as extract's."""
    from .fileio import sha256_file
    from .results import DisputeParty, DisputeReport

    if len(parties) != 2:
        given = {0: "not at all", 1: "once"}.get(len(parties), f"{len(parties)} times")
        raise InputError(f"a dispute is between two parties: give --party twice, not {given}")
    names = [str(n) for n in (names or ["A", "B"])]
    if len(names) != 2 or len(set(names)) != 2 or not all(names):
        raise InputError("the two parties need two different, non-empty names (--name)")
    for keys, _, model in parties:  # cheap checks for both parties before any passphrase
        check_keys(keys)
        if not Path(model).is_file():
            raise InputError(f"model not found: {shown(model)}: check --party")
    theirs = {sha256_file(model) for _, _, model in parties}
    controls = [str(c) for c in controls]
    for control in controls:
        if not Path(control).is_file():
            raise InputError(f"model not found: {shown(control)}: check --control")
        if sha256_file(control) in theirs:  # (the same bytes: a copy, a link)
            raise InputError(f"{shown(control)} is a party's model: a control is a model neither party made")
    if sha256_file(parties[0][0]) == sha256_file(parties[1][0]):  # (each would read its own mark twice)
        raise InputError("the two parties give the same key bundle: a dispute is between two owners' bundles")
    commitments = list(commitments or (None, None))
    if len(commitments) != 2:
        raise InputError(f"give one --commitment per --party (2), or none, not {len(commitments)}")
    for name, (keys, _, _), published in zip(names, parties, commitments, strict=True):
        try:  # (before any passphrase, naming the party)
            check_commitment(keys, published)
        except InputError as exc:
            raise InputError(f"{name}'s bundle: {exc}") from None
    readers = [_Reader("extract", keys, passphrase, alpha=alpha, arch=arch, arch_kwargs=arch_kwargs,
                       provider=provider, timeout=timeout, commitment=published, output=output, queries=queries)
               for (keys, passphrase, _), published in zip(parties, commitments, strict=True)]
    made = {readers[0].weights(model) for _, _, model in parties} - {None} if controls else set()
    for control in controls:  # (a copy of other bytes: saved again, with other metadata, as a .pt)
        if readers[0].weights(control) in made:
            raise InputError(f"{shown(control)} holds the weights of a party's model: a control is a model neither "
                             "party made")
    # (a model a bundle cannot read whole is that cell's no verdict, which the reading weighs: one
    # party's noisy deployment had ended the whole dispute)
    matrix = [[reader.read(model, unread_ok=True) for _, _, model in parties] for reader in readers]
    checked = [[reader.read(control, unread_ok=True) for control in controls] for reader in readers]
    who = [DisputeParty(name, str(keys), str(model), reader.published, reader.bundle.key_id)
           for name, (keys, _, model), reader in zip(names, parties, readers, strict=True)]
    first, reading = _dispute_reading(names, matrix, checked, controls)
    return DisputeReport(who, matrix, readers[0].alpha, first, reading, controls, checked)


def _dispute_reading(names: list[str], matrix, checked=((), ()), controls=()) -> tuple[str | None, str]:
    """(the party that marked first, or None; the reading in words)."""
    a, b = names
    claims = [[c for c, d in zip(controls, row, strict=True) if d.detected] for row in checked]
    if any(claims):
        who = " and ".join(f"{n}'s keys also detect {shown(found[0])}" for n, found in zip(names, claims, strict=True)
                           if found)
        return None, (f"undecided: {who}, a model neither party made: such keys prove nothing (keys that keygen "
                      "drew detect no model they were not embedded in), so that claim is void")
    own = [matrix[0][0].detected, matrix[1][1].detected]
    if not all(own):
        void = [n for n, ok in zip(names, own, strict=True) if not ok]
        who = " and ".join(f"{n}'s keys do not detect {n}'s own model" for n in void)
        return None, f"undecided: {who}, so that claim is void; re-check the files given"
    a_in_b, b_in_a = matrix[0][1].detected, matrix[1][0].detected
    # a cross reading that missed a scheme (outputs it cannot read: a model that answers labels
    # only, or none) is no evidence that the mark is not in that model
    unseen = [f"{n}'s keys did not read all of {m}'s model ({', '.join(r.scheme for r in cell.results if r.unread)} "
              "not read)" for n, m, cell in ((a, b, matrix[0][1]), (b, a, matrix[1][0]))
              if not cell.detected and any(r.unread for r in cell.results)]
    if unseen and (a_in_b or b_in_a):
        return None, (f"undecided: {' and '.join(unseen)}, so the mark may be in it unseen; give the models "
                      "as checkpoints, which are read whole")
    if a_in_b and not b_in_a:
        return a, (f"{a} marked first: {a}'s mark is in {b}'s model, {b}'s mark is not in {a}'s: "
                   f"{b}'s model was made from {a}'s")
    if b_in_a and not a_in_b:
        return b, (f"{b} marked first: {b}'s mark is in {a}'s model, {a}'s mark is not in {b}'s: "
                   f"{a}'s model was made from {b}'s")
    if a_in_b:
        return None, ("undecided: each mark is in the other's model (the same model, or both "
                      "marked into one): the earlier published commitment decides")
    closest = min(matrix[0][1].p_value, matrix[1][0].p_value)
    return None, (f"undecided: neither mark is detected in the other's model (the smaller of the two p-values: "
                  f"{closest:.2g}), which shows neither who marked first nor that the models are unrelated")


#: what each command reads from a folder
_SUFFIXES = {"verify": (".onnx",), "extract": (".onnx", ".safetensors", ".pt", ".pth")}


def suspect_files(models: list[str | Path], command: str) -> list[Path]:
    """The suspect files named: each path a file, or a folder whose entries named like the
    command's kinds (directly inside it, sorted) are taken, those that can be read (a scan
    reports the others as rows). Missing paths and empty folders fail."""
    return [path for path, problem in _suspects(models, command).items() if problem is None]


def _suspects(models: list[str | Path], command: str) -> dict[Path, str | None]:
    """`suspect_files`, each with why it cannot be read (None: it can). An entry of a folder
    that is not a regular file inside it is not read, but it is a suspect: a scan that skipped
    it would say "not detected" of a folder it did not read whole."""
    if isinstance(models, (str, Path)):
        models = [models]
    files: dict[Path, str | None] = {}
    for given in models:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in _SUFFIXES[command])
            if not found:
                raise InputError(f"folder {shown(path)} holds no {' or '.join(_SUFFIXES[command])} "
                                 f"file to {command}")
            for entry in found:  # (stdout sent into one, by any name: a hard link, too)
                refuse_the_report_file(str(entry), f"a suspect of the folder {shown(path)}")
                files.setdefault(entry, _entry_problem(entry, path))
        elif path.is_file():
            if command == "verify":
                _check_onnx_path(path)
            files.setdefault(path, None)
        else:
            raise InputError(f"suspect not found: {shown(path)}: check --model")
    if not files:
        raise InputError("no suspect given: use --model FILE (repeat it, or give a folder)")
    return files


def _entry_problem(entry: Path, folder: Path) -> str | None:
    """Why a folder's entry named like a suspect is not read (None: it is a regular file in the
    folder). A symbolic link is followed only to a file inside the folder: one that leads
    elsewhere (the owner's own marked model, /dev/zero) is not the folder's to offer."""
    import stat

    try:
        mode = entry.stat().st_mode
    except OSError as exc:  # (a link that leads nowhere, or to itself)
        return f"{shown(entry)} cannot be read ({exc.strerror or type(exc).__name__}): remove it or repair it"
    if entry.is_symlink() and not Path(os.path.realpath(entry)).is_relative_to(os.path.realpath(folder)):
        return (f"{shown(entry)} is a symbolic link that leads outside folder {shown(folder)}: a folder's "
                "links are read only within it; give the file it leads to with --model")
    if stat.S_ISDIR(mode):
        return f"{shown(entry)} is a folder, not a model file: a folder's folders are not read; give it with --model"
    if not stat.S_ISREG(mode):
        return f"{shown(entry)} is not a regular file (a FIFO, a socket or a device): not a model to read"
    return None


def _check_onnx_path(model: str | Path) -> None:
    if not str(model).lower().endswith(".onnx"):
        raise InputError(f"{shown(model)}: verify reads ONNX models; export a checkpoint first "
                         "with 'deepsigns export', or use 'deepsigns extract'")


_AS_ASKED = object()  # (`_Reader.read`: the output the reader was made with)


class _Reader:
    """The bundle opened once (commitment checked first), then any number of suspects read:
    extract (every scheme, checkpoint or ONNX) or verify (the black-box schemes, ONNX)."""

    def __init__(self, command: str, keys: str | Path, passphrase: Passphrase, *,
                 alpha: float = DEFAULT_ALPHA, commitment: str | None = None, arch: str | None = None,
                 arch_kwargs: dict | None = None, provider: str = "auto",
                 timeout: float | None = DEFAULT_TIMEOUT, output: str | None = None,
                 queries: int | None = None):
        from .bundle import unlock

        self.command, self.alpha = command, _check_alpha(alpha)
        _check_positive("timeout", timeout)
        _check_provider(provider)
        self.queries = _check_int("queries", queries)
        self.published = check_commitment(keys, commitment)  # (before a prompt for the passphrase)
        self._unlocked = unlock(keys, _passphrase(passphrase))  # scrypt runs while a suspect loads
        if self._unlocked.commitment != self.published:  # (the bytes opened are the ones checked)
            raise InputError(f"{shown(keys)} changed while the command read it (it was replaced or "
                             "updated meanwhile): run the command again")
        self._bundle: Bundle | None = None
        self._arch = (arch, arch_kwargs)
        self.provider, self.timeout, self.output = provider, timeout, output

    @property
    def bundle(self) -> Bundle:
        """The opened bundle (waiting for the key derivation the first time), and what it decides:
        the schemes read, the architecture's arguments."""
        if self._bundle is None:
            bundle = self._unlocked()
            names = embed_order(bundle.schemes)
            if self.command == "verify":
                names = [n for n in names if scheme_entry(n).blackbox]
                if not names:
                    raise SchemeError(
                        "this bundle holds white-box keys only (scheme: "
                        f"{', '.join(bundle.schemes)}): use 'deepsigns extract' to read them"
                    )
            asking = [n for n, entry in SCHEMES.items() if entry.result == "gradient"]  # (read by queries)
            if self.queries is not None and not set(asking) & set(names):
                raise SchemeError(f"--queries sets what a reading of {' or '.join(asking)} keys may ask, and this "
                                  f"bundle holds none (scheme: {', '.join(names)}): leave --queries out")
            arch, arch_kwargs = self._arch
            if arch_kwargs is None and arch == bundle.info.get("arch"):
                arch_kwargs = bundle.info.get("arch_kwargs")
            self.names, self.arch, self.arch_kwargs = names, arch, arch_kwargs
            self._bundle = bundle
        return self._bundle

    def weights(self, model: str | Path) -> str | None:
        """The fingerprint of a checkpoint's weights, loaded as `read` loads them; None for an
        ONNX file."""
        from .checkpoint import fingerprint
        from .suspect import open_suspect

        if Path(model).suffix.lower() == ".onnx":
            return None
        suspect = open_suspect(model, shapes=self.bundle.shapes, arch=self.arch, arch_kwargs=self.arch_kwargs)
        try:
            return fingerprint(suspect.model)
        finally:
            suspect.close()

    def read(self, model: str | Path, name: str | None = None, unread_ok: bool = False,
             output: str | None | object = _AS_ASKED) -> Decision:
        """`name`: what messages call the model (None: its path). `unread_ok`: a model no scheme
        could read whole is a decision of no verdict (each result `unread`), not an error
        (`read_keys`). `output`: the ONNX output read in this model, where it is not the one
        the reader was asked for (`_sweep_row`)."""
        from .runtime import OnnxModel
        from .suspect import OnnxSuspect, open_suspect

        output = self.output if output is _AS_ASKED else output
        if self.command == "verify":  # (the callers checked the path is .onnx before the passphrase)
            try:  # loaded while the bundle opens; the bundle's error, if any, comes first
                suspect = OnnxSuspect(OnnxModel(model, provider=self.provider, timeout=self.timeout, name=name),
                                      blackbox_only=True, output=output, name=name)
            except BaseException:
                _ = self.bundle
                raise
        else:
            suspect = open_suspect(model, shapes=self.bundle.shapes, arch=self.arch,
                                   arch_kwargs=self.arch_kwargs, provider=self.provider,
                                   timeout=self.timeout, output=output, name=name)
        suspect.query_budget = self.queries
        try:
            return read_keys(suspect, self.bundle, self.names, alpha=self.alpha, command=self.command,
                             commitment=self.published, unread_ok=unread_ok)
        finally:
            suspect.close()


def attack(name: str, model: str | Path, out: str | Path, *, data: str = "digits",
           options: dict | None = None, seed: int = 0, device: str = "auto", arch: str | None = None,
           arch_kwargs: dict | None = None, force: bool = False, passphrase: Passphrase | None = None,
           timeout: float | None = DEFAULT_TIMEOUT, progress: Progress | None = None,
           provider: str = "auto", recorded: dict | None = None, shown_as: str | None = None,
           also_inputs: dict | None = None, batch_size: int = 64, workers: int = 0,
           precision: str = "fp32", output: str | None = None) -> AttackReport:
    """`deepsigns attack NAME`: the attacked model, written to `out` (never the input): a
    checkpoint (.safetensors) or an ONNX file (.onnx), as the attack's registry row allows.
    `passphrase`: for the attacks that seal a bundle of their own (overwrite). `timeout`: the
    seconds an ONNX model (the victim, the attacked model) may take to answer the test set, on
    onnxruntime's `provider`. `recorded`: parameters the checkpoint's record of the attack names
    otherwise (a sweep makes the attacker's bundle in a scratch folder, and keeps it elsewhere);
    `shown_as`, what messages call the attacked model (a sweep's is in its scratch folder).
    `batch_size`, `workers`, `precision`: how the attacks that train do (as train's). `output`:
    the ONNX victim's output the attack wraps and whose accuracy it reports (None: the first of
    class scores, else of labels)."""
    import time

    import numpy as np

    from .attacks import AttackContext
    from .fileio import Outputs, check_output
    from .results import AttackReport
    from .training import check_device, seed_everything

    entry = attack_entry(name)
    given = {k: v for k, v in (options or {}).items() if v is not None and v is not False}
    known = {o.key: o for o in entry.options}
    for key, value in given.items():
        if key not in known:
            raise InputError(f"--{key.replace('_', '-')} is not an option of attack {name}")
        given[key] = known[key].check(value)  # (as the check gives it: -0.0 as 0.0)
    _check_int("seed", seed)
    _check_int("batch_size", batch_size)
    _check_positive("timeout", timeout)
    _check_provider(provider)
    out_kind = _attack_out_kind(name, out, entry.writes)
    victim_onnx = str(model).lower().endswith(".onnx")
    if victim_onnx and entry.takes == "torch":
        raise InputError(f"attack {name} works on the model in torch: give the checkpoint (.safetensors, or "
                         ".pt with --arch), not an ONNX file")
    if entry.passphrase and passphrase is None:
        raise InputError(f"attack {name} seals a bundle of its own: it needs a passphrase")
    if output is not None and not victim_onnx:
        raise InputError(f"--output names an output of an ONNX victim; {shown(model)} is a checkpoint, which "
                         "answers with its class scores")
    with Outputs(force=force, inputs={"--model": model, "--data": data, **(also_inputs or {})}) as outs, \
            _reading(progress):
        tmp = outs.add(out, "--out")
        if given.get("attacker_keys") is not None:  # (the bundle the attack seals: checked before any work too)
            check_output(given["attacker_keys"], force, inputs={"--model": model, "--data": data, "--out": out,
                                                                **(also_inputs or {})}, option="--attacker-keys")
        dataset = load_dataset(data, model)
        net, info = _load_victim(model, arch, arch_kwargs, dataset)
        check_device(device)  # --device cuda without a GPU fails before any work
        before = _accuracy(model if victim_onnx else net, dataset, timeout, provider, output=output)
        if entry.takes == "onnx" and not victim_onnx:
            net = _as_onnx(net, info, dataset, outs)
        ctx = AttackContext(info=info, data=dataset, options=given, rng=np.random.default_rng(seed),
                            seed=seed, device=device, progress=progress, out_kind=out_kind,
                            add_output=outs.add,
                            passphrase=None if passphrase is None else lambda: _passphrase(passphrase),
                            batch_size=batch_size, workers=workers, precision=precision, output=output)
        seed_everything(seed)
        started = time.perf_counter()
        attacked, params = load_attack(name).run(net, ctx)
        seconds = time.perf_counter() - started
        if entry.trains:  # (how it trained changes what it made: recorded as its options are)
            params = {**params, "batch_size": batch_size, "precision": precision}
        after = _write_attacked(attacked, info, tmp, out_kind, dataset, timeout, provider,
                                record={"name": name, "params": {**params, **(recorded or {})}, "seed": seed},
                                name=shown_as or f"the attacked model ({shown(out)})", output=output)
    return AttackReport(name, before, after, params, seconds, str(out), str(model), str(data), seed)


_NAME_MAX = 255  # bytes in a file's name (Linux and macOS file systems): a sweep's kept models are named by value


def sweep(name: str, model: str | Path, param: str, values: list, keys: str | Path, passphrase: Passphrase, *,
          data: str = "digits", options: dict | None = None, seed: int = 0, device: str = "auto",
          arch: str | None = None, arch_kwargs: dict | None = None, alpha: float = DEFAULT_ALPHA,
          keep: str | Path | None = None, plot: str | Path | None = None, force: bool = False,
          attacker_passphrase: Passphrase | None = None, timeout: float | None = DEFAULT_TIMEOUT,
          progress: Progress | None = None, provider: str = "auto", also_inputs: dict | None = None,
          commitment: str | None = None, output: str | None = None, queries: int | None = None,
          batch_size: int = 64, workers: int = 0, precision: str = "fp32") -> SweepReport:
    """`deepsigns attack NAME --sweep PARAM=v1,v2,...`: the attack at each strength, then the
    owner's keys read in the result (extract: every scheme; verify: the black-box schemes from
    the ONNX answers, a checkpoint exported first). `keep`: a folder for the attacked models
    (else they are removed); `plot`: a PNG of accuracy and evidence against strength.
    `commitment`, `output`, `queries`: as extract's and verify's; `batch_size`, `workers`,
    `precision`: as attack's."""
    import shutil

    from .bundle import BUNDLE_MODE
    from .fileio import Outputs, check_output, not_final, scratch_folder
    from .results import SweepReport

    entry = attack_entry(name)
    option = next((o for o in entry.options if o.key == param.replace("-", "_")), None)
    if option is None or option.kind == "flag":
        known = ", ".join(o.flag.lstrip("-") for o in entry.options if o.kind != "flag") or "none"
        raise InputError(f"--sweep {param}=...: attack {name} has no such option to sweep (it has: {known})")
    if not values:
        raise InputError(f"--sweep {param}=...: give at least one value")
    values = [option.check(v) for v in values]
    twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if twice is not None:  # (each strength's model has one name: the second would be refused mid-sweep)
        raise InputError(f"--sweep {param}=...: {twice} is given twice; give each value once")
    if option.key == "attacker_keys" or (options or {}).get("attacker_keys"):  # (a file, sealed per strength)
        raise InputError("--attacker-keys names the attacker's bundle, which a sweep seals once per strength and "
                         "keeps beside each model in --out: leave it out of --sweep")
    # (a text value, distill's student, is part of each kept model's name, and of its scratch copy's)
    longest = len(f"{name}-{param}-.attacker.dskey".encode())
    pathy = next((v for v in values if "/" in str(v) or str(v) in (".", "..")
                  or longest + len(str(v).encode(errors="surrogateescape")) > _NAME_MAX), None)
    if pathy is not None:
        raise InputError(f"--sweep {param}=...: {shown(repr(pathy))} cannot be part of a file name (each strength's "
                         f"model is {name}-{param}-VALUE): give values without '/', of at most "
                         f"{_NAME_MAX - longest} bytes")
    given = {k: v for k, v in (options or {}).items() if v is not None and v is not False}
    if option.key in given:
        raise InputError(f"--{param} is swept: leave it out of the attack's own options")
    inputs = {"--model": model, "--data": data, "--keys": keys, **(also_inputs or {})}  # (never overwritten)
    # (a plot in the --out folder the sweep is to make is checked once that folder is made)
    plot_in_new_keep = plot is not None and keep is not None and not Path(keep).is_dir() \
        and Path(os.path.abspath(plot)).is_relative_to(os.path.abspath(keep))
    if plot is not None:
        if not str(plot).lower().endswith(".png"):
            raise InputError(f"--plot must name a .png file, got {shown(plot)}")
        if not plot_in_new_keep:
            check_output(plot, force, inputs=inputs, option="--plot")
    if keep is not None and Path(keep).suffix.lower() in _SUFFIXES["extract"]:  # (every model file we read)
        raise InputError(f"--out {shown(keep)} names a model, but a sweep keeps its models in a folder: give a folder "
                         "path (every command tells a model's kind by its name)")
    suffix = ".onnx" if entry.writes == ("onnx",) else ".safetensors"

    def kept(folder: Path, value) -> tuple[Path, Path | None]:
        """One strength's model, and the attacker's bundle beside it (attacks that seal one)."""
        stem = f"{name}-{param}-{value}"
        return folder / f"{stem}{suffix}", folder / f"{stem}.attacker.dskey" if entry.passphrase else None

    if keep is not None:  # every output checked before the first attack: a clash fails at once
        if plot is not None and os.path.abspath(plot) == os.path.abspath(keep):
            raise InputError(f"--plot {shown(plot)} is also --out, the folder the sweep keeps its models in: "
                             "give the plot another path")
        if Path(keep).is_dir():
            for value in values:
                for path, flag in zip(kept(Path(keep), value), ("--out", "--attacker-keys"), strict=True):
                    if path is not None:
                        check_output(path, force, inputs=inputs, option=flag)
    check_keys(keys)  # a missing or foreign bundle fails before the passphrase is asked
    check_commitment(keys, commitment)  # (and one other than the published one)
    secret = _passphrase(passphrase)  # asked once for both readers
    attacked_output = output if str(model).lower().endswith(".onnx") else None  # (what attack() takes)
    reading = dict(alpha=alpha, timeout=timeout, provider=provider, commitment=commitment, output=output,
                   queries=queries)
    extract_reader = _Reader("extract", keys, secret, arch=arch, arch_kwargs=arch_kwargs, **reading)
    bundle = extract_reader.bundle
    blackbox = any(scheme_entry(n).blackbox for n in bundle.schemes)
    verify_reader = _Reader("verify", keys, secret, **reading) if blackbox else None
    # the report's parameters: the attack's options but the ones each strength sets; the rest of
    # what the attack reports (sparsity, samples, ...) is its own result at that strength
    settings = {o.key for o in entry.options} - {option.key, "attacker_keys"}
    if entry.trains:  # (the same at every strength)
        settings |= {"batch_size", "precision"}
    params: dict = {}
    rows = []
    made: list[Path] = []  # the folders this sweep made for `keep`, the deepest first

    def make_keep() -> None:
        try:
            missing = [p for p in (Path(keep), *Path(keep).parents) if not p.exists()]
            Path(keep).mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as exc:  # (a file of that name, a folder that cannot be written)
            raise InputError(f"--out {shown(keep)} cannot be the folder --sweep keeps the attacked models "
                             f"in ({one_line(exc)}): give a folder path") from None
        made.extend(missing)

    def unmake_keep() -> None:
        for path in made:
            with contextlib.suppress(OSError):
                path.rmdir()
        made.clear()

    new_keep = keep is not None and not Path(keep).is_dir()
    try:
        if new_keep:  # (after the bundle opened: a failed start leaves none)
            # made to check that it can be, and the plot in it, then removed until the commit: a
            # sweep killed meanwhile (SIGKILL) had left the folder behind, empty
            make_keep()
            if plot_in_new_keep:
                check_output(plot, force, inputs=inputs, option="--plot")
            unmake_keep()
        # every strength's model is made in the scratch folder; the kept ones and the plot are
        # committed together at the end (committed one by one, a failure at a later strength had
        # removed the earlier ones, files that --force had replaced among them)
        with scratch_folder("deepsigns-sweep-") as scratch:
            read = functools.partial(_sweep_row, extract_reader=extract_reader, verify_reader=verify_reader,
                                     scratch=scratch, arch=arch, arch_kwargs=arch_kwargs)
            with not_final():
                rows.append(read(None, model, _victim_accuracy(model, data, arch, arch_kwargs, timeout, provider,
                                                                attacked_output), 0.0, named=str(model)))
                for i, value in enumerate(values):
                    if progress is not None:
                        progress(i, len(values), f"{name} {param}={value}")
                    out, attacker_keys = kept(Path(scratch), value)
                    run_options = {**given, option.key: value}
                    if attacker_keys is not None:  # the attacker's own bundle, one per strength, beside the model
                        run_options["attacker_keys"] = str(attacker_keys)
                    final = kept(Path(keep), value) if keep is not None else (None, None)
                    report = attack(name, model, out, data=data, options=run_options, seed=seed, device=device,
                                    arch=arch, arch_kwargs=arch_kwargs, force=True,
                                    passphrase=attacker_passphrase if entry.passphrase else None, timeout=timeout,
                                    provider=provider, progress=progress,
                                    recorded={"attacker_keys": str(final[1])} if final[1] is not None else None,
                                    shown_as=f"the model of {name} {param}={value}", batch_size=batch_size,
                                    workers=workers, precision=precision, output=attacked_output)
                    params = params or {k: v for k, v in report.params.items() if k in settings}
                    results = {k: v for k, v in report.params.items() if k not in settings and k != option.key
                               and k != "attacker_keys"}
                    if final[1] is not None:
                        results["attacker_keys"] = str(final[1])
                    rows.append(read(value, out, report.accuracy_after, report.seconds, results=results,
                                     named=None if final[0] is None else str(final[0]),
                                     unnamed=f"{name} {param}={value}, not kept"))
                if progress is not None:
                    progress(len(values), len(values), f"{name} {param}")
            result = SweepReport(name, option.key, params, str(model), str(data), seed, extract_reader.alpha,
                                 bundle.key_id, extract_reader.published, rows, str(plot) if plot else None)
            png = None
            if plot is not None:
                from .plots import sweep_plot

                png = sweep_plot(result)
            if new_keep:
                make_keep()
            with Outputs(force=force, inputs=inputs) as outs:
                for value in values if keep is not None else ():
                    for made_at, path, flag, mode in zip(kept(Path(scratch), value), kept(Path(keep), value),
                                                         ("--out", "--attacker-keys"), (None, BUNDLE_MODE),
                                                         strict=True):
                        if made_at is not None:  # (copied into the temporary file, which stays locked)
                            shutil.copyfile(made_at, outs.add(path, flag, mode=mode))
                if png is not None:
                    outs.add(plot, "--plot").write_bytes(png)
    except BaseException:  # a failure or an interruption: the sweep leaves no output, as no command does
        unmake_keep()
        raise
    return result


def _load_victim(model, arch, arch_kwargs, dataset: Dataset):
    """(the victim, its checkpoint facts): a torch model from a checkpoint, or an ONNX
    ModelProto (facts None)."""
    if str(model).lower().endswith(".onnx"):
        from .runtime import load_onnx

        return load_onnx(model), None
    net, info = _load_model(model, arch, arch_kwargs, data=dataset)
    dataset.check_fits(info.input_shape, info.num_classes)
    return net, info


def _victim_accuracy(model, data: str, arch, arch_kwargs, timeout: float | None, provider: str,
                     output: str | None = None) -> float:
    """`output`: of an ONNX victim, the output read (None: as `_accuracy` chooses)."""
    dataset = load_dataset(data, model)
    net, _ = _load_victim(model, arch, arch_kwargs, dataset)
    return _accuracy(model if str(model).lower().endswith(".onnx") else net, dataset, timeout, provider, output=output)


def _sweep_row(value, path, accuracy: float, seconds: float, *, extract_reader: _Reader,
               verify_reader: _Reader | None, scratch: Path, arch, arch_kwargs, named: str | None,
               unnamed: str = "", results: dict | None = None) -> SweepRow:
    """Read the owner's keys in one attacked model (`path`, in the scratch folder, or the victim):
    extract as it is, verify from ONNX. The readings name the model `named` (where it is kept;
    None: it is not, and `unnamed` says which it was), never the scratch folder's files.
    `results`: what the attack reported of its own at this strength."""
    from .results import SweepRow
    from .runtime import load_onnx

    attacked = value is not None
    asked = extract_reader.output

    def answer(onnx_path: Path) -> str | None:  # (a wrapper's answer has a name of its own: read where --output is not)
        return asked if not attacked or asked is None else _kept_output(asked, load_onnx(onnx_path))

    onnx_path = Path(path)
    output = answer(onnx_path) if onnx_path.suffix.lower() == ".onnx" else asked
    # (an attacked model the keys cannot read whole is that row's no verdict: it had ended the sweep)
    decision = extract_reader.read(path, name=named or unnamed, unread_ok=attacked, output=output)
    checked = None
    if verify_reader is not None:
        if onnx_path.suffix.lower() != ".onnx":
            onnx_path = Path(scratch) / (Path(path).stem + ".onnx")
            export(path, onnx_path, arch=arch, arch_kwargs=arch_kwargs, force=True)
            output = answer(onnx_path)
        checked = replace(verify_reader.read(onnx_path, name=named or unnamed, unread_ok=attacked, output=output),
                          model=named or unnamed)
    decision = replace(decision, model=named or unnamed)
    kept = None if value is None else named  # (the victim's row keeps nothing)
    return SweepRow(value, accuracy, decision, checked, seconds, kept, results or {})


def _attack_out_kind(name: str, out: str | Path, writes: tuple[str, ...]) -> str:
    from .fileio import MODEL_SUFFIXES

    kind = {suffix: kind for kind, suffix in MODEL_SUFFIXES.items()}.get(Path(out).suffix.lower())
    if kind is None:
        raise InputError(f"--out must end in .safetensors (a checkpoint) or .onnx, got {shown(out)}")
    if kind not in writes:
        want = " or ".join(MODEL_SUFFIXES[w] for w in writes)
        raise InputError(f"attack {name} writes {want} files: give --out a {want} name")
    return kind


def _as_onnx(net, info, dataset: Dataset, outs):
    """A checkpoint's model as an ONNX ModelProto (the plain export, checked for parity)."""
    from .checkpoint import export_onnx
    from .runtime import load_onnx

    path = outs.scratch(".onnx")
    export_onnx(net, info, path, check_inputs=dataset.x_test[:64])
    return load_onnx(path)


def _kept_output(output: str | None, proto) -> str | None:
    """`output` where the ONNX model `proto` has an output of that name, else None (its own answer)."""
    return output if output in {o.name for o in proto.graph.output} else None


def _accuracy(model, dataset: Dataset, timeout: float | None = DEFAULT_TIMEOUT, provider: str = "auto",
              name: str | None = None, output: str | None = None) -> float:
    """Top-1 test accuracy of a torch model, or of an ONNX file (a path; run by onnxruntime,
    from its answers: scores, probabilities or labels, within `timeout` seconds in all; `name`,
    what messages call it; `output`: the output read, None: the first of class scores, else of
    labels)."""
    from .training import evaluate

    if not isinstance(model, (str, Path)):
        return evaluate(model, dataset.x_test, dataset.y_test)
    import numpy as np

    from .runtime import OnnxModel

    onnx_model = OnnxModel(model, provider=provider, timeout=timeout, name=name)
    try:  # in chunks: a lazy test split (an image folder) is decoded a chunk at a time
        x, chunk = dataset.x_test, 1024
        if output is not None:
            onnx_model.choose_output(output)  # (an unknown name fails before any query)
        labels = [onnx_model.answers(x[i: i + chunk], output)[0] for i in range(0, len(x), chunk)]
    finally:
        onnx_model.close()
    if not labels:
        return 0.0
    return float((np.concatenate(labels) == dataset.y_test).mean() * 100.0)


def _write_attacked(attacked, info, tmp: Path, out_kind: str, dataset: Dataset, timeout: float | None,
                    provider: str, record: dict, name: str, output: str | None = None) -> float:
    """Write the attacked model as --out asks; its accuracy. A model of another architecture
    than the victim's (a distilled student) carries its own facts in `deepsigns_info`. A
    checkpoint records the attack (`record`: its name, parameters and seed) in its metadata.
    `name`: what messages call it (not its temporary file)."""
    from .checkpoint import export_onnx, save_checkpoint

    info = getattr(attacked, "deepsigns_info", info)
    if hasattr(attacked, "SerializeToString"):  # an ONNX model: written, then run from the file
        if out_kind == "checkpoint":  # (the registry row said it writes ONNX only: refused before)
            raise InputError("this attack gives an ONNX model: give --out a .onnx name")
        Path(tmp).write_bytes(attacked.SerializeToString())
        # (the output the victim was read on, where the attacked model keeps it: else its own answer)
        return _accuracy(tmp, dataset, timeout, provider, name=name, output=_kept_output(output, attacked))
    accuracy = _accuracy(attacked, dataset)
    if out_kind == "checkpoint":
        attack = {"attacked": True, "attack": record, "test_accuracy": round(accuracy, 4)}
        save_checkpoint(attacked, replace(info, extra={**info.extra, **attack}), tmp)
    else:
        export_onnx(attacked, info, tmp, check_inputs=dataset.x_test[:64])
    return accuracy


def inspect(path: str | Path) -> InspectReport:
    """`deepsigns inspect`: the public facts of a bundle, checkpoint or ONNX file."""
    from .describe import describe
    from .results import InspectReport

    facts = describe(path)
    return InspectReport(facts.pop("kind"), facts.pop("path"), facts)


def claim_record(commitment: str, schemes: list[str], weights: str, files: dict) -> dict:
    """What an owner publishes with a model, to date the claim: the bundle's commitment, the
    model's fingerprints, the date, the schemes. Nothing secret (no key id, no key).
    `files`: role -> (the file's name as published, the path to read its bytes from)."""
    from datetime import datetime, timezone

    from .fileio import sha256_file

    # (a record to publish: valid Unicode, a name that is not UTF-8 written out byte by byte)
    digests = {role: {"file": valid_text(Path(name).name), "sha256": sha256_file(path)}
               for role, (name, path) in files.items()}
    return {"commitment": commitment, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "schemes": list(schemes), "weights_fingerprint": weights, "files": digests}


def report_json(report) -> dict:
    """Any report of the commands above as a JSON object (always valid JSON: no NaN)."""
    from .results import to_json_dict

    return to_json_dict(report)


# ============================================================================ building blocks


def _scheme_list(schemes) -> list[str]:
    if isinstance(schemes, str):
        schemes = schemes.split(",")
    names = [s.strip() for s in schemes if s and s.strip()]
    if not names:
        raise InputError(f"no scheme given: use --scheme {' or '.join(SCHEMES)} (comma-separated)")
    for name in names:
        scheme_entry(name)  # unknown names fail here, with the list
    if len(set(names)) != len(names):
        raise InputError(f"--scheme names a scheme twice: {','.join(names)}")
    return names


def _split_options(names: list[str], options: dict) -> dict[str, dict]:
    """Flat option values -> the options of each scheme (its registry row says which)."""
    given = {k: v for k, v in options.items() if v is not None}
    per = {n: {o.key: o.check(given[o.key]) for o in scheme_entry(n).options if o.key in given}
           for n in names}
    for key in given:
        if not any(key in opts for opts in per.values()):
            takers = [n for n, e in SCHEMES.items() if any(o.key == key for o in e.options)]
            flag = "--" + key.replace("_", "-")
            raise InputError(f"{flag} is an option of scheme {' and '.join(takers) or '(none)'}, "
                             f"which is not in --scheme {','.join(names)}: add it, or drop {flag}")
    return per


def _default_share(schemes: int) -> str:
    """What each scheme of a bundle of `schemes` must reach at the default alpha, in words (extract
    reads every scheme of the bundle, and each has its share of alpha: results.decide)."""
    if schemes > 1:
        return f"its share of the default alpha ({DEFAULT_ALPHA:g} over {schemes} schemes)"
    return f"the default alpha of {DEFAULT_ALPHA:g}"


def _keygen_warnings(bundle: Bundle) -> list[str]:
    """What keygen tells the owner: each scheme's own warnings, and keys that no reading can
    bring to the default alpha (they would mark a model that nothing can then claim)."""
    found, schemes = [], len(bundle.schemes)
    share = _default_share(schemes)
    for name, keys in bundle.schemes.items():
        scheme = load_scheme(name)
        found += scheme.warnings(keys)
        best = scheme.best_p_value(keys)
        if best is not None and best * schemes > DEFAULT_ALPHA:
            found.append(f"{name}: these keys give at best p = {best:.2g}"
                         + (f" {scheme.best_is_typical}, above {share}: a model would be detected with them at that "
                            "alpha only if more than that lasted" if scheme.best_is_typical else
                            f", above {share}: no model can be detected with them at that alpha")
                         + f"; make more of them ({scheme.more_evidence})")
    return found


def train_model(arch: str, data: Dataset, *, arch_kwargs: dict | None = None, epochs: int = 30,
                lr: float = 1e-3, batch_size: int = 64, seed: int = 0, device: str = "auto",
                progress: Progress | None = None, workers: int = 0, precision: str = "fp32"):
    """A plain, unmarked model in memory. Returns (model, info, TrainReport without `out`)."""
    import numpy as np

    from .checkpoint import ModelInfo
    from .results import TrainReport
    from .training import TrainConfig, evaluate, fit, seed_everything
    from .zoo import build_model

    seed_everything(seed)
    model = build_model(arch, arch_kwargs or {}, data.input_shape, data.num_classes)
    cfg = TrainConfig(epochs, batch_size, lr, seed, device, "train", workers=workers, precision=precision)
    history = fit(model, data.x_train, data.y_train, cfg, progress=progress)
    acc = evaluate(model, data.x_test, data.y_test)
    info = ModelInfo(
        arch, dict(arch_kwargs or {}), data.input_shape, data.num_classes, lr,
        extra={"producer": "deepsigns", "data": data.name, "seed": seed,
               "test_accuracy": round(acc, 4),
               # an image folder's preprocessing: keygen, embed, attack and export reuse it
               **({"preprocess": data.preprocess} if data.preprocess is not None else {})},
    )
    report = TrainReport(arch, data.name, history["epochs"], acc,
                         float(np.mean(history["epoch_seconds"])), out="")
    return model, info, report


@contextlib.contextmanager
def process_group(device: str = "auto", waiting: Callable[[str], None] | None = None):
    """The run's process group when torchrun started this process (nothing otherwise): a
    data-parallel `train` or `embed` runs inside it. `waiting` is told when a process that no
    torchrun agent started waits for the others (training.distributed)."""
    from .fileio import run_place

    if run_place()[1] == 1:
        yield
        return
    from .training import distributed

    with distributed(device, waiting):
        yield


def held_signals():
    """A context that holds Ctrl-C, SIGTERM, SIGHUP and SIGQUIT until it ends (fileio.held_signals)."""
    from .fileio import held_signals as held

    return held()


def held_after_commit(*, restore: bool = True):
    """A context around a whole command: from a commit on, Ctrl-C, SIGTERM, SIGHUP and SIGQUIT are held
    until it ends (fileio.held_after_commit)."""
    from .fileio import held_after_commit as held

    return held(restore=restore)


def outputs_written(written: list[str]) -> None:
    """Another process wrote the command's outputs: signals are held as after a commit."""
    from .fileio import outputs_written as done

    done(written)


def sweep_run(outputs: list[str], since: float) -> None:
    """Remove what the killed processes of a failed run left (fileio.sweep_run)."""
    from .fileio import sweep_run as sweep

    sweep(outputs, since)


def is_main_process() -> bool:
    """Whether this process writes files and prints the report (under torchrun: RANK 0)."""
    from .fileio import is_main_process as main

    return main()


def world_size() -> int:
    """The processes of this run: WORLD_SIZE as torchrun sets it, 1 outside torchrun
    (InputError for settings that are wrong: fileio.run_place)."""
    from .fileio import run_place

    return run_place()[1]


def run_by_agent() -> bool:
    """Whether torchrun's agent started this process (fileio.run_by_agent)."""
    from .fileio import run_by_agent as by_agent

    return by_agent()


def stop_with_parent(parent: int) -> None:
    """SIGTERM to this process when its parent `parent` dies (fileio.stop_with_parent)."""
    from .fileio import stop_with_parent as stop

    stop(parent)


def parallel_slots(device: str = "auto") -> tuple[int, str]:
    """(how many processes a data-parallel run may start here, what they are: GPUs or CPU cores).
    On the CPU without importing torch: `--nproc` imports it in every process it starts, and
    importing it in the launching one too had delayed them by 1.3 s."""
    if device != "cpu":
        from .training import resolve_device

        device = resolve_device(device).type
    if device == "cuda":
        import torch

        return torch.cuda.device_count(), "GPUs"
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1), "CPU cores"


def make_keys(model, info: ModelInfo, data: Dataset, schemes: list[str], options: dict[str, dict],
              *, seed: int | None = None) -> Bundle:
    """Draw every secret for the given schemes (keys that depend on the model use it).
    `options`: scheme name -> that scheme's option values."""
    import numpy as np

    from .bundle import Bundle, check_sealable
    from .checkpoint import fingerprint

    data.check_fits(info.input_shape, info.num_classes)
    names = _scheme_list(schemes)
    rng = np.random.default_rng(seed)  # seed=None: fresh OS entropy, the normal case for keys
    bundle = Bundle(info={
        "arch": info.arch, "arch_kwargs": info.arch_kwargs,
        "input_shape": list(info.input_shape), "num_classes": info.num_classes,
        "base_fingerprint": fingerprint(model), "embedded": False,
    })
    asked = {name: load_scheme(name).resolved(options.get(name, {})) for name in names}
    # (before any is drawn: keys of 2048 x 2048 images had taken 15.7 GB before seal refused them)
    check_sealable(sum(load_scheme(name).key_samples(asked[name]) for name in names)
                   * math.prod(info.input_shape) * 4)
    for name in names:
        draws = _key_draws(rng, bundle.info, data, name, asked)
        bundle.put(load_scheme(name).keygen(model, info, data, options.get(name, {}), draws))
    return bundle


def _key_draws(rng, info: dict, data: Dataset, scheme: str, asked: dict[str, dict]):
    """The generator one scheme's keys are drawn from: the seed's next number together with a
    digest of all else keygen was given (the model's weights and architecture, the training
    data, every scheme asked for and its options, a --message included: a seed's hidden keys
    alone had been those of the same seed's hidden and gradsigns). Secrets drawn from the seed alone
    could be seen first and everything else fitted to them: a --message that spells the bits
    someone else's model reads through the projection a seed draws claimed that model, 4 of 96
    bits wrong at p = 9e-23, from the unmodified tool (a model or data could be shaped to them
    as well). Now every choice is a fresh draw, and p is the chance of one."""
    import json

    import numpy as np

    from .data import digest_number

    given = json.dumps({"model": info, "data": data.digest, "scheme": scheme, "schemes": asked},
                       sort_keys=True, default=repr)
    return np.random.default_rng([int(rng.integers(2**63)), digest_number(given.encode())])


def embed_keys(model, info: ModelInfo, data: Dataset, bundle: Bundle, *, epochs: int | None = None,
               lr: float | None = None, batch_size: int = 64, seed: int = 0, device: str = "auto",
               progress: Progress | None = None, workers: int = 0, precision: str = "fp32"):
    """Embed every scheme of the bundle in registry order; returns (model, info, bundle,
    report dict). The model is trained in place; objectives of the schemes already embedded
    stay on, so every watermark stays readable."""
    import numpy as np

    from .checkpoint import fingerprint
    from .training import TrainConfig, check_device, evaluate

    data.check_fits(info.input_shape, info.num_classes)
    _check_bundle_fits(bundle, info)
    # (keys are drawn against that model: an output key's label is one it does not give, the
    # hidden line-up's reference is its units; and a model prepared after keygen to learn some
    # keys more readily than others would steer the choice of the output keys kept). Embedded
    # keys go again into that model or the one they marked (a mark that did not take), no other.
    made_on, marked = bundle.info.get("base_fingerprint"), bundle.info.get("marked_fingerprint")
    if made_on and fingerprint(model) not in (made_on, marked):
        also = " or of the model they marked" if marked else ""
        raise SchemeError(f"the model is not the one these keys were made on (its weights differ from those of "
                          f"keygen's --model{also}): embed into the model given to keygen, or make keys for this one")
    for name in embed_order(bundle.schemes):  # (before any scheme trains)
        scheme = load_scheme(name)
        scheme.can_embed(scheme.check(bundle.schemes[name]), data)
    check_device(device)
    acc_before = evaluate(model, data.x_test, data.y_test)
    schemes: dict[str, dict] = {}
    embedded = []  # objectives of the watermarks already in the model
    for name in embed_order(bundle.schemes):
        scheme, entry = load_scheme(name), scheme_entry(name)
        # --epochs, else the scheme's own default (a cap where it stops by itself)
        cfg = TrainConfig(epochs=epochs or entry.default_epochs, lr=lr or info.lr, batch_size=batch_size,
                          seed=seed, device=device, description=f"embed {name}", workers=workers,
                          precision=precision)
        keys, history = scheme.embed(model, info, data, scheme.check(bundle.schemes[name]), cfg,
                                     progress, tuple(embedded))
        bundle.put(keys)
        embedded.append(scheme.objective(model, info, data, keys))
        schemes[name] = {"epochs": history["epochs"],
                         "seconds_per_epoch": float(np.mean(history["epoch_seconds"]))}
    acc_after = evaluate(model, data.x_test, data.y_test)
    # every mark read back from the marked model, as extract reads it: an embedding that did not
    # take says so (a random key set can be hard to embed; the owner must know before release)
    from .suspect import TorchSuspect

    for result in read_keys(TorchSuspect(model), bundle, list(schemes)).results:
        took = result.detected or getattr(result, "bit_errors", None) == 0  # (every bit, with too few to claim)
        schemes[result.scheme].update(read_back=result.brief(), read_back_p=result.p_value, took=bool(took),
                                      detected=bool(result.detected))
    fp = fingerprint(model)
    bundle.info.update(embedded=True, marked_fingerprint=fp)
    # no key id and no "embed" in the metadata: a marked file must look like any other
    info = replace(info, extra={**info.extra, "test_accuracy": round(acc_after, 4)})
    report = {"accuracy_before": acc_before, "accuracy_after": acc_after, "schemes": schemes,
              "fingerprint": fp}
    return model, info, bundle, report


def _check_bundle_fits(bundle: Bundle, info: ModelInfo) -> None:
    made_for = (bundle.info.get("arch"), bundle.info.get("arch_kwargs") or {})
    if made_for != (info.arch, info.arch_kwargs or {}):

        def arch(name, kwargs) -> str:
            return f"'{one_line(name, 60)}'" + (f" {one_line(json.dumps(kwargs, default=repr), 80)}" if kwargs else "")

        raise SchemeError(f"the keys were made for architecture {arch(*made_for)}, this model is "
                          f"{arch(info.arch, info.arch_kwargs)}: embed into the model the keys were made for")
    want, classes = bundle.shapes
    if want != tuple(info.input_shape) or classes != info.num_classes:
        raise SchemeError(
            f"the keys were made for inputs {list(want)} and {classes} "
            f"classes, this model takes {list(info.input_shape)} and {info.num_classes}: "
            "use the model the keys were made with"
        )


def read_keys(suspect: Suspect, bundle: Bundle, names: list[str], *, alpha: float = DEFAULT_ALPHA,
              command: str = "extract", commitment: str = "", unread_ok: bool = False) -> Decision:
    """Read the named schemes of the bundle from a suspect and decide (extract and verify). A
    suspect no scheme could read whole, with nothing detected, is an OnnxError (no verdict,
    exit 2), or with `unread_ok` that decision, each result `unread`."""
    from .errors import OnnxError
    from .results import SchemeResult, decide

    schemes = {n: load_scheme(n) for n in names}
    keys = {n: schemes[n].check(bundle.schemes[n]) for n in names}  # all checked before any query
    results, failed = [], None
    for n in names:
        try:
            results.append(schemes[n].read(suspect, keys[n]))
        except OnnxError as exc:
            # the model failed as a whole (no answer in time, a crash) reading this scheme: a mark
            # a scheme read before found stands (one scheme's batch that ran out of time had
            # thrown a detection away); none found is no verdict
            if not suspect.broken or not results:
                raise
            failed = failed or exc
            results.append(SchemeResult(n, 1.0, note=f"not read: {one_line(exc, 300)}", unread=True))
    decision = decide(results, alpha, command=command, model=suspect.name, key_id=bundle.key_id,
                      commitment=commitment)
    if failed is not None and not decision.detected:
        raise failed
    if not decision.detected and all(r.unread for r in results) and not unread_ok:  # (as an output that cannot be read)
        why = "; ".join(f"{r.scheme}: {r.note}" for r in results)
        raise OnnxError(f"{shown(suspect.name)} could not be read ({why}): no verdict either way")
    return decision
