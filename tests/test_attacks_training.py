"""The attacks that train: fine-tuning (last or all layers, re-initialised or not), magnitude
pruning with sparse fine-tuning, distillation into a fresh student. Through the CLI, on the
shared marked digits MLP, with few epochs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_bad_input, run_cli, run_json

from deepsigns_cli.checkpoint import load_checkpoint, save_checkpoint
from deepsigns_cli.training import evaluate

PRUNED = ("fc1.weight", "fc2.weight", "head.weight")  # the digits MLP's linear weights
VICTIM_LR = object()  # stands for the learning rate the victim's checkpoint records


@pytest.fixture(scope="module")
def victim(marked):
    """The marked MLP (model, info, a copy of its state dict), loaded once."""
    model, info = load_checkpoint(marked.marked)
    return model, info, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def attacked(marked, tmp_path_factory):
    """attacked(NAME, *ARGS) -> (report, state dict of --out): each attack run once per module."""
    folder = tmp_path_factory.mktemp("attacked")
    cache: dict[tuple, tuple[dict, dict]] = {}

    def run(name: str, *args):
        key = (name, *map(str, args))
        if key not in cache:
            out = folder / f"{len(cache)}.safetensors"
            report = run_json("attack", name, "--model", marked.marked, *args, "--seed", 0,
                              "--device", "cpu", "--out", out)
            cache[key] = report, load_checkpoint(out)[0].state_dict()
        return cache[key]

    return run


def _sparsity(state: dict, names=PRUNED) -> float:
    return sum(int((state[n] == 0).sum()) for n in names) / sum(state[n].numel() for n in names)


# ----------------------------------------------------------------------------- every attack


TRAINED = {"batch_size": 64, "precision": "fp32"}  # (how the attacks that train trained, at the defaults)
RUNS = {
    "finetune": (("--epochs", 1), {"epochs": 1, "lr": VICTIM_LR, "optimizer": "adam", "layers": "all",
                                   "reinit_last": False, "data_fraction": 1.0, "samples": 1348, **TRAINED}),
    "prune": ((), {"rate": 0.5, "scope": "global", "finetune_epochs": 0, "lr": VICTIM_LR,
                   "optimizer": "adam", "data_fraction": 1.0, "sparsity": 0.5, **TRAINED}),
    "distill": (("--epochs", 5), {"epochs": 5, "lr": 1e-3, "student": "mlp", "student_kwargs": {},
                                  "temperature": 1.0, "data_fraction": 1.0, "samples": 1348, **TRAINED}),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_an_attack_writes_a_loadable_checkpoint_and_its_params(name, attacked, victim, digits, marked):
    args, want = RUNS[name]
    report, state = attacked(name, *args)
    model, info, original = victim
    assert report["attack"] == name
    assert (report["model"], report["data"], report["seed"]) == (str(marked.marked), "digits", 0)
    assert report["params"] == {k: info.lr if v is VICTIM_LR else v for k, v in want.items()}
    assert report["accuracy_before"] == pytest.approx(evaluate(model, digits.x_test, digits.y_test))
    assert set(state) == set(original) and any(not torch.equal(state[k], original[k]) for k in state)
    model.load_state_dict(state)
    try:
        assert report["accuracy_after"] == pytest.approx(evaluate(model, digits.x_test, digits.y_test))
    finally:
        model.load_state_dict(original)


# ----------------------------------------------------------------------------- fine-tuning


def test_finetuning_the_last_layer_leaves_every_other_tensor_bit_identical(attacked, victim):
    report, state = attacked("finetune", "--layers", "last", "--epochs", 1)
    original = victim[2]
    assert report["params"]["layers"] == "last"
    for name, tensor in state.items():
        if name.startswith("head."):
            assert not torch.equal(tensor, original[name]), f"{name} did not train"
        else:
            assert torch.equal(tensor, original[name]), f"{name} changed"


def test_reinit_last_redraws_the_last_layer(attacked, victim):
    """At a learning rate of 1e-12 training moves nothing: a changed head is the re-draw."""
    tiny = ("--layers", "last", "--epochs", 1, "--lr", 1e-12, "--data-fraction", 0.1)
    kept, kept_state = attacked("finetune", *tiny)
    redrawn, state = attacked("finetune", *tiny, "--reinit-last")
    original = victim[2]
    assert redrawn["params"]["reinit_last"] is True and kept["params"]["reinit_last"] is False
    assert torch.allclose(kept_state["head.weight"], original["head.weight"], atol=1e-6)
    for name in ("head.weight", "head.bias"):
        assert (state[name] - original[name]).abs().max() > 0.01, f"{name} was not re-drawn"
    assert all(torch.equal(state[n], original[n]) for n in state if not n.startswith("head."))
    assert redrawn["accuracy_after"] < redrawn["accuracy_before"] - 30  # a random head


# ----------------------------------------------------------------------------- pruning


def test_pruning_zeroes_the_smallest_weights_over_all_layers(attacked, victim):
    report, state = attacked("prune", "--rate", 0.9)
    original = victim[2]
    assert _sparsity(state) >= 0.9 and report["params"]["sparsity"] == pytest.approx(_sparsity(state))
    zeroed = torch.cat([original[n][state[n] == 0].abs() for n in PRUNED])
    kept = torch.cat([original[n][state[n] != 0].abs() for n in PRUNED])
    assert zeroed.max() <= kept.min()  # one threshold over every layer
    for name in state:  # biases untouched, kept weights unchanged
        assert torch.equal(state[name][state[name] != 0], original[name][state[name] != 0]), name


def test_pruning_per_layer_gives_each_layer_its_rate(attacked, victim):
    report, state = attacked("prune", "--rate", 0.7, "--scope", "layer")
    original = victim[2]
    assert report["params"]["scope"] == "layer"
    for name in PRUNED:
        share = _sparsity(state, [name])
        assert 0.7 <= share <= 0.7 + 1e-3, f"{name}: {share}"
        assert original[name][state[name] == 0].abs().max() <= original[name][state[name] != 0].abs().min()


def test_pruned_weights_stay_zero_through_finetuning(attacked, victim):
    report, state = attacked("prune", "--rate", 0.8, "--finetune-epochs", 2, "--data-fraction", 0.5)
    original = victim[2]
    assert report["params"]["finetune_epochs"] == 2 and report["params"]["rate"] == 0.8
    assert _sparsity(state) >= 0.8
    zeroed = torch.cat([original[n][state[n] == 0].abs() for n in PRUNED])
    kept = torch.cat([original[n][state[n] != 0].abs() for n in PRUNED])
    assert zeroed.max() <= kept.min()  # the zeros are still the pruned weights
    changed = [not torch.equal(state[n][state[n] != 0], original[n][state[n] != 0]) for n in PRUNED]
    assert all(changed), "the kept weights did not train"


# ----------------------------------------------------------------------------- distillation


def test_a_distilled_student_is_about_as_accurate_with_other_weights(attacked, victim):
    report, state = attacked("distill", *RUNS["distill"][0])
    assert report["accuracy_after"] >= report["accuracy_before"] - 10
    for name, tensor in state.items():
        assert not torch.allclose(tensor, victim[2][name], atol=1e-3), f"{name} looks copied"


def test_a_student_of_another_architecture_carries_its_own_model_info(tmp_path, victim, digits):
    """api.attack saves the attacked model with the victim's ModelInfo; a student of another
    architecture brings its own as `deepsigns_info` (checked here through the library)."""
    from deepsigns_cli.attacks import AttackContext
    from deepsigns_cli.attacks.distill import DistillAttack

    model, info, original = victim
    ctx = AttackContext(info=info, data=digits, options={"student": "cnn", "epochs": 1, "data_fraction": 0.2},
                        rng=np.random.default_rng(0), seed=0, device="cpu", progress=None,
                        out_kind="checkpoint", add_output=lambda *a: None)
    student, params = DistillAttack().run(model, ctx)
    assert params["student"] == "cnn" and params["student_kwargs"] == {} and params["samples"] == 270
    assert student.deepsigns_info.arch == "cnn" and info.arch == "mlp"
    save_checkpoint(student, student.deepsigns_info, tmp_path / "student.safetensors")
    loaded, loaded_info = load_checkpoint(tmp_path / "student.safetensors")
    assert loaded_info.arch == "cnn" and loaded_info.input_shape == info.input_shape
    x = torch.as_tensor(digits.x_test[:32])
    with torch.no_grad():
        assert torch.equal(loaded(x), student.eval()(x))
    assert all(torch.equal(t, original[n]) for n, t in model.state_dict().items())  # victim untouched


# ----------------------------------------------------------------------------- the attacker's data


def test_the_attackers_share_of_the_data_is_seeded_and_holds_every_class(digits):
    from deepsigns_cli.attacks import AttackContext
    from deepsigns_cli.attacks.finetune import attacker_data

    def share(fraction, seed=0):
        ctx = AttackContext(info=None, data=digits, options={}, rng=np.random.default_rng(seed), seed=seed,
                            device="cpu", progress=None, out_kind="checkpoint", add_output=lambda *a: None)
        return attacker_data(ctx, fraction)

    x, y = share(0.05)
    assert len(y) == 67 and np.array_equal(x, share(0.05)[0]) and not np.array_equal(x, share(0.05, seed=1)[0])
    few = share(0.008)[1]
    assert len(few) == 11 and set(few.tolist()) == set(range(10))  # one of each class first
    assert len(set(share(0.003)[1].tolist())) == 4  # fewer samples than classes: all different
    assert share(1.0)[0] is digits.x_train


# ----------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(("name", "flag", "value"), [
    ("prune", "--rate", 1.5),
    ("prune", "--finetune-epochs", -1),
    ("finetune", "--data-fraction", 0),
    ("finetune", "--lr", 0),
    ("distill", "--temperature", 0),
    ("distill", "--student", "nope"),
    ("noise", "--sigma", 1e-50),  # (0 in float32: noise-scores built a graph onnxruntime aborted on)
])
def test_an_option_out_of_range_exits_2_with_one_line(name, flag, value, tmp_path, marked):
    out = tmp_path / "x.safetensors"
    result = run_cli("attack", name, "--model", marked.marked, flag, value, "--out", out, code=2)
    assert_bad_input(result, str(value) if flag == "--student" else flag)
    assert not out.exists()


def test_an_attacked_checkpoint_records_the_attack_and_a_seed_gives_the_same_bytes(marked, tmp_path):
    """The metadata had described the victim alone (its seed, its rate), and came out in a hash
    map's order, new in every run: it records the attack, sorted, and a seeded run repeats."""
    outs = [tmp_path / f"{i}.safetensors" for i in range(2)]
    reports = [run_json("attack", "finetune", "--model", marked.marked, "--epochs", 1, "--seed", 5,
                        "--device", "cpu", "--out", out) for out in outs]
    assert reports[0]["seed"] == 5
    assert load_checkpoint(outs[0])[1].extra["attack"] == {"name": "finetune", "params": reports[0]["params"],
                                                          "seed": 5}
    assert outs[0].read_bytes() == outs[1].read_bytes()


@pytest.mark.parametrize("name, args", [
    ("finetune", ("--epochs", 1)),
    ("prune", ("--finetune-epochs", 1)),
    ("distill", ("--epochs", 1)),
    ("overwrite", ("--scheme", "hidden", "--epochs", 1, "--attacker-keys", "{tmp}/thief.dskey")),
])
def test_the_attacks_that_train_take_train_and_embeds_training_flags(name, args, marked, tmp_path, monkeypatch):
    """--batch-size, --workers and --precision, as on train and embed (the attacks had trained at
    64 samples per step in this process, whatever the data: an image folder too large for a step
    of 64 could not be attacked). The loop is watched as it runs, not replaced."""
    from deepsigns_cli import training

    seen, real = [], training._fit

    def watched(model, x, y, cfg, *rest):
        seen.append(cfg)
        return real(model, x, y, cfg, *rest)

    monkeypatch.setattr(training, "_fit", watched)
    args = [str(a).format(tmp=tmp_path) for a in args]
    report = run_json("attack", name, "--model", marked.marked, *args, "--batch-size", 24, "--workers", 1,
                      "--precision", "bf16", "--device", "cpu", "--out", tmp_path / "a.safetensors")
    assert seen and all((c.batch_size, c.workers, c.precision) == (24, 1, "bf16") for c in seen), seen
    assert (report["params"]["batch_size"], report["params"]["precision"]) == (24, "bf16")  # (and reported)
    result = run_cli("attack", "noise", "--model", marked.marked, "--batch-size", 24,
                     "--out", tmp_path / "n.safetensors", code=2)  # (it trains nothing)
    assert "No such option '--batch-size'" in result.stderr


def test_the_last_layer_is_the_one_the_forward_pass_applies_last():
    """A model of --arch that registers its head before its hidden layers: --layers last and
    --reinit-last had re-initialised and trained fc2, a hidden layer, and left the head as it
    was (helper-55 A04). The last layer is the linear layer the forward pass applies last."""
    from torch import nn

    from deepsigns_cli.attacks.finetune import last_linear

    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 10)
            self.fc1 = nn.Linear(64, 16)
            self.fc2 = nn.Linear(16, 16)

        def forward(self, x):
            return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))

    model = HeadFirst().train()
    name, layer = last_linear(model, torch.zeros(1, 1, 8, 8))
    assert name == "head" and layer is model.head and model.training  # (its mode as it was)
    assert last_linear(model)[0] == "fc2"  # (no input to run: module order, as before)


def test_an_existing_attacker_bundle_is_refused_before_any_work(marked, tmp_path):
    """--attacker-keys was checked inside the attack, after the data and the victim's accuracy
    (helper-55 A09): an existing file is refused as --out is, before the data are read (here a
    --data that does not exist is never reached)."""
    existing = tmp_path / "thief.dskey"
    existing.write_bytes(b"kept")
    result = run_cli("attack", "overwrite", "--model", marked.marked, "--data", tmp_path / "missing.npz",
                     "--attacker-keys", existing, "--out", tmp_path / "out.safetensors", code=2)
    assert_bad_input(result, "thief.dskey exists", "--attacker-keys")
    assert existing.read_bytes() == b"kept" and not (tmp_path / "out.safetensors").exists()
