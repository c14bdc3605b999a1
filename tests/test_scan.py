"""Scanning many suspects with one bundle: one row per suspect, exit like grep."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers import run_cli, run_json

from deepsigns_cli import api


@pytest.fixture(scope="module")
def suspects(blackbox, tmp_path_factory):
    """A folder of suspects: the owner's marked export twice, the unmarked model, and a file
    that is not ONNX (plus a checkpoint, which verify skips in a folder)."""
    folder = tmp_path_factory.mktemp("scan")
    shutil.copy(blackbox["onnx"], folder / "a-marked.onnx")
    shutil.copy(blackbox["onnx"], folder / "b-marked-copy.onnx")
    shutil.copy(blackbox["dir"] / "base.onnx", folder / "c-unmarked.onnx")
    shutil.copy(blackbox["dir"] / "base.safetensors", folder / "d-unmarked.safetensors")
    return folder


def rows(report):
    return {r["model"].rsplit("/", 1)[-1]: r for r in report["rows"]}


def test_a_folder_is_scanned_with_one_row_per_suspect(blackbox, suspects):
    report = run_json("verify", "--model", suspects, "--keys", blackbox["keys"], code=0)
    got = rows(report)
    assert sorted(got) == ["a-marked.onnx", "b-marked-copy.onnx", "c-unmarked.onnx"]
    assert got["a-marked.onnx"]["detected"] and got["b-marked-copy.onnx"]["detected"]
    assert not got["c-unmarked.onnx"]["detected"] and got["c-unmarked.onnx"]["p_value"] > 1e-3
    assert report["suspects"] == 3 and len(report["detected"]) == 2 and report["errors"] == []
    single = run_json("verify", "--model", suspects / "a-marked.onnx", "--keys", blackbox["keys"], code=0)
    assert got["a-marked.onnx"]["p_value"] == single["p_value"]
    assert report["commitment"] == single["commitment"]


def test_none_detected_exits_1(blackbox, suspects):
    unmarked = suspects / "c-unmarked.onnx"
    report = run_json("verify", "--model", unmarked, "--model", unmarked, "--keys", blackbox["keys"], code=1)
    assert report["suspects"] == 1 and report["detected"] == []  # the same file is read once


def test_an_unreadable_suspect_is_a_row_and_exit_2(blackbox, suspects, tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    result = run_cli("verify", "--model", suspects / "a-marked.onnx", "--model", junk,
                     "--keys", blackbox["keys"], "--json", code=2)
    import json

    report = json.loads(result.stdout)
    got = rows(report)
    assert got["a-marked.onnx"]["detected"] is True  # still read, and reported
    assert "not an ONNX model" in got["junk.onnx"]["error"]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "junk.onnx" in lines[0]


@pytest.mark.parametrize("bad", ["missing.onnx", "empty-folder"])
def test_a_missing_suspect_fails_before_any_work(blackbox, tmp_path, bad):
    (tmp_path / "empty-folder").mkdir()
    result = run_cli("verify", "--model", blackbox["onnx"], "--model", tmp_path / bad,
                     "--keys", blackbox["keys"], code=2)
    assert result.stdout == "" and result.stderr.count("\n") == 1 and bad in result.stderr


def test_extract_scans_checkpoints_and_onnx(blackbox, suspects):
    report = run_json("extract", "--model", suspects, "--keys", blackbox["keys"], code=0)
    got = rows(report)
    assert len(got) == 4 and report["errors"] == []
    assert [n for n, r in got.items() if r["detected"]] == ["a-marked.onnx", "b-marked-copy.onnx"]


def test_a_scan_prints_a_table(blackbox, suspects):
    # wide enough for the longest temporary path (a test worker's folder names are long)
    out = run_cli("verify", "--model", suspects, "--keys", blackbox["keys"], code=0, env={"COLUMNS": "300"}).stdout
    assert "2 of 3 suspects detected" in out and "c-unmarked.onnx" in out


ENTRIES = {  # an entry named like a suspect that is not a regular file inside the folder
    "fifo": lambda e, d: os.mkfifo(e),
    "folder": lambda e, d: e.mkdir(),
    "link-to-nothing": lambda e, d: e.symlink_to("/nonexistent/gone.onnx"),
    "link-loop": lambda e, d: e.symlink_to(e.name),
    "link-to-a-device": lambda e, d: e.symlink_to("/dev/zero"),
    "link-outside": lambda e, d: e.symlink_to(d["onnx"]),  # (the owner's own marked model)
}


@pytest.mark.parametrize("command", ["verify", "extract"])
@pytest.mark.parametrize("kind", list(ENTRIES))
def test_an_entry_that_is_not_a_file_in_the_folder_is_an_error_row(blackbox, tmp_path, kind, command):
    """Each was left out of the scan without a word: a folder of one unmarked model and one of
    these read as "not detected" (exit 1), or, for a link to the owner's model, as detected."""
    folder = tmp_path / "suspects"
    folder.mkdir()
    shutil.copy(blackbox["dir"] / "base.onnx", folder / "a-unmarked.onnx")
    ENTRIES[kind](folder / "b.onnx", blackbox)
    result = run_cli(command, "--model", folder, "--keys", blackbox["keys"], "--json", code=2)
    got = rows(json.loads(result.stdout))
    assert sorted(got) == ["a-unmarked.onnx", "b.onnx"]
    assert got["a-unmarked.onnx"]["detected"] is False and "b.onnx" in got["b.onnx"]["error"]
    assert result.stderr.count("error: ") == 1 and "b.onnx" in result.stderr
    # the library's list of suspects holds only what can be read (a FIFO would block its reader)
    assert api.suspect_files([folder], command) == [folder / "a-unmarked.onnx"]


def test_a_link_to_a_file_in_the_folder_is_read(blackbox, tmp_path):
    folder = tmp_path / "suspects"
    folder.mkdir()
    shutil.copy(blackbox["onnx"], folder / "a-marked.onnx")
    (folder / "b-link.onnx").symlink_to("a-marked.onnx")
    report = run_json("verify", "--model", folder, "--keys", blackbox["keys"], code=0)
    assert len(report["detected"]) == 2 and report["errors"] == []
