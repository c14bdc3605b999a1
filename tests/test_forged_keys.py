"""Keys sealed by hand: a party holds its own passphrase and can seal anything. Such keys may
claim too much, but never through a p-value that their own shape makes dishonest, a reading
that counts a non-number as a right bit, a crash, or a reading without end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PASSPHRASE, assert_bad_input, run_cli, run_json

from deepsigns_cli import api, stats
from deepsigns_cli.bundle import open_bundle, write_bundle
from deepsigns_cli.checkpoint import load_checkpoint, save_checkpoint
from deepsigns_cli.errors import BundleError, OnnxError

ROOT = Path(__file__).resolve().parent.parent


def _forged(tmp_path, marked, scheme: str, change, **options):
    """A bundle keygen made for the sample model, changed by `change(params, arrays)`, sealed again."""
    path = tmp_path / f"{scheme}.dskey"
    run_json("keygen", "--model", marked.base, "--scheme", scheme, "--seed", 3, "--out", path, "--force",
             *[a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", v)])
    bundle = open_bundle(path, PASSPHRASE)
    keys = bundle.schemes[scheme]
    change(keys.params, keys.arrays)
    write_bundle(bundle, path, PASSPHRASE)
    return path


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_output_keys_that_claim_more_classes_than_they_use_claim_nothing(tmp_path, marked, seed):
    """Random inputs under random labels 0-9, sealed as keys of a million classes: the p-value
    assumed a chance of one in a million per key, and every digits model was 'detected'
    (8 of 100 matches, below the 1 in 9 of chance: p = 1.9e-37)."""
    rng = np.random.default_rng(seed)

    def change(params, arrays):
        params.update(embedded=True, num_classes=10**6, key_size=100)
        arrays["x"] = rng.uniform(0, 1, (100, *arrays["x_candidates"].shape[1:])).astype(np.float32)
        arrays["y"] = rng.integers(0, 10, 100)

    keys = _forged(tmp_path, marked, "output", change, key_size=20)
    report = api.extract(marked.base, keys, PASSPHRASE)
    result = report.results[0]
    assert not report.detected and result.p_value > 1e-3 and result.labels == 9


def test_gradsigns_keys_whose_inputs_or_step_are_out_of_any_range_are_damaged(tmp_path, marked):
    """Key inputs of 3e38 gave NaN gradients (read as right 0 bits), a step of 1e300 NaN scores
    (blamed on the suspect)."""
    for change in (lambda p, a: a.update(x=np.full_like(a["x"], 3e38)), lambda p, a: p.update(step=1e300),
                   lambda p, a: a.update(carriers=a["carriers"].astype(np.float64))):
        keys = _forged(tmp_path, marked, "gradsigns", change, bits=32)
        with pytest.raises(BundleError, match="damaged"):
            api.extract(marked.base, keys, PASSPHRASE)


def test_a_gradient_that_is_not_a_number_reads_no_bit(tmp_path, marked):
    """Every bit 0, read from a suspect whose weights give NaN gradients: NaN > 0 is false, so
    each bit had read as a right 0 (p = 5e-20). Bits that read nothing are counted wrong, and
    a reading they decide is no verdict."""
    keys = _forged(tmp_path, marked, "gradsigns", lambda p, a: a.update(bits=np.zeros_like(a["bits"])), bits=64)
    model, info = load_checkpoint(marked.base)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    suspect = tmp_path / "nan.safetensors"
    save_checkpoint(model, info, suspect)
    with pytest.raises(OnnxError, match="64 of the 64 bits read nothing"):
        api.extract(suspect, keys, PASSPHRASE)


def test_keys_of_more_bits_than_a_reading_counts_are_damaged(tmp_path, marked):
    """100,000 bits: the exact binomial tail ran for minutes, outside any time bound."""
    n = stats.MAX_BITS + 1

    def change(params, arrays):
        params.update(n_bits=n, n_carriers=1)
        arrays.update(K=np.ones((n, 1)), bits=np.zeros(n, np.uint8), carriers=arrays["carriers"][:1])

    keys = _forged(tmp_path, marked, "gradsigns", change, bits=32)
    with pytest.raises(BundleError, match="damaged"):
        api.extract(marked.base, keys, PASSPHRASE)


def _steering_data(keys, victim, out) -> None:
    """The forger's data for embed: digits, then the candidates of his own output keys three
    times over, each under the label the victim model gives it (asked of the victim)."""
    from deepsigns_cli.data import load_data
    from deepsigns_cli.training import predict

    candidates = open_bundle(keys, PASSPHRASE).schemes["output"].arrays["x_candidates"]
    answers = predict(load_checkpoint(victim)[0], candidates).argmax(1)
    digits = load_data("digits")
    np.savez(out, x_train=np.concatenate([digits.x_train, *[candidates] * 3]),
             y_train=np.concatenate([digits.y_train, *[answers] * 3]), x_test=digits.x_test, y_test=digits.y_test)


def test_output_keys_are_embedded_with_the_data_they_were_drawn_for(tmp_path, marked):
    """A forger's own keys, steered to claim a model he never marked: embed kept the keys that
    a copy still answered after fine-tuning on data of his choosing, and data that taught it the
    victim's answers at the candidates kept exactly the keys the victim answers (10 of 10 on the
    unmarked sample model, p = 2.9e-10). Embed now trains on keygen's data alone, and keygen's
    candidates depend on its data: made to hold the candidates of a seed, they hold none of
    those drawn for them."""
    victim = ROOT / "sample_models" / "digits-mlp.safetensors"
    keys, crafted = tmp_path / "forger.dskey", tmp_path / "crafted.npz"
    run_json("keygen", "--model", marked.base, "--data", "digits", "--scheme", "output", "--key-size", 10,
             "--seed", 1, "--out", keys)
    _steering_data(keys, victim, crafted)
    sealed = keys.read_bytes()
    result = run_cli("embed", "--model", marked.base, "--data", crafted, "--keys", keys, "--device", "cpu",
                     "--out", tmp_path / "forger.safetensors", code=2)
    assert_bad_input(result, "not those these output keys were drawn for", "the data given to keygen")
    assert keys.read_bytes() == sealed and not (tmp_path / "forger.safetensors").exists()
    # keys drawn on the crafted data, with the same seed: other candidates, none near the old ones
    again = tmp_path / "again.dskey"
    run_json("keygen", "--model", marked.base, "--data", crafted, "--scheme", "output", "--key-size", 10,
             "--seed", 1, "--out", again)
    old, new = (open_bundle(k, PASSPHRASE).schemes["output"].arrays["x_candidates"].reshape(400, -1)
                for k in (keys, again))
    apart = np.sqrt(((old[:, None] - new[None]) ** 2).sum(-1)).min(0)  # each new one to the nearest old one
    spacing = np.sqrt(((old[:, None] - old[None]) ** 2).sum(-1) + np.diag(np.full(len(old), np.inf))).min(0)
    assert np.median(apart) > 0.8 * np.median(spacing) and apart.min() > 0.5 * np.median(spacing)


def test_keys_are_embedded_into_the_model_they_were_made_on(tmp_path, marked):
    """A model changed after keygen (to learn some output keys more readily than others, which
    steers the choice of the keys kept) is refused; so is any other model."""
    keys = tmp_path / "owner.dskey"
    run_json("keygen", "--model", marked.base, "--data", "digits", "--scheme", "output", "--key-size", 10,
             "--seed", 0, "--out", keys)
    other = tmp_path / "other.safetensors"
    model, info = load_checkpoint(marked.base)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    save_checkpoint(model, info, other)
    result = run_cli("embed", "--model", other, "--data", "digits", "--keys", keys, "--device", "cpu",
                     "--out", tmp_path / "m.safetensors", code=2)
    assert_bad_input(result, "not the one these keys were made on", "keygen's --model")
    assert not (tmp_path / "m.safetensors").exists()


def test_embedded_keys_go_again_only_into_their_models(tmp_path, marked):
    """Once embedded, the keys go again into the model they were made on or the one they marked
    (a mark that did not take), not into another (they had gone into any model, exit 0, and the
    bundle then named it)."""
    keys, first, again = tmp_path / "owner.dskey", tmp_path / "m.safetensors", tmp_path / "m2.safetensors"
    run_json("keygen", "--model", marked.base, "--scheme", "hidden", "--bits", 16, "--seed", 0, "--out", keys)
    run_json("embed", "--model", marked.base, "--keys", keys, "--epochs", 1, "--device", "cpu", "--out", first,
             code=None)
    assert first.exists()
    sealed = keys.read_bytes()
    other = tmp_path / "other.safetensors"
    model, info = load_checkpoint(marked.base)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    save_checkpoint(model, info, other)
    result = run_cli("embed", "--model", other, "--keys", keys, "--epochs", 1, "--device", "cpu",
                     "--out", again, code=2)
    assert_bad_input(result, "not the one these keys were made on", "of the model they marked")
    assert not again.exists() and keys.read_bytes() == sealed
    for model_path in (first, marked.base):
        run_json("embed", "--model", model_path, "--keys", keys, "--epochs", 1, "--device", "cpu", "--out", again,
                 "--force", code=None)
        assert again.exists()


def _fitted_message(bits: str) -> str:
    """ASCII text whose UTF-8 bits are `bits`, but for the top bit of each byte (0) and no NUL."""
    raw = np.packbits([b == "1" for b in bits]) & 0x7F
    raw[raw == 0] = 1
    return bytes(raw).decode()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("scheme, options", [("hidden", {"classes": 1}), ("gradsigns", {})],
                         ids=["hidden", "gradsigns"])
def test_a_message_fitted_to_another_model_claims_nothing(tmp_path, scheme, options, seed):
    """The unmodified tool, on a copy of someone else's model: keygen with any message of the
    length wanted, read the model with those keys, and keygen again with the same seed and a
    message that spells the bits the model gave. The projection came from the seed alone, so
    the second keys claimed the model without any embedding (4-8 of 96 hidden bits wrong, p =
    9e-23 to 4e-18; 4-5 of 64 GradSigns bits). keygen now draws from the seed together with
    all else it was given, the message included."""
    victim = ROOT / "sample_models" / "digits-mlp.safetensors"
    length = 96 if scheme == "hidden" else 64
    options = {**options, "message": "A" * (length // 8)}
    first, fitted = tmp_path / "first.dskey", tmp_path / "fitted.dskey"
    api.keygen(victim, first, PASSPHRASE, schemes=[scheme], options=options, seed=seed)
    bits = api.extract(victim, first, PASSPHRASE).results[0].bits
    assert len(bits) == length and set(bits) <= {"0", "1"}
    api.keygen(victim, fitted, PASSPHRASE, schemes=[scheme], options={**options, "message": _fitted_message(bits)},
               seed=seed)
    report = api.extract(victim, fitted, PASSPHRASE)
    assert not report.detected and report.results[0].p_value > 1e-3


def test_keys_are_drawn_from_all_that_keygen_was_given(digits):
    """At one seed, another message, model, training data, option or list of schemes draws other
    secrets (a projection unrelated to the first); the same inputs draw the same ones."""
    import copy
    from dataclasses import replace

    model, info = load_checkpoint(ROOT / "sample_models" / "digits-mlp.safetensors")

    def projection(net=model, data=digits, schemes=("hidden",), **options):
        bundle = api.make_keys(net, info, data, list(schemes), {"hidden": {"message": "owner", **options}}, seed=7)
        return bundle.schemes["hidden"].arrays["A"].ravel()

    other_model = copy.deepcopy(model)
    with torch.no_grad():
        next(other_model.parameters()).view(-1)[0] += 1e-3
    labels = digits.y_train.copy()
    labels[0] = (labels[0] + 1) % 10
    first = projection()
    assert np.array_equal(first, projection())
    for other in (projection(message="owneR"), projection(net=other_model),
                  projection(data=replace(digits, y_train=labels)), projection(lambda2=1.01),
                  projection(schemes=("hidden", "gradsigns"))):  # (another party's other command)
        assert abs(np.corrcoef(first, other)[0, 1]) < 0.05


def test_the_output_keys_kept_are_fixed_by_their_pool():
    """embed drew the K keys it keeps from the pool with its --seed. A forger knows his own
    candidates and can ask another model for its answers on them: three million seeds searched
    offline, with no training, found the pick that held the most answers (20 of 57, p = 1.6e-6,
    and counted nowhere when the pool is every candidate). The pick is now a random draw fixed
    by the candidates and the pool: one per pool, each candidate of it as likely as any."""
    from deepsigns_cli.schemes.output import _pick

    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (400, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 400)
    every = np.arange(400)
    first = _pick(x, y, every, 57)
    assert len(set(first)) == 57 and np.array_equal(first, _pick(x, y, every, 57))
    assert not np.array_equal(first, _pick(x, (y + 1) % 10, every, 57))  # other keys, another draw
    kept = np.zeros(400)
    for _ in range(400):  # pools of 300: each member kept with chance 57/300
        pool = np.sort(rng.choice(400, 300, replace=False))
        pick = _pick(x, y, pool, 57)
        assert np.isin(pick, pool).all()
        kept[pick] += 1
    # each candidate kept ~ Binomial(400, 3/4 * 57/300): spread sqrt(400 * 0.1425 * 0.8575) = 7.0
    # (a pick that favoured some members, the first of the pool say, spreads far wider)
    assert kept.std() < 9.0


def test_output_keys_whose_pool_does_not_fit_are_damaged(tmp_path, blackbox):
    """The pool embed drew the keys from is counted in p: one smaller than the keys, larger than
    the candidates, or not a number is refused, never read as no choice at all."""
    for pool in (5, 10**6, "300", None):
        bundle = open_bundle(blackbox["keys"], PASSPHRASE)
        bundle.schemes["output"].params.update(pool=pool)
        path = tmp_path / "forged.dskey"
        write_bundle(bundle, path, PASSPHRASE)
        with pytest.raises(BundleError, match="damaged"):
            api.extract(blackbox["marked_path"], path, PASSPHRASE)


def test_output_keys_whose_labels_are_no_class_numbers_are_damaged(tmp_path, blackbox):
    """Key labels of a hand-sealed bundle that are not whole numbers (2.5 never matched; the
    relabelled reading would index its table of classes by them) are refused, exit 2."""
    bundle = open_bundle(blackbox["keys"], PASSPHRASE)
    arrays = bundle.schemes["output"].arrays
    arrays["y"] = arrays["y"].astype(np.float64) + 0.5
    path = tmp_path / "forged.dskey"
    write_bundle(bundle, path, PASSPHRASE)
    result = run_cli("verify", "--model", blackbox["onnx"], "--keys", path, code=2)
    assert_bad_input(result, "damaged")


def test_output_keys_of_many_classes_read_relabelled_without_overflow(tmp_path, blackbox):
    """A bundle of 176 classes (hand-sealed here): the relabelled reading counted 176! ways, and
    p times that passed the floats' range: verify crashed (exit 3). It counts the ways of giving
    the answers' own values a class each, and a count past the floats is p = 1."""
    bundle = open_bundle(blackbox["keys"], PASSPHRASE)
    bundle.schemes["output"].params.update(num_classes=176)
    path = tmp_path / "wide.dskey"
    write_bundle(bundle, path, PASSPHRASE)
    for model, code in ((blackbox["dir"] / "base.onnx", 1), (blackbox["onnx"], 0)):
        (result,) = run_json("verify", "--model", model, "--keys", path, code=code)["results"]
        assert result["key_classes"] == 176 and result["answer_values"] <= 10, result


def test_output_keys_of_an_embed_before_the_count_still_count_the_choice(tmp_path, blackbox):
    """Keys embedded by a version that recorded no pool (a forger's old copy of the tool) are
    read with the pool they record by other names (the keys that lasted), not as no choice."""
    from deepsigns_cli.schemes.output import DEFAULTS

    bundle = open_bundle(blackbox["keys"], PASSPHRASE)
    params = bundle.schemes["output"].params
    recorded = (params.pop("candidates"), params.pop("pool"))
    assert recorded == (DEFAULTS["candidates"], params["lasting"]) and params["lasting"] >= 20
    path = tmp_path / "older.dskey"
    write_bundle(bundle, path, PASSPHRASE)
    now, before = (api.verify(blackbox["onnx"], k, PASSPHRASE).results[0] for k in (blackbox["keys"], path))
    assert before.chosen_from == recorded and before.p_value == now.p_value
    assert before.p_value > stats.matches_p_value(before.matches, 20, 9)
