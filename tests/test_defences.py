"""What the attacks break, defended: shuffled hidden units are lined up with the unmarked model's
before the hidden mark is read, and a sweep reads the owner's keys at every strength."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from helpers import (
    PASSPHRASE,
    SEEDS,
    assert_bad_input,
    assert_one_error_line,
    deepsigns_argv,
    process_env,
    reaped,
    run_cli,
    run_json,
)

from deepsigns_cli import stats
from deepsigns_cli.checkpoint import load_checkpoint
from deepsigns_cli.suspect import MAX_UNITS

WIDE = 40_000  # units of the "wide" carrier: more than the 32,768 values per sample of the reading of every unit


def hidden(report: dict) -> dict:
    return next(r for r in report["results"] if r["scheme"] == "hidden")


@pytest.fixture(scope="module")
def permuted(marked_runs, tmp_path_factory) -> dict:
    """seed -> (the permuted marked model, the same then fine-tuned 30 epochs at the training rate)."""
    out = {}
    for seed in SEEDS:
        run = marked_runs(seed)
        folder = tmp_path_factory.mktemp(f"permuted{seed}")
        perm, tuned = folder / "perm.safetensors", folder / "perm-ft.safetensors"
        report = run_json("attack", "permute", "--model", run.marked, "--seed", seed, "--out", perm)
        run_json("attack", "finetune", "--model", perm, "--epochs", 30, "--seed", seed, "--device", "cpu",
                 "--out", tuned)
        out[seed] = (run, perm, tuned, report)
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_a_permuted_model_reads_with_no_bit_errors(permuted, seed):
    run, perm, _, report = permuted[seed]
    assert report["params"]["max_output_diff"] < 1e-3  # the same function
    assert sum(report["params"]["units_permuted"].values()) > 100
    r = hidden(run_json("extract", "--model", perm, "--keys", run.keys))
    assert r["detected"] and r["bit_errors"] == 0 and r["aligned"] is True
    assert r["readings"] == 3  # as it is, and lined up (over scales; over offsets): each counted in p


@pytest.mark.parametrize("seed", SEEDS)
def test_a_permuted_then_fine_tuned_model_is_still_detected(permuted, seed):
    run, _, tuned, _ = permuted[seed]
    r = hidden(run_json("extract", "--model", tuned, "--keys", run.keys))
    assert r["detected"] and r["aligned"] is True
    assert r["bit_errors"] <= r["max_bit_errors"] // 2  # with room to spare, not just past the line


def test_the_line_up_is_read_from_onnx_too(permuted, tmp_path):
    run, perm, _, _ = permuted[SEEDS[0]]
    run_json("export", perm, "--out", tmp_path / "perm.onnx")
    r = hidden(run_json("extract", "--model", tmp_path / "perm.onnx", "--keys", run.keys))
    assert r["detected"] and r["bit_errors"] == 0 and r["aligned"] is True


def test_an_unrelated_permuted_model_is_not_claimed(marked_runs, tmp_path):
    """The line-up is against the unmarked model's units, which the keys kept before the bits
    were drawn: another owner's model, shuffled or not, reads as chance."""
    owner, other = marked_runs(SEEDS[0]), marked_runs(SEEDS[1])
    perm = tmp_path / "other-perm.safetensors"
    run_json("attack", "permute", "--model", other.base, "--seed", 5, "--out", perm)
    for model in (other.base, perm):
        report = run_json("extract", "--model", model, "--keys", owner.keys, code=1)
        r = hidden(report)
        assert not r["detected"] and r["bit_errors"] > r["max_bit_errors"] + 20


def _rebuilt(marked_path, how: str, path, wide: int = WIDE):
    """The marked MLP as an ONNX graph built by hand that computes what it computes, with its
    carrier (fc2's output) rebuilt as a thief may: padded with a dead unit or with `wide` - 512 live
    ones, computed as two halves or inside an If, laid out as (units, batch), negated, or copied
    many times over."""
    import numpy as np
    import onnx
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from deepsigns_cli.checkpoint import load_checkpoint

    w = {k: v.numpy() for k, v in load_checkpoint(marked_path)[0].state_dict().items()}
    w1, b1, w2, b2, w3, b3 = (w[f"{layer}.{p}"] for layer in ("fc1", "fc2", "head") for p in ("weight", "bias"))
    inits = {"w1": w1, "b1": b1, "b3": b3}
    nodes = [h.make_node("Flatten", ["input"], ["flat"], axis=1)]
    if how == "padded":  # a 513th unit that nothing reads
        inits.update(w2=np.concatenate([w2, np.zeros((1, 512), np.float32)]), b2=np.append(b2, 0).astype(np.float32),
                     w3=np.concatenate([w3, np.zeros((10, 1), np.float32)], 1))
        how_nodes = [h.make_node("Gemm", ["h1", "w2", "b2"], ["z2"], transB=1), h.make_node("Relu", ["z2"], ["h2"]),
                     h.make_node("Gemm", ["h2", "w3", "b3"], ["logits"], transB=1)]
    elif how == "wide":  # `wide` units, all but 512 of them junk that nothing reads (no tensor of 512 units)
        junk = np.random.default_rng(0).normal(0, 0.1, (wide - 512, 512)).astype(np.float32)
        inits.update(w2=np.concatenate([w2, junk]), b2=np.concatenate([b2, np.full(wide - 512, 0.1, np.float32)]),
                     w3=np.concatenate([w3, np.zeros((10, wide - 512), np.float32)], 1))
        how_nodes = [h.make_node("Gemm", ["h1", "w2", "b2"], ["z2"], transB=1), h.make_node("Relu", ["z2"], ["h2"]),
                     h.make_node("Gemm", ["h2", "w3", "b3"], ["logits"], transB=1)]
    elif how == "if":  # the carrier computed only inside the branches of an If, on a condition always true
        inits.update(w2=w2, b2=b2, w3=w3, low=np.float32(-1e30))
        body = [h.make_node("Gemm", ["h1", "w2", "b2"], ["z2"], transB=1), h.make_node("Relu", ["z2"], ["h2"]),
                h.make_node("Gemm", ["h2", "w3", "b3"], ["out"], transB=1)]
        branches = [h.make_graph(body, name, [], [h.make_tensor_value_info("out", TensorProto.FLOAT, None)])
                    for name in ("then", "else")]
        how_nodes = [h.make_node("ReduceSum", ["flat"], ["total"], keepdims=0),
                     h.make_node("Greater", ["total", "low"], ["cond"]),
                     h.make_node("If", ["cond"], ["logits"], then_branch=branches[0], else_branch=branches[1])]
    elif how == "halves":  # 256 units twice, the head a sum of two products
        how_nodes = []
        for k, part in enumerate((slice(0, 256), slice(256, 512))):
            inits.update({f"w2{k}": w2[part], f"b2{k}": b2[part], f"w3{k}": np.ascontiguousarray(w3[:, part].T)})
            how_nodes += [h.make_node("Gemm", ["h1", f"w2{k}", f"b2{k}"], [f"z2{k}"], transB=1),
                          h.make_node("Relu", [f"z2{k}"], [f"h2{k}"]),
                          h.make_node("MatMul", [f"h2{k}", f"w3{k}"], [f"o{k}"])]
        how_nodes += [h.make_node("Add", ["o0", "o1"], ["s"]), h.make_node("Add", ["s", "b3"], ["logits"])]
    elif how == "shifted":  # each unit moved up by its own constant, ReLU(z) + c as Max(z + c, c), the head's
        # bias taking the shift back (as a quantized copy's zero point moves every unit)
        shift = np.random.default_rng(1).uniform(1, 5, 512).astype(np.float32)
        inits.update(w2=w2, b2=b2 + shift, shift=shift, w3=w3, b3=b3 - w3 @ shift)
        how_nodes = [h.make_node("Gemm", ["h1", "w2", "b2"], ["z2"], transB=1),
                     h.make_node("Max", ["z2", "shift"], ["h2"]),
                     h.make_node("Gemm", ["h2", "w3", "b3"], ["logits"], transB=1)]
    elif how == "bfloat16":  # a copy of the carrier in bfloat16 that nothing reads (numpy cannot hold one)
        inits.update(w2=w2, b2=b2, w3=w3)
        how_nodes = [h.make_node("Gemm", ["h1", "w2", "b2"], ["z2"], transB=1), h.make_node("Relu", ["z2"], ["h2"]),
                     h.make_node("Cast", ["h2"], ["half"], to=TensorProto.BFLOAT16),
                     h.make_node("Gemm", ["h2", "w3", "b3"], ["logits"], transB=1)]
    elif how == "negated":  # -ReLU(z) as Min(-z, 0), the head negated
        inits.update(w2=-w2, b2=-b2, w3=-w3, zero=np.zeros(1, np.float32))
        how_nodes = [h.make_node("Gemm", ["h1", "w2", "b2"], ["z2"], transB=1),
                     h.make_node("Min", ["z2", "zero"], ["h2"]),
                     h.make_node("Gemm", ["h2", "w3", "b3"], ["logits"], transB=1)]
    elif how == "copies":  # 300 copies of the carrier, added to the scores times 0
        inits.update(w2=w2, b2=b2, w3=w3, nothing=np.zeros(1, np.float32))
        copies = [h.make_node("Identity", ["h2"], [f"c{i}"]) for i in range(300)]
        how_nodes = [h.make_node("Gemm", ["h1", "w2", "b2"], ["z2"], transB=1), h.make_node("Relu", ["z2"], ["h2"]),
                     *copies, h.make_node("Sum", [f"c{i}" for i in range(300)], ["all"]),
                     h.make_node("Mul", ["all", "nothing"], ["none"]), h.make_node("Add", ["h2", "none"], ["h3"]),
                     h.make_node("Gemm", ["h3", "w3", "b3"], ["logits"], transB=1)]
    elif how == "rows":  # (units, batch) in two tensors of `wide` units, as many as extract feeds inputs
        rest = np.zeros((wide, 512), np.float32)
        rest[: 512 - wide] = w2[wide:]
        rest_b, rest_head = np.zeros((wide, 1), np.float32), np.zeros((10, wide), np.float32)
        rest_b[: 512 - wide, 0], rest_head[:, : 512 - wide] = b2[wide:], w3[:, wide:]
        inits.update(w2a=w2[:wide], b2a=b2[:wide, None], w2b=rest, b2b=rest_b, w3a=np.ascontiguousarray(w3[:, :wide]),
                     w3b=rest_head, b3=b3[:, None])
        how_nodes = [node for k in "ab" for node in (
            h.make_node("Gemm", [f"w2{k}", "h1", f"b2{k}"], [f"z2{k}"]), h.make_node("Relu", [f"z2{k}"], [f"h2{k}"]),
            h.make_node("MatMul", [f"w3{k}", f"h2{k}"], [f"o{k}"]))]
        how_nodes += [h.make_node("Add", ["oa", "ob"], ["s"]), h.make_node("Add", ["s", "b3"], ["t"]),
                      h.make_node("Transpose", ["t"], ["logits"], perm=[1, 0])]
    elif how in ("reversed", "reversed-decoys", "batch-padded", "batch-merged"):  # the carrier's rows not the
        # batch's: its rows reversed, one row more (zeros), or that and its units merged with the rows,
        # (4 (n + 1), 128); reversed, beside decoys made of the carrier (helper-54's E3): for each class c,
        # three scaled copies of it, times -100 on the inputs the model answers c (unused)
        ints = {"back": [-1], "end": [-(1 << 62)], "axis": [0], "start": [0], "units": [-1, 128], "rows": [-1, 512]}
        inits.update(w2=w2, b2=b2, w3=w3, zrow=np.zeros((1, 512)),
                     **{k: np.array(v, np.int64) for k, v in ints.items()})
        moved = ([h.make_node("Slice", ["h1", "back", "end", "axis", "back"], ["h1m"])] if how.startswith("reversed")
                 else [h.make_node("Concat", ["h1", "zrow"], ["h1m"], axis=0)])
        act = ([h.make_node("Relu", ["z2"], ["h2"])] if how != "batch-merged" else
               [h.make_node("Reshape", ["z2", "units"], ["z2m"]), h.make_node("Relu", ["z2m"], ["h2m"]),
                h.make_node("Reshape", ["h2m", "rows"], ["h2"])])
        how_nodes = [*moved, h.make_node("Gemm", ["h1m", "w2", "b2"], ["z2"], transB=1), *act,
                     h.make_node("Gemm", ["h2", "w3", "b3"], ["out"], transB=1),
                     h.make_node("Slice", ["out", *(("back", "end", "axis", "back") if how.startswith("reversed")
                                                     else ("start", "back", "axis"))], ["logits"])]
        if how == "reversed-decoys":
            inits.update(one=np.float32(1), apart=np.float32(101))
            how_nodes.append(h.make_node("ArgMax", ["out"], ["pred"], axis=1, keepdims=1))
            for c in range(10):
                inits[f"class{c}"] = np.array(c, np.int64)
                how_nodes += [h.make_node("Equal", ["pred", f"class{c}"], [f"is{c}"]),
                              h.make_node("Cast", [f"is{c}"], [f"isf{c}"], to=TensorProto.FLOAT),
                              h.make_node("Mul", [f"isf{c}", "apart"], [f"far{c}"]),
                              h.make_node("Sub", ["one", f"far{c}"], [f"sign{c}"]),
                              h.make_node("Mul", ["h2", f"sign{c}"], [f"flip{c}"])]
                for r in range(3):
                    inits[f"scale{c}_{r}"] = np.float32(1 + 0.01 * (r + 1) + 0.001 * c)
                    how_nodes.append(h.make_node("Mul", [f"flip{c}", f"scale{c}_{r}"], [f"decoy{c}_{r}"]))
    elif how == "input-widened":  # the carrier and the head's weights widened by as many zero units as the
        # input has values above 0.5: every tensor that holds the carrier changes shape from one input to the next
        ints = {"one": [1], "c512": [512], "c10": [10]}
        inits.update(w2t=np.ascontiguousarray(w2.T), b2r=b2[None, :], w3t=np.ascontiguousarray(w3.T), half=0.5,
                     zero=np.zeros((1, 1)), **{k: np.array(v, np.int64) for k, v in ints.items()})
        n = h.make_node
        how_nodes = [n("Greater", ["flat", "half"], ["big"]), n("Cast", ["big"], ["bigi"], to=TensorProto.INT64),
                     n("ReduceSum", ["bigi"], ["count"], keepdims=0), n("Reshape", ["count", "one"], ["k"])]
        for name, shape, axis in (("w2t", ["c512", "k"], 1), ("b2r", ["one", "k"], 1), ("w3t", ["k", "c10"], 0)):
            how_nodes += [n("Concat", shape, [f"{name}_shape"], axis=0),
                          n("Expand", ["zero", f"{name}_shape"], [f"{name}_zeros"]),
                          n("Concat", [name, f"{name}_zeros"], [f"{name}_wide"], axis=axis)]
        how_nodes += [n("MatMul", ["h1", "w2t_wide"], ["m2"]), n("Add", ["m2", "b2r_wide"], ["z2"]),
                      n("Relu", ["z2"], ["h2"]), n("MatMul", ["h2", "w3t_wide"], ["m3"]),
                      n("Add", ["m3", "b3"], ["logits"])]
    else:  # "transposed": every hidden tensor (units, batch)
        inits.update(w2=w2, b2=b2[:, None], w3=np.ascontiguousarray(w3.T))
        how_nodes = [h.make_node("Gemm", ["w2", "h1", "b2"], ["z2"]), h.make_node("Relu", ["z2"], ["h2"]),
                     h.make_node("Gemm", ["h2", "w3", "b3"], ["logits"], transA=1)]
    first = ([h.make_node("Gemm", ["w1", "flat", "b1"], ["z1"], transB=1)] if how in ("transposed", "rows") else
             [h.make_node("Gemm", ["flat", "w1", "b1"], ["z1"], transB=1)])
    if how in ("transposed", "rows"):
        inits["b1"] = b1[:, None]
    graph = h.make_graph(nodes + first + [h.make_node("Relu", ["z1"], ["h1"])] + how_nodes, how,
                         [h.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                         [h.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
                         [nh.from_array(v if getattr(v, "dtype", None) == np.int64 else np.asarray(v, np.float32), k)
                          for k, v in inits.items()])
    if how == "bfloat16":  # (an unused sparse tensor named as the reading's Cast of the copy would be: the
        # graph that reading made had been refused, "duplicate definition", exit 2)
        graph.sparse_initializer.append(h.make_sparse_tensor(nh.from_array(np.ones(1, np.float32), "half as float32"),
                                                             nh.from_array(np.zeros(1, np.int64), "at"), [4]))
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_units_as_many_as_the_inputs_fed_are_not_taken_for_the_batch(marked, tmp_path):
    """The carrier laid out as (units, batch) in tensors of 448 units, as many as the inputs
    extract fed the model at once (the keys' trigger and probe samples): the first axis, of the
    batch's length, was taken for the batch, and the marked model read "not detected" (101 of
    216 bits wrong, exit 1). The inputs are fed in two batches of two lengths now, and the
    batch is the axis that has the length of both."""
    import numpy as np
    import onnxruntime as ort

    from deepsigns_cli.bundle import open_bundle

    arrays = open_bundle(marked.keys, PASSPHRASE).schemes["hidden"].arrays
    fed = len(arrays["trigger_x"]) + len(arrays["probe_x"])
    assert fed < 512  # (the construction splits 512 units into two tensors of `fed`)
    path = _rebuilt(marked.marked, "rows", tmp_path / "rows.onnx", fed)
    x = np.random.default_rng(0).random((fed, 1, 8, 8), dtype=np.float32)
    got, want = (ort.InferenceSession(str(p)).run(None, {"input": x})[0] for p in (path, marked.onnx))
    np.testing.assert_allclose(got, want, atol=1e-4)
    r = hidden(run_json("extract", "--model", path, "--keys", marked.keys, code=0))
    assert r["detected"] and r["bit_errors"] <= r["max_bit_errors"] // 2, r


@pytest.mark.parametrize("how", ["padded", "halves", "transposed", "negated", "copies", "shifted", "bfloat16",
                                 "reversed", "reversed-decoys", "batch-padded", "batch-merged"])
def test_a_carrier_rebuilt_in_the_graph_is_still_read(marked_runs, tmp_path, how):
    """Graph surgery that keeps the function but leaves no tensor of the carrier's width with
    the batch first had hidden the mark (90 of 192 bits wrong, or no carrier at all): the
    batch axis is now found wherever it is, and one more reading lines every unit of the
    graph up with ours at once. Units shifted by constants had read as chance (60 of 192 wrong):
    they are also lined up over their offsets. A bfloat16 tensor anywhere had failed the reading
    (exit 2): it is read through a cast. A carrier whose rows are not the batch's (reversed, one
    more, merged with its units) had read as not detected (62, 91 of 192 wrong, exit 1): the units
    are read again with the graph fed one input at a time, and so are the tensors of the
    carrier's width (decoys made of the carrier had drawn the line-up of every unit alone: 58
    wrong). Three seeds; an unmarked model rebuilt so is not claimed."""
    import numpy as np
    import onnxruntime as ort

    for seed in SEEDS:
        run = marked_runs(seed)
        for model, marked in ((run.marked, True), (run.base, False)):
            path = _rebuilt(model, how, tmp_path / f"{how}-{seed}-{marked}.onnx")
            if marked:  # the same function as the marked model's own export
                x = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
                got, want = (ort.InferenceSession(str(p)).run(None, {"input": x})[0] for p in (path, run.onnx))
                np.testing.assert_allclose(got, want, atol=1e-4)
            r = hidden(run_json("extract", "--model", path, "--keys", run.keys, code=0 if marked else 1))
            if how == "copies":  # (copies read as one: 300 had made 1,000 readings and, at 1,300, no reading)
                assert r["candidates"] <= 8, r  # (the tensors of width 512 that differ)
            if marked:
                assert r["detected"] and r["bit_errors"] <= r["max_bit_errors"] // 2, r
            else:
                assert not r["detected"] and r["bit_errors"] > r["max_bit_errors"] + 20, r



def test_a_carrier_whose_shape_the_input_decides_leaves_the_scheme_unread(marked, tmp_path):
    """Every tensor that holds the carrier widened by as many zero units as the input decides
    (the head's weights with it: the same function) changes shape from one input to the next,
    and had been dropped without a word: the hidden scheme is now unread, and an unmarked model
    rebuilt so is no verdict (exit 2), never "not detected"."""
    for model, code in ((marked.base, 2), (marked.marked, None)):
        path = _rebuilt(model, "input-widened", tmp_path / f"widened-{code}.onnx")
        if code is None:
            _same_function(path, marked.onnx)
        result = run_cli("extract", "--model", path, "--keys", marked.keys, "--json", code=None)
        if code == 2:
            assert_bad_input(result, "could not be read", "change shape from one input to the next")
        else:  # (a batch's reading may still find it: detected, the note with it; never "not detected")
            assert result.exit_code in (0, 2), result.stdout
            assert "change shape from one input to the next" in result.stdout + result.stderr


def _same_function(path, onnx_path) -> None:
    import numpy as np
    import onnxruntime as ort

    x = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    got, want = (ort.InferenceSession(str(p)).run(None, {"input": x})[0] for p in (path, onnx_path))
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("wide", [10_000, WIDE])
def test_a_carrier_padded_with_many_units_is_still_read(marked, tmp_path, wide):
    """fc2 widened with junk units that the head reads with weights of 0: no tensor has the
    carrier's 512 units. At 40,000, the only one that holds them is wider than the 32,768 values
    per sample the reading of every unit took: it skipped them, and the model read as "not
    detected" (exit 1, 101/216 bits wrong, p = 0.94). The units past that reading are now read in
    sets of their own. The junk units all but drown ours in the line-up (at 10,000, 53/216 bits
    wrong, 62 allowed; at 40,000, 83 in fc2's set): each set is also lined up at a sharper
    temperature (none wrong). Every reading is counted in p; the unmarked model padded so reads
    as chance (exit 1)."""
    path = _rebuilt(marked.marked, "wide", tmp_path / "wide.onnx", wide)
    _same_function(path, marked.onnx)
    r = hidden(run_json("extract", "--model", path, "--keys", marked.keys, code=0))
    sets = 1 if wide < MAX_UNITS // 2 else 2
    assert r["bit_errors"] <= r["max_bit_errors"] // 2 and r["tensor"].endswith("sharp line-up"), r
    # every reading counted in p: the tensors of 512 units (fc1's) as they are and lined up (over
    # scales; over offsets), and each set of units at two temperatures, over scales and over offsets
    # (the first set, and at 40,000 the one that holds fc2's), from a batch and one input at a time
    assert r["readings"] == 3 * r["candidates"] + 8 * sets
    assert r["p_value"] == pytest.approx(stats.bonferroni(stats.bits_p_value(r["bit_errors"], r["n_bits"]),
                                                          r["readings"]))
    base = hidden(run_json("extract", "--model", _rebuilt(marked.base, "wide", tmp_path / "base-wide.onnx", wide),
                           "--keys", marked.keys, code=1))
    assert not base.get("unread") and base["bit_errors"] > base["max_bit_errors"] + 20 and base["p_value"] > 1e-3


def test_units_beyond_every_reading_leave_the_hidden_scheme_unread(marked, tmp_path, monkeypatch):
    """A tensor wider than any set of units deepsigns reads (here the set is made smaller than
    the padded carrier): what was not read is no verdict, so the model could not be read (exit 2),
    never "not detected"."""
    from deepsigns_cli import suspect

    monkeypatch.setattr(suspect, "MAX_SET_UNITS", WIDE // 2)  # (read in this process: run_cli is in-process)
    path = _rebuilt(marked.marked, "wide", tmp_path / "wide.onnx")
    result = run_cli("extract", "--model", path, "--keys", marked.keys, "--json", code=2)
    assert_one_error_line(result.stderr, result.stdout, "could not be read", f"{WIDE} values per sample")


def test_a_carrier_inside_an_if_leaves_the_hidden_scheme_unread(marked, tmp_path):
    """The carrier computed only inside an If's branches (on a condition that is always true but
    not a constant): no tensor of a subgraph can be asked for, and the model read as "not
    detected" (exit 1) from the units outside it. What a subgraph computes is out of reach: the
    model could not be read (exit 2)."""
    path = _rebuilt(marked.marked, "if", tmp_path / "if.onnx")
    _same_function(path, marked.onnx)
    result = run_cli("extract", "--model", path, "--keys", marked.keys, "--json", code=2)
    assert_one_error_line(result.stderr, result.stdout, "could not be read", "inside a subgraph or function (If)")
    ours = hidden(run_json("extract", "--model", marked.onnx, "--keys", marked.keys, code=0))  # (no subgraph)
    assert not ours.get("unread")

def _quantized(src, dst, digits) -> None:
    """`src` statically quantized by onnxruntime's own tool, in its QOperator format (uint8
    activations, QGemm), calibrated on 500 training samples."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    name = onnx.load(str(src)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: digits.x_train[i : i + 50]} for i in range(0, 500, 50)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QOperator,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    ops = {node.op_type for node in onnx.load(str(dst)).graph.node}
    assert "QGemm" in ops and "Gemm" not in ops, ops  # (every hidden activation an integer)


def test_a_model_quantized_to_integer_activations_is_still_read(marked_runs, digits, tmp_path):
    """Static quantisation in onnxruntime's QOperator format computes the carrier as uint8: it
    had been passed over (not a float), and the marked model read as not detected (105 of 192
    bits wrong, exit 1). An integer tensor is now read as the graph's quantized operators declare
    it, scale and zero point; three seeds, and the unmarked model quantized so is not claimed."""
    for seed in SEEDS:
        run = marked_runs(seed)
        base_onnx = tmp_path / f"base{seed}.onnx"
        run_json("export", run.base, "--out", base_onnx)
        for model, marked in ((run.onnx, True), (base_onnx, False)):
            path = tmp_path / f"q-{seed}-{marked}.onnx"
            _quantized(model, path, digits)
            r = hidden(run_json("extract", "--model", path, "--keys", run.keys, code=0 if marked else 1))
            assert r["candidates"] == 2, r  # (fc1's and fc2's uint8 outputs, both counted in p)
            if marked:
                assert r["detected"] and r["bit_errors"] <= r["max_bit_errors"] // 2, r
            else:
                assert not r["detected"] and r["bit_errors"] > r["max_bit_errors"] + 20, r


def test_integer_tensors_are_read_as_their_quantized_operators_declare_them(tmp_path):
    """A graph built by hand with integer tensors of the input's values, each read as the reals
    it stands for, (q - zero point) * scale, within a step or two of the input; not as integers
    100 too high. Declared by their producer (QuantizeLinear at a zero point of 100; a
    QLinearMatMul at 50 and twice the step) or only by a reader (a Cast to uint8 read by a
    QLinearMatMul). One whose declared scale is not above zero is read as its integers; a copy
    (an Identity, the DequantizeLinear of a tensor at its own declaration, a Cast to float) is
    read once."""
    import numpy as np
    import onnx
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from deepsigns_cli.runtime import OnnxModel

    step = 1 / 64
    inits = {"s": np.float32(step), "z": np.uint8(100), "s2": np.float32(2 * step), "z2": np.uint8(50),
             "bad": np.float32(-step), "w": np.eye(4, dtype=np.int8), "ws": np.float32(1.0), "wz": np.int8(0),
             "k": np.float32(1 / step), "zf": np.float32(100), "lo": np.float32(0), "hi": np.float32(255)}
    node = h.make_node
    nodes = [node("QuantizeLinear", ["input", "s", "z"], ["q"]), node("Identity", ["q"], ["passed"]),
             node("QLinearMatMul", ["passed", "s", "z", "w", "ws", "wz", "s2", "z2"], ["product"]),
             node("DequantizeLinear", ["product", "s2", "z2"], ["out"]),
             node("Mul", ["input", "k"], ["scaled"]), node("Add", ["scaled", "zf"], ["shifted"]),
             node("Clip", ["shifted", "lo", "hi"], ["clipped"]),
             node("Cast", ["clipped"], ["raw"], to=TensorProto.UINT8),
             node("QLinearMatMul", ["raw", "s", "z", "w", "ws", "wz", "s2", "z2"], ["raw_product"]),
             node("QuantizeLinear", ["input", "bad", "z"], ["negative"]),
             node("Cast", ["negative"], ["cast"], to=TensorProto.FLOAT),
             node("Cast", ["raw_product"], ["cast2"], to=TensorProto.FLOAT),
             node("Sum", ["out", "cast", "cast2"], ["logits"])]
    graph = h.make_graph(nodes, "hand-quantized", [h.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
                         [h.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
                         [nh.from_array(np.asarray(v), k) for k, v in inits.items()])
    path = tmp_path / "hand.onnx"
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8), path)
    x = np.random.default_rng(0).uniform(-1.5, 1.5, (16, 4)).astype(np.float32)
    model = OnnxModel(path, timeout=60)
    try:
        found = model.intermediates(x)
    finally:
        model.close()
    for name, within in (("q", step / 2), ("product", 1.5 * step), ("raw", step), ("raw_product", 2 * step)):
        assert np.abs(found[name] - x).max() <= within + 1e-6, name
    # no scale declared as a scale can be (negative): read as its integers
    assert ((found["negative"] == np.round(found["negative"])) & (found["negative"] >= 0)).all()
    # copies read once: q's Identity, product's DequantizeLinear, negative's Cast to float
    assert not {"passed", "out", "cast"} & set(found), set(found)


# ---------------------------------------------------------------------------- the sweep


@pytest.fixture(scope="module")
def prune_sweep(marked, tmp_path_factory) -> tuple[dict, object]:
    """A sweep with --plot, run where HOME cannot be written: matplotlib, finding no config
    folder it could make, had logged two lines on stderr beside the report."""
    from helpers import run_proc

    folder = tmp_path_factory.mktemp("sweep")
    home = folder / "home"
    home.write_text("a file, not a folder: nothing can be made under it\n")
    proc = run_proc("attack", "prune", "--model", marked.marked, "--sweep", "rate=0.2,0.97", "--keys", marked.keys,
                    "--plot", folder / "prune.png", "--out", folder / "kept", "--json",
                    env={"HOME": str(home), "MPLCONFIGDIR": None})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    home.unlink()
    return json.loads(proc.stdout), folder


def test_a_sweep_reads_the_owners_keys_at_every_strength(prune_sweep, marked):
    report, folder = prune_sweep
    rows = report["rows"]
    assert [r["value"] for r in rows] == [None, 0.2, 0.97]  # the victim first
    victim, light, heavy = rows
    assert victim["extract"]["detected"] and light["extract"]["detected"]
    assert heavy["accuracy"] < victim["accuracy"] - 30  # 97% of the weights gone breaks the model
    assert hidden(heavy["extract"])["bit_errors"] > hidden(light["extract"])["bit_errors"]
    assert report["param"] == "rate" and report["commitment"] and report["alpha"] == 1e-9
    assert rows[0]["verify"] is None  # the bundle has no black-box scheme: nothing to verify
    for row in rows[1:]:  # --out: every attacked model kept, and named where it is kept
        path = folder / "kept" / f"prune-rate-{row['value']}.safetensors"
        assert path.is_file() and row["model"] == row["extract"]["model"] == str(path)
    assert victim["extract"]["model"] == str(marked.marked) and victim["model"] is None
    assert (folder / "prune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_reports_every_parameter_and_each_strengths_results(prune_sweep, marked):
    """As a single attack's report: the parameters with their defaults, the seed, the data and
    the input model once; each strength's own results (here the sparsity) in its row."""
    report, _ = prune_sweep
    lr = load_checkpoint(marked.marked)[1].lr
    assert report["params"] == {"scope": "global", "finetune_epochs": 0, "lr": lr, "optimizer": "adam",
                                "data_fraction": 1.0, "batch_size": 64, "precision": "fp32"}
    assert (report["model"], report["data"], report["seed"]) == (str(marked.marked), "digits", 0)
    assert [r["results"] for r in report["rows"]] == [{}, {"sparsity": pytest.approx(0.2, abs=1e-4)},
                                                      {"sparsity": pytest.approx(0.97, abs=1e-4)}]


def test_a_sweep_verifies_black_box_marks_from_onnx(blackbox):
    report = run_json("attack", "noise", "--model", blackbox["marked_path"], "--sweep", "sigma=0,2",
                      "--keys", blackbox["keys"])
    victim, none, strong = report["rows"]
    # (each reading named its model by a scratch file's path, removed before the report was printed)
    assert victim["verify"]["model"] == victim["extract"]["model"] == str(blackbox["marked_path"])
    assert none["verify"]["model"] == none["extract"]["model"] == "noise sigma=0.0, not kept" and none["model"] is None
    assert victim["verify"]["detected"] and none["verify"]["detected"]
    assert none["verify"]["results"][0]["matches"] == 20
    assert strong["verify"]["results"][0]["matches"] < 20


def test_a_sweep_keeps_each_attackers_bundle_and_its_record_names_it_where_it_is_kept(marked, tmp_path):
    """A sweep makes its models in a scratch folder and keeps them at the end: the record in a
    kept model named the attacker's bundle by its scratch path."""
    kept = tmp_path / "kept"
    report = run_json("attack", "overwrite", "--model", marked.marked, "--scheme", "hidden", "--sweep", "epochs=1",
                      "--keys", marked.keys, "--out", kept)
    model, bundle = kept / "overwrite-epochs-1.safetensors", kept / "overwrite-epochs-1.attacker.dskey"
    assert report["rows"][1]["results"]["attacker_keys"] == str(bundle) and report["rows"][1]["model"] == str(model)
    assert bundle.stat().st_mode & 0o777 == 0o600
    record = json.dumps(run_json("inspect", model))
    assert f'"attacker_keys": "{bundle}"' in record and "deepsigns-sweep-" not in record
    assert run_json("extract", "--model", model, "--keys", bundle)["detected"]


@pytest.mark.parametrize("args, needle", [
    (["--sweep", "nope=1,2", "--keys", "{keys}"], "no such option"),
    (["--sweep", "rate=1.5", "--keys", "{keys}"], "--rate"),
    (["--sweep", "rate=", "--keys", "{keys}"], "PARAM=v1"),
    (["--sweep", "rate=0.5"], "--keys"),
    (["--keys", "{keys}", "--out", "{tmp}/x.safetensors"], "--keys goes with --sweep"),
    # (without --sweep, these two had been taken and ignored: an --alpha of 5 too)
    (["--alpha", "5", "--out", "{tmp}/x.safetensors"], "--alpha goes with --sweep"),
    (["--passphrase-file", "{keys}", "--out", "{tmp}/x.safetensors"], "--passphrase-file goes with --sweep"),
    (["--sweep", "rate=0.5", "--keys", "{keys}", "--plot", "{tmp}/x.jpg"], ".png"),
    (["--sweep", "rate=0.5", "--keys", "{keys}", "--out", "{keys}"], "cannot be the folder --sweep keeps"),
    (["--sweep", "rate=0.5,0.2,0.50", "--keys", "{keys}", "--out", "{tmp}/kept"], "0.5 is given twice"),
    (["--sweep", "rate=0.5", "--keys", "{keys}", "--out", "{tmp}/kept.onnx"], "keeps its models in a folder"),
    (["--sweep", "rate=0.5", "--keys", "{keys}", "--out", "{tmp}/kept.pt"], "keeps its models in a folder"),
    (["--sweep", "rate=0.5", "--keys", "{keys}", "--out", "{tmp}/kept.PTH"], "keeps its models in a folder"),
    (["--sweep", "rate=0.5", "--sweep", "rate=0.2", "--keys", "{keys}"], "--sweep is given twice"),
    (["--sweep", "rate=0.5", "--keys", "{keys}", "--commitment", "0" * 64], "not the published 0000"),
    (["--rate", "0.5", "--commitment", "0" * 64, "--out", "{tmp}/p.safetensors"], "--commitment goes with --sweep"),
])
def test_bad_sweeps_are_refused_with_one_line(marked, tmp_path, args, needle):
    args = [a.format(keys=marked.keys, tmp=tmp_path) for a in args]
    result = run_cli("attack", "prune", "--model", marked.marked, *args, code=2)
    assert_one_error_line(result.stderr, result.stdout, needle)
    assert not list(tmp_path.iterdir())


def test_an_attacks_passphrase_files_are_inputs_it_never_overwrites(marked, tmp_path):
    """With --force, the attacker's bundle had been sealed over its own passphrase file, and a
    sweep's plot written over the owner's (keygen and embed refused the same)."""
    thief, owner = tmp_path / "thief.dskey", tmp_path / "owner.png"
    thief.write_text("the thief's passphrase\n")
    owner.write_text(PASSPHRASE + "\n")
    for args, flag in (
            (["overwrite", "--model", marked.base, "--attacker-keys", thief, "--attacker-passphrase-file", thief,
              "--out", tmp_path / "o.safetensors"], "--attacker-passphrase-file"),
            (["prune", "--model", marked.marked, "--sweep", "rate=0.5", "--keys", marked.keys, "--passphrase-file",
              owner, "--plot", owner], "--passphrase-file")):
        result = run_cli("attack", *args, "--force", code=2)
        assert_one_error_line(result.stderr, result.stdout, f"is also the {flag} input")
    assert thief.read_text() == "the thief's passphrase\n" and owner.read_text() == PASSPHRASE + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["owner.png", "thief.dskey"]


def test_a_swept_text_that_is_a_path_is_refused_before_any_attack(marked, tmp_path, monkeypatch):
    """Each strength's model is kept as NAME-PARAM-VALUE: distill's student 'sub/x' made a path
    of folders, refused as a missing folder, and only once the strengths before it had run; a
    student of 300 characters, a name too long, blamed the scratch folder's path."""
    from deepsigns_cli import api

    def ran(*args, **kwargs):
        raise AssertionError("an attack ran")

    monkeypatch.setattr(api, "attack", ran)
    (tmp_path / "kept").mkdir()
    for student in ("sub/x", "..", "m" * 300):
        result = run_cli("attack", "distill", "--model", marked.marked, "--keys", marked.keys, "--sweep",
                         f"student=mlp,{student}", "--out", tmp_path / "kept", code=2)
        assert_one_error_line(result.stderr, result.stdout, repr(student), "cannot be part of a file name")
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"] and not list((tmp_path / "kept").iterdir())


@pytest.mark.parametrize("args, needle", [
    (["--out", "{tmp}/kept"], "kept/prune-rate-0.9.safetensors exists: pass --force"),
    (["--out", "{tmp}/p.png", "--plot", "{tmp}/p.png"], "is also --out"),
])
def test_a_sweeps_outputs_are_checked_before_the_first_attack(marked, tmp_path, monkeypatch, args, needle):
    """A kept model of a later strength, or --plot naming the folder, had failed the sweep only
    once the attacks were done (after minutes of training): now before any runs."""
    from deepsigns_cli import api

    def ran(*args, **kwargs):
        raise AssertionError("an attack ran")

    monkeypatch.setattr(api, "attack", ran)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "prune-rate-0.9.safetensors").write_bytes(b"kept before")
    args = [a.format(tmp=tmp_path) for a in args]
    result = run_cli("attack", "prune", "--model", marked.marked, "--keys", marked.keys, "--sweep", "rate=0.5,0.9",
                     *args, code=2)
    assert_one_error_line(result.stderr, result.stdout, needle)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept", "prune-rate-0.9.safetensors"]


@pytest.mark.parametrize("columns", ["20", "60", "80"])
def test_a_sweep_table_is_never_cropped(blackbox, tmp_path, columns):
    """Drawn for 80 columns (a pipe, a file, a terminal), a three-scheme table lost its p-values
    and both verdict columns without a mark; for fewer, rich dropped whole columns: every column
    is drawn whole, whatever the width."""
    result = run_cli("attack", "noise", "--model", blackbox["marked_path"], "--sweep", "sigma=0,0.5",
                     "--keys", blackbox["keys"], "--quiet", env={"COLUMNS": columns}, code=0)
    header = next(line for line in result.stdout.splitlines() if "acc" in line)
    assert header.split() == ["sigma", "acc", "output", "(p)", "extract", "verify"], result.stdout
    victim = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["victim"])
    assert victim.split()[-2:] == ["yes", "yes"], result.stdout


@pytest.mark.parametrize("width", [20, 60, 80])
def test_a_wide_sweep_table_keeps_every_column(width):
    """Three schemes' columns and both verdicts (the report as a sweep of a three-scheme bundle
    gives it): below their width rich had dropped whole columns (the strength, the accuracy,
    a verdict) without a mark."""
    import io

    from rich.console import Console

    from deepsigns_cli.cli import render
    from deepsigns_cli.results import BitsResult, GradResult, MatchResult, SweepReport, SweepRow, decide

    def decision(errors: int) -> object:
        results = [BitsResult("hidden", 1e-58, n_bits=192, bits="0" * 192, bit_errors=errors, ber=errors / 192),
                   MatchResult("output", 1e-37, keys=100, matches=65, num_classes=10),
                   GradResult("gradsigns", 1e-9, n_bits=64, bits="0" * 64, bit_errors=9, ber=9 / 64)]
        return decide(results, 1e-9, command="extract", model="m", key_id="k")

    rows = [SweepRow(value, 97.5, decision(0), decide([MatchResult("output", 1e-37, keys=100, matches=65,
                                                                   num_classes=10)], 1e-9, command="verify",
                                                      model="m", key_id="k"), 0.1,
                     results={} if value is None else {"sparsity": 0.5}) for value in (None, 0.5)]
    out = io.StringIO()
    render.sweep(Console(file=out, width=width),
                 SweepReport("prune", "rate", {"scope": "layer"}, "v.safetensors", "digits", 7, 1e-9, "k", "c" * 64,
                             rows))
    header = next(line for line in out.getvalue().splitlines() if "acc" in line)
    assert header.split() == ["rate", "acc", "sparsity", "hidden", "(p)", "output", "(p)", "gradsigns", "(p)",
                              "extract", "verify"], out.getvalue()
    assert "v.safetensors, data digits, seed 7; scope layer" in out.getvalue()


def test_a_sweep_report_is_json(prune_sweep):
    report, _ = prune_sweep
    json.dumps(report, allow_nan=False)
    assert report["command"] == "attack" and report["attack"] == "prune"


@pytest.mark.slow
@pytest.mark.parametrize("before, sig", [(False, signal.SIGTERM), (True, signal.SIGTERM), (False, signal.SIGKILL)],
                         ids=["new-folder", "forced-over-a-kept-model", "killed"])
def test_an_interrupted_sweep_leaves_nothing_behind(marked, tmp_path, before, sig):
    """SIGTERM once the first strength's model is made: exit 143, and the folder the sweep made is
    gone, as any command's outputs are. With --force over a folder that held a model of that
    name from before, the model from before was removed too (each strength was committed on its
    own, and a failure removed what the sweep had committed): the folder is as it was. SIGKILL
    leaves the scratch folder (removed by the next sweep), but no --out folder: the sweep makes
    it for the commit (it had been made at the start, and was left behind, empty)."""
    kept, scratch = tmp_path / "a" / "kept", tmp_path / "tmp"
    scratch.mkdir()
    if before:
        kept.mkdir(parents=True)
        (kept / "finetune-epochs-1.safetensors").write_bytes(b"an earlier sweep's model")
    proc = subprocess.Popen(
        [*deepsigns_argv(), "attack", "finetune", "--model", str(marked.marked), "--keys", str(marked.keys),
         "--sweep", "epochs=1,100000", "--device", "cpu", "--out", str(kept), *(["--force"] if before else [])],
        env=process_env({"TMPDIR": str(scratch)}), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE)
    with reaped(proc):
        deadline = time.monotonic() + 180
        while not list(scratch.glob("deepsigns-sweep-*/finetune-epochs-1.safetensors")):
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace")
            assert time.monotonic() < deadline, "the sweep never made its first model"
            time.sleep(0.1)
        time.sleep(1.0)  # (into the second strength's training)
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        assert [p.name for p in tmp_path.iterdir()] == ["tmp"]
        return
    assert code == 143, proc.stderr.read().decode(errors="replace")
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []
    if before:
        assert [p.name for p in kept.iterdir()] == ["finetune-epochs-1.safetensors"]
        assert (kept / "finetune-epochs-1.safetensors").read_bytes() == b"an earlier sweep's model"
    else:
        assert [p.name for p in tmp_path.iterdir()] == ["tmp"]


def test_a_plot_in_the_folder_the_sweep_makes_is_written_there(marked, tmp_path):
    """(--plot kept/plot.png, with --out kept not made yet, had been refused: the plot's folder
    was checked before the sweep made --out; the same command without --plot makes it)"""
    kept = tmp_path / "kept"
    run_json("attack", "prune", "--model", marked.marked, "--sweep", "rate=0.2", "--keys", marked.keys,
             "--out", kept, "--plot", kept / "plot.png")
    assert (kept / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (kept / "prune-rate-0.2.safetensors").is_file()
    result = run_cli("attack", "prune", "--model", marked.marked, "--sweep", "rate=0.2", "--keys", marked.keys,
                     "--out", tmp_path / "new", "--plot", tmp_path / "new" / "sub" / "plot.png", code=2)
    assert "sub" in result.stderr and not (tmp_path / "new").exists()  # (the folder it made, removed)

