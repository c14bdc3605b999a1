"""Commitments: every report names the bundle it used; a claim counts with the commitment
published before the dispute, so extract/verify can insist on it; keygen and embed print the
claim record an owner publishes (nothing secret in it)."""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers import PASSPHRASE, assert_bad_input, copy, run_cli, run_json

from deepsigns_cli import api
from deepsigns_cli.errors import InputError


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("command", ["extract", "verify"])
def test_every_report_shows_the_commitment_of_the_bundle(blackbox, command):
    report = run_json(command, "--model", blackbox["onnx"], "--keys", blackbox["keys"])
    assert report["commitment"] == sha256(blackbox["keys"])
    table = run_cli(command, "--model", blackbox["onnx"], "--keys", blackbox["keys"]).stdout
    assert sha256(blackbox["keys"]) in table.replace("\n", "")


@pytest.mark.parametrize("command", ["extract", "verify"])
def test_the_published_commitment_is_required_when_given(blackbox, tmp_path, command):
    keys = blackbox["keys"]
    right = sha256(keys)
    args = [command, "--model", blackbox["onnx"], "--keys", keys]
    assert run_json(*args, "--commitment", right.upper())["detected"]
    # any other file (here one byte changed) is not the published bundle, whatever it holds
    other = copy(keys, tmp_path / "other.dskey")
    other.write_bytes(other.read_bytes()[:-1] + bytes([other.read_bytes()[-1] ^ 1]))
    args_other = [command, "--model", blackbox["onnx"], "--keys", other]
    assert_bad_input(run_cli(*args_other, "--commitment", right, code=None), "not the published",
                     right[:16])
    assert_bad_input(run_cli(*args, "--commitment", "abc123", code=None), "--commitment", "64 hex")


def test_the_check_comes_before_the_passphrase(blackbox, tmp_path):
    result = run_cli("verify", "--model", blackbox["onnx"], "--keys", blackbox["keys"],
                     "--commitment", "0" * 64, env={"DEEPSIGNS_PASSPHRASE": None}, code=None)
    assert_bad_input(result, "not the published")


def test_keygen_and_embed_print_the_claim_record(marked, tmp_path):
    base = copy(marked.base, tmp_path / "base.safetensors")
    keys, out, onnx = tmp_path / "k.dskey", tmp_path / "m.safetensors", tmp_path / "m.onnx"
    made = run_json("keygen", "--model", base, "--bits", 32, "--seed", 4, "--out", keys)
    assert made["claim"]["commitment"] == made["commitment"]
    assert made["claim"]["files"]["model"]["sha256"] == sha256(base)
    embedded = run_json("embed", "--model", base, "--keys", keys, "--out", out, "--onnx", onnx,
                        "--epochs", 2)
    claim = embedded["claim"]
    assert claim["commitment"] == embedded["commitment"] == sha256(keys)
    assert claim["files"]["model"]["sha256"] == sha256(out)
    assert claim["files"]["onnx"]["sha256"] == sha256(onnx)
    assert claim["schemes"] == ["hidden"] and claim["weights_fingerprint"] == embedded["fingerprint"]
    assert set(claim) == {"commitment", "date", "schemes", "weights_fingerprint", "files"}
    text = json.dumps(claim)
    header_key_id = json.loads(run_cli("inspect", keys, "--json").stdout)["key_id"]
    assert header_key_id not in text  # nothing that links the record to the bundle's secrets
    # people see the same record, as one line to copy
    shown = run_cli("embed", "--model", base, "--keys", keys, "--out", tmp_path / "n.safetensors",
                    "--epochs", 1).stdout
    line = next(ln for ln in shown.splitlines() if ln.startswith('{"commitment"'))
    assert json.loads(line)["commitment"] == sha256(keys)


def test_the_bundle_opened_is_the_bundle_checked(blackbox, marked, tmp_path):
    """The commitment was checked on one read of the file and the keys came from a second one,
    after the passphrase prompt: a bundle swapped while the prompt waited was used under the
    published commitment (another owner's keys reported as the published ones, detected)."""
    keys = copy(blackbox["keys"], tmp_path / "k.dskey")
    published = sha256(keys)

    def prompt():  # the file is replaced while the prompt waits
        copy(marked.keys, tmp_path / "other.dskey").replace(keys)
        return PASSPHRASE

    with pytest.raises(InputError, match="changed while the command read it"):
        api.extract(blackbox["onnx"], keys, prompt, commitment=published)
