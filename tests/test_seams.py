"""The seams the next capabilities build on: the api does whole commands, one registry, the
wider training loop (batch object, input gradients, after-step hook, objective state in a
module, chosen loss and optimiser), typed results with one place that applies alpha."""

from __future__ import annotations

import ast
import copy
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PASSPHRASE, run_json

from deepsigns_cli import api, registry
from deepsigns_cli.errors import InputError
from deepsigns_cli.objective import Objective
from deepsigns_cli.results import RESULT_KINDS, BitsResult, MatchResult, decide
from deepsigns_cli.training import Batch, TrainConfig, fit

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"hidden": [128, 128]}


# ----------------------------------------------------------------------------- the api


def test_api_does_the_whole_flow_like_the_cli(tmp_path):
    """Train, keygen, embed (checkpoint + ONNX + bundle), extract, verify: from Python,
    the same functions the CLI calls, with the same results as the CLI."""
    base, keys = tmp_path / "base.safetensors", tmp_path / "k.dskey"
    marked, onnx = tmp_path / "m.safetensors", tmp_path / "m.onnx"
    train = api.train("mlp", base, arch_kwargs=SMALL, epochs=8, seed=3, device="cpu")
    assert train.out == str(base) and base.is_file() and train.test_accuracy > 80
    made = api.keygen(base, keys, PASSPHRASE, schemes=["hidden", "output"],
                      options={"bits": 32, "key_size": 20}, seed=3)
    assert made.schemes == ["hidden", "output"] and len(made.commitment) == 64
    # the passphrase may be a function: asked once the cheap checks have passed
    asked = []
    report = api.embed(base, keys, lambda: asked.append(1) or PASSPHRASE, marked, onnx=onnx,
                       seed=3, device="cpu")
    assert asked == [1]
    assert marked.is_file() and onnx.is_file() and report.commitment != made.commitment
    for suspect in (marked, onnx):
        decision = api.extract(suspect, keys, PASSPHRASE)
        assert decision.detected and [r.scheme for r in decision.results] == ["hidden", "output"]
        assert decision.results[0].bit_errors == 0
    verdict = api.verify(onnx, keys, PASSPHRASE)
    assert verdict.detected and verdict.results[0].matches == 20
    cli = run_json("verify", "--model", onnx, "--keys", keys)
    assert cli == api.report_json(verdict) | {"results": cli["results"]}
    assert cli["results"][0]["matches"] == 20
    assert not api.extract(base, keys, PASSPHRASE).detected


def test_cli_imports_only_the_api_the_errors_and_the_rendering():
    allowed = {"api", "errors", ""}  # "" = the package itself (its version)
    for path in sorted((ROOT / "deepsigns_cli" / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert (node.module or "") in allowed, f"{path.name} imports ..{node.module}"
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module in (None, "common", "render", "main", "launch"), f"{path.name}: .{node.module}"


# ----------------------------------------------------------------------------- the registry


@pytest.mark.parametrize("name", registry.scheme_names())
def test_every_registry_row_loads_its_scheme(name):
    entry = registry.scheme_entry(name)
    scheme = registry.load_scheme(name)
    assert scheme.name == name and scheme.entry is entry
    assert entry.result in RESULT_KINDS


@pytest.mark.parametrize("name", registry.attack_names())
def test_every_attack_row_loads_its_attack(name):
    assert registry.load_attack(name).name == name


def test_an_attack_writes_a_new_model_and_reports_accuracy(tmp_path, marked):
    from deepsigns_cli.checkpoint import fingerprint, load_checkpoint

    before = marked.marked.read_bytes()
    same = run_json("attack", "noise", "--model", marked.marked, "--sigma", 0, "--out", tmp_path / "a.safetensors")
    noisy = run_json("attack", "noise", "--model", marked.marked, "--sigma", 3.0, "--seed", 1,
                     "--out", tmp_path / "b.safetensors")
    assert marked.marked.read_bytes() == before  # never the input file
    assert same["accuracy_after"] == same["accuracy_before"] and same["params"] == {"sigma": 0.0}
    assert noisy["accuracy_after"] < noisy["accuracy_before"] - 5
    original = fingerprint(load_checkpoint(marked.marked)[0])
    assert fingerprint(load_checkpoint(tmp_path / "a.safetensors")[0]) == original
    assert fingerprint(load_checkpoint(tmp_path / "b.safetensors")[0]) != original


def test_scheme_names_are_spelled_in_the_registry_alone():
    """Outside the registry and each scheme's own module, no code names a scheme."""
    names = registry.scheme_names()
    for path in sorted((ROOT / "deepsigns_cli").rglob("*.py")):
        rel = path.relative_to(ROOT / "deepsigns_cli").as_posix()
        if rel in ("registry.py", "zoo.py") or rel.startswith("schemes/"):  # zoo: MLP "hidden" widths
            continue
        tree = ast.parse(path.read_text())
        prose = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
        literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in prose}
        assert not literals & set(names), f"{rel} spells a scheme name: {literals & set(names)}"


def test_unknown_scheme_lists_the_known_ones(tmp_path):
    with pytest.raises(InputError, match="hidden, output"):
        api.keygen("x.safetensors", tmp_path / "k.dskey", PASSPHRASE, schemes=["nope"])


def test_an_option_of_a_scheme_not_asked_for_is_refused(tmp_path):
    with pytest.raises(InputError, match="--key-size is an option of scheme output"):
        api.keygen("x.safetensors", tmp_path / "k.dskey", PASSPHRASE, schemes=["hidden"],
                   options={"key_size": 5})


# ----------------------------------------------------------------------------- the loop


class _InputGradientTerm(Objective):
    """Pushes the input gradient of the class-0 logit toward a target: only double
    back-propagation can learn it (GradSigns' shape)."""

    needs_input_grad = True

    def __init__(self):
        self.state = torch.nn.Module()
        self.state.register_buffer("target", torch.full((64,), 0.5))
        self.steps = []

    def loss(self, batch: Batch):
        rows = batch.logits[: batch.n_train, 0].sum()
        g = batch.input_grad(rows).flatten(1)[: batch.n_train].mean(0)
        return ((g - self.state.target) ** 2).mean()

    def after_step(self, model, step):
        self.steps.append(step)


def _tiny(seed=0):
    from deepsigns_cli.zoo import build_model

    torch.manual_seed(seed)
    return build_model("mlp", {"hidden": [32]}, (1, 8, 8), 10)


def _input_grad_of_class0(model, x):
    x = torch.as_tensor(x).requires_grad_(True)
    (g,) = torch.autograd.grad(model(x)[:, 0].sum(), x)
    return g.flatten(1).mean(0)


def test_an_objective_can_train_the_input_gradient(digits):
    x, y = digits.x_train[:256], digits.y_train[:256]
    cfg = TrainConfig(epochs=10, lr=1e-2, device="cpu")
    control = _tiny()
    fit(control, x, y, cfg)  # the same training without the term
    model, term = _tiny(), _InputGradientTerm()
    fit(model, x, y, cfg, [term])
    gap = float(((_input_grad_of_class0(model, x) - 0.5) ** 2).mean())
    gap_control = float(((_input_grad_of_class0(control, x) - 0.5) ** 2).mean())
    assert gap < gap_control / 4, (gap, gap_control)
    assert term.steps == list(range(1, 10 * 4 + 1))  # after every step, counted


def test_objective_state_is_trained_with_the_model(digits):
    class Centre(Objective):
        def __init__(self):
            self.state = torch.nn.Module()
            self.state.c = torch.nn.Parameter(torch.zeros(3))

        def loss(self, batch):
            return ((self.state.c - 2.0) ** 2).sum()

    term = Centre()
    fit(_tiny(), digits.x_train[:128], digits.y_train[:128], TrainConfig(epochs=10, lr=0.1, device="cpu"),
        [term])
    assert (term.state.c.detach() > 1.5).all(), term.state.c  # from 0, towards 2


def test_soft_targets_and_sgd_distil_a_teacher(digits):
    teacher = _tiny(0)
    fit(teacher, digits.x_train, digits.y_train, TrainConfig(epochs=10, device="cpu"))
    with torch.no_grad():
        soft = torch.softmax(teacher(torch.as_tensor(digits.x_train)), 1).numpy()
    student = _tiny(1)
    cfg = TrainConfig(epochs=15, lr=0.05, device="cpu", optimizer="sgd", loss="soft")
    fit(student, digits.x_train, soft, cfg)
    from deepsigns_cli.training import predict

    agree = (predict(student, digits.x_test).argmax(1) == predict(teacher, digits.x_test).argmax(1))
    assert agree.mean() > 0.85


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_loops_optimiser_updates_every_weight(optimizer, dtype):
    """The loop's optimiser is fused where that is safe: torch's fused SGD on the CPU leaves the
    first weights of each vector block of fp16/bf16 parameters as they were (pytorch#191763)."""
    param = torch.nn.Parameter(torch.ones(100, dtype=dtype))
    param.grad = torch.ones(100, dtype=dtype)
    TrainConfig(optimizer=optimizer, lr=0.1).make_optimizer([param]).step()
    assert (param.detach().float() < 0.95).all(), param  # every weight moved from 1 by about -0.1


@pytest.mark.parametrize("limit", [1, None])
def test_the_loop_holds_numpys_blas_to_its_limit_and_gives_it_back(digits, limit):
    """numpy's BLAS threads spin on the cores torch trains on (`scripts/bench.py threads`): the
    loop holds them to TrainConfig.blas_threads (None: as they were), and restores them after."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    seen = []

    class Watch(Objective):
        def loss(self, batch):
            seen.append(blas_threads())

    with threadpool_limits(limits=2, user_api="blas"):
        outside = blas_threads()
        fit(_tiny(), digits.x_train[:128], digits.y_train[:128],
            TrainConfig(epochs=1, device="cpu", blas_threads=limit), [Watch()])
        after = blas_threads()
    assert outside and after == outside  # (numpy's BLAS is loaded; 2 threads here, fewer on a 1-core box)
    assert seen and all(s == ({1} if limit == 1 else outside) for s in seen), seen


def test_a_diverging_loss_is_a_clear_error(digits):
    from deepsigns_cli.errors import TrainingError

    with pytest.raises(TrainingError, match="lower --lr"):
        fit(_tiny(), digits.x_train[:128], digits.y_train[:128],
            TrainConfig(epochs=3, lr=1e30, device="cpu"))


def test_early_stop_is_one_decision(digits):
    class StopAfter(Objective):
        def end_epoch(self, model, epoch):
            return epoch == 2

    history = fit(_tiny(), digits.x_train[:64], digits.y_train[:64], TrainConfig(epochs=9, device="cpu"),
                  [StopAfter()])
    assert history["epochs"] == 3


# ----------------------------------------------------------------------------- results


def test_alpha_is_applied_in_one_place():
    bits = BitsResult("hidden", 2.0**-32, n_bits=32, bits="0" * 32, bit_errors=0, ber=0.0,
                      candidates=1)
    match = MatchResult("output", 1e-20, keys=20, matches=20, num_classes=10)
    strict = decide([copy.deepcopy(bits), copy.deepcopy(match)], 1e-12, command="extract",
                    model="m", key_id="k")
    assert [r.detected for r in strict.results] == [False, True] and strict.detected
    assert strict.results[0].max_bit_errors == -1 and "cannot reach" in strict.results[0].warning
    loose = decide([bits], 1e-3, command="extract", model="m", key_id="k")
    assert loose.results[0].detected and loose.results[0].max_bit_errors >= 3
    with pytest.raises(ValueError):
        decide([bits], float("nan"), command="extract", model="m", key_id="k")


def test_a_schemes_row_is_detected_exactly_where_it_carries_the_verdict():
    """Each scheme's row is judged at its share of alpha (Bonferroni over the schemes read): at
    the whole of alpha, a bundle's GradSigns row at p = 0.108 read 'detected' at --alpha 0.16
    under a verdict of not detected (p = 0.215)."""
    from deepsigns_cli import stats

    def results(ps):
        return [MatchResult("output", float(p), keys=20, matches=10, num_classes=10) for p in ps]

    edge = decide(results([0.9, 0.108]), 0.1615, command="verify", model="m", key_id="k")
    assert not edge.detected and not any(r.detected for r in edge.results)
    # the largest p whose exact product by 3 is at most 1e-3 (as floats are), and the next: the
    # product is rounded up, never to nearest (0.0003333333333333334 x 3, 1e-3 to nearest, is above it)
    edge_p = 0.0003333333333333334
    while Fraction(edge_p) * 3 > Fraction(1e-3):
        edge_p = float(np.nextafter(edge_p, 0))
    edge = decide(results([edge_p, 0.9, 0.9]), 1e-3, command="verify", model="m", key_id="k")
    assert edge.detected and edge.results[0].detected and edge.p_value <= 1e-3
    above = decide(results([float(np.nextafter(edge_p, 1)), 0.9, 0.9]), 1e-3, command="verify", model="m", key_id="k")
    assert not above.detected and not above.results[0].detected and above.p_value > 1e-3
    rng = np.random.default_rng(0)
    for _ in range(300):
        ps, alpha = 10.0 ** rng.uniform(-12, 0, int(rng.integers(1, 4))), float(10.0 ** rng.uniform(-10, 0))
        decision = decide(results(ps), alpha, command="extract", model="m", key_id="k")
        assert decision.detected == any(r.detected for r in decision.results), (ps, alpha)
        assert decision.detected == (decision.p_value <= alpha), (ps, alpha)  # (the p-value the report gives)
    bits = BitsResult("hidden", 2.0**-32, n_bits=32, bits="0" * 32, bit_errors=0, ber=0.0, candidates=1)
    two = decide([bits, *results([0.5])], 1e-3, command="extract", model="m", key_id="k")
    assert two.results[0].max_bit_errors == stats.max_bit_errors(32, 1e-3 / 2)
    assert two.results[1].max_mismatches == stats.max_mismatches(20, 9, 1e-3 / 2)


def test_a_rows_threshold_agrees_with_its_verdict_when_alpha_is_its_p_value():
    """--alpha given as a row's own p-value: the row is detected, and its threshold allows its
    count (the exact tail had been compared for the threshold: 'at most 18 allowed' beside a row
    detected with 19 of 64 bits wrong)."""

    from deepsigns_cli import stats
    from deepsigns_cli.results import GradResult

    for n, errors, tries, schemes in ((64, 19, 1, 1), (64, 19, 3, 2), (192, 70, 10, 3), (24, 5, 2, 1), (64, 0, 1, 1)):
        p = stats.bonferroni(stats.bits_p_value(errors, n), tries)
        row = GradResult("gradsigns", p, n_bits=n, bits="0" * n, bit_errors=errors, readings=tries, candidates=tries)
        others = [MatchResult("output", 0.5, keys=20, num_classes=10) for _ in range(schemes - 1)]
        for alpha in (stats.bonferroni(p, schemes), np.nextafter(stats.bonferroni(p, schemes), 0)):
            if not 0 < alpha < 1:
                continue
            decide([row, *others], alpha, command="verify", model="m", key_id="k")
            assert row.detected == (row.bit_errors <= row.max_bit_errors), (n, errors, tries, schemes, alpha)
    for keys, matches, chosen, moved in ((20, 14, None, None), (20, 16, (400, 354), None), (100, 41, None, None),
                                         (20, 20, None, [[1, 2], [2, 1]]), (100, 60, (400, 300), [[0, 9], [9, 0]])):
        p = stats.matches_p_value(matches, keys, 9, chosen)  # (as the reading gives it: as answered, or relabelled)
        p = stats.as_answered(p) if moved is None else stats.relabelled(p, 10, 10)
        for alpha in (p, np.nextafter(p, 0)):
            row = MatchResult("output", p, keys=keys, matches=matches, mismatches=keys - matches, num_classes=10,
                              chosen_from=chosen, relabelled=moved, key_classes=10, answer_values=10)
            decide([row], alpha, command="verify", model="m", key_id="k")
            assert row.detected == (row.mismatches <= row.max_mismatches), (keys, matches, chosen, alpha)


def test_json_reports_are_always_valid_json():
    r = MatchResult("output", float("nan"), keys=4, num_classes=10)
    report = decide([r], 1e-3, command="verify", model="m", key_id="k")
    text = json.dumps(api.report_json(report), allow_nan=False)  # raises on NaN
    assert json.loads(text)["results"][0]["p_value"] is None
    # (a NaN beside another scheme's p: the verdict's product by the schemes is no reading, as 1)
    two = decide([MatchResult("output", float("nan"), keys=4, num_classes=10),
                  MatchResult("output", 0.5, keys=4, num_classes=10)], 1e-3, command="verify", model="m", key_id="k")
    assert not two.detected and json.loads(json.dumps(api.report_json(two), allow_nan=False))["p_value"] in (1.0, None)


def test_max_bit_errors_is_one_pass():
    from deepsigns_cli import stats

    # the threshold agrees with the p-value it is derived from, at the edge, for large N
    for n in (32, 64, 512):
        t = stats.max_bit_errors(n, 1e-3)
        assert stats.bits_p_value(t, n) <= 1e-3 < stats.bits_p_value(t + 1, n)
