"""The sealed key bundle: round trip, a public header, nothing secret in the clear, mode 0600."""

from __future__ import annotations

import hashlib
import json
import os
import stat

import numpy as np
import pytest
from helpers import MESSAGE, PASSPHRASE, assert_bad_input, run_cli, run_json

# (sealed_bytes: the size of what follows the header, which the file's size shows anyway)
PUBLIC_HEADER = {"format", "version", "schemes", "created", "updated", "kdf", "cipher", "key_id", "sealed_bytes"}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def sample_bundle():
    from deepsigns_cli.bundle import Bundle

    rng = np.random.default_rng(7)
    bundle = Bundle(info={"arch": "mlp", "input_shape": [1, 8, 8], "num_classes": 10,
                          "embedded": False})
    bundle.add("hidden", {"layer": "head:input", "n_bits": 40, "message": "Grüße ✓ ACME",
                          "lambda1": 0.01, "nested": {"list": [1, 2.5, None, True]}},
               {"A": rng.standard_normal((512, 40)).astype(np.float32),
                "bits": rng.integers(0, 2, (2, 40)).astype(np.uint8),
                "classes": np.array([3, 7], np.int64),
                "trigger_x": rng.random((5, 1, 8, 8), dtype=np.float32)})
    bundle.add("output", {"key_size": 20}, {"labels": np.arange(6, dtype=np.int32).reshape(2, 3)})
    return bundle


def test_seal_and_open_round_trip(tmp_path, sample_bundle):
    from deepsigns_cli.bundle import BUNDLE_VERSION, open_bundle, read_header, write_bundle

    path = tmp_path / "owner.dskey"
    write_bundle(sample_bundle, path, PASSPHRASE)
    opened = open_bundle(path, PASSPHRASE)
    assert opened.info == sample_bundle.info
    assert set(opened.schemes) == {"hidden", "output"}
    for name, body in sample_bundle.schemes.items():
        assert opened.schemes[name].params == body.params
        got = opened.schemes[name].arrays
        assert set(got) == set(body.arrays)
        for key, want in body.arrays.items():
            assert got[key].dtype == want.dtype and got[key].shape == want.shape
            np.testing.assert_array_equal(got[key], want)
    header = read_header(path)
    assert header == opened.header
    assert header["format"] == "deepsigns-keys" and header["version"] == BUNDLE_VERSION
    assert header["schemes"] == ["hidden", "output"]
    assert header["kdf"]["name"] in ("scrypt", "argon2id")
    assert header["cipher"] in ("AES-256-GCM", "ChaCha20-Poly1305")
    assert opened.key_id == header["key_id"] != ""


def test_resealing_keeps_the_identity_and_changes_the_bytes(tmp_path, sample_bundle):
    from deepsigns_cli.bundle import open_bundle, write_bundle

    path = tmp_path / "owner.dskey"
    write_bundle(sample_bundle, path, PASSPHRASE)
    first_bytes, first = path.read_bytes(), open_bundle(path, PASSPHRASE)
    write_bundle(first, path, PASSPHRASE)
    second = open_bundle(path, PASSPHRASE)
    assert second.key_id == first.key_id and second.header["created"] == first.header["created"]
    assert path.read_bytes() != first_bytes  # fresh salt and nonce every time
    np.testing.assert_array_equal(second.schemes["hidden"].arrays["A"],
                                  first.schemes["hidden"].arrays["A"])


def test_wrong_passphrase_fails_closed(tmp_path, sample_bundle):
    from deepsigns_cli.bundle import open_bundle, write_bundle
    from deepsigns_cli.errors import BundleError

    path = tmp_path / "owner.dskey"
    write_bundle(sample_bundle, path, PASSPHRASE)
    with pytest.raises(BundleError, match="wrong passphrase or tampered"):
        open_bundle(path, PASSPHRASE + "!")


@pytest.mark.parametrize("damage", ["cut short", "added to"])
def test_a_bundle_cut_short_or_added_to_is_told_apart(tmp_path, marked, damage):
    """A bundle cut short after its header had shown a commitment in inspect (of the damaged
    file) and read as "wrong passphrase or tampered" everywhere else."""
    data = marked.keys.read_bytes()
    path = tmp_path / "copy.dskey"
    path.write_bytes(data[: len(data) // 2] if damage == "cut short" else data + b"\n")
    for args in (["inspect", path], ["extract", "--model", marked.marked, "--keys", path]):
        result = run_cli(*args, code=2)
        assert "is damaged: its header says" in result.stderr and "(cut short or added to)" in result.stderr
        assert "commitment" not in result.output
    path.write_bytes(data)  # whole again
    assert json.loads(run_cli("inspect", path, "--json").stdout)["commitment"] == sha256(marked.keys)


def test_header_is_public_and_holds_no_secret(marked):
    from deepsigns_cli.bundle import read_header

    header = read_header(marked.keys)  # no passphrase needed
    assert set(header) <= PUBLIC_HEADER
    text = json.dumps(header)
    for secret in (MESSAGE, "trigger", "head:input", "fingerprint"):
        assert secret not in text


def test_inspect_shows_the_commitment_and_no_secret(marked):
    from deepsigns_cli.bundle import open_bundle

    # no passphrase at all: inspect only reads the public header
    result = run_cli("inspect", marked.keys, "--json", env={"DEEPSIGNS_PASSPHRASE": None})
    report = json.loads(result.stdout)
    assert report["kind"] == "key bundle"
    assert report["commitment"] == sha256(marked.keys)
    assert report["schemes"] == ["hidden"]
    assert set(report) <= PUBLIC_HEADER | {"kind", "path", "commitment"}
    secrets = open_bundle(marked.keys, PASSPHRASE)
    a = secrets.schemes["hidden"].arrays["A"]
    for needle in (MESSAGE, "trigger", "head:input", secrets.info["marked_fingerprint"],
                   f"{a[0, 0]:.5f}", f"{a[1, 1]:.5f}"):
        assert needle not in result.output
    human = run_cli("inspect", marked.keys, env={"COLUMNS": "80"}).output
    assert f"commitment (SHA-256): {report['commitment']}\n" in human and MESSAGE not in human  # (whole at 80 columns)


def test_bundle_bytes_hold_no_plaintext(marked):
    from deepsigns_cli.bundle import open_bundle

    data = marked.keys.read_bytes()
    secrets = open_bundle(marked.keys, PASSPHRASE)
    arrays = secrets.schemes["hidden"].arrays
    assert MESSAGE.encode() not in data
    for word in (b"trigger", b"lambda1", b"head:input", b"marked_fingerprint",
                 secrets.info["marked_fingerprint"].encode()):
        assert word not in data
    for name in ("A", "trigger_x"):
        raw = arrays[name].tobytes()
        for start in (0, len(raw) // 2):
            assert raw[start : start + 32] not in data, f"{name} is stored in the clear"


def test_bundle_is_readable_by_its_owner_only(marked, tmp_path):
    keys = tmp_path / "fresh.dskey"
    run_json("keygen", "--model", marked.base, "--seed", 3, "--out", keys)
    assert mode(keys) == 0o600
    assert mode(marked.keys) == 0o600  # still 0600 after embed rewrote it


def test_keygen_reports_the_commitment_of_the_file(marked, tmp_path):
    keys = tmp_path / "fresh.dskey"
    report = run_json("keygen", "--model", marked.base, "--seed", 3, "--out", keys)
    assert report["commitment"] == sha256(keys)
    assert report["key_id"] == json.loads(run_cli("inspect", keys, "--json").stdout)["key_id"]


@pytest.mark.parametrize("name", ["k.safetensors", "k.ONNX", "k.pt"])
def test_keygen_refuses_a_model_s_name_for_the_bundle(marked, tmp_path, name):
    """A bundle written as `k.safetensors` was read back by every command as a broken checkpoint
    (a folder scan listed it among the suspects)."""
    assert_bad_input(run_cli("keygen", "--model", marked.base, "--out", tmp_path / name, code=None),
                     "names a model", ".dskey")
    assert list(tmp_path.iterdir()) == []


def test_embed_records_the_marked_model_and_a_new_commitment(marked):
    from deepsigns_cli.bundle import open_bundle
    from deepsigns_cli.checkpoint import fingerprint, load_checkpoint

    secrets = open_bundle(marked.keys, PASSPHRASE)
    assert secrets.info["embedded"] is True
    assert secrets.info["marked_fingerprint"] == fingerprint(load_checkpoint(marked.marked)[0])
    assert secrets.info["base_fingerprint"] == fingerprint(load_checkpoint(marked.base)[0])
    assert marked.embed_report["commitment"] == sha256(marked.keys)


def test_passphrase_file(marked, tmp_path):
    pw = tmp_path / "pw.txt"
    pw.write_text("from a file\n")  # the trailing newline is not part of the passphrase
    keys = tmp_path / "k.dskey"
    run_json("keygen", "--model", marked.base, "--seed", 0, "--out", keys,
             "--passphrase-file", pw, env={"DEEPSIGNS_PASSPHRASE": None})
    run_cli("extract", "--model", marked.base, "--keys", keys, code=1,
            env={"DEEPSIGNS_PASSPHRASE": "from a file"})
    run_cli("extract", "--model", marked.base, "--keys", keys, code=2)  # the env passphrase


def test_keygen_seed_makes_the_secrets_reproducible(marked, tmp_path):
    from deepsigns_cli.bundle import open_bundle

    def secrets(name, *seed):
        path = tmp_path / name
        run_json("keygen", "--model", marked.base, *seed, "--out", path)
        return open_bundle(path, PASSPHRASE).schemes["hidden"].arrays

    one, two = secrets("a.dskey", "--seed", 5), secrets("b.dskey", "--seed", 5)
    fresh = secrets("c.dskey")
    for name in ("A", "bits", "classes", "trigger_x"):
        np.testing.assert_array_equal(one[name], two[name])
    assert not np.array_equal(one["A"], fresh["A"])  # no --seed: fresh randomness


def test_keys_too_large_to_seal_are_refused_before_any_is_drawn(marked, tmp_path, monkeypatch):
    """Keys on 2048 x 2048 images held more than the 2 GiB AES-GCM seals at once: keygen ended in
    the cipher's OverflowError, "a bug in deepsigns" (exit 3), and then was refused only after
    drawing them (15.7 GB). Refused with the remedy before any scheme draws its keys, nothing
    written (the limit lowered here)."""
    from deepsigns_cli import bundle
    from deepsigns_cli.registry import load_scheme

    monkeypatch.setattr(bundle, "MAX_SEALED_ARRAYS", 1000)
    drawn = []
    for name in ("hidden", "output"):
        monkeypatch.setattr(type(load_scheme(name)), "keygen", lambda *args: drawn.append(args))
    out = tmp_path / "k.dskey"
    result = run_cli("keygen", "--model", marked.base, "--data", "digits", "--out", out, code=2)
    assert_bad_input(result, "more than the", "a bundle seals", "--image-size")
    assert drawn == [] and list(tmp_path.iterdir()) == []


def test_seal_refuses_arrays_past_its_limit(sample_bundle, monkeypatch):
    """The cipher's own limit stays guarded where the bytes are sealed."""
    from deepsigns_cli import bundle
    from deepsigns_cli.errors import InputError

    monkeypatch.setattr(bundle, "MAX_SEALED_ARRAYS", 1000)
    with pytest.raises(InputError, match="a bundle seals"):
        bundle.seal(sample_bundle, PASSPHRASE)


def test_keygen_s_estimate_of_the_samples_bounds_what_the_keys_hold(marked):
    """Every scheme's `key_samples` (what keygen checks against the limit before drawing) is at
    least the number of input samples its keys then hold."""
    from deepsigns_cli import api
    from deepsigns_cli.checkpoint import load_checkpoint
    from deepsigns_cli.registry import load_scheme

    model, info = load_checkpoint(marked.base)
    digits = api.load_dataset("digits")
    names = ("hidden", "output", "gradsigns")
    keys = api.make_keys(model, info, digits, list(names), {}, seed=3)
    for name in names:
        held = sum(len(a) for a in keys.schemes[name].arrays.values() if a.shape[1:] == tuple(info.input_shape))
        assert 0 < held <= load_scheme(name).key_samples(load_scheme(name).resolved({})), name
