"""Attacks that rewrite the weights without training data of their own: hidden-unit permutation
(the same function, other weights), quantization (int8 ONNX, k-bit rounding), and overwriting
(the attacker's own watermark, sealed in the attacker's bundle)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
import torch
from helpers import assert_bad_input, partial_files, run_cli, run_json, run_proc
from onnx import TensorProto
from safetensors.numpy import load_file

from deepsigns_cli.bundle import MAGIC, read_header
from deepsigns_cli.checkpoint import ModelInfo, load_checkpoint, save_checkpoint
from deepsigns_cli.zoo import build_model


def _logits(path, x) -> np.ndarray:
    model, _ = load_checkpoint(path)
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float32)).numpy()


def _moved(old: np.ndarray, new: np.ndarray) -> int:
    """How many rows of `new` are a positive multiple of another row of `old` than their own;
    fails unless every row of `new` is a positive multiple of exactly one row of `old`."""
    def unit(a):
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    cos = unit(new.astype(np.float64)) @ unit(old.astype(np.float64)).T
    match = cos.argmax(axis=1)
    assert cos.max(axis=1).min() > 1 - 1e-5, "a unit's weights are not a rescaled copy of any unit's"
    assert len(set(match.tolist())) == len(match), "two units map to the same original"
    return int((match != np.arange(len(match))).sum())


# layer -> how its units are laid out: first-layer rows (conv kernels flattened), head columns
PERMUTED = {
    "mlp": [("fc1", "rows"), ("head", "columns")],
    "cnn": [("conv1", "rows"), ("head", "columns")],
}


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_permute_keeps_the_function_and_moves_the_units(arch, marked, cnn, digits, tmp_path):
    victim = marked.marked if arch == "mlp" else cnn[0]
    out = tmp_path / "permuted.safetensors"
    report = run_json("attack", "permute", "--model", victim, "--data", "digits", "--out", out)
    assert report["accuracy_after"] == report["accuracy_before"]
    before, after = _logits(victim, digits.x_test), _logits(out, digits.x_test)
    assert np.abs(after - before).max() <= 1e-4 * np.abs(before).max()
    assert report["params"]["max_output_diff"] <= 1e-4 * np.abs(before).max()
    old, new = load_file(victim), load_file(out)
    for layer, layout in PERMUTED[arch]:
        a, b = old[f"{layer}.weight"], new[f"{layer}.weight"]
        if layout == "rows":
            a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
        else:
            a, b = a.T, b.T
        assert not np.allclose(a, b)
        assert _moved(a, b) >= len(a) // 2, f"fewer than half of the units of {layer} moved"
    permuted = report["params"]["units_permuted"]
    expected = {"mlp": ["fc1", "fc2"], "cnn": ["conv1", "conv2", "fc1"]}[arch]
    assert list(permuted) == expected
    assert all(permuted[name] >= len(old[f"{name}.weight"]) // 2 for name in expected)


def test_permute_without_rescaling_is_an_exact_permutation(marked, tmp_path):
    out = tmp_path / "permuted.safetensors"
    report = run_json("attack", "permute", "--model", marked.marked, "--data", "digits", "--scale", 1,
                      "--out", out)
    assert report["params"]["scale"] == 1
    old, new = load_file(marked.marked), load_file(out)
    assert old.keys() == new.keys()
    for name in old:  # every tensor but the head's bias (the outputs are not shuffled) moved
        assert np.array_equal(old[name], new[name]) == (name == "head.bias"), name
        # the same values, moved: sorted, they are bit for bit the original's
        assert np.array_equal(np.sort(old[name], axis=None), np.sort(new[name], axis=None)), name
    rows = {r.tobytes() for r in old["fc1.weight"]}
    assert all(r.tobytes() in rows for r in new["fc1.weight"])  # whole rows moved, none rescaled
    columns = {c.tobytes() for c in old["head.weight"].T}
    assert all(c.tobytes() in columns for c in new["head.weight"].T)


def test_permute_refuses_a_resnet(tmp_path):
    model = build_model("resnet", {"widths": [4, 8]}, (1, 8, 8), 10)
    path, out = tmp_path / "resnet.safetensors", tmp_path / "permuted.safetensors"
    save_checkpoint(model, ModelInfo("resnet", {"widths": [4, 8]}, (1, 8, 8), 10), path)
    result = run_cli("attack", "permute", "--model", path, "--data", "digits", "--out", out, code=2)
    assert_bad_input(result, "no hidden units to shuffle", "BatchNorm")
    assert not out.exists() and partial_files(tmp_path) == []


def test_quantize_int8_onnx(marked, tmp_path):
    out = tmp_path / "int8.onnx"
    # a real process: onnxruntime's quantizer logs through the root logger, which would
    # print on stderr there (in pytest, its own handler takes those records)
    proc = run_proc("attack", "quantize", "--model", marked.marked, "--data", "digits", "--out", out, "--json")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    report = json.loads(proc.stdout)
    assert report["params"]["mode"] == "int8-onnx" and report["params"]["bits"] == 8
    assert 0 < report["params"]["max_relative_change"] < 0.01
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    inits = list(proto.graph.initializer)
    matrices = [t for t in inits if len(t.dims) == 2]
    assert len(matrices) == 3 and all(t.data_type == TensorProto.INT8 for t in matrices)
    assert abs(report["accuracy_after"] - report["accuracy_before"]) <= 2.0


def test_quantize_static_int8_onnx_computes_integer_activations_and_the_mark_is_read(marked, tmp_path):
    out = tmp_path / "static.onnx"
    proc = run_proc("attack", "quantize", "--model", marked.marked, "--data", "digits", "--static",
                    "--out", out, "--json")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    report = json.loads(proc.stdout)
    assert report["params"]["mode"] == "int8-static-onnx" and report["params"]["bits"] == 8
    assert 0 < report["params"]["max_relative_change"] < 0.01
    assert abs(report["accuracy_after"] - report["accuracy_before"]) <= 2.0
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert "QGemm" in ops and not ops & {"Gemm", "MatMul", "MatMulInteger"}, ops  # (no float hidden layer)
    r = run_json("extract", "--model", out, "--keys", marked.keys)["results"][0]
    assert r["detected"] and r["bit_errors"] <= r["max_bit_errors"] // 2, r
    result = run_cli("attack", "quantize", "--model", marked.marked, "--data", "digits", "--static",
                     "--out", tmp_path / "static.safetensors", code=2)
    assert_bad_input(result, "--static quantizes activations in an ONNX graph: use --out x.onnx", "takes no --static")
    assert partial_files(tmp_path) == []


def test_quantize_k_bits_rounds_each_tensor(marked, tmp_path):
    out = tmp_path / "4bit.safetensors"
    report = run_json("attack", "quantize", "--model", marked.marked, "--data", "digits", "--bits", 4,
                      "--out", out)
    assert report["params"]["mode"] == "k-bit" and report["params"]["bits"] == 4
    old, new = load_file(marked.marked), load_file(out)
    for name, tensor in new.items():
        assert len(np.unique(tensor)) <= 16, name
        assert tensor.min() == old[name].min() and tensor.max() == old[name].max(), name
        step = (old[name].max() - old[name].min()) / 15
        assert np.abs(tensor - old[name]).max() <= step / 2 * (1 + 1e-5), name
    assert len(np.unique(old["fc1.weight"])) > 16
    assert 0 < report["params"]["max_relative_change"] < 0.2
    assert report["accuracy_after"] > report["accuracy_before"] - 5


def test_quantize_k_bits_refused_for_onnx(marked, tmp_path):
    out = tmp_path / "4bit.onnx"
    result = run_cli("attack", "quantize", "--model", marked.marked, "--data", "digits", "--bits", 4,
                     "--out", out, code=2)
    assert_bad_input(result, "int8 only for .onnx; use --out .safetensors for k-bit rounding")
    assert not out.exists() and partial_files(tmp_path) == []


OVERWRITE_EPOCHS = 3  # 2 leave the output scheme short of its 20 learnt keys


def test_overwrite_embeds_the_attackers_own_mark(marked, tmp_path):
    out, keys = tmp_path / "overwritten.safetensors", tmp_path / "attacker.dskey"
    # the default schemes (hidden, output) with the fewest epochs the output keys need
    report = run_json("attack", "overwrite", "--model", marked.marked, "--data", "digits",
                      "--epochs", OVERWRITE_EPOCHS, "--attacker-keys", keys, "--out", out)
    params = report["params"]
    assert params["schemes"] == ["hidden", "output"]
    assert params["epochs"] == {"hidden": OVERWRITE_EPOCHS, "output": OVERWRITE_EPOCHS}
    assert params["lr"] == load_checkpoint(marked.marked)[1].lr  # (embed's default)
    assert params["attacker_keys"] == str(keys)
    assert out.exists() and keys.exists()
    # sealed: the magic, a public header naming the attacker's key, nothing secret in the clear
    blob = keys.read_bytes()
    assert blob.startswith(MAGIC)
    header = read_header(keys)
    assert header["key_id"] == params["attacker_key_id"] and header["schemes"] == ["hidden", "output"]
    assert b"__metadata__" not in blob and b'"dtype"' not in blob  # no safetensors plaintext
    assert hashlib.sha256(blob).hexdigest() == params["attacker_commitment"]
    assert params["attacker_key_id"] != read_header(marked.keys)["key_id"]
    decision = run_json("extract", "--model", out, "--keys", keys)
    assert decision["detected"] is True, json.dumps(decision)
    assert [r["detected"] for r in decision["results"]] == [True, True], json.dumps(decision)
    # and the attacker's keys do not claim the owner's unmarked baseline
    baseline = run_json("extract", "--model", marked.base, "--keys", keys, code=None)
    assert baseline["detected"] is False


def test_overwrite_trains_at_the_rate_it_is_given(marked, tmp_path):
    """--lr, as embed takes it (it had none: the attacker's embedding ran at the model's rate
    whatever he chose). At a rate of 1e-9 one epoch leaves every weight where it was."""
    moved = {}
    for lr in (None, 1e-9):
        out = tmp_path / f"overwritten-{lr}.safetensors"
        report = run_json("attack", "overwrite", "--model", marked.marked, "--data", "digits", "--scheme", "hidden",
                          "--epochs", 1, *(("--lr", lr) if lr else ()), "--attacker-keys", tmp_path / f"a-{lr}.dskey",
                          "--out", out)
        assert report["params"]["lr"] == (lr or load_checkpoint(marked.marked)[1].lr)
        before, after = (load_checkpoint(p)[0].state_dict() for p in (marked.marked, out))
        moved[lr] = max(float((after[k] - before[k]).abs().max()) for k in before)
    assert moved[1e-9] < 1e-6 < 1e-3 < moved[None], moved


def test_overwrite_refuses_a_model_s_name_for_the_attacker_s_bundle(marked, tmp_path):
    out = tmp_path / "overwritten.safetensors"
    result = run_cli("attack", "overwrite", "--model", marked.marked, "--data", "digits", "--epochs", 1,
                     "--attacker-keys", tmp_path / "thief.safetensors", "--out", out, code=2)
    assert_bad_input(result, "--attacker-keys", "names a model", ".dskey")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_needs_attacker_keys(marked, tmp_path):
    out = tmp_path / "overwritten.safetensors"
    result = run_cli("attack", "overwrite", "--model", marked.marked, "--data", "digits", "--epochs", 1,
                     "--out", out, code=2)
    assert_bad_input(result, "--attacker-keys is required: the bundle of the attacker's keys to write")
    assert not out.exists() and partial_files(tmp_path) == []


def test_overwrite_that_did_not_take_gives_advice_the_attack_can_follow(marked, tmp_path):
    """The attacker's keys are made at the defaults: only --epochs can help (not keygen's --key-size)."""
    out, keys = tmp_path / "overwritten.safetensors", tmp_path / "attacker.dskey"
    result = run_cli("attack", "overwrite", "--model", marked.marked, "--data", "digits", "--epochs", 1,
                     "--scheme", "output", "--attacker-keys", keys, "--out", out, code=2)
    assert_bad_input(result, "the attacker's embedding: only", "keys were learnt", "raise --epochs")
    assert "keygen" not in result.output and "--key-size" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_prune_ranks_the_weights_of_every_kind_of_convolution():
    """nn.Conv2d alone had been pruned: a Conv1d's weights stayed whole, and a model reported
    pruned at 0.9 held 0.69 of zeros."""
    from torch import nn

    from deepsigns_cli.attacks.prune import masks, prunable

    torch.manual_seed(0)
    layers = {"c1": nn.Conv1d(2, 4, 3), "c3": nn.Conv3d(1, 2, 2), "t2": nn.ConvTranspose2d(2, 3, 2),
              "fc": nn.Linear(5, 3)}
    model = nn.ModuleDict(layers)
    weights = prunable(model)
    assert set(weights) == set(layers)
    kept = masks(weights, 0.9, "global")
    zeroed = sum(int((~kept[name]).sum()) for name in weights)
    assert zeroed == int(np.ceil(0.9 * sum(w.numel() for w in weights.values())))


def test_a_sweep_takes_no_attacker_bundle_of_the_users(marked, tmp_path):
    """A sweep seals one attacker bundle per strength, kept in --out: --attacker-keys had been
    taken and dropped without a word (no file written, exit 0), and swept as if a strength."""
    base = ("attack", "overwrite", "--model", marked.marked, "--data", "digits", "--keys", marked.keys)
    for extra in (("--sweep", "epochs=1", "--attacker-keys", tmp_path / "mine.dskey"),
                  ("--sweep", f"attacker-keys={tmp_path / 'a.dskey'},{tmp_path / 'b.dskey'}")):
        assert_bad_input(run_cli(*base, *extra, code=None), "--attacker-keys", "sweep")
    assert list(tmp_path.iterdir()) == []


def test_a_kept_attacker_bundle_that_is_the_keys_is_refused_before_any_attack(marked, tmp_path, monkeypatch):
    """(every output is checked before any work: the kept bundle's clash with --keys had been
    found only at the end, after every strength's embedding)"""
    import shutil

    from deepsigns_cli import training

    def no_training(*args, **kwargs):
        raise AssertionError("an attack ran before the outputs were checked")

    kept = tmp_path / "kept"
    kept.mkdir()
    keys = shutil.copyfile(marked.keys, kept / "overwrite-epochs-1.attacker.dskey")
    monkeypatch.setattr(training, "fit", no_training)
    assert_bad_input(run_cli("attack", "overwrite", "--model", marked.marked, "--data", "digits", "--keys", keys,
                             "--sweep", "epochs=1", "--out", kept, "--force", code=None), "--keys")


def test_prune_s_fine_tuning_flags_without_its_epochs_are_refused(marked, tmp_path):
    """--lr, --optimizer and --data-fraction without --finetune-epochs were taken, changed
    nothing, and were reported and recorded as what the attack used (helper-55 A08)."""
    result = run_cli("attack", "prune", "--model", marked.marked, "--data", "digits", "--lr", 5, "--optimizer", "sgd",
                     "--out", tmp_path / "pruned.safetensors", code=2)
    assert_bad_input(result, "--lr, --optimizer set how prune fine-tunes", "--finetune-epochs")
    assert partial_files(tmp_path) == [] and not (tmp_path / "pruned.safetensors").exists()
