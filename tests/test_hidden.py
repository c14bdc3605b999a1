"""Scheme 1 (DeepSigns hidden layer, white-box): reliability, integrity, fidelity, formats."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import MESSAGE, PASSPHRASE, SEEDS, assert_one_error_line, run_cli, run_json
from torch import nn

from deepsigns_cli.defaults import DEFAULT_ALPHA as ALPHA
from deepsigns_cli.schemes.hidden import DEFAULTS

CLASSES = DEFAULTS["classes"]  # the signature is held at this many class centres


def extract(model, keys, *extra, code=None) -> dict:
    return run_json("extract", "--model", model, "--keys", keys, *extra, code=code)


def hidden(report: dict) -> dict:
    (result,) = [r for r in report["results"] if r["scheme"] == "hidden"]
    return result


def accuracy(path) -> float:
    from deepsigns_cli.checkpoint import load_checkpoint
    from deepsigns_cli.data import load_data
    from deepsigns_cli.training import evaluate

    data = load_data("digits")
    return evaluate(load_checkpoint(path)[0], data.x_test, data.y_test)


# ----------------------------------------------------------------------------- reliability


def test_marked_model_is_detected_with_no_bit_errors(seeded_run):
    report = extract(seeded_run.marked, seeded_run.keys, code=0)
    r = hidden(report)
    assert report["detected"] is True and r["detected"] is True
    assert r["n_bits"] == 8 * len(MESSAGE) * CLASSES == len(r["bits"])  # a copy at each class
    assert r["bit_errors"] == 0 and r["ber"] == 0.0
    assert r["p_value"] == pytest.approx(0.5 ** r["n_bits"])  # P[Binomial(N, 1/2) <= 0]
    assert report["p_value"] <= report["alpha"] == ALPHA



def test_extract_on_an_onnx_file_does_not_import_torch(marked):
    """Reading a hidden mark from an ONNX file takes onnxruntime and numpy alone: torch's import
    (1.7 s here) had been most of such an extract (2.6 s, now 0.8 s)."""
    from helpers import imports_torch

    assert not imports_torch(marked.onnx, marked.keys, PASSPHRASE, command="extract")


def test_message_round_trips(seeded_run):
    r = hidden(extract(seeded_run.marked, seeded_run.keys, code=0))
    assert r["message"] == MESSAGE and r["message_errors"] == 0
    n = 8 * len(MESSAGE)
    for k in range(CLASSES):  # every class centre holds the whole signature
        assert int(r["bits"][k * n:(k + 1) * n], 2).to_bytes(len(MESSAGE), "big") == MESSAGE.encode()


@pytest.mark.parametrize("carrier", ["zeros", "the same for every input", "NaN"])
def test_a_carrier_that_reads_nothing_claims_nothing(seeded_run, tmp_path, carrier):
    """An innocent hand-built model whose only tensor of the carrier's width is zeros, the same
    for every input (no unit to line up) or NaN projects every bit to exactly 0 or NaN. Read as
    0, those bits matched the 0 bits of the owner's --message, which are most of a text's bits:
    64 characters claimed such a model at p = 7e-17 (NaN: 6e-12). Such a bit now reads nothing
    and counts as wrong."""
    import numpy as np
    import onnx
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    width = 512  # the digits MLP's carrier
    bias = {"zeros": np.zeros(width, np.float32), "NaN": np.full(width, np.nan, np.float32),
            "the same for every input": rng.uniform(0, 1, width).astype(np.float32)}[carrier]
    graph = h.make_graph(
        [h.make_node("Flatten", ["input"], ["flat"], axis=1), h.make_node("MatMul", ["flat", "w1"], ["z"]),
         h.make_node("Add", ["z", "b1"], ["carrier"]), h.make_node("Gemm", ["carrier", "w2", "b2"], ["scores"])],
        "constant", [h.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [h.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 10])],
        [nh.from_array(np.zeros((64, width), np.float32), "w1"), nh.from_array(bias, "b1"),
         nh.from_array(rng.standard_normal((width, 10)).astype(np.float32), "w2"),
         nh.from_array(rng.standard_normal(10).astype(np.float32), "b2")])
    path = tmp_path / "constant.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8), path)
    r = hidden(extract(path, seeded_run.keys, code=1))
    assert not r["detected"] and r["p_value"] > 0.01
    if carrier != "the same for every input":  # the carrier's own reading, alone (the file's other units
        # read as a fair coin)
        from deepsigns_cli.bundle import open_bundle
        from deepsigns_cli.schemes.hidden import HiddenScheme
        from deepsigns_cli.suspect import Suspect

        class Constant(Suspect):
            def carriers(self, x, layer, width):
                return {"carrier": np.broadcast_to(bias, (len(x), width)).copy()}, ""

        alone = HiddenScheme().read(Constant(), open_bundle(seeded_run.keys, PASSPHRASE).schemes["hidden"])
        assert alone.bit_errors == alone.n_bits and set(alone.bits) == {"?"} and alone.p_value == 1.0


def test_onnx_export_gives_identical_bits(seeded_run):
    from_checkpoint = hidden(extract(seeded_run.marked, seeded_run.keys, code=0))
    from_onnx = hidden(extract(seeded_run.onnx, seeded_run.keys, code=0))
    assert from_onnx["bits"] == from_checkpoint["bits"]
    assert from_onnx["bit_errors"] == 0
    # no name is trusted: every tensor of the carrier's width is a candidate, counted in p
    assert from_onnx["candidates"] >= 1 and from_onnx["tensor"] != "head:input"
    assert from_onnx["p_value"] == pytest.approx(min(1.0, from_checkpoint["p_value"] * from_onnx["candidates"]))


def _plain_export(checkpoint, path) -> None:
    """What a thief (or any user) would do: torch.onnx.export of the model plus a softmax."""
    from deepsigns_cli.checkpoint import load_checkpoint

    model, info = load_checkpoint(checkpoint)
    wrapped = nn.Sequential(model, nn.Softmax(dim=1)).eval()
    with warnings.catch_warnings():  # the TorchScript exporter warns that it is deprecated
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (torch.zeros(2, *info.input_shape),), str(path),
                          input_names=["x"], output_names=["probs"], dynamo=False,
                          opset_version=17, dynamic_axes={"x": {0: "batch"}, "probs": {0: "batch"}})


def test_plain_onnx_export_with_softmax_is_detected(seeded_run, tmp_path):
    path = tmp_path / "stolen.onnx"
    _plain_export(seeded_run.marked, path)
    report = extract(path, seeded_run.keys, code=0)
    r = hidden(report)
    assert r["candidates"] >= 1
    assert r["bit_errors"] == 0 and r["message"] == MESSAGE
    # the best of several tensors is corrected for the number of tries (Bonferroni)
    assert r["p_value"] == pytest.approx(min(1.0, 0.5 ** r["n_bits"] * r["candidates"]))
    assert report["detected"] is True


# ----------------------------------------------------------------------------- integrity


def test_unmarked_baseline_is_not_detected(seeded_run):
    report = extract(seeded_run.base, seeded_run.keys, code=1)
    r = hidden(report)
    assert report["detected"] is False and r["detected"] is False
    assert r["p_value"] > ALPHA
    assert r["bit_errors"] > r["max_bit_errors"]


def test_a_message_read_with_errors_says_so(seeded_run):
    """The unmarked baseline's reading decodes to noise: the report gives the message as read,
    and how many of its bits differ from the keys' (a garbled string alone would not say)."""
    r = hidden(extract(seeded_run.base, seeded_run.keys, code=1))
    assert r["message"] != MESSAGE and 0 < r["message_errors"] <= 8 * len(MESSAGE)
    table = run_cli("extract", "--model", seeded_run.base, "--keys", seeded_run.keys, code=1).output
    assert f"(read with {r['message_errors']} of its bits wrong)" in table
    marked = run_cli("extract", "--model", seeded_run.marked, "--keys", seeded_run.keys, code=0).output
    assert f"hidden message: {MESSAGE!r}\n" in marked  # (read right: nothing added)


def test_plain_onnx_export_of_the_baseline_is_not_detected(seeded_run, tmp_path):
    """Searching every tensor of the carrier's width must not turn into a false claim."""
    path = tmp_path / "other.onnx"
    _plain_export(seeded_run.base, path)
    r = hidden(extract(path, seeded_run.keys, code=1))
    assert r["candidates"] >= 1 and r["detected"] is False


def test_another_owners_marked_model_is_not_claimed(seeded_run, marked_runs):
    """Same architecture, same data, marked with other keys: not ours."""
    other = marked_runs(SEEDS[(SEEDS.index(seeded_run.seed) + 1) % len(SEEDS)])
    report = extract(other.marked, seeded_run.keys, code=1)
    assert report["detected"] is False


def test_cnn_onnx_with_mlp_keys_is_not_detected(marked, cnn):
    _, cnn_onnx = cnn
    report = extract(cnn_onnx, marked.keys, code=1)
    r = hidden(report)
    assert report["detected"] is False and r["detected"] is False
    assert r["candidates"] == 0  # no tensor of the carrier's width in a CNN
    assert r["readings"] == 8 and r["tensor"].startswith("every unit")  # its units, lined up with ours (at
    # two temperatures, over their scales and over their offsets; from a batch and one input at a time): chance
    assert r["bit_errors"] > r["max_bit_errors"] + 20 and r["p_value"] > 1e-3


def test_cnn_checkpoint_with_mlp_keys_is_not_claimed(marked, cnn):
    """Another architecture: never claimed, and a clean message rather than a crash."""
    cnn_ckpt, _ = cnn
    result = run_cli("extract", "--model", cnn_ckpt, "--keys", marked.keys, code=None)
    assert result.exit_code in (1, 2), result.stderr
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert_one_error_line(result.stderr, result.stdout, "architecture")


def test_cnn_checkpoint_with_mlp_keys_exits_not_detected(marked, cnn):
    cnn_ckpt, _ = cnn
    report = extract(cnn_ckpt, marked.keys, code=1)
    assert hidden(report)["detected"] is False


# ----------------------------------------------------------------------------- fidelity


def test_embedding_costs_at_most_two_points_of_accuracy(seeded_run):
    base, marked = accuracy(seeded_run.base), accuracy(seeded_run.marked)
    assert base >= 90.0  # a real baseline, not a broken one
    assert marked >= base - 2.0, f"accuracy {base:.2f}% -> {marked:.2f}%"
    # the embed report says the same as an independent measurement
    assert seeded_run.embed_report["accuracy_before"] == pytest.approx(base)
    assert seeded_run.embed_report["accuracy_after"] == pytest.approx(marked)


# ----------------------------------------------------------------------------- reports


def test_json_report_has_the_documented_keys(marked):
    report = extract(marked.marked, marked.keys, code=0)
    assert {"detected", "p_value", "alpha", "results"} <= set(report)
    assert isinstance(report["detected"], bool) and report["alpha"] == ALPHA
    for r in report["results"]:
        assert {"scheme", "detected", "p_value", "bits", "bit_errors", "ber"} <= set(r)
        assert r["scheme"] == "hidden"
        assert set(r["bits"]) <= {"0", "1"} and len(r["bits"]) == r["n_bits"]
        assert r["ber"] == pytest.approx(r["bit_errors"] / r["n_bits"])
        assert 0.0 <= r["p_value"] <= 1.0


def test_human_report_goes_to_stdout_and_says_detected(marked):
    result = run_cli("extract", "--model", marked.marked, "--keys", marked.keys, code=0)
    assert "DETECTED" in result.stdout and "NOT DETECTED" not in result.stdout
    assert MESSAGE in result.stdout
    assert result.stderr == ""


def test_alpha_smaller_than_the_signature_can_reach(marked):
    """3 x 72 bits cannot give p <= 1e-80: not detected, and the report says why."""
    report = extract(marked.marked, marked.keys, "--alpha", "1e-80", code=1)
    r = hidden(report)
    assert r["bit_errors"] == 0 and r["detected"] is False
    assert "more --bits" in r["warning"]


def test_too_few_bits_for_alpha_is_reported(marked, tmp_path):
    keys = tmp_path / "short.dskey"
    run_json("keygen", "--model", marked.base, "--bits", 8, "--seed", 0, "--out", keys)
    r = hidden(extract(marked.base, keys, code=1))
    assert r["n_bits"] == 8 * CLASSES and r["max_bit_errors"] == -1  # 2^-24 > 1e-9: no match is enough
    assert "cannot reach alpha" in r["warning"]
    # a warning goes to stderr, and --quiet silences it (it had been printed in the report's table)
    table = run_cli("extract", "--model", marked.base, "--keys", keys, code=1)
    assert "cannot reach alpha" not in table.stdout and "NOT DETECTED" in table.stdout
    assert "warning: hidden: " in table.stderr and "cannot reach alpha" in table.stderr
    assert run_cli("extract", "--model", marked.base, "--keys", keys, "--quiet", code=1).stderr == ""
    # and when several suspects are read: once (it is the keys'), not dropped
    scan = run_cli("extract", "--model", marked.base, "--model", marked.marked, "--keys", keys, code=None)
    assert scan.stderr.count("cannot reach alpha") == 1, scan.stderr
    # embed says so too: every bit reads back, and still no model can be claimed (it had
    # reported the mark as embedded, with no word of the p-value, which keygen had warned of)
    embed = run_cli("embed", "--model", marked.base, "--keys", keys, "--out", tmp_path / "short.safetensors",
                    "--seed", 0, "--device", "cpu", "--json")
    read = json.loads(embed.stdout)["schemes"]["hidden"]
    assert read["took"] and not read["detected"] and read["read_back_p"] > ALPHA, read
    assert "reads back in full" in embed.stderr and "no model can be claimed" in embed.stderr, embed.stderr


# ----------------------------------------------------------------------------- the rows of a step


def _objective(path, keys_path, data, **params):
    from deepsigns_cli.bundle import open_bundle
    from deepsigns_cli.checkpoint import load_checkpoint
    from deepsigns_cli.registry import load_scheme

    scheme = load_scheme("hidden")
    model, info = load_checkpoint(path)
    keys = scheme.check(open_bundle(keys_path, PASSPHRASE).schemes["hidden"])
    if params:
        keys = type(keys)("hidden", {**keys.params, **params}, keys.arrays)
    return model, keys, scheme.objective(model, info, data, keys)


@pytest.mark.parametrize("arrays", ["numpy", "torch"])
@pytest.mark.parametrize("lined", [True, False], ids=["both-readings", "older-keys-one-reading"])
def test_the_steps_term_gives_the_gradient_of_its_value(marked, digits, lined, arrays, monkeypatch):
    """The embedding's term writes its gradients out (no autograd graph): along random directions
    they match central finite differences of its value, in float64, with a target class absent
    from the step, rows pinned, bits on both sides of their margin, and a non-trivial line-up.
    In numpy (the CPU's) and in torch (every other device's, here on the CPU)."""
    import numpy as np

    from deepsigns_cli.schemes import hidden_objective
    from deepsigns_cli.schemes.hidden_objective import written_out

    if arrays == "torch":
        monkeypatch.setattr(hidden_objective, "HOST_DEVICES", set())
    _, keys, objective = _objective(marked.base, marked.keys, digits)
    if not lined:
        objective.arrays = None  # keys made before the line-up: the units as they are only
    state = objective.state.double()
    gen = torch.Generator().manual_seed(0)
    width, classes = keys.params["width"], keys.arrays["classes"].tolist()
    with torch.no_grad():
        state.set_line_up(torch.softmax(torch.randn(width, width, generator=gen, dtype=torch.float64) * 3, 1),
                      torch.empty(width, dtype=torch.float64).uniform_(0.5, 1.5, generator=gen))  # scales other than 1
    others = [c for c in range(10) if c not in classes]
    y = torch.tensor([classes[0]] * 4 + [classes[1]] * 3 + others * 2)  # classes[2] is absent
    pin = (np.array([7, 9, 12]), torch.rand(5, width, generator=gen, dtype=torch.float64), np.array([4, 0, 2]))
    act = torch.rand(len(y), width, generator=gen, dtype=torch.float64).requires_grad_()
    centres = (state.centres.detach() + 0.1 * torch.randn(state.centres.shape, generator=gen,
                                                          dtype=torch.float64)).requires_grad_()

    def term(a, c):
        return written_out(lambda a_, c_: objective._terms(a_, c_, y, slice(0, len(y)), pin, 0.7), a, c)

    value = term(act, centres)
    g_act, g_centres = torch.autograd.grad(value, (act, centres))
    if arrays == "torch":  # the same value and gradients as numpy's
        monkeypatch.setattr(hidden_objective, "HOST_DEVICES", {"cpu"})
        in_numpy = term(act, centres)
        assert in_numpy.item() == pytest.approx(value.item(), rel=1e-12)
        for ours, theirs in zip(torch.autograd.grad(in_numpy, (act, centres)), (g_act, g_centres), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
        monkeypatch.setattr(hidden_objective, "HOST_DEVICES", set())
    assert g_act[len(y) - 1].abs().sum() > 0 and g_centres[classes[2]].abs().sum() > 0  # pull and push
    for _ in range(6):
        d_act = torch.randn(act.shape, generator=gen, dtype=torch.float64)
        d_centres = torch.randn(centres.shape, generator=gen, dtype=torch.float64)
        h = 1e-6
        with torch.no_grad():
            numeric = (term(act + h * d_act, centres + h * d_centres)
                       - term(act - h * d_act, centres - h * d_centres)) / (2 * h)
        analytic = (g_act * d_act).sum() + (g_centres * d_centres).sum()
        assert float(numeric) == pytest.approx(float(analytic), rel=1e-5, abs=1e-9)


def test_new_keys_add_no_rows_to_a_step_and_older_keys_still_embed(marked, digits, tmp_path):
    """Keys made now teach the bits on the batch's own rows and add none to a step; keys made
    before own_rows mix in trigger and probe rows, and still embed."""
    import numpy as np

    from deepsigns_cli import api
    from deepsigns_cli.bundle import open_bundle, write_bundle

    _, keys, objective = _objective(marked.base, marked.keys, digits)
    assert keys.params["own_rows"] is True and objective.extra_batch(np.random.default_rng(0)) is None
    bundle = open_bundle(marked.keys, PASSPHRASE)
    older = {k: v for k, v in keys.params.items() if k != "own_rows"}
    arrays = {k: v for k, v in keys.arrays.items() if not k.endswith("_rows")}
    bundle.put(type(keys)("hidden", older, arrays))
    old_keys = tmp_path / "older.dskey"
    write_bundle(bundle, old_keys, PASSPHRASE)
    _, _, objective = _objective(marked.base, old_keys, digits)
    rows, _ = objective.extra_batch(np.random.default_rng(0))
    assert len(rows) == DEFAULTS["trigger_batch"] + DEFAULTS["pin_batch"] and objective.watch is None
    report = api.embed(marked.base, old_keys, PASSPHRASE, tmp_path / "m.safetensors", seed=0, device="cpu")
    assert report.schemes["hidden"]["took"] and report.schemes["hidden"]["read_back"].startswith("0/")


def test_an_epoch_reads_the_probes_and_trigger_samples_as_it_passes_them(marked, digits, monkeypatch):
    """With the model held still (lr 0), what the epoch saw of the probes and the trigger
    samples is what a pass of their own gives, and the epoch made no such pass."""
    import numpy as np

    from deepsigns_cli.schemes import hidden_objective as scheme
    from deepsigns_cli.training import TrainConfig, fit
    from deepsigns_cli.zoo import activations

    model, keys, objective = _objective(marked.base, marked.keys, digits)
    assert objective.watch is not None
    seen, passes = [], []
    collect = objective.watch.collect
    monkeypatch.setattr(objective.watch, "collect", lambda: seen.append(collect()) or seen[-1])
    monkeypatch.setattr(scheme, "activations", lambda *a: passes.append(1) or activations(*a))
    fit(model, digits.x_train, digits.y_train, TrainConfig(epochs=2, lr=0.0, seed=0, device="cpu"), [objective])
    assert len(passes) == 1  # the one before the first step (the line-up to start from)
    check = np.concatenate([keys.arrays["probe_x"], keys.arrays["trigger_x"]])
    expected = activations(model, keys.params["layer"], check).numpy()
    assert len(seen) == 2 and all(np.allclose(s, expected, atol=1e-5) for s in seen)


def test_data_other_than_the_keys_are_read_by_a_pass_of_their_own(marked, digits):
    """Training rows in another order than keygen saw: the keys' row numbers no longer point
    at the probes, so the end of an epoch reads them itself (and the embedding still takes)."""
    import dataclasses

    import numpy as np

    from deepsigns_cli.training import TrainConfig, fit

    order = np.random.default_rng(0).permutation(len(digits.y_train))
    shuffled = dataclasses.replace(digits, x_train=digits.x_train[order], y_train=digits.y_train[order])
    model, keys, objective = _objective(marked.base, marked.keys, shuffled)
    assert objective.watch is None
    objective.stop_when_read = True
    history = fit(model, shuffled.x_train, shuffled.y_train, TrainConfig(epochs=40, lr=1e-3, seed=0, device="cpu"),
                  [objective])
    assert history["epochs"] < 40  # it stopped because every bit read back


def test_keys_with_half_of_their_row_numbers_are_refused_with_one_line(marked, tmp_path):
    """A bundle that knows where its probes are but not its trigger samples is damaged: exit 2."""
    from deepsigns_cli.bundle import open_bundle, write_bundle

    bundle = open_bundle(marked.keys, PASSPHRASE)
    keys = bundle.schemes["hidden"]
    bundle.put(type(keys)("hidden", keys.params, {k: v for k, v in keys.arrays.items() if k != "trigger_rows"}))
    damaged = tmp_path / "half.dskey"
    write_bundle(bundle, damaged, PASSPHRASE)
    result = run_cli("extract", "--model", marked.marked, "--keys", damaged, code=2)
    assert_one_error_line(result.stderr, result.stdout, "damaged")


def test_keys_whose_bits_are_not_bits_are_refused_with_one_line(marked, tmp_path):
    """A signature bit of 2 in a sealed bundle read as a bit that never matches (p-values off)."""
    from deepsigns_cli.bundle import open_bundle, write_bundle

    bundle = open_bundle(marked.keys, PASSPHRASE)
    keys = bundle.schemes["hidden"]
    bits = keys.arrays["bits"].copy()
    bits[0, 0] = 2
    bundle.put(type(keys)("hidden", keys.params, {**keys.arrays, "bits": bits}))
    damaged = tmp_path / "two.dskey"
    write_bundle(bundle, damaged, PASSPHRASE)
    result = run_cli("extract", "--model", marked.marked, "--keys", damaged, code=2)
    assert_one_error_line(result.stderr, result.stdout, "hidden keys are damaged")


def test_an_empty_layer_name_is_refused(marked, tmp_path):
    result = run_cli("keygen", "--model", marked.base, "--scheme", "hidden", "--layer", "", "--out",
                     tmp_path / "k.dskey", code=2)
    assert_one_error_line(result.stderr, result.stdout, "--layer is empty")


def test_bf16_autocast_on_the_cpu_embeds_the_mark(marked, tmp_path):
    """--precision bf16 autocasts the forward pass on the CPU too: the hidden term is computed in
    fp32 from bf16 activations, its gradients go back in bf16, and the mark reads back exactly."""
    keys, out = tmp_path / "owner.dskey", tmp_path / "bf16.safetensors"
    run_json("keygen", "--model", marked.base, "--data", "digits", "--scheme", "hidden", "--bits", 32,
             "--seed", 3, "--out", keys)
    report = run_json("embed", "--model", marked.base, "--data", "digits", "--keys", keys, "--out", out,
                      "--precision", "bf16", "--seed", 3, "--device", "cpu")
    assert report["schemes"]["hidden"]["read_back"].startswith("0/")
    assert report["accuracy_after"] >= report["accuracy_before"] - 1.0
    decision = run_json("extract", "--model", out, "--keys", keys)
    assert decision["detected"] is True and decision["results"][0]["bit_errors"] == 0


def test_every_unit_read_a_block_at_a_time_reads_as_the_units_side_by_side(monkeypatch):
    """The reading of every unit lines the units up a block at a time (memory stays a block's,
    however wide the sets of units): the same projections as the units side by side, each also
    negated, lined up at once. Units that are off (in the suspect or in ours) included."""
    import numpy as np

    from deepsigns_cli.schemes import hidden as scheme

    rng = np.random.default_rng(0)
    width, units, classes, n_bits = 24, 300, np.array([1, 3]), 16
    ty = np.repeat(classes, 20)
    arrays = {"trigger_y": ty, "classes": classes, "probe_y": rng.integers(0, 5, 60),
              "probe_ref": rng.normal(size=(60, width)).astype(np.float32),
              "bits": rng.integers(0, 2, (2, n_bits)), "A": rng.normal(size=(width, 2 * n_bits)).astype(np.float32)}
    arrays["probe_ref"][:, 5] = 1.0  # one of our units off
    acts = (rng.normal(size=(len(ty) + 60, units)) * rng.uniform(0.1, 3, units)).astype(np.float32)
    acts[:, [7, 250]] = 0.5  # two of theirs
    both = np.concatenate([acts, -acts], axis=1)
    temperatures = (scheme.ALIGN_TEMPERATURE, scheme.SHARP_TEMPERATURE)
    want = []
    for shifted in (False, True):  # (over the units' scales, then over their offsets too)
        for t in temperatures:
            monkeypatch.setattr(scheme, "ALIGN_TEMPERATURE", t)
            want.append(scheme.projections(both[: len(ty)], both[len(ty):], arrays, shifted=shifted))
    monkeypatch.setattr(scheme, "UNIT_BLOCK", 64)
    got = scheme.every_unit_projections([acts[:, :100], acts[:, 100:]], len(ty), arrays, temperatures)
    assert len(got) == 4
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())
    off = scheme.every_unit_projections([np.zeros_like(acts)], len(ty), arrays)  # nothing to line up
    assert len(off) == 2 and all((o == 0).all() for o in off)
