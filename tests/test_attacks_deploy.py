"""The deployment wrappers (round-scores, noise-scores, noise-inputs, label-only): the victim's
ONNX graph behind a few nodes. Each writes a checked ONNX file that our reader reads, keeps the
victim's accuracy, and leaves the output-scheme watermark detectable where labels survive."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import assert_bad_input, run_cli, run_json
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from deepsigns_cli import api
from deepsigns_cli.registry import ATTACKS, load_attack
from deepsigns_cli.runtime import output_kind

WRAPPERS = ("round-scores", "noise-scores", "noise-inputs", "label-only")
OPTIONS = {"round-scores": ("--decimals", 2), "noise-scores": (), "noise-inputs": ("--sigma", 0.1),
           "label-only": ()}
# accuracy points the wrapped model may lose or gain, and the params its report gives
TOLERANCE = {"round-scores": 2.0, "noise-scores": 2.0, "noise-inputs": 10.0, "label-only": 0.0}
PARAMS = {"round-scores": {"decimals": 2}, "noise-scores": {"sigma": 0.01}, "noise-inputs": {"sigma": 0.1},
          "label-only": {}}
# the one output each writes: (name, kind as the reader sees it); None: the victim's own
OUTPUT = {"round-scores": ("probabilities", "scores"), "noise-scores": ("probabilities", "scores"),
          "noise-inputs": None, "label-only": ("label", "labels")}


def attack(name: str, model: Path, out: Path, *options, code: int = 0) -> dict:
    return run_json("attack", name, "--model", model, "--data", "digits", *options, "--out", out, code=code)


def answer(path: Path, x: np.ndarray) -> np.ndarray:
    """The first output of an ONNX file for inputs x (our own files: run here directly)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = x.reshape(len(x), *[d if isinstance(d, int) else -1 for d in session.get_inputs()[0].shape[1:]])
    return session.run(None, {session.get_inputs()[0].name: feed.astype(np.float32)})[0]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def wrapped(blackbox, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """Each wrapper once over the owner's marked ONNX model: name -> (file, report)."""
    folder = tmp_path_factory.mktemp("wrapped")
    return {name: (folder / f"{name}.onnx", attack(name, blackbox["onnx"], folder / f"{name}.onnx",
                                                    *OPTIONS[name]))
            for name in WRAPPERS}


@pytest.fixture(scope="module")
def x_test(digits) -> np.ndarray:
    return digits.x_test.astype(np.float32)


@pytest.fixture(scope="module")
def victim_logits(blackbox, x_test) -> np.ndarray:
    return answer(blackbox["onnx"], x_test)


def test_one_module_serves_the_four_rows():
    for name in WRAPPERS:
        assert ATTACKS[name].module == "deepsigns_cli.attacks.wrappers"
        assert load_attack(name).name == name


@pytest.mark.parametrize("name", WRAPPERS)
def test_each_wrapper_writes_a_checked_model_that_keeps_the_accuracy(blackbox, wrapped, name):
    path, report = wrapped[name]
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    victim = onnx.load(str(blackbox["onnx"]))
    opset = {o.domain: o.version for o in victim.opset_import}[""]
    assert {o.domain: o.version for o in model.opset_import}[""] == opset >= 13
    assert [i.name for i in model.graph.input] == [i.name for i in victim.graph.input]
    outputs = [(o.name, output_kind(o)[0]) for o in model.graph.output]
    want = OUTPUT[name] or (victim.graph.output[0].name, "scores")
    assert outputs == [want]
    assert report["params"] == {**PARAMS[name], "wrapped_output": victim.graph.output[0].name}
    assert abs(report["accuracy_after"] - report["accuracy_before"]) <= TOLERANCE[name]
    assert report["accuracy_before"] > 80


def test_round_scores_answers_the_victims_probabilities_rounded(wrapped, victim_logits, x_test):
    got = answer(wrapped["round-scores"][0], x_test)
    assert got.shape == victim_logits.shape and got.dtype == np.float32
    np.testing.assert_allclose(got * 100, np.round(got * 100), atol=1e-4)  # multiples of 0.01
    # the probabilities the victim gives, rounded (a value on a .005 edge may round either way)
    np.testing.assert_allclose(got, np.round(softmax(victim_logits.astype(np.float64)), 2), atol=0.0101)
    assert len(np.unique(got)) > 10  # not all 0 and 1: two decimals kept


def test_round_scores_keeps_the_decimals_asked(blackbox, tmp_path, x_test):
    out = tmp_path / "one.onnx"
    report = attack("round-scores", blackbox["onnx"], out, "--decimals", 1)
    got = answer(out, x_test)
    np.testing.assert_allclose(got * 10, np.round(got * 10), atol=1e-5)
    assert report["params"]["decimals"] == 1 and len(np.unique(got)) <= 11


def test_label_only_answers_the_victims_top_label(wrapped, victim_logits, x_test):
    got = answer(wrapped["label-only"][0], x_test)
    assert got.dtype == np.int64 and got.shape == (len(x_test),)
    np.testing.assert_array_equal(got, victim_logits.argmax(1))


def test_noise_scores_adds_noise_of_the_spread_asked(wrapped, victim_logits, x_test):
    path = wrapped["noise-scores"][0]
    noise = answer(path, x_test) - softmax(victim_logits.astype(np.float64))
    assert 0.008 < noise.std() < 0.012 and abs(noise.mean()) < 0.002
    # fresh noise on every call (a deployed model), the same sequence for every session (seeded)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    first, second = (session.run(None, {"input": x_test})[0] for _ in range(2))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, answer(path, x_test))


def test_noise_inputs_is_relative_to_the_inputs_spread(blackbox, wrapped, tmp_path, victim_logits, x_test):
    noisy = answer(wrapped["noise-inputs"][0], x_test)
    assert not np.allclose(noisy, victim_logits, atol=1e-3)
    silent = tmp_path / "silent.onnx"
    attack("noise-inputs", blackbox["onnx"], silent, "--sigma", 0)
    np.testing.assert_allclose(answer(silent, x_test), victim_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [None, "label-only", "round-scores"], ids=["victim", "label-only", "round-scores"])
def test_the_output_watermark_is_still_detected(blackbox, wrapped, name):
    model = blackbox["onnx"] if name is None else wrapped[name][0]
    result = run_json("verify", "--model", model, "--keys", blackbox["keys"], code=0)
    (row,) = result["results"]
    assert row["matches"] >= 18, row


def test_a_checkpoint_victim_is_exported_first(blackbox, wrapped, tmp_path, x_test):
    for name in ("label-only", "round-scores"):
        out = tmp_path / f"{name}.onnx"
        report = attack(name, blackbox["marked_path"], out, *OPTIONS[name])
        from_onnx = wrapped[name][1]
        assert report["accuracy_after"] == pytest.approx(from_onnx["accuracy_after"], abs=0.3)
        assert report["accuracy_before"] == pytest.approx(from_onnx["accuracy_before"], abs=0.3)
        got, want = answer(out, x_test), answer(wrapped[name][0], x_test)
        assert (got == want).mean() >= 0.99, name


@pytest.mark.parametrize("name", WRAPPERS)
def test_a_checkpoint_out_is_refused(blackbox, tmp_path, name):
    out = tmp_path / "wrapped.safetensors"
    result = run_cli("attack", name, "--model", blackbox["onnx"], "--data", "digits", "--out", out, code=None)
    assert_bad_input(result, ".onnx")
    assert not out.exists()


def test_a_timeout_names_the_model_as_the_user_knows_it(blackbox, tmp_path):
    """An attacked model that did not answer within --timeout was named by its temporary file,
    beside --out or in a sweep's scratch folder, gone by the time the line was read."""
    out = tmp_path / "rounded.onnx"
    result = run_cli("attack", "round-scores", "--model", blackbox["marked_path"], "--data", "digits", "--out", out,
                     "--timeout", 0.001, code=None)
    line = assert_bad_input(result, f"the attacked model ({out}) did not answer within 0.001 s", "--timeout")
    assert ".part" not in line and list(tmp_path.iterdir()) == []
    result = run_cli("attack", "round-scores", "--model", blackbox["marked_path"], "--data", "digits", "--sweep",
                     "decimals=2", "--keys", blackbox["keys"], "--timeout", 0.001, code=None)
    line = assert_bad_input(result, "did not answer within 0.001 s")
    assert "deepsigns-sweep-" not in line and ".part" not in line, line  # (the victim, or the strength's model)
    assert str(blackbox["marked_path"]) in line or "the model of round-scores decimals=2" in line, line


# ----------------------------------------------------------------------------- other victims


@pytest.fixture(scope="module")
def sklearn_model(digits):
    pytest.importorskip("skl2onnx")
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    x = digits.x_train.reshape(len(digits.x_train), -1).astype(np.float32)
    # one BLAS thread: on a small shared box, threads fighting make this 0.1 s fit take seconds
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(max_iter=100).fit(x, digits.y_train)


@pytest.mark.parametrize("zipmap", [True, False], ids=["zipmap", "no-zipmap"])
def test_a_scikit_learn_model_is_wrapped(sklearn_model, tmp_path, x_test, zipmap):
    from skl2onnx import to_onnx

    x = x_test.reshape(len(x_test), -1)
    options = None if zipmap else {id(sklearn_model): {"zipmap": False}}
    victim = tmp_path / "skl.onnx"
    onnx.save(to_onnx(sklearn_model, x[:1], options=options, target_opset={"": 17, "ai.onnx.ml": 3}), str(victim))

    labels = tmp_path / "labels.onnx"
    report = attack("label-only", victim, labels)
    assert report["accuracy_after"] == report["accuracy_before"]
    np.testing.assert_array_equal(answer(labels, x), sklearn_model.predict(x))

    rounded = tmp_path / "rounded.onnx"
    report = attack("round-scores", victim, rounded)
    assert report["params"]["wrapped_output"] == ("output_probability" if zipmap else "probabilities")
    assert abs(report["accuracy_after"] - report["accuracy_before"]) <= 2
    # probabilities already: rounded as they are, not put through a softmax again
    want = np.round(sklearn_model.predict_proba(x), 2)
    np.testing.assert_allclose(answer(rounded, x), want, atol=0.0101)
    for path in (labels, rounded):
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def linear_victim(path: Path, *, opset: int = 17, input_name: str = "label", output_name: str = "probabilities",
                  weights_name: str = "wrap/1") -> tuple[Path, np.ndarray]:
    """A hand-made linear classifier whose names are the ones the wrappers use themselves."""
    w = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
    graph = h.make_graph(
        [h.make_node("Flatten", [input_name], ["victim/flat"], axis=1),
         h.make_node("MatMul", ["victim/flat", weights_name], [output_name])],
        "hostile", [h.make_tensor_value_info(input_name, T.FLOAT, ["n", 1, 8, 8])],
        [h.make_tensor_value_info(output_name, T.FLOAT, ["n", 10])], [nh.from_array(w, weights_name)])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path, w


@pytest.mark.parametrize("name", WRAPPERS)
def test_a_victims_names_cannot_collide_with_ours(tmp_path, x_test, name):
    victim, w = linear_victim(tmp_path / "victim.onnx")
    out = tmp_path / "out.onnx"
    report = api.attack(name, victim, out, options={"sigma": 0.0} if name == "noise-inputs" else None)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    logits = x_test.reshape(len(x_test), -1) @ w
    got = answer(out, x_test)
    if name == "label-only":
        np.testing.assert_array_equal(got, logits.argmax(1))
    elif name == "noise-inputs":
        np.testing.assert_allclose(got, logits, rtol=1e-4, atol=1e-4)
    else:
        assert np.abs(got - softmax(logits.astype(np.float64))).max() < 0.06
    assert abs(report.accuracy_after - report.accuracy_before) <= TOLERANCE[name]


@pytest.mark.parametrize("name", ["noise-scores", "noise-inputs"])
def test_no_noise_asked_is_no_noise(tmp_path, x_test, name):
    """sigma 0 adds no noise node (onnxruntime aborts on RandomNormalLike with scale 0)."""
    victim, w = linear_victim(tmp_path / "victim.onnx")
    out = tmp_path / "out.onnx"
    api.attack(name, victim, out, options={"sigma": 0.0})
    assert "RandomNormalLike" not in {n.op_type for n in onnx.load(str(out)).graph.node}
    logits = (x_test.reshape(len(x_test), -1) @ w).astype(np.float64)
    want = logits if name == "noise-inputs" else softmax(logits)
    np.testing.assert_allclose(answer(out, x_test), want, rtol=1e-4, atol=1e-5)


def test_an_old_opset_is_refused_with_the_fix(tmp_path):
    victim, _ = linear_victim(tmp_path / "old.onnx", opset=12, input_name="x", output_name="y", weights_name="w")
    result = run_cli("attack", "label-only", "--model", victim, "--data", "digits",
                     "--out", tmp_path / "out.onnx", code=None)
    assert_bad_input(result, "opset 13", "re-export")
    assert not (tmp_path / "out.onnx").exists()


def _decoy_first(blackbox, path: Path) -> Path:
    """The marked export with a decoy of scores (the logits negated) as its first output."""
    model = onnx.load(str(blackbox["onnx"]))
    real = model.graph.output[0]
    model.graph.node.append(h.make_node("Neg", [real.name], ["decoy"]))
    model.graph.output.insert(0, h.make_tensor_value_info("decoy", T.FLOAT, ["n", 10]))
    onnx.save(model, str(path))
    return path


def test_output_names_the_victims_output_to_attack(blackbox, tmp_path):
    """A decoy of scores listed first: the wrapper wrapped it and the accuracy was read on it
    (0% before and after), and --output was refused without --sweep; a sweep given --output
    failed where the wrapper's answer has a name of its own (helper-55 A02). --output now names
    the output the attack wraps and reads the accuracy of, and a sweep reads each attacked
    model's own answer where it does not keep that output."""
    victim = _decoy_first(blackbox, tmp_path / "decoy-first.onnx")
    real = onnx.load(str(blackbox["onnx"])).graph.output[0].name
    report = attack("round-scores", victim, tmp_path / "out.onnx", "--output", real)
    assert report["params"]["wrapped_output"] == real
    assert report["accuracy_before"] > 90 and abs(report["accuracy_after"] - report["accuracy_before"]) <= 2
    sweep = run_json("attack", "round-scores", "--model", victim, "--data", "digits", "--sweep", "decimals=1,2",
                     "--keys", blackbox["keys"], "--output", real)
    assert len(sweep["rows"]) == 3 and all(row["accuracy"] > 90 for row in sweep["rows"]), sweep["rows"]
    assert all(row["verify"]["detected"] for row in sweep["rows"]), sweep["rows"]
    assert_bad_input(run_cli("attack", "round-scores", "--model", blackbox["marked_path"], "--data", "digits",
                             "--output", real, "--out", tmp_path / "c.onnx", code=2), "--output", "checkpoint")
    assert_bad_input(run_cli("attack", "round-scores", "--model", victim, "--data", "digits",
                             "--output", "nowhere", "--out", tmp_path / "n.onnx", code=2), "nowhere", "does not exist")


@pytest.mark.parametrize("name", ["round-scores", "noise-scores", "label-only"])
def test_an_output_of_integers_is_not_changed_as_scores(blackbox, tmp_path, name):
    """A top-k's indices (int64): the wrappers took them for scores, softmaxed class numbers and
    answered positions as classes, and a sweep showed the mark removed at no cost (helper-55
    A03). An output of integers may be scores or classes ranked: refused, with one line."""
    model = onnx.load(str(blackbox["onnx"]))
    real = model.graph.output[0].name
    model.graph.initializer.append(nh.from_array(np.array([3], np.int64), "k"))
    model.graph.node.append(h.make_node("TopK", [real, "k"], ["topv", "topi"], axis=1))
    del model.graph.output[:]
    model.graph.output.append(h.make_tensor_value_info("topi", T.INT64, ["n", 3]))
    victim = tmp_path / "topk.onnx"
    onnx.save(model, str(victim))
    result = run_cli("attack", name, "--model", victim, "--data", "digits", "--out", tmp_path / "out.onnx", code=2)
    assert_bad_input(result, "holds integers", "top-k", "--output")
    assert not (tmp_path / "out.onnx").exists()


def test_a_graph_of_ai_onnx_ml_operators_alone_is_read(tmp_path, digits, x_test):
    """skl2onnx writes some classifiers as ai.onnx.ml operators only, with no default-domain
    opset: read as "opset 0, which onnxruntime cannot run" (helper-55 A06)."""
    rng = np.random.default_rng(0)
    coefficients = rng.normal(size=(10, 64)).astype(np.float32)
    node = h.make_node("LinearClassifier", ["X"], ["label", "scores"], domain="ai.onnx.ml",
                       coefficients=coefficients.ravel().tolist(), intercepts=[0.0] * 10,
                       classlabels_ints=list(range(10)))
    graph = h.make_graph([node], "ml-only", [h.make_tensor_value_info("X", T.FLOAT, ["n", 64])],
                         [h.make_tensor_value_info("label", T.INT64, ["n"]),
                          h.make_tensor_value_info("scores", T.FLOAT, ["n", 10])])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 8
    victim = tmp_path / "ml-only.onnx"
    onnx.save(model, str(victim))
    report = attack("label-only", victim, tmp_path / "out.onnx")
    want = (x_test.reshape(len(x_test), -1) @ coefficients.T).argmax(1)
    assert report["accuracy_before"] == pytest.approx(100 * float((want == digits.y_test).mean()), abs=0.01)
    assert report["accuracy_after"] == report["accuracy_before"]


def test_noise_relative_to_test_inputs_that_do_not_vary_is_refused(blackbox, digits, tmp_path):
    """A test split of one constant input: noise of 10 times its spread was no noise, and the
    report said sigma 10 (helper-55 A11)."""
    data = tmp_path / "flat.npz"
    np.savez(data, x_train=digits.x_train.astype(np.float32), y_train=digits.y_train,
             x_test=np.zeros_like(digits.x_test, dtype=np.float32), y_test=digits.y_test)
    result = run_cli("attack", "noise-inputs", "--model", blackbox["onnx"], "--data", data, "--sigma", 10,
                     "--out", tmp_path / "out.onnx", code=2)
    assert_bad_input(result, "do not vary", "--data")
    assert not (tmp_path / "out.onnx").exists()
