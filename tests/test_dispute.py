"""`deepsigns dispute`: after a thief overwrites the owner's model with a mark of their own
(our keygen and embed, fresh secrets), the cross matrix names the owner."""

from __future__ import annotations

import pytest
import torch
from helpers import PASSPHRASE, assert_one_error_line, run_cli, run_json


@pytest.fixture(scope="module")
def overwritten(marked, tmp_path_factory):
    """The thief runs our own keygen and embed on the owner's marked model."""
    folder = tmp_path_factory.mktemp("dispute")
    (folder / "owner.pass").write_text(PASSPHRASE + "\n")  # the owner's bundle is sealed under it
    (folder / "thief.pass").write_text("the thief's own passphrase\n")
    thief = folder / "thief.safetensors"
    run_json("keygen", "--model", marked.marked, "--seed", 7, "--out", folder / "thief.dskey",
             "--passphrase-file", folder / "thief.pass")
    run_json("embed", "--model", marked.marked, "--keys", folder / "thief.dskey", "--seed", 7,
             "--out", thief, "--passphrase-file", folder / "thief.pass")
    return folder, marked, thief



def test_dispute_after_overwriting_names_the_owner(overwritten):
    folder, marked, thief = overwritten
    args = ["dispute", "--party", marked.keys, folder / "owner.pass", marked.marked,
            "--party", folder / "thief.dskey", folder / "thief.pass", thief, "--name", "owner", "--name", "thief"]
    report = run_json(*args, code=0)
    cell = {(c["keys_of"], c["model_of"]): c for c in report["matrix"]}
    assert cell["owner", "owner"]["detected"] and cell["thief", "thief"]["detected"]
    assert cell["owner", "thief"]["detected"]  # the owner's mark survived the overwrite
    assert not cell["thief", "owner"]["detected"] and cell["thief", "owner"]["p_value"] > 1e-3
    assert report["first"] == "owner" and report["reading"].startswith("owner marked first")
    assert [p["commitment"] for p in report["parties"]] == [
        run_json("inspect", marked.keys)["commitment"], run_json("inspect", folder / "thief.dskey")["commitment"]]
    # the same parties in the other order: still the owner
    swapped = ["dispute", *args[5:9], *args[1:5], "--name", "thief", "--name", "owner"]
    assert run_json(*swapped, code=0)["first"] == "owner"
    out = run_cli(*args[:-4]).stdout
    assert "A marked first" in out and "commitment" in out
    assert report["detected"] is True  # (--json's `detected` is the verdict, as the exit code)


def test_published_commitments_are_checked_party_by_party(overwritten):
    """`--commitment`, once per party in order, as extract's: a bundle other than the one
    published is refused, naming whose it is; the party's passphrase file is named as the
    --party word it is (there is no --passphrase-file in a dispute)."""
    folder, marked, thief = overwritten
    owner, other = (run_json("inspect", k)["commitment"] for k in (marked.keys, folder / "thief.dskey"))
    parties = ["--party", marked.keys, folder / "owner.pass", marked.marked,
               "--party", folder / "thief.dskey", folder / "thief.pass", thief, "--name", "owner", "--name", "thief"]
    report = run_json("dispute", *parties, "--commitment", owner, "--commitment", other, code=0)
    assert report["first"] == "owner" and [p["commitment"] for p in report["parties"]] == [owner, other]
    result = run_cli("dispute", *parties, "--commitment", owner, "--commitment", owner, code=2)
    assert_one_error_line(result.stderr, result.stdout, "thief's bundle", f"not the published {owner[:16]}")
    result = run_cli("dispute", *parties, "--commitment", owner, code=2)
    assert_one_error_line(result.stderr, result.stdout, "one --commitment per --party")
    result = run_cli("dispute", "--party", marked.keys, folder / "missing.pass", marked.marked, *parties[4:], code=2)
    assert_one_error_line(result.stderr, result.stdout, "check the PASSPHRASE_FILE of --party 1")
    assert "--passphrase-file" not in result.stderr


def test_the_same_model_twice_is_undecided(overwritten):
    folder, marked, thief = overwritten
    report = run_json("dispute", "--party", marked.keys, folder / "owner.pass", thief,
                      "--party", folder / "thief.dskey", folder / "thief.pass", thief, code=1)
    assert report["first"] is None and report["reading"].startswith("undecided")


def test_neither_mark_in_the_others_model_is_undecided_not_unrelated():
    """A cross reading short of alpha is no evidence that the models are unrelated: the reading
    had said they were, beside the owner's mark read from the thief's model at p = 8e-8."""
    from deepsigns_cli.api import _dispute_reading
    from deepsigns_cli.results import Decision

    def read(detected: bool, p: float) -> Decision:
        return Decision("extract", "m", "k", 1e-9, [], detected=detected, p_value=p)

    first, reading = _dispute_reading(["owner", "thief"], [[read(True, 1e-50), read(False, 8.26e-8)],
                                                           [read(False, 0.4), read(True, 1e-40)]])
    assert first is None and reading.startswith("undecided") and "8.3e-08" in reading
    assert "shows neither who marked first nor that the models are unrelated" in reading


def test_a_cross_reading_that_missed_a_scheme_decides_nothing():
    """The owner's mark in the thief's model, and the thief's keys read in the owner's model
    with their output scheme unread (a model that answers no output the black-box schemes
    read): 'not in' is not shown, so the thief's mark may be there unseen. It had read 'owner
    marked first'."""
    from deepsigns_cli.api import _dispute_reading
    from deepsigns_cli.results import Decision, MatchResult

    def read(detected: bool, p: float, unread: bool = False) -> Decision:
        results = [MatchResult("output", p, note="no output deepsigns can read", unread=unread)]
        return Decision("extract", "m", "k", 1e-9, results, detected=detected, p_value=p)

    owner, thief = read(True, 1e-50), read(True, 1e-40)
    first, reading = _dispute_reading(["owner", "thief"], [[owner, read(True, 1e-30)], [read(False, 1, True), thief]])
    assert first is None and reading.startswith("undecided: thief's keys did not read all of owner's model")
    assert "(output not read)" in reading
    first, _ = _dispute_reading(["owner", "thief"], [[owner, read(True, 1e-30)], [read(False, 1), thief]])
    assert first == "owner"  # (read whole: the reading stands)


def test_the_same_bundle_twice_is_refused(overwritten):
    """One bundle as both parties' read as a dispute its owner cannot settle (exit 1)."""
    folder, marked, thief = overwritten
    result = run_cli("dispute", "--party", marked.keys, folder / "owner.pass", marked.marked,
                     "--party", marked.keys, folder / "owner.pass", thief, code=2)
    assert result.stderr.count("\n") == 1 and "the same key bundle" in result.stderr


@pytest.mark.parametrize("extra, needle", [((), "give --party twice, not once"),
                                           (("--name", "x"), "one --name per --party")])
def test_a_dispute_needs_two_parties(overwritten, extra, needle):
    folder, marked, thief = overwritten
    result = run_cli("dispute", "--party", marked.keys, folder / "owner.pass", marked.marked,
                     *(("--party", folder / "thief.dskey", folder / "thief.pass", thief) if extra else ()),
                     *extra, code=2)
    assert result.stderr.count("\n") == 1 and needle in result.stderr
    assert "Traceback" not in result.stderr


def test_keys_sealed_by_hand_that_claim_any_model_are_voided_by_a_control(blackbox, tmp_path):
    """A bundle is sealed by whoever holds its passphrase, and nothing in it proves keygen drew its
    keys: a forger sealed real digits under their true labels as output keys, which every good
    classifier answers, and `dispute` named the forger first (their keys 'in' the owner's model,
    the owner's not in the forger's own, unrelated model). A control, a model neither party made,
    voids such keys; the owner's keys detect no control."""
    import copy

    import numpy as np

    from deepsigns_cli import api
    from deepsigns_cli.bundle import write_bundle
    from deepsigns_cli.data import load_data

    digits = load_data("digits")
    forged = copy.deepcopy(blackbox["bundle"])  # (its structure a real bundle's; the shared one untouched)
    keys = forged.schemes["output"]
    rows = np.random.default_rng(0).choice(len(digits.x_test), len(keys.arrays["y"]), replace=False)
    keys.arrays["x"], keys.arrays["y"] = digits.x_test[rows], digits.y_test[rows].astype(np.int64)
    write_bundle(forged, tmp_path / "forger.dskey", "forger")
    (tmp_path / "forger.pass").write_text("forger\n")
    (tmp_path / "owner.pass").write_text(PASSPHRASE + "\n")
    theirs, control = tmp_path / "theirs.safetensors", tmp_path / "control.safetensors"
    for path, seed in ((theirs, 11), (control, 12)):  # models the forger never touched
        api.train("mlp", path, arch_kwargs={"hidden": [128, 128]}, epochs=15, seed=seed, device="cpu")
    args = ["dispute", "--party", blackbox["keys"], tmp_path / "owner.pass", blackbox["marked_path"],
            "--party", tmp_path / "forger.dskey", tmp_path / "forger.pass", theirs, "--name", "owner",
            "--name", "forger"]
    assert run_json(*args, code=0)["first"] == "forger"  # what the p-values alone say
    report = run_json(*args, "--control", control, code=1)
    assert report["first"] is None and "forger's keys also detect" in report["reading"]
    assert "claim is void" in report["reading"]
    checked = {c["keys_of"]: c for c in report["controls"]}
    assert checked["forger"]["detected"] and not checked["owner"]["detected"]
    import shutil

    shutil.copyfile(blackbox["marked_path"], tmp_path / "copy.safetensors")  # a party's model is no control
    assert "is a party's model" in run_cli(*args, "--control", tmp_path / "copy.safetensors", code=2).stderr
    # nor are its weights saved again with other metadata (other bytes), or as a plain state dict
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(blackbox["marked_path"]), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, {**f.metadata(), "note": '"independent"'}
    save_file(tensors, tmp_path / "resaved.safetensors", metadata=meta)
    torch.save(tensors, tmp_path / "resaved.pt")
    for again, arch in (("resaved.safetensors", []), ("resaved.pt", ["--arch", "mlp", "--arch-kwargs",
                                                                     meta["arch_kwargs"]])):
        refused = run_cli(*args, "--control", tmp_path / again, *arch, code=2)
        assert_one_error_line(refused.stderr, refused.stdout, again, "holds the weights of a party's model")
