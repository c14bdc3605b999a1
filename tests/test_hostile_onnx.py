"""Suspect ONNX files written to make the tool fail: each ends in one `error:` line and exit 2,
or, where the file is a legitimate model, in a verdict. Never a traceback, a hang, an OOM kill
of our process, or a file written.

The files are built with onnx.helper or by mutating a real export (our owner's marked model).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import assert_bad_input, run_cli, run_json
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from deepsigns_cli import runtime
from deepsigns_cli.errors import InputError, OnnxError
from deepsigns_cli.runtime import OnnxModel
from deepsigns_cli.suspect import EVERY_UNIT, OnnxSuspect

SAMPLE = Path(__file__).resolve().parents[1] / "sample_models" / "digits-mlp.safetensors"
CLI_TIMEOUT = 3  # seconds: what the hanging cases are given


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def owner(blackbox):
    """Black-box keys (scheme output, K = 20) embedded into an MLP, and its export (shared)."""
    return {"keys": blackbox["keys"], "marked": blackbox["marked_path"], "onnx": blackbox["onnx"]}


@pytest.fixture
def suspects(tmp_path):
    """A folder for suspect files; checks that verify writes nothing into it."""
    folder = tmp_path / "suspects"
    folder.mkdir()
    yield folder
    leftovers = [n for n in os.listdir(folder) if n.endswith(".part") or n.startswith(".")]
    assert not leftovers, leftovers


def verify(owner, model, *extra):
    """`deepsigns verify --json` in-process; the folder of the model gains no file."""
    before = sorted(os.listdir(Path(model).parent))
    result = run_cli("verify", "--model", model, "--keys", owner["keys"], "--json", *extra, code=None)
    assert sorted(os.listdir(Path(model).parent)) == before, "verify wrote a file"
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def refused(owner, model, *needles, extra=()):
    result = verify(owner, model, *extra)
    return assert_bad_input(result, *needles)


def verdict(owner, model, code: int | None = None) -> dict:
    result = verify(owner, model)
    assert result.exit_code in (0, 1), f"exit {result.exit_code}: {result.stderr}"
    assert result.stderr == "", result.stderr
    report = json.loads(result.stdout)
    assert report["detected"] is (result.exit_code == 0)
    if code is not None:
        assert result.exit_code == code, report
    return report


def matches(report: dict) -> int:
    (result,) = [r for r in report["results"] if r["scheme"] == "output"]
    return result["matches"]


# ----------------------------------------------------------------------------- building files


def save(model, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def graph_model(nodes, inputs, outputs, initializers=(), opset: int = 17, ir: int = 8, check: bool = True):
    model = h.make_model(h.make_graph(nodes, "suspect", inputs, outputs, list(initializers)),
                         opset_imports=[h.make_opsetid("", opset)], ir_version=ir)
    if check:
        onnx.checker.check_model(model)
    return model


def x_info(elem=T.FLOAT, batch="n"):
    return h.make_tensor_value_info("x", elem, [batch, 1, 8, 8])


def y_info(name="y", elem=T.FLOAT, shape=("n", 10)):
    return h.make_tensor_value_info(name, elem, list(shape))


def classifier(path: Path, tail=(), tail_inits=(), out=None, check: bool = True) -> Path:
    """x (n, 1, 8, 8) -> Flatten -> MatMul (64 x 10) -> z, then `tail` nodes; output `out`."""
    weights = nh.from_array(np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32), "W")
    nodes = [h.make_node("Flatten", ["x"], ["f"]), h.make_node("MatMul", ["f", "W"], ["z"]), *tail]
    model = graph_model(nodes, [x_info()], [out or y_info("z")], [weights, *tail_inits], check=check)
    return save(model, path)


def loop_model(path: Path, trip: int = 2**62) -> Path:
    """The scores come out of a Loop that adds 1 to them `trip` times."""
    body = h.make_graph(
        [h.make_node("Identity", ["cond_in"], ["cond_out"]), h.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body",
        [h.make_tensor_value_info("i", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
         h.make_tensor_value_info("v_in", T.FLOAT, ["n", 64])],
        [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info("v_out", T.FLOAT, ["n", 64])],
        [nh.from_array(np.array(1.0, np.float32), "one")],
    )
    nodes = [h.make_node("Flatten", ["x"], ["f"]),
             h.make_node("Loop", ["M", "cond", "f"], ["v"], body=body),
             h.make_node("Slice", ["v", "s", "e", "ax"], ["y"])]
    inits = [nh.from_array(np.array(trip, np.int64), "M"), nh.from_array(np.array(True), "cond"),
             nh.from_array(np.array([0]), "s"), nh.from_array(np.array([10]), "e"),
             nh.from_array(np.array([1]), "ax")]
    return save(graph_model(nodes, [x_info()], [y_info()], inits), path)


def allocating_model(path: Path, elements: int, op: str = "ConstantOfShape") -> Path:
    """Scores that depend on a tensor of `elements` floats (ConstantOfShape or Expand)."""
    if op == "ConstantOfShape":
        make = [h.make_node("ConstantOfShape", ["shape"], ["big"], value=nh.from_array(np.array([1.0], np.float32)))]
        shape = np.array([elements], np.int64)
    else:
        side = math.isqrt(elements)
        make = [h.make_node("Expand", ["one", "shape"], ["big"])]
        shape = np.array([side, side], np.int64)
    nodes = [h.make_node("Flatten", ["x"], ["f"]),
             h.make_node("ReduceSum", ["f", "ax1"], ["s"], keepdims=1),
             *make,
             h.make_node("ReduceMax", ["big"], ["t"], keepdims=0),
             h.make_node("Mul", ["s", "t"], ["s2"]),
             h.make_node("Expand", ["s2", "ten"], ["y"])]
    inits = [nh.from_array(np.array([1], np.int64), "ax1"), nh.from_array(shape, "shape"),
             nh.from_array(np.array(1.0, np.float32), "one"), nh.from_array(np.array([1, 10], np.int64), "ten")]
    return save(graph_model(nodes, [x_info()], [y_info()], inits), path)


def mutated(owner, path: Path, change) -> Path:
    """The owner's marked export, changed by `change(model)` (which may return a new model)."""
    model = onnx.load(str(owner["onnx"]))
    model = change(model) or model
    return save(model, path)


def with_input_type(elem):
    """The graph input becomes `elem`, cast to float right away: the marked model inside."""

    def change(model):
        graph = model.graph
        graph.input[0].name = "raw"
        graph.input[0].type.tensor_type.elem_type = elem
        graph.node.insert(0, h.make_node("Cast", ["raw"], ["input"], to=T.FLOAT))

    return change


def with_output(nodes, name, elem=T.FLOAT, shape=("batch", 10), inits=()):
    """`nodes` appended after the logits; the first output becomes `name`."""

    def change(model):
        graph = model.graph
        graph.node.extend(nodes)
        graph.initializer.extend(inits)
        del graph.output[:]
        graph.output.append(h.make_tensor_value_info(name, elem, list(shape)))

    return change


def external(owner, folder: Path) -> Path:
    """The marked export with its weights in 'w.data' beside it."""
    model = onnx.load(str(owner["onnx"]))
    onnx.save_model(model, str(folder / "ext.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.data", size_threshold=0)
    return folder / "ext.onnx"


def set_external(path: Path, key: str, value: str) -> Path:
    model = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.external_data)
    entries = {e.key: e for e in tensor.external_data}
    if key in entries:
        entries[key].value = value
    else:
        tensor.external_data.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def deep_bytes(depth: int) -> bytes:
    """A ModelProto whose graph nests `depth` If subgraphs (raw protobuf, no helper)."""

    def varint(n):
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    def field(num, payload):
        return varint(num << 3 | 2) + varint(len(payload)) + payload

    graph = b""
    for _ in range(depth):
        attr = field(1, b"then_branch") + varint(20 << 3) + varint(5) + field(6, graph)
        graph = field(1, field(4, b"If") + field(5, attr))
    return varint(1 << 3) + varint(8) + field(7, graph) + field(8, varint(2 << 3) + varint(17))


# ============================================================================= 1. hangs and memory


def test_loop_for_ever_ends_with_timeout_error(owner, suspects):
    path = loop_model(suspects / "loop.onnx")
    start = time.monotonic()
    line = refused(owner, path, "did not answer within 3 s", "--timeout", extra=["--timeout", CLI_TIMEOUT])
    assert time.monotonic() - start < CLI_TIMEOUT + 10, line


def test_an_output_that_fails_the_model_as_a_whole_fails_the_reading():
    """Every output is read and one that cannot be read is left out, but not one that stops
    the model as a whole (no answer in time, a crash): that had been left out too, and the
    verdict came from the outputs read before it (3,000 decoy outputs ahead of the real one).
    (A real file cannot show it reliably: what onnxruntime runs for one output varies.)"""
    from deepsigns_cli.schemes.base import each_output
    from deepsigns_cli.suspect import Suspect

    class Stops(Suspect):
        broken = False

        def outputs(self, alone=False):
            return ["decoy", "slow", "logits"]

    def read(output):
        if output == "slow":
            suspect.broken = True
            raise OnnxError("did not answer within 3 s")
        return output

    suspect = Stops()
    with pytest.raises(OnnxError, match="did not answer"):
        each_output(suspect, read)

    def no_scores(output):  # an output that cannot be read, the model still answering: left out
        if output == "decoy":
            raise OnnxError("holds no scores")
        return output

    suspect.broken = False
    assert each_output(suspect, no_scores) == (["slow", "logits"], ["not read: holds no scores"])  # (named)


@pytest.mark.parametrize("units", [None, 64], ids=["nothing-read", "units-read"])
def test_more_tensors_than_deepsigns_reads_leave_the_hidden_scheme_unread(marked, monkeypatch, units):
    """The carrier's tensors are more data than a worker may send back (1,300 distinct copies of
    a 512-wide carrier pass 1 GiB; here the limit is lowered instead): the hidden scheme says it
    was not read, and a bundle with no other scheme could not be read (exit 2), never "not
    detected". units-read: the reading of every unit still fits (a thief's decoys fill it first);
    it had dropped the note, and the suspect read as "not detected"."""
    from helpers import PASSPHRASE

    from deepsigns_cli import api, suspect
    from deepsigns_cli.bundle import open_bundle
    from deepsigns_cli.schemes import hidden

    monkeypatch.setattr(runtime, "MAX_REPLY_BYTES", 1 << 17)  # (the worker is forked after this)
    if units is not None:
        monkeypatch.setattr(suspect, "MAX_UNITS", units)
    keys = open_bundle(marked.keys, PASSPHRASE).schemes["hidden"]
    model = OnnxModel(marked.onnx, provider="cpu")
    try:
        result = hidden.SCHEME().read(suspect.OnnxSuspect(model), keys)
    finally:
        model.close()
    assert result.unread and result.note.startswith("not read:") and "more data" in result.note
    assert result.readings == (0 if units is None else 8)  # (the first set of units, at two temperatures,
    # over scales and over offsets, from a batch and one input at a time)
    with pytest.raises(OnnxError, match="could not be read .hidden: not read: .* more data"):
        api.extract(marked.onnx, marked.keys, PASSPHRASE)
    result = run_cli("extract", "--model", marked.onnx, "--keys", marked.keys, code=None)
    assert_bad_input(result, "could not be read", "more data")


def test_extract_is_bounded_too(marked, suspects):
    path = loop_model(suspects / "loop.onnx")
    result = run_cli("extract", "--model", path, "--keys", marked.keys, "--timeout", 2, code=None)
    assert_bad_input(result, "did not answer within 2 s")


def test_timeout_kills_the_worker_and_stays_failed(tmp_path, monkeypatch):
    started = []
    real_init = runtime._Worker.__init__

    def spy(self, *args):
        real_init(self, *args)
        started.append(self.pid)

    monkeypatch.setattr(runtime._Worker, "__init__", spy)
    model = OnnxModel(loop_model(tmp_path / "loop.onnx"), provider="cpu", timeout=1.5)
    x = np.zeros((20, 1, 8, 8), np.float32)
    start = time.monotonic()
    with pytest.raises(OnnxError, match=r"did not answer within 1\.5 s.*--timeout"):
        model.scores(x)
    assert 1.5 <= time.monotonic() - start < 6
    (pid,) = started
    with pytest.raises(ChildProcessError):  # killed and reaped: no zombie left
        os.waitpid(pid, os.WNOHANG)
    again = time.monotonic()
    with pytest.raises(OnnxError, match="did not answer"):
        model.scores(x)
    assert time.monotonic() - again < 0.5 and len(started) == 1


@pytest.mark.parametrize("allowed", [0.0, 2.0], ids=["one budget", "allowed more"])
def test_timeout_is_one_budget_for_all_queries(owner, monkeypatch, allowed):
    """Every query draws on one --timeout; `allow` adds to it (extract's further sets of units
    each run the whole graph again: a wide ordinary model that answered its first run in time
    had run out of time on its second)."""
    real_run = runtime._Evaluator.run

    def slow(self, *args):  # in the worker: each query takes 0.8 s
        time.sleep(0.8)
        return real_run(self, *args)

    monkeypatch.setattr(runtime._Evaluator, "run", slow)
    model = OnnxModel(owner["onnx"], provider="cpu", timeout=2.0)
    x = np.zeros((1, 1, 8, 8), np.float32)  # (one input: no check of a batch's answers, a query of its own)
    model.scores(x)
    model.scores(x)
    if allowed:
        model.allow(allowed)
        model.scores(x)
        model.scores(x)
    with pytest.raises(OnnxError, match="did not answer within 2 s"):
        model.scores(x)


def test_no_timeout_means_no_limit(owner):
    model = OnnxModel(owner["onnx"], provider="cpu", timeout=None)
    assert model.scores(np.zeros((3, 1, 8, 8), np.float32)).shape == (3, 10)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "10", True])
def test_bad_timeout_is_an_input_error(owner, bad):
    with pytest.raises(InputError, match="--timeout"):
        OnnxModel(owner["onnx"], provider="cpu", timeout=bad)



def test_attack_is_bounded_too(suspects):
    """attack runs the victim ONNX to measure its accuracy: it had no time limit at all."""
    path = loop_model(suspects / "loop.onnx")
    result = run_cli("attack", "label-only", "--model", path, "--out", suspects / "out.onnx", "--timeout", 2,
                     code=None)
    assert_bad_input(result, "did not answer within 2 s")
    assert not (suspects / "out.onnx").exists()


def test_external_data_beyond_what_onnxruntime_takes_is_refused_unread(owner, suspects):
    """A sparse file beside the model costs its maker nothing: 3 GiB of it, all loaded in our own
    process before the checker, took 12 GB of memory there."""
    model = onnx.load(str(owner["onnx"]))
    huge = model.graph.initializer.add(name="unused", data_type=T.FLOAT, dims=[3 * 2**28])
    huge.data_location = T.EXTERNAL
    for key, value in {"location": "huge.data", "offset": "0", "length": str(3 * 2**30)}.items():
        huge.external_data.add(key=key, value=value)
    with open(suspects / "huge.data", "wb") as fh:
        fh.truncate(3 * 2**30)
    onnx.save(model, str(suspects / "huge.onnx"))
    refused(owner, suspects / "huge.onnx", "'unused'", "beyond the 2048 MiB")


def test_a_graph_of_too_many_nodes_is_refused_before_the_checker(owner, monkeypatch):
    """Parsed and checked in our own process, 4 million Identity nodes (127 MB) took a minute."""
    monkeypatch.setattr(runtime, "MAX_NODES", 3)
    refused(owner, owner["onnx"], "nodes, more than deepsigns checks and runs (3)")


@pytest.mark.parametrize("op", ["ConstantOfShape", "Expand"])
def test_huge_tensor_is_an_error_not_an_oom_kill(owner, suspects, op):
    path = allocating_model(suspects / f"{op}.onnx", 2**40, op)
    refused(owner, path, "memory")


def test_memory_limit_is_enforced_in_the_worker(tmp_path, monkeypatch):
    """1 GiB would fit in this machine: only the worker's limit (256 MiB here) refuses it."""
    monkeypatch.setattr(runtime, "MEMORY_LIMIT", 256 << 20)
    model = OnnxModel(allocating_model(tmp_path / "gib.onnx", 2**28), provider="cpu")
    with pytest.raises(OnnxError, match="needs more memory than the 256 MiB"):
        model.scores(np.zeros((2, 1, 8, 8), np.float32))
    monkeypatch.setattr(runtime, "MEMORY_LIMIT", 4 << 30)
    fits = OnnxModel(allocating_model(tmp_path / "mib.onnx", 2**20), provider="cpu")
    assert fits.scores(np.zeros((2, 1, 8, 8), np.float32)).shape == (2, 10)


def test_worker_crash_is_an_onnx_error(owner, monkeypatch):
    def segfault(self, *args):  # what a hostile graph could make onnxruntime do
        os.kill(os.getpid(), signal.SIGSEGV)

    monkeypatch.setattr(runtime._Evaluator, "run", segfault)
    model = OnnxModel(owner["onnx"], provider="cpu")
    with pytest.raises(OnnxError, match="crashed.*SIGSEGV.*malformed or hostile"):
        model.scores(np.zeros((2, 1, 8, 8), np.float32))


def test_outputs_larger_than_the_reply_limit_are_refused(owner, monkeypatch):
    monkeypatch.setattr(runtime, "MAX_REPLY_BYTES", 100)
    model = OnnxModel(owner["onnx"], provider="cpu")
    with pytest.raises(OnnxError, match="more data than deepsigns reads"):
        model.scores(np.zeros((20, 1, 8, 8), np.float32))


def test_parent_never_touches_cuda_and_answers_match(owner):
    """The provider is resolved in the worker: our process never initialises CUDA."""
    runtime._cuda_usable.cache_clear()
    model = OnnxModel(owner["onnx"])  # provider auto
    x = np.random.default_rng(1).random((37, 1, 8, 8), dtype=np.float32)
    scores = model.scores(x, batch_size=8)
    assert runtime._cuda_usable.cache_info().currsize == 0
    import onnxruntime as ort

    session = ort.InferenceSession(str(owner["onnx"]), providers=["CPUExecutionProvider"])
    (want,) = session.run(None, {"input": x})
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-5)
    model.close()


def test_without_fork_the_loop_is_still_bounded(owner, tmp_path, monkeypatch):
    """Where os.fork is missing the model runs here; onnxruntime's terminate flag ends a Loop."""
    monkeypatch.setattr(runtime, "_can_fork", lambda: False)
    x = np.zeros((5, 1, 8, 8), np.float32)
    assert OnnxModel(owner["onnx"], provider="cpu").scores(x).shape == (5, 10)
    model = OnnxModel(loop_model(tmp_path / "loop.onnx"), provider="cpu", timeout=1.0)
    start = time.monotonic()
    with pytest.raises(OnnxError, match="did not answer within 1 s"):
        model.scores(x)
    assert time.monotonic() - start < 5


# ============================================================================= 2. onnxruntime's errors


@pytest.mark.parametrize("elem", [T.STRING, T.BOOL, T.UINT8, T.INT64], ids=["string", "bool", "uint8", "int64"])
def test_non_real_inputs_are_refused(owner, suspects, elem):
    path = mutated(owner, suspects / "typed.onnx", with_input_type(elem))
    refused(owner, path, "real-valued samples", T.DataType.Name(elem).lower())


@pytest.mark.parametrize("elem", [T.DOUBLE, T.FLOAT16], ids=["double", "float16"])
def test_double_and_half_inputs_get_cast_keys(owner, suspects, elem):
    path = mutated(owner, suspects / "typed.onnx", with_input_type(elem))
    report = verdict(owner, path, code=0)
    assert matches(report) == 20


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, as users run it
@pytest.mark.parametrize("batch", [1, 2])
def test_fixed_batch_export_is_still_detected(owner, suspects, batch):
    """torch.onnx.export without dynamic_axes fixes the batch: keys go in chunks, padded."""
    import torch

    from deepsigns_cli.checkpoint import load_checkpoint

    model = load_checkpoint(owner["marked"])[0].eval()
    path = suspects / f"fixed{batch}.onnx"
    torch.onnx.export(model, (torch.zeros(batch, 1, 8, 8),), str(path), input_names=["image"],
                      output_names=["scores"], dynamo=False)
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == batch
    report = verdict(owner, path, code=0)
    assert matches(report) == 20


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fixed_batch_export_is_read_by_extract(marked, suspects):
    """The hidden-layer keys (64 trigger samples) through a batch-1 export."""
    import torch

    from deepsigns_cli.checkpoint import load_checkpoint

    model = load_checkpoint(marked.marked)[0].eval()
    path = suspects / "fixed1.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False)
    report = run_json("extract", "--model", path, "--keys", marked.keys, code=0)
    assert report["detected"] is True


def test_fixed_batch_scores_equal_dynamic_ones(owner, suspects):
    def fix(model):
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3

    fixed = OnnxModel(mutated(owner, suspects / "fixed3.onnx", fix), provider="cpu")
    dynamic = OnnxModel(owner["onnx"], provider="cpu")
    x = np.random.default_rng(2).random((10, 1, 8, 8), dtype=np.float32)  # 3 + 3 + 3 + 1 padded
    np.testing.assert_allclose(fixed.scores(x), dynamic.scores(x), rtol=1e-5, atol=1e-5)
    got, want = fixed.intermediates(x), dynamic.intermediates(x)
    assert got.keys() == want.keys() and len(got) >= 4
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_huge_fixed_batch_is_refused(owner, suspects):
    def fix(model):
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2**40

    refused(owner, mutated(owner, suspects / "huge.onnx", fix), "batch dimension fixed at 1099511627776",
            "dynamic")


@pytest.mark.parametrize("opset, ir", [(1, 3), (6, 3)])
def test_ancient_opsets_are_refused(owner, suspects, opset, ir):
    weights = nh.from_array(np.zeros((64, 10), np.float32), "W")
    w_input = h.make_tensor_value_info("W", T.FLOAT, [64, 10])  # IR 3: initializers are inputs too
    model = graph_model([h.make_node("Flatten", ["x"], ["f"]), h.make_node("MatMul", ["f", "W"], ["y"])],
                        [x_info(), w_input], [y_info()], [weights], opset=opset, ir=ir)
    refused(owner, save(model, suspects / "old.onnx"), f"opset {opset}")


@pytest.mark.parametrize("key, value", [("offset", "-5"), ("length", "-1"), ("offset", "abc"),
                                        ("length", "1e3"), ("offset", "99999999999"),
                                        ("location", "w.data\x00.evil"), ("location", "")])
def test_bad_external_data_fields_are_refused(owner, suspects, key, value):
    path = set_external(external(owner, suspects), key, value)
    refused(owner, path, "external")


def test_external_data_in_a_subgraph_cannot_escape(owner, suspects, tmp_path):
    secret = tmp_path / "secret.data"
    secret.write_bytes(np.zeros(10, np.float32).tobytes())
    inner = nh.from_array(np.zeros(10, np.float32), "w")
    inner.ClearField("raw_data")
    inner.data_location = T.EXTERNAL
    for k, v in {"location": "../secret.data", "offset": "0", "length": "40"}.items():
        inner.external_data.add(key=k, value=v)
    then = h.make_graph([h.make_node("Add", ["z", "w"], ["t"])], "then", [], [y_info("t")], [inner])
    other = h.make_graph([h.make_node("Identity", ["z"], ["e"])], "else", [], [y_info("e")])
    branch = h.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)
    path = classifier(suspects / "sub.onnx", tail=[branch], tail_inits=[nh.from_array(np.array(True), "c")],
                      out=y_info(), check=False)
    refused(owner, path, "outside the model's folder")


def test_external_data_inside_folder_still_verifies(owner, suspects):
    assert matches(verdict(owner, external(owner, suspects), code=0)) == 20


@pytest.mark.parametrize("kind", ["string", "bool", "scalar", "no-classes", "sequence"])
def test_unusable_first_output_is_refused(owner, suspects, kind):
    change = {
        "string": with_output([h.make_node("Cast", ["logits"], ["s"], to=T.STRING)], "s", T.STRING),
        "bool": with_output([h.make_node("Greater", ["logits", "zero"], ["b"])], "b", T.BOOL,
                            inits=[nh.from_array(np.array(0.0, np.float32), "zero")]),
        "scalar": with_output([h.make_node("ReduceSum", ["logits"], ["r"], keepdims=0)], "r", shape=()),
        "no-classes": with_output([h.make_node("Slice", ["logits", "s0", "s0", "a1"], ["o"])], "o", shape=("batch", 0),
                                  inits=[nh.from_array(np.array([0]), "s0"), nh.from_array(np.array([1]), "a1")]),
        "sequence": None,
    }[kind]
    if kind == "sequence":
        def change(model):
            model.graph.node.append(h.make_node("SequenceConstruct", ["logits"], ["q"]))
            del model.graph.output[:]
            model.graph.output.append(h.make_tensor_sequence_value_info("q", T.FLOAT, ["batch", 10]))
    refused(owner, mutated(owner, suspects / f"{kind}.onnx", change), "first output")


def test_an_output_of_one_row_for_a_batch_is_read_one_input_at_a_time(owner, suspects):
    """An output that answers a batch with its first row only (refused, exit 2, when the keys
    were asked in a batch) answers each input asked alone: it is read so, and the marked model
    is detected."""
    change = with_output([h.make_node("Slice", ["logits", "s0", "e1"], ["o"])], "o", shape=(1, 10),
                         inits=[nh.from_array(np.array([0]), "s0"), nh.from_array(np.array([1]), "e1")])
    report = verdict(owner, mutated(owner, suspects / "first-row.onnx", change), code=0)
    assert matches(report) == 20


def test_one_number_per_input_under_a_declared_row_of_scores_is_refused(owner, suspects):
    """Declared (batch, 10), it answers (batch, 1): read as one class's scores, every answer was
    class 0 and the verdict "not detected" (exit 1); declared as it is, it was refused."""
    change = with_output([h.make_node("ReduceSum", ["logits", "a1"], ["r"], keepdims=1)], "r",
                         inits=[nh.from_array(np.array([1]), "a1")])
    refused(owner, mutated(owner, suspects / "one.onnx", change), "one number per input", "not class scores")


def test_run_time_failure_is_an_onnx_error(owner, suspects):
    change = with_output([h.make_node("Reshape", ["logits", "shape"], ["r"])], "r", shape=(7, 13),
                         inits=[nh.from_array(np.array([7, 13], np.int64), "shape")])
    refused(owner, mutated(owner, suspects / "reshape.onnx", change), "onnxruntime failed evaluating")


def test_file_onnxruntime_cannot_load_is_an_onnx_error(owner, suspects):
    """onnx.checker accepts an op of an unknown domain; onnxruntime has no kernel for it."""
    model = h.make_model(h.make_graph([h.make_node("Foo", ["x"], ["y"], domain="com.evil")], "g",
                                      [x_info()], [y_info()]),
                         opset_imports=[h.make_opsetid("", 17), h.make_opsetid("com.evil", 1)], ir_version=8)
    refused(owner, save(model, suspects / "foo.onnx"), "onnxruntime cannot load", "com.evil:Foo")


@pytest.mark.parametrize("missing", ["nodes", "outputs"])
def test_a_graph_with_no_nodes_or_no_outputs_is_named_so(owner, suspects, missing):
    """It had been called "not an ONNX model (no graph)"."""
    nodes = [] if missing == "nodes" else [h.make_node("Identity", ["x"], ["y"])]
    outputs = [] if missing == "outputs" else [y_info()]
    model = h.make_model(h.make_graph(nodes, "g", [x_info()], outputs), opset_imports=[h.make_opsetid("", 17)],
                         ir_version=8)
    refused(owner, save(model, suspects / f"no-{missing}.onnx"), f"(no {missing})")


def test_deeply_nested_protobuf_is_refused(owner, suspects):
    path = suspects / "deep.onnx"
    path.write_bytes(deep_bytes(3000))
    refused(owner, path, "is not an ONNX model")


def test_recursion_error_while_parsing_is_refused(owner, monkeypatch):
    """The pure-Python protobuf parser recurses: a deep file raises RecursionError there."""

    class Deep:  # stands in for onnx.ModelProto (whose classes cannot be subclassed)
        def ParseFromString(self, data):  # noqa: N802
            raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(onnx, "ModelProto", Deep)
    with pytest.raises(OnnxError, match=r"is not an ONNX model \(RecursionError\)"):
        OnnxModel(owner["onnx"], provider="cpu")


def test_checker_error_of_another_type_is_refused(owner, suspects):
    """An op type that is not UTF-8: onnx.checker fails with UnicodeDecodeError."""
    path = suspects / "utf.onnx"
    path.write_bytes(Path(owner["onnx"]).read_bytes().replace(b"Relu", b"R\xfflu"))
    refused(owner, path, "fails the ONNX checker")


@pytest.mark.parametrize("exc", [IndexError("out of range"), RuntimeError("std::exception"),
                                 TypeError("bad"), RecursionError("deep"), MemoryError()])
def test_any_checker_failure_is_an_onnx_error(owner, monkeypatch, exc):
    def check(*args, **kwargs):
        raise exc

    monkeypatch.setattr(onnx.checker, "check_model", check)
    with pytest.raises(OnnxError, match="fails the ONNX checker"):
        OnnxModel(owner["onnx"], provider="cpu")


def test_names_that_are_not_utf8_are_refused(owner, suspects):
    path = suspects / "names.onnx"
    path.write_bytes(Path(owner["onnx"]).read_bytes().replace(b"input", b"\xffnput"))
    refused(owner, path, "not UTF-8")


def test_control_characters_in_names_stay_on_one_line(owner, suspects):
    def rename(model):
        for node in model.graph.node:
            node.input[:] = ["in\nput\x1b[31m" if n == "input" else n for n in node.input]
        model.graph.input[0].name = "in\nput\x1b[31m"
        model.graph.input[0].type.tensor_type.elem_type = T.STRING

    refused(owner, mutated(owner, suspects / "ctl.onnx", rename), "real-valued")


def test_names_metadata_and_paths_are_printed_as_text(suspects):
    """rich reads `[...]` as markup: a name `[/]` ended `inspect` with an internal error (exit
    3), and `[red]` vanished. Every name, value and path is printed as it is."""
    x = h.make_tensor_value_info("[/]in", T.FLOAT, [None, 64])
    y = h.make_tensor_value_info("[bold]out", T.FLOAT, [None, 64])
    graph = h.make_graph([h.make_node("Relu", ["[/]in"], ["[bold]out"])], "[/]graph", [x], [y])
    model = h.make_model(graph, producer_name="[/]producer", opset_imports=[h.make_opsetid("", 17)])
    h.set_model_props(model, {"[/]key": "[red]value"})
    path = suspects / "[red]markup.onnx"
    onnx.save(model, str(path))
    output = run_cli("inspect", path).output
    for text in ("[red]markup.onnx", "[/]producer", "[/]in", "[bold]out", "[/]key", "[red]value"):
        assert text in output, text


def test_control_characters_from_a_file_are_printed_escaped(suspects):
    """A terminal takes ESC (and C1's CSI, and the bidirectional overrides) for instructions:
    a producer name could retitle the window, clear the screen or forge a line of the table."""
    x = h.make_tensor_value_info("in", T.FLOAT, [None, 64])
    y = h.make_tensor_value_info("out", T.FLOAT, [None, 64])
    graph = h.make_graph([h.make_node("Relu", ["in"], ["out"])], "g", [x], [y])
    hostile = "\x1b]0;owned\x07\x1b[2J\nforged line\r\x9b31m\u202eevil"
    model = h.make_model(graph, producer_name=hostile, opset_imports=[h.make_opsetid("", 17)])
    onnx.save(model, str(suspects / "ctl.onnx"))
    output = run_cli("inspect", suspects / "ctl.onnx").output
    assert not any(c in output for c in "\x1b\x07\r\x9b\u202e"), repr(output)
    assert "\\x1b]0;owned\\x07\\x1b[2J\\nforged line\\r\\x9b31m\\u202eevil" in output


def test_a_message_and_a_note_read_from_a_suspect_are_printed_as_text():
    """The message is decoded from a suspect's bits and a note may name its tensors: text too."""
    from rich.console import Console

    from deepsigns_cli.cli import render
    from deepsigns_cli.results import BitsResult, Decision

    result = BitsResult("hidden", 0.5, note="tensor [/]x", n_bits=8, bits="01011011", bit_errors=4, ber=0.5,
                        message="a[/]b[bold]c", message_errors=4)
    console = Console(record=True, width=200)
    render.decision(console, Decision("extract", "m", "k", 1e-9, [result]))
    output = console.export_text()
    assert "hidden message: 'a[/]b[bold]c' (read with 4 of its bits wrong)" in output
    assert "note: tensor [/]x" in output


# ============================================================================= 3. NaN is data


@pytest.mark.parametrize("where", ["all", "one class"])
def test_nan_scores_are_no_verdict(owner, suspects, where):
    """Keys that get no answer (a NaN in every row) had counted as mismatches, "not detected"
    (exit 1): what the model did not answer, it may have answered with the mark. No verdict."""
    bad = np.full(10, np.nan, np.float32) if where == "all" else np.r_[np.float32(np.nan), np.ones(9, np.float32)]
    change = with_output([h.make_node("Mul", ["logits", "bad"], ["n"])], "n",
                         inits=[nh.from_array(bad.astype(np.float32), "bad")])
    refused(owner, mutated(owner, suspects / "nan.onnx", change), "could not be read", "keys got no answer")


def test_the_marked_export_is_still_detected(owner):
    assert matches(verdict(owner, owner["onnx"], code=0)) == 20


# ----------------------------------------------------------------------------- names are data


def _hidden(report: dict) -> dict:
    (result,) = [r for r in report["results"] if r["scheme"] == "hidden"]
    return result


def test_a_decoy_carrier_name_cannot_hide_the_hidden_mark(marked, suspects):
    """A thief renames every tensor and gives the carrier's layer name ("head:input") to a decoy
    of the same width (the carrier negated: every bit wrong). The read-out trusts no name: the
    real carrier is still found, and the decoy is one more candidate counted in p."""
    honest = _hidden(run_json("extract", "--model", marked.onnx, "--keys", marked.keys, code=0))
    proto = onnx.load(str(marked.onnx))
    g = proto.graph
    names = {}
    for node in g.node:
        for name in node.output:
            names.setdefault(name, f"t{len(names)}")
    carrier = names[honest["tensor"]]
    for node in g.node:
        node.name = ""
        for tensors in (node.input, node.output):
            for i, name in enumerate(tensors):
                tensors[i] = names.get(name, name)
    for info in [*g.output, *g.value_info]:
        info.name = names.get(info.name, info.name)
    g.node.append(h.make_node("Neg", [carrier], ["head:input"]))
    decoy = _hidden(run_json("extract", "--model", save(proto, suspects / "decoy.onnx"),
                             "--keys", marked.keys, code=0))
    assert decoy["bit_errors"] == honest["bit_errors"] == 0 and decoy["tensor"] == carrier
    assert decoy["candidates"] == honest["candidates"] + 1
    assert decoy["p_value"] == pytest.approx(min(1.0, 0.5 ** decoy["n_bits"] * decoy["candidates"]))


def _batch_keyed_decoy(marked_onnx: Path, out: Path, rows: int | None) -> Path:
    """The marked MLP, the same function, with a decoy of its carrier first in the graph: the
    carrier's own values when a batch has `rows` inputs (None: always), another unit's otherwise (from the
    input's Shape: no If, nothing out of reach). A copy judged on the first batch alone had been
    the decoy's: the carrier after it was dropped as "the same values", and the decoy read as
    chance, not detected (exit 1)."""
    w = {t.name: nh.to_array(t) for t in onnx.load(str(marked_onnx)).graph.initializer}
    roll = np.roll(np.arange(len(w["fc2.bias"])), 1)
    consts = {**w, "w2r": w["fc2.weight"][roll], "b2r": w["fc2.bias"][roll],
              "rows": np.array([rows or 0], np.int64), "never": np.array([-1], np.int64),
              "one": np.array(1, np.float32)}
    n = h.make_node
    nodes = [n("Flatten", ["input"], ["f"]), n("Gemm", ["f", "fc1.weight", "fc1.bias"], ["g1"], transB=1),
             n("Relu", ["g1"], ["a1"]),
             n("Shape", ["input"], ["shape"], end=1),
             n("Equal" if rows is not None else "GreaterOrEqual", ["shape", "rows"], ["eq"]),
             n("Cast", ["eq"], ["m1"], to=T.FLOAT), n("Sub", ["one", "m1"], ["m0"]),
             n("Mul", ["fc2.weight", "m1"], ["wa"]), n("Mul", ["w2r", "m0"], ["wb"]), n("Add", ["wa", "wb"], ["wd"]),
             n("Mul", ["fc2.bias", "m1"], ["ba"]), n("Mul", ["b2r", "m0"], ["bb"]), n("Add", ["ba", "bb"], ["bd"]),
             n("Gemm", ["a1", "wd", "bd"], ["decoy"], transB=1), n("Relu", ["decoy"], ["decoy_act"]),
             # (the carrier's weights computed at run time too, as the decoy's are: the same kernel, the same bits)
             n("Equal", ["shape", "never"], ["no"]), n("Cast", ["no"], ["z"], to=T.FLOAT),
             n("Mul", ["w2r", "z"], ["wz"]), n("Add", ["fc2.weight", "wz"], ["w2"]),
             n("Mul", ["b2r", "z"], ["bz"]), n("Add", ["fc2.bias", "bz"], ["b2"]),
             n("Gemm", ["a1", "w2", "b2"], ["g2"], transB=1), n("Relu", ["g2"], ["carrier"]),
             n("Gemm", ["carrier", "head.weight", "head.bias"], ["logits"], transB=1)]
    return save(graph_model(nodes, [h.make_tensor_value_info("input", T.FLOAT, ["batch", 1, 8, 8])],
                            [h.make_tensor_value_info("logits", T.FLOAT, ["batch", 10])],
                            [nh.from_array(v, k) for k, v in consts.items()]), out)


def test_a_copy_of_the_carrier_at_one_batch_length_cannot_hide_it(marked, suspects):
    from helpers import PASSPHRASE

    from deepsigns_cli.bundle import open_bundle

    x = np.random.default_rng(0).random((448, 1, 8, 8), np.float32)
    first = len(x) // 2 + 1  # (the first of the two batches a reading feeds)
    decoy = OnnxModel(_batch_keyed_decoy(marked.onnx, suspects / "decoy-at.onnx", first))
    read = decoy.intermediates(x)
    assert {"carrier", "decoy_act"} <= set(read) and not np.array_equal(read["carrier"], read["decoy_act"])
    inert = OnnxModel(_batch_keyed_decoy(marked.onnx, suspects / "inert.onnx", None))  # (a copy throughout)
    assert "decoy_act" in inert.intermediates(x) and "carrier" not in inert.intermediates(x)  # (the later one left out)
    # end to end: extract's own reading, its first batch the decoy's
    arrays = open_bundle(marked.keys, PASSPHRASE).schemes["hidden"].arrays
    rows = (len(arrays["probe_x"]) + len(arrays["trigger_x"])) // 2 + 1
    path = _batch_keyed_decoy(marked.onnx, suspects / "decoy.onnx", rows)
    r = _hidden(run_json("extract", "--model", path, "--keys", marked.keys, code=0))
    assert r["detected"] and r["bit_errors"] == 0, r


def test_a_copy_of_a_tensor_that_is_left_out_is_left_out_with_it(marked, suspects, tmp_path):
    """A copy (Identity, or a Flatten of a pooled map: the same bytes) of a tensor that is not
    read (integers; past the first set of units) had been taken for the copy of one that is, and
    read from its empty list: an internal failure, reported as "onnxruntime crashed" (exit 2) for
    an ordinary export of the zoo's CNN on 32x32 inputs."""
    import torch

    from deepsigns_cli.zoo import CNN

    proto = onnx.load(str(marked.onnx))
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend([h.make_node("Cast", ["input"], ["as_int"], to=T.INT64),
                             h.make_node("Identity", ["as_int"], ["int_copy"]), *nodes])
    r = _hidden(run_json("extract", "--model", save(proto, suspects / "int-copy.onnx"), "--keys", marked.keys, code=0))
    assert r["bit_errors"] == 0, r
    path = tmp_path / "cnn32.onnx"
    torch.onnx.export(CNN((3, 32, 32), 10).eval(), (torch.zeros(1, 3, 32, 32),), str(path), input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}}, dynamo=False)
    x = np.random.default_rng(0).random((20, 3, 32, 32), np.float32)
    read, left_out, *_ = OnnxModel(path).unit_tensors(x, units=1 << 15)
    assert read and left_out  # (the pooled map and its flattened copy past the first set: out together)
    # the second set holds both; the copy is left out there too, not taken for a tensor that
    # answered otherwise (which had left the second set of every such CNN unread)
    missed: list[str] = []
    sets = dict(OnnxSuspect(OnnxModel(path, provider="cpu")).units(x, missed))
    assert missed == [] and len(sets) == 4, (missed, list(sets))  # (two from batches, two one input at a time)
    assert sum(a.shape[1] for a in sets[f"{EVERY_UNIT}, set 2"]) < sum(left_out.values())  # (a copy out)


def test_a_copy_of_the_carrier_past_the_first_set_leaves_it_read(marked, suspects, monkeypatch):
    """helper-51 C4: the carrier past the first set of units (there, the first 64 values per sample)
    and an Identity of it: the copy had made its set "not answer as it had", and the mark went
    unread (exit 2); an unmarked model the same way had not been read either."""
    from helpers import PASSPHRASE

    from deepsigns_cli import suspect
    from deepsigns_cli.bundle import open_bundle
    from deepsigns_cli.schemes import hidden

    proto = onnx.load(str(marked.onnx))
    acts = [node.output[0] for node in proto.graph.node if node.op_type == "Relu"]  # (the carrier among them)
    assert acts
    proto.graph.node.extend(h.make_node("Identity", [a], [f"{a}_copy"]) for a in acts)
    path = save(proto, suspects / "copy.onnx")
    monkeypatch.setattr(suspect, "MAX_UNITS", 64)
    keys = open_bundle(marked.keys, PASSPHRASE).schemes["hidden"]
    model = OnnxModel(path, provider="cpu")
    try:
        result = hidden.SCHEME().read(suspect.OnnxSuspect(model), keys)
    finally:
        model.close()
    assert not result.unread and result.p_value < 1e-20 and result.message_errors == 0, result


@pytest.mark.parametrize("width", [512, 64])
def test_a_batch_fixed_at_the_carriers_width_is_read(marked, suspects, tmp_path, width):
    """Fixed at as many rows as the carrier has units, every (width, width) tensor has two axes
    of the batch's length: the one whose rows past the real inputs repeat the last (the padding)
    is the batch's. Neither had been told, and the model went unread (exit 2, no verdict). At 64,
    the 448 inputs had filled seven batches with no padding at all."""
    from helpers import PASSPHRASE

    from deepsigns_cli import api

    onnx_path, keys = marked.onnx, marked.keys
    if width != 512:  # (the session's model has 512 units; a narrower one, its mark embedded here)
        base, keys, onnx_path = tmp_path / "b.safetensors", tmp_path / "k.dskey", tmp_path / "m.onnx"
        api.train("mlp", base, arch_kwargs={"hidden": [width, width]}, epochs=10, seed=0, device="cpu")
        api.keygen(base, keys, PASSPHRASE, schemes=["hidden"], options={"bits": 32}, seed=1)
        api.embed(base, keys, PASSPHRASE, tmp_path / "m.safetensors", onnx=onnx_path, seed=0, device="cpu")
    honest = _hidden(run_json("extract", "--model", onnx_path, "--keys", keys, code=0))
    proto = onnx.load(str(onnx_path))
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = width
    r = _hidden(run_json("extract", "--model", save(proto, suspects / f"b{width}.onnx"), "--keys", keys, code=0))
    assert r["detected"] and r["bit_errors"] == honest["bit_errors"] and r["tensor"] == honest["tensor"], r


def _as_function(proto, name: str = "Net"):
    """The whole graph moved into one local function, called once: the same computation, and a
    graph whose only tensors are its input and output."""
    params = [t.name for t in proto.graph.initializer]
    inputs = [i.name for i in proto.graph.input if i.name not in params] + params
    body = h.make_function("com.thief", name, inputs, [o.name for o in proto.graph.output], list(proto.graph.node),
                           [h.make_opsetid("", proto.opset_import[0].version)])
    del proto.graph.node[:]
    proto.graph.node.append(h.make_node(name, inputs, [o.name for o in proto.graph.output], domain="com.thief"))
    proto.functions.append(body)
    proto.opset_import.append(h.make_opsetid("com.thief", 1))
    return proto


def test_a_network_wrapped_in_a_function_is_still_read(marked, suspects):
    """Exporters write modules as local functions, and a thief can wrap the whole network in one:
    its tensors were out of reach, and the hidden mark read as "not our architecture"."""
    path = save(_as_function(onnx.load(str(marked.onnx))), suspects / "function.onnx")
    found = _hidden(run_json("extract", "--model", path, "--keys", marked.keys, code=0))
    assert found["bit_errors"] == 0 and found["p_value"] < 1e-9


def test_a_network_wrapped_in_a_function_that_holds_an_if_is_still_read(marked, suspects):
    """A function with an If (or Loop) inside was left as it was: every tensor it computes out of
    reach, the hidden mark read as a fair coin (97/192 bits wrong) with no word. It is inlined
    now; the If stays, with only its own body out of reach."""
    proto = _as_function(onnx.load(str(marked.onnx)))
    body, out = proto.functions[0], proto.graph.output[0].name
    for node in body.node:
        node.output[:] = ["pre" if name == out else name for name in node.output]
    then, other = (h.make_graph([h.make_node("Identity", ["pre"], [f"y{i}"])], f"b{i}", [],
                                [h.make_tensor_value_info(f"y{i}", T.FLOAT, None)]) for i in range(2))
    body.node.extend([h.make_node("Constant", [], ["cond"], value=nh.from_array(np.array(True))),
                      h.make_node("If", ["cond"], [out], then_branch=then, else_branch=other)])
    assert runtime._inlined(proto) is not proto
    path = save(proto, suspects / "function-if.onnx")
    found = _hidden(run_json("extract", "--model", path, "--keys", marked.keys, code=0))
    assert found["bit_errors"] == 0 and found["p_value"] < 1e-9


def test_calls_inside_a_functions_if_count_in_its_size():
    """Each function's If calls the next function twice in each branch, 40 deep: inlined, 4**40
    nodes. Sized with its subgraphs, it is left as it is."""
    opset = [h.make_opsetid("", 17), h.make_opsetid("com.thief", 1)]
    functions = []
    for depth in range(40):
        if depth == 39:
            nodes = [h.make_node("Identity", ["a"], ["b"])]
        else:
            call = [h.make_node(f"F{depth + 1}", ["a"], ["m"], domain="com.thief"),
                    h.make_node(f"F{depth + 1}", ["m"], ["y"], domain="com.thief")]
            branch = h.make_graph(call, "branch", [], [h.make_tensor_value_info("y", T.FLOAT, None)])
            nodes = [h.make_node("Constant", [], ["c"], value=nh.from_array(np.array(True))),
                     h.make_node("If", ["c"], ["b"], then_branch=branch, else_branch=branch)]
        functions.append(h.make_function("com.thief", f"F{depth}", ["a"], ["b"], nodes, opset))
    x, y = (h.make_tensor_value_info(name, T.FLOAT, [1, 4]) for name in "xy")
    graph = h.make_graph([h.make_node("F0", ["x"], ["y"], domain="com.thief")], "g", [x], [y])
    proto = h.make_model(graph, opset_imports=opset, functions=functions)
    assert runtime._inlined(proto) is proto


def test_a_graph_a_function_takes_by_reference_is_not_copied_at_every_use():
    """A function of 200 Ifs whose branches are the caller's graph attribute `g` (by reference),
    `g` 300 nodes: counted once, about 500 nodes; inlined, 60,000 (at 500 and 5,000, 5 million
    nodes, 3 GB and 30 s in the main process, outside any bound). Left as it is."""
    size, uses = 300, 200
    opset = [h.make_opsetid("", 17), h.make_opsetid("com.thief", 1)]
    body = h.make_graph([h.make_node("Identity", ["x" if i == 0 else f"t{i}"], [f"t{i + 1}"]) for i in range(size)],
                        "g", [], [h.make_tensor_value_info(f"t{size}", T.FLOAT, [1])])
    ifs = []
    for i in range(uses):
        node = h.make_node("If", ["c"], [f"y{i}"])
        for name in ("then_branch", "else_branch"):
            node.attribute.append(onnx.AttributeProto(name=name, ref_attr_name="g", type=onnx.AttributeProto.GRAPH))
        ifs.append(node)
    function = h.make_function("com.thief", "F", ["c", "x"], [f"y{uses - 1}"], ifs, opset, attributes=["g"])
    call = h.make_node("F", ["c", "x"], ["y"], domain="com.thief")
    call.attribute.append(h.make_attribute("g", body))
    graph = h.make_graph([call], "g", [h.make_tensor_value_info("c", T.BOOL, []),
                                       h.make_tensor_value_info("x", T.FLOAT, [1])],
                         [h.make_tensor_value_info("y", T.FLOAT, [1])])
    proto = h.make_model(graph, opset_imports=opset, functions=[function])
    assert runtime._inlined(proto) is proto


def test_functions_that_would_inline_to_too_many_nodes_are_left_as_they_are(marked, suspects):
    """Each function calls the next twice, 40 deep: inlined, 2**40 nodes. Our process leaves it as
    it is; onnxruntime, which inlines it, is stopped at the timeout."""
    proto = onnx.load(str(marked.onnx))
    opset = [h.make_opsetid("", proto.opset_import[0].version), h.make_opsetid("com.thief", 1)]
    for depth in range(40):
        nodes = [h.make_node("Identity", ["a"], ["b"])] if depth == 39 else \
            [h.make_node(f"F{depth + 1}", ["a"], ["m"], domain="com.thief"),
             h.make_node(f"F{depth + 1}", ["m"], ["b"], domain="com.thief")]
        proto.functions.append(h.make_function("com.thief", f"F{depth}", ["a"], ["b"], nodes, opset))
    out = proto.graph.output[0].name
    for node in proto.graph.node:
        node.output[:] = ["pre" if name == out else name for name in node.output]
    proto.graph.node.append(h.make_node("F0", ["pre"], [out], domain="com.thief"))
    proto.opset_import.append(h.make_opsetid("com.thief", 1))
    assert runtime._inlined(proto) is proto
    result = run_cli("extract", "--model", save(proto, suspects / "chain.onnx"), "--keys", marked.keys,
                     "--timeout", CLI_TIMEOUT, code=None)
    assert_bad_input(result, f"did not answer within {CLI_TIMEOUT} s")


def test_the_marked_export_carries_no_trace_of_the_tool(marked):
    proto = onnx.load(str(marked.onnx))
    assert list(proto.metadata_props) == [] and proto.producer_name == "pytorch"
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert not [n for n in proto.graph.node if n.op_type == "Identity"]
    assert b"deepsigns" not in Path(marked.onnx).read_bytes()


def test_a_reading_one_input_at_a_time_that_runs_out_of_time_leaves_the_scheme_unread(marked, monkeypatch, tmp_path):
    """The reading one input at a time stops at its share of the time the model has left: the
    hidden scheme is then unread (no verdict from a reading that did not finish), the model
    stays usable for what comes after, and a mark the batch's reading found is still found."""
    from helpers import PASSPHRASE

    from deepsigns_cli import suspect
    from deepsigns_cli.bundle import open_bundle
    from deepsigns_cli.schemes import hidden

    base = tmp_path / "base.onnx"
    run_cli("export", marked.base, "--out", base)
    monkeypatch.setattr(runtime, "ALONE_SHARE", 1e-9)
    keys = open_bundle(marked.keys, PASSPHRASE).schemes["hidden"]
    for path, found in ((marked.onnx, True), (base, False)):
        model = OnnxModel(path, provider="cpu")
        try:
            result = hidden.SCHEME().read(suspect.OnnxSuspect(model), keys)
            assert "one at a time" in (result.note or "") and "--timeout" in result.note, result
            assert result.unread and (result.p_value < 1e-20) is found, result
            assert not model.broken and model.scores(keys.arrays["trigger_x"][:4]).shape == (4, 10)
        finally:
            model.close()
