"""Which output `verify` reads: scores, probabilities or labels, chosen by the declared type
and shape of each graph output (never its name), or named with --output.

A model that answers labels (an argmax head, a scikit-learn classifier) is read as labels,
not as a column of scores (whose argmax would always be class 0).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from helpers import PASSPHRASE, assert_bad_input, run_cli
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from deepsigns_cli import stats
from deepsigns_cli.bundle import open_bundle, write_bundle
from deepsigns_cli.checkpoint import load_checkpoint
from deepsigns_cli.errors import OnnxError
from deepsigns_cli.runtime import OnnxModel


@pytest.fixture(scope="module")
def owner(blackbox):
    return blackbox


def key_labels(owner) -> np.ndarray:
    return owner["bundle"].schemes["output"].arrays["y"]


def key_inputs(owner) -> np.ndarray:
    return owner["bundle"].schemes["output"].arrays["x"]


def verify(owner, model, *extra, code: int | None = None):
    result = run_cli("verify", "--model", model, "--keys", owner["keys"], *extra, "--json", code=None)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    if code is not None:
        assert result.exit_code == code, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
    return result


def verdict(owner, model, *extra, code: int) -> dict:
    result = verify(owner, model, *extra, code=code)
    assert result.stderr == "", result.stderr
    report = json.loads(result.stdout)
    (out,) = [r for r in report["results"] if r["scheme"] == "output"]
    return out


class Heads(torch.nn.Module):
    """The marked model with other heads: "labels" (argmax), "scores" (logits), in `order`."""

    def __init__(self, model, order):
        super().__init__()
        self.model, self.order = model, order

    def forward(self, x):
        logits = self.model(x)
        heads = {"labels": logits.argmax(1), "scores": logits, "decoy": x.flatten(1)[:, 10:20] * 3}
        out = tuple(heads[k] for k in self.order)
        return out[0] if len(out) == 1 else out


def export_heads(owner, path: Path, order, names) -> Path:
    model = Heads(owner["marked"].eval(), order).eval()
    example = torch.as_tensor(key_inputs(owner)[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=list(names),
                          dynamic_axes={n: {0: "batch"} for n in ["input", *names]}, opset_version=17,
                          dynamo=False)
    return path


@pytest.fixture(scope="module")
def argmax_onnx(owner, tmp_path_factory) -> Path:
    return export_heads(owner, tmp_path_factory.mktemp("argmax") / "argmax.onnx", ["labels"], ["label"])


@pytest.fixture(scope="module")
def two_heads(owner, tmp_path_factory) -> Path:
    return export_heads(owner, tmp_path_factory.mktemp("heads") / "heads.onnx", ["labels", "scores"],
                        ["label", "logits"])


# ----------------------------------------------------------------------------- (a) an argmax head


def test_argmax_head_is_read_as_labels(argmax_onnx):
    model = OnnxModel(argmax_onnx, provider="cpu")
    assert model.outputs["label"][0] == "labels"
    with pytest.raises(OnnxError, match="labels only"):
        model.scores(np.zeros((2, 1, 8, 8), np.float32))


def test_marked_model_with_argmax_head_is_detected(owner, argmax_onnx):
    out = verdict(owner, argmax_onnx, code=0)
    assert out["output"] == "label" and out["output_kind"] == "labels"
    assert out["matches"] == len(key_labels(owner))


def test_a_scheme_that_cannot_read_labels_leaves_the_verdict_to_the_others(owner, argmax_onnx, tmp_path):
    """A bundle of output and GradSigns keys on a model that answers labels only: GradSigns
    reads no gradient from labels, and the output keys still decide (the whole bundle had
    failed, exit 2). Alone, GradSigns keys get no verdict either way (exit 2)."""
    from deepsigns_cli import api

    alone, both = tmp_path / "gradsigns.dskey", tmp_path / "both.dskey"
    api.keygen(owner["dir"] / "base.safetensors", alone, PASSPHRASE, schemes=["gradsigns"], seed=1)
    bundle = open_bundle(owner["keys"], PASSPHRASE)
    bundle.put(open_bundle(alone, PASSPHRASE).schemes["gradsigns"])
    write_bundle(bundle, both, PASSPHRASE)
    result = run_cli("verify", "--model", argmax_onnx, "--keys", both, "--json", code=0)
    rows = {r["scheme"]: r for r in json.loads(result.stdout)["results"]}
    assert rows["output"]["detected"] and rows["output"]["matches"] == len(key_labels(owner))
    assert rows["gradsigns"]["unread"] and not rows["gradsigns"]["detected"] and rows["gradsigns"]["p_value"] == 1
    assert "labels only" in rows["gradsigns"]["note"]
    assert_bad_input(run_cli("verify", "--model", argmax_onnx, "--keys", alone, code=2), "could not be read",
                     "labels only")


def test_table_says_which_output_was_read(owner, argmax_onnx):
    result = run_cli("verify", "--model", argmax_onnx, "--keys", owner["keys"], code=0,
                     env={"COLUMNS": "200"})
    assert "labels from 'label'" in result.stdout, result.stdout


# ----------------------------------------------------------------------------- (b) (c) several outputs


def test_every_output_is_read_and_one_can_be_chosen(owner, two_heads):
    default = verdict(owner, two_heads, code=0)
    assert (default["output"], default["output_kind"]) == ("logits", "scores")
    chosen = verdict(owner, two_heads, "--output", "label", code=0)
    assert (chosen["output"], chosen["output_kind"], chosen["outputs"]) == ("label", "labels", 1)
    assert chosen["matches"] == default["matches"] == len(key_labels(owner))
    # (the labels are the scores' argmax: the two outputs answer alike, one reading)
    assert default["outputs"] == 1 and default["p_value"] == pytest.approx(chosen["p_value"])


def test_a_decoy_output_before_the_answer_hides_nothing(owner, tmp_path):
    """A thief adds an output of other scores before the model's own: verify had read the first
    one (12 of 100 keys) and exited 1. Every output is now read, the best kept, both counted."""
    decoy = export_heads(owner, tmp_path / "decoy.onnx", ["decoy", "scores"], ["aux", "logits"])
    out = verdict(owner, decoy, code=0)
    assert (out["output"], out["outputs"]) == ("logits", 2) and out["matches"] == len(key_labels(owner))
    alone = verdict(owner, decoy, "--output", "aux", code=1)
    assert alone["matches"] < len(key_labels(owner)) // 2


def test_unknown_output_lists_the_outputs(owner, two_heads):
    result = verify(owner, two_heads, "--output", "probs")
    assert_bad_input(result, "--output 'probs'", "'label' (labels)", "'logits' (scores)")


# ----------------------------------------------------------------------------- (d) a constant label


def constant_labels(path: Path, label: int, name: str = "y") -> Path:
    """x (n, 1, 8, 8) -> `label` for every input, int64 (n,): a labels-only model."""
    nodes = [h.make_node("Shape", ["x"], ["shape"]),
             h.make_node("Slice", ["shape", "zero", "one"], ["n"]),
             h.make_node("ConstantOfShape", ["n"], [name], value=nh.from_array(np.array([label], np.int64)))]
    inits = [nh.from_array(np.array([0], np.int64), "zero"), nh.from_array(np.array([1], np.int64), "one")]
    graph = h.make_graph(nodes, "constant", [h.make_tensor_value_info("x", T.FLOAT, ["n", 1, 8, 8])],
                         [h.make_tensor_value_info(name, T.INT64, ["n"])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("which", ["label 0", "the keys' most common label"])
def test_constant_label_model_is_not_claimed(owner, tmp_path, which):
    y = key_labels(owner)
    label = 0 if which == "label 0" else Counter(y.tolist()).most_common(1)[0][0]
    out = verdict(owner, constant_labels(tmp_path / "constant.onnx", label), code=1)
    hits = int((y == label).sum())
    assert out["output_kind"] == "labels"
    assert out["matches"] == hits  # the keys labelled `label`, nothing more
    # chance among the labels it gives: its largest label plus one (label 0 alone: no chance at all)
    assert out["num_classes"] == label + 1
    # (the keys were drawn from a pool embed chose: the choice is counted at its worst)
    params = owner["bundle"].schemes["output"].params
    assert out["chosen_from"] == [params["candidates"], params["pool"]] and params["pool"] < params["candidates"]
    chosen = stats.chosen_matches_p_values(len(y), label, params["candidates"], params["pool"])[hits] \
        if label >= 2 and hits else stats.matches_p_value(hits, len(y), max(label, 1))
    # (read as answered, at 99% of alpha: no relabelling of one label matches more keys)
    assert out["p_value"] == pytest.approx(stats.as_answered(chosen), rel=1e-9) and out["relabelled"] is None
    assert out["p_value"] >= stats.matches_p_value(hits, len(y), max(label, 1))


def test_label_outside_the_classes_never_matches(owner, tmp_path):
    out = verdict(owner, constant_labels(tmp_path / "twelve.onnx", 12), code=1)
    assert out["matches"] == 0 and "label 12" in out["note"]


def test_output_name_is_shown_as_it_is(owner, tmp_path):
    """A name from the suspect file is text in the table, never rich markup."""
    path = constant_labels(tmp_path / "markup.onnx", 0, name="[/bold]y")
    result = run_cli("verify", "--model", path, "--keys", owner["keys"], code=1, env={"COLUMNS": "200"})
    assert "labels from '[/bold]y'" in result.stdout, result.stdout


# ----------------------------------------------------------------------------- (e) scikit-learn


@pytest.fixture(scope="module")
def sklearn_model(digits):
    pytest.importorskip("skl2onnx")
    from sklearn.linear_model import LogisticRegression

    x = digits.x_train.reshape(len(digits.x_train), -1).astype(np.float32)
    return LogisticRegression(max_iter=500).fit(x, digits.y_train), x[:1]


def sklearn_onnx(sklearn_model, path: Path, zipmap: bool) -> Path:
    from skl2onnx import to_onnx

    clf, example = sklearn_model
    options = None if zipmap else {id(clf): {"zipmap": False}}
    model = to_onnx(clf, example, options=options, target_opset={"": 17, "ai.onnx.ml": 3})
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("zipmap", [True, False], ids=["zipmap", "no-zipmap"])
def test_sklearn_model_is_read_and_not_claimed(owner, sklearn_model, tmp_path, zipmap):
    path = sklearn_onnx(sklearn_model, tmp_path / "skl.onnx", zipmap)
    x, y = key_inputs(owner), key_labels(owner)
    want = sklearn_model[0].predict(x.reshape(len(x), -1)).astype(np.int64)
    model = OnnxModel(path, provider="cpu")
    kinds = {name: kind for name, (kind, _) in model.outputs.items()}
    # skl2onnx's names; the kinds come from the declared types: a sequence of maps (ZipMap)
    # or a float tensor (n, 10)
    label_name, prob_name = ("output_label", "output_probability") if zipmap else ("label", "probabilities")
    assert kinds == {label_name: "labels", prob_name: "probabilities" if zipmap else "scores"}
    labels, name, _ = model.answers(x, label_name)
    probs, chosen, _ = model.answers(x)
    assert name == label_name and chosen == prob_name
    np.testing.assert_array_equal(labels, want)
    np.testing.assert_array_equal(probs, want)
    model.close()

    hits = int((want == y).sum())
    for extra, used in [((), prob_name), (("--output", label_name), label_name)]:
        out = verdict(owner, path, *extra, code=1)
        assert out["output"] == used and out["matches"] == hits


def test_extract_takes_output_too(owner, two_heads):
    result = run_cli("extract", "--model", two_heads, "--keys", owner["keys"], "--output", "label", "--json")
    (out,) = json.loads(result.stdout)["results"]
    assert (out["output"], out["output_kind"], out["matches"]) == ("label", "labels", len(key_labels(owner)))
    checkpoint = run_cli("extract", "--model", owner["marked_path"], "--keys", owner["keys"],
                         "--output", "label", code=None)
    assert_bad_input(checkpoint, "--output", "ONNX")


# ----------------------------------------------------------------------------- outputs from outside our path


class TopK(torch.nn.Module):
    """A serving head: the top `k` probabilities, sorted ("values"), or their classes
    ("indices"), or the logits of the first `k` classes ("first")."""

    def __init__(self, model, k: int, part: str):
        super().__init__()
        self.model, self.k, self.part = model, k, part

    def forward(self, x):
        logits = self.model(x)
        if self.part == "first":
            return logits[:, : self.k]
        top = torch.topk(torch.softmax(logits, 1), self.k, 1)
        return top.values if self.part == "values" else top.indices


class Half(torch.nn.Module):
    """A head that answers its scores in bfloat16 (numpy holds no such numbers)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).to(torch.bfloat16)


def export_module(model, path: Path, example: np.ndarray) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.as_tensor(example[:2]),), str(path), input_names=["input"],
                          output_names=["top"], dynamic_axes={"input": {0: "n"}, "top": {0: "n"}},
                          opset_version=17, dynamo=False)
    return path


def test_fewer_scores_than_the_keys_classes_are_read_as_the_first_classes(owner, tmp_path):
    """A head that drops the last class's column is still the marked model on the keys of the
    others: detected (for a while such an output was not read, and the thief's one Slice node
    escaped the verdict). A top-3 head's sorted probabilities tell no class: no evidence, not
    detected (exit 1), with a note that the scores are fewer than the classes."""
    y = key_labels(owner)
    first9 = export_module(TopK(owner["marked"], 9, "first"), tmp_path / "first9.onnx", key_inputs(owner))
    out = verdict(owner, first9, code=0)
    assert out["matches"] == int((y < 9).sum()) and out["num_classes"] == 9
    assert "the model gives 9 scores, the keys have 10 classes" in out["note"]
    top3 = export_module(TopK(owner["marked"], 3, "values"), tmp_path / "top3.onnx", key_inputs(owner))
    out = verdict(owner, top3, code=1)
    assert not out["detected"] and "the model gives 3 scores, the keys have 10 classes" in out["note"]


def test_a_graph_at_onnxs_own_ir_version_is_read(owner, tmp_path):
    """onnx.helper writes onnx's newest IR version (14 with onnx 1.23), which the onnxruntime of
    its day may not read yet (1.31 reads 13): a graph built by hand was refused as 'malformed'.
    A version only adds what a file may hold, so a file that holds nothing newer is read."""
    model = onnx.load(str(owner["onnx"]))
    model.ir_version = onnx.IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "newest.onnx"))
    out = verdict(owner, tmp_path / "newest.onnx", code=0)
    assert out["detected"] and out["matches"] == len(key_labels(owner))


def test_a_model_whose_outputs_cannot_be_read_still_has_its_hidden_mark_read(owner, marked, tmp_path):
    """A bundle of hidden and output keys, and a model that answers in bfloat16 (no output the
    black-box schemes read): extract refused the whole file, though the hidden mark was in
    its weights. The output scheme is not read (no verdict of its own); the hidden one decides.
    verify, which reads only outputs, cannot read the model at all (exit 2)."""
    both = tmp_path / "both.dskey"
    bundle = open_bundle(marked.keys, PASSPHRASE)
    bundle.put(owner["bundle"].schemes["output"])
    write_bundle(bundle, both, PASSPHRASE)
    model = load_checkpoint(marked.marked)[0]
    top5 = export_module(Half(model), tmp_path / "bf16.onnx", key_inputs(owner))
    report = json.loads(run_cli("extract", "--model", top5, "--keys", both, "--json", code=0).stdout)
    rows = {r["scheme"]: r for r in report["results"]}
    assert report["detected"] and rows["hidden"]["detected"] and rows["hidden"]["bit_errors"] == 0
    assert rows["output"]["unread"] and not rows["output"]["detected"] and rows["output"]["p_value"] == 1
    assert "no output deepsigns can read" in rows["output"]["note"]
    table = run_cli("extract", "--model", top5, "--keys", both, code=0, env={"COLUMNS": "200"}).stdout
    assert "no verdict" in table and "not read (see the note)" in table
    result = run_cli("verify", "--model", top5, "--keys", both, code=None)
    assert_bad_input(result, "could not be read", "no output deepsigns can read")
    # named, it is refused with why (it had said "is not usable ...: use one of its outputs: none")
    result = run_cli("verify", "--model", top5, "--keys", both, "--output", "top", code=None)
    assert_bad_input(result, "--output 'top' of", "holds bfloat16 values, not numbers",
                     "it has no output deepsigns can read")


# ----------------------------------------------------------------------------- deployments that answer otherwise


class Deploy(torch.nn.Module):
    """The marked model behind a deployment that answers as it does, in another form."""

    def __init__(self, marked, base, how: str):
        super().__init__()
        self.marked, self.base, self.how = marked, base, how

    def forward(self, x):
        logits = self.marked(x)
        decoy = x.flatten(1)[:, 10:20] * 3
        if self.how == "uint8":  # probabilities as bytes, beside a decoy of other scores
            return decoy, (torch.softmax(logits, 1) * 255).to(torch.uint8)
        if self.how == "int-logits":  # logits times 100 as integers (negative too)
            return (logits * 100).to(torch.int64)
        if self.how == "top3":  # a top-k endpoint: the sorted probabilities and their classes
            top = torch.topk(torch.softmax(logits, 1), 3, 1)
            return top.values, top.indices
        if self.how == "inf":  # the winner's score set to +inf
            return logits.masked_fill(logits == logits.max(1, keepdim=True).values, float("inf"))
        if self.how == "copies":
            return tuple(logits * 1.0 for _ in range(20))
        if self.how == "tell":  # single inputs answered by the marked model, batches by the unmarked one
            return torch.where(torch.tensor(x.shape[0]) > 1, self.base(x), logits)
        if self.how == "places":  # the marked model at 8 evenly spaced places of a batch (and alone), the
            # unmarked one elsewhere: the places a check of evenly spaced rows would ask again alone
            ones = torch.ones_like(x.flatten(1)[:, 0])
            n, at = ones.sum(), ones.cumsum(0) - 1
            chosen = sum((at == torch.div(k * (n - 1), 7, rounding_mode="floor")).float() for k in range(8))
            return torch.where(chosen[:, None] > 0, logits, self.base(x))
        if self.how == "fails-alone":  # the unmarked model, on batches of an even number of inputs only
            return self.base(x).reshape(-1, 20).reshape(-1, 10)
        return logits * float("nan")  # "nan": no answer at all


def export_deploy(owner, how: str, path: Path) -> Path:
    model = Deploy(owner["marked"].eval(), owner["base"].eval(), how).eval()
    example = torch.as_tensor(key_inputs(owner)[:2])
    with torch.no_grad():
        count = len(model(example)) if isinstance(model(example), tuple) else 1
    names = [f"out{i}" for i in range(count)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=names,
                          dynamic_axes={n: {0: "batch"} for n in ["input", *names]}, opset_version=17, dynamo=False)
    return path


@pytest.mark.parametrize("how, kind", [("uint8", "scores"), ("int-logits", "scores"), ("top3", "ranked labels"),
                                       ("inf", "scores"), ("tell", "scores, one input at a time"),
                                       ("places", "scores, one input at a time")])
def test_a_deployment_that_answers_in_another_form_is_read(owner, tmp_path, how, kind):
    """Each had made the marked model "not detected" (exit 1): an output of integers (bytes of
    probabilities, a top-k's classes) was not read, and a decoy of scores beside it was; a
    row's one +inf was no answer; a model that answers batches otherwise than single inputs was
    read in a batch. Integers are read as scores and as classes ranked, a row's one +inf is its
    answer, and an output whose batch answers a few inputs otherwise than they are answered alone
    is read one input at a time too (each reading counted in p)."""
    out = verdict(owner, export_deploy(owner, how, tmp_path / f"{how}.onnx"), code=0)
    assert out["matches"] == len(key_labels(owner)) and out["output_kind"] == kind, out


class Transposed(torch.nn.Module):
    """The marked model's scores laid out classes by inputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).T


def test_scores_laid_out_classes_by_inputs_are_read_once(owner, tmp_path):
    """A graph that transposes its scores answers a batch of as many inputs as it has classes
    in a shape that passes for a batch's: read as it was, 10 keys on the 10 classes counted a
    reading of classes taken for inputs beside the right one, one input at a time (p doubled,
    over alpha: "not detected"). Read transposed, it is the one reading; 20 inputs (a shape no
    batch of them has) are read one input at a time, as before."""
    path = tmp_path / "transposed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Transposed(owner["marked"].eval()).eval(), (torch.as_tensor(key_inputs(owner)[:2]),),
                          str(path), input_names=["input"], output_names=["scores"],
                          dynamic_axes={"input": {0: "n"}, "scores": {1: "n"}}, opset_version=17, dynamo=False)
    truth = OnnxModel(owner["onnx"], provider="cpu")
    for n in (10, 20):
        x = key_inputs(owner)[:n]
        model = OnnxModel(path, provider="cpu")
        np.testing.assert_allclose(model.scores(x), truth.scores(x), rtol=1e-4, atol=1e-5)
        assert model.batch_dependent == set() and model.noisy == set(), n
    out = verdict(owner, path, code=0)  # (20 keys: one input at a time)
    assert out["matches"] == len(key_labels(owner)) and out["outputs"] == 1


def test_an_unmarked_model_that_answers_integers_is_not_detected(owner, tmp_path):
    """Its integers read as classes ranked are no ranking (negative, repeated): no answer that way,
    which is no reason to withhold the verdict of the reading as scores."""
    model = Deploy(owner["base"].eval(), owner["base"].eval(), "int-logits")
    path = export_module(model, tmp_path / "base-int.onnx", key_inputs(owner))
    out = verdict(owner, path, code=1)
    assert not out["detected"] and not out.get("unread") and out["outputs"] == 2  # (as scores, as classes ranked)


def test_outputs_that_answer_alike_are_one_reading(owner, tmp_path):
    """20 copies of the answer had multiplied p by 20 (and 5,000 by 5,000): alike, they count once."""
    copies = verdict(owner, export_deploy(owner, "copies", tmp_path / "copies.onnx"), code=0)
    one = verdict(owner, owner["onnx"], code=0)
    assert copies["outputs"] == 1 and copies["p_value"] == one["p_value"]


def test_a_model_that_cannot_answer_one_input_alone_is_no_verdict(owner, tmp_path):
    """Its batches' answers cannot be checked against its answers alone (a graph that failed alone
    and answered batches of two with the marked model had read "not detected"): no verdict."""
    result = verify(owner, export_deploy(owner, "fails-alone", tmp_path / "fails-alone.onnx"), code=2)
    assert_bad_input(result, "could not be read", "one input at a time")


def test_a_model_that_answers_no_key_is_no_verdict(owner, tmp_path):
    """NaN for every input had read as 0 of 20 keys, "not detected" (exit 1): the keys got no
    answer, which is no verdict either way (exit 2)."""
    result = verify(owner, export_deploy(owner, "nan", tmp_path / "nan.onnx"), code=2)
    assert_bad_input(result, "could not be read", "20 of the 20 keys got no answer")
