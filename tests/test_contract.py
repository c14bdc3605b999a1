"""The exit-code contract: 0/1 are verdicts and nothing else; bad input is one line and 2;
a bug is one line and 3 (the traceback only with --debug); warnings never leak."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from helpers import assert_bad_input, assert_one_error_line, run_cli, run_json, run_proc
from test_errors import snapshot

from deepsigns_cli import api

SAMPLE = Path(__file__).resolve().parents[1] / "sample_models" / "digits-mlp.safetensors"


def _boom(*args, **kwargs):
    raise ValueError("an unexpected failure\n  at frame 1\n  at frame 2")


@pytest.mark.parametrize("command", ["extract", "verify"])
def test_an_internal_error_is_exit_3_never_a_verdict(marked, monkeypatch, command):
    monkeypatch.setattr(api, command, _boom)
    result = run_cli(command, "--model", marked.onnx, "--keys", marked.keys, code=3)
    line = assert_one_error_line(result.stderr, result.stdout, "internal error", "ValueError",
                                 "an unexpected failure", "--debug")
    assert "frame 1" not in line


@pytest.mark.parametrize(("stdout", "json_"), [("a reader that went away", []), ("a reader that went away", ["--json"]),
                                               ("closed", []), ("a full disk", ["--json"])])
def test_a_report_that_cannot_be_printed_is_never_a_verdict(marked, tmp_path, stdout, json_):
    """A detected model's report into a pipe whose reader is gone had exited 1 ("not detected",
    rich's own answer to a broken pipe) or 3 (with --json): now 141, as a shell reports a process
    a closed pipe stopped, and 2 on a full disk; the line says the files written are complete."""
    import os
    import subprocess

    from helpers import deepsigns_argv, process_env

    argv = [*deepsigns_argv(), "export", str(marked.marked), "--out", str(tmp_path / "m.onnx"), *json_]
    read, write = os.pipe()
    os.close(read)
    sink = {"a reader that went away": write, "closed": None, "a full disk": os.open("/dev/full", os.O_WRONLY)}[stdout]
    try:
        proc = subprocess.run(argv, env=process_env(), stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.PIPE,
                              text=True, timeout=300, preexec_fn=(lambda: os.close(1)) if sink is None else None)
    finally:
        os.close(write)
        if stdout == "a full disk":
            os.close(sink)
    assert proc.returncode == (2 if stdout == "a full disk" else 141), proc.stderr
    assert_one_error_line(proc.stderr, "", "stdout", "is complete")
    assert (tmp_path / "m.onnx").is_file()


def test_debug_shows_the_traceback(marked, monkeypatch):
    monkeypatch.setattr(api, "verify", _boom)
    for args, env in ((["--debug"], {}), ([], {"DEEPSIGNS_DEBUG": "1"})):
        result = run_cli("verify", "--model", marked.onnx, "--keys", marked.keys, *args, code=3, env=env)
        assert "Traceback" in result.stderr and "_boom" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: internal error")


@pytest.mark.parametrize("args, needles", [
    (["verify", "--model"], ["--model", "requires an argument"]),
    (["verify", "--keys", "k"], ["missing option", "--model"]),
    (["train", "--arch", "mlp", "--out", "x", "--epochs", "0"], ["--epochs", "range"]),
    (["train", "--arch", "mlp", "--out", "x", "--epochs", str(2**63)], ["--epochs"]),
    (["train", "--arch", "mlp", "--out", "x", "--seed", "-1"], ["--seed"]),
    (["embed", "--model", "m", "--keys", "k", "--out", "x", "--batch-size", "0"], ["--batch-size", "range"]),
    (["train", "--arch", "mlp", "--out", "x", "--seed", str(2**64)], ["--seed"]),
    (["keygen", "--model", "m", "--out", "k", "--bits", str(10**15)], ["--bits"]),
    (["keygen", "--model", "m", "--out", "k", "--key-size", str(2**63)], ["--key-size"]),
    (["keygen", "--model", "m", "--out", "k", "--bits", "3", "--message", "x"], ["--bits or --message"]),
    (["frobnicate"], ["no such command"]),
], ids=lambda v: "-".join(v) if isinstance(v, list) and len(v) < 4 else None)
def test_usage_errors_are_one_line(tmp_path, args, needles):
    before = snapshot(tmp_path)
    assert_bad_input(run_cli(*args, code=None), *needles)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args, value", [
    (["keygen", "--model", "m", "--out", "k", "--bits"], "1_0"),
    (["train", "--arch", "mlp", "--out", "x", "--seed"], "\u0661\u0662"),  # (Arabic-Indic 12)
    (["train", "--arch", "mlp", "--out", "x", "--lr"], "1_0e-3"),
    (["verify", "--model", "m", "--keys", "k", "--queries"], "1_000"),
    (["extract", "--model", "m", "--keys", "k", "--alpha"], "\u0661e-9"),
    (["embed", "--model", "m", "--keys", "k", "--out", "x", "--workers"], "\uff11"),  # (a fullwidth 1)
    (["embed", "--model", "m", "--keys", "k", "--out", "x", "--nproc"], "\u0662"),
    (["attack", "prune", "--model", "m", "--out", "x", "--rate"], "0.\u0665"),
    (["attack", "prune", "--model", "m", "--keys", "k", "--sweep"], "rate=0.1,0.\u0665"),
    (["attack", "prune", "--model", "m", "--keys", "k", "--sweep"], "rate=0.1,1_0"),
], ids=lambda v: v if isinstance(v, str) else v[0])
def test_numbers_are_written_in_the_digits_0_to_9(tmp_path, args, value):
    """int() and float() read '1_0' as 10 and other scripts' digits as ours, and click had passed
    them on: `--bits 1_0` made 10 bits, `--seed \u0661\u0662` was seed 12."""
    before = snapshot(tmp_path)
    line = assert_bad_input(run_cli(*args, value, code=None))
    assert value.rpartition(",")[2] in line, line
    assert "digits 0-9" in line or "must be a number" in line, line  # (a sweep's value: the attack's own line)
    assert snapshot(tmp_path) == before


def test_numbers_of_thousands_of_digits_are_one_short_line(tmp_path):
    """A --sweep value past int()'s 4,300 digits had been an internal error (exit 3)."""
    digits = "0" * 4300 + "8"
    for args in (["attack", "quantize", "--model", "m", "--keys", "k", "--sweep", f"bits={digits}"],
                 ["train", "--arch", "mlp", "--out", tmp_path / "x", "--epochs", "9" * 5000]):
        line = assert_bad_input(run_cli(*args, code=None))
        assert len(line) < 500, line  # (not the value in full)


@pytest.mark.parametrize("command", ["verify", "extract", "train", "embed"])
def test_help_shows_no_range_where_there_is_none(command):
    """--queries and --nproc take any whole number (the command checks it): help had shown [x<=None]."""
    assert "None" not in run_cli(command, "--help").stdout


@pytest.mark.parametrize("alpha", ["nan", "inf", "-1", "0", "1", "2", "1e-400", "5e-324", "1e-310"])
def test_alpha_must_be_a_probability(marked, alpha):
    """(5e-324 and 1e-310, above 0, had been taken: shared out among the readings they came to 0,
    exit 3; 1 had been taken, and detected every model)"""
    assert_bad_input(run_cli("extract", "--model", marked.onnx, "--keys", marked.keys, "--alpha", alpha,
                             code=None), "--alpha")


@pytest.mark.parametrize("value, size", [("1e-400", "small"), ("0.0001e-330", "small"), ("1e400", "large")])
def test_a_number_past_a_floats_range_is_named_as_typed(value, size):
    """1e-400 had been refused as "got 0.0", a number the user never typed."""
    line = assert_bad_input(run_cli("extract", "--model", "m.onnx", "--keys", "k", "--alpha", value, code=None),
                            "--alpha", f"'{value}' is too {size}")
    assert "0.0" not in line.replace(value, ""), line


@pytest.mark.parametrize("lr", ["nan", "inf", "1e308", "-1", "0", "1e-320"])
def test_learning_rate_must_be_sane(tmp_path, lr):
    before = snapshot(tmp_path)
    assert_bad_input(run_cli("train", "--arch", "mlp", "--epochs", 1, "--lr", lr,
                             "--out", tmp_path / "m.safetensors", code=None), "--lr")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(("scheme", "size", "advice"), [
    ("hidden", ("--bits", 8), "(--bits, a longer --message, or more --classes)"),
    ("gradsigns", ("--bits", 8), "(--bits, or a longer --message)"),
    ("output", ("--key-size", 5), "(a larger --key-size)")])  # (each scheme its own: --bits is no output option)
def test_keys_that_can_never_reach_alpha_are_warned_of(tmp_path, marked, scheme, size, advice):
    """keygen and embed had taken them without a word; only extract, on the marked model, said
    that no reading could reach alpha (and exited 1)."""
    result = run_cli("keygen", "--model", marked.base, "--scheme", scheme, *size, "--out", tmp_path / "k.dskey",
                     code=0)
    assert f"warning: {scheme}: these keys give at best p = " in result.stderr, result.stderr
    assert "above the default alpha" in result.stderr and advice in result.stderr
    default = run_cli("keygen", "--model", marked.base, "--scheme", scheme, "--out", tmp_path / "d.dskey", code=0)
    assert "at best p" not in default.stderr


def test_keys_that_reach_alpha_alone_but_not_their_share_in_a_bundle_are_warned_of(tmp_path, marked):
    """extract gives each scheme of a bundle its share of alpha: 32 hidden bits read three ways
    reach 1e-9 alone (best p = 7e-10), not 5e-10; GradSigns' 32 bits (2.3e-10) do."""
    args = ("keygen", "--model", marked.base, "--bits", 32, "--classes", 1)
    alone = run_cli(*args, "--scheme", "hidden", "--out", tmp_path / "a.dskey", code=0)
    assert "at best p" not in alone.stderr, alone.stderr
    both = run_cli(*args, "--scheme", "hidden,gradsigns", "--out", tmp_path / "b.dskey", code=0)
    assert ("warning: hidden: these keys give at best p = 7e-10, above its share of the default alpha "
            "(1e-09 over 2 schemes)") in both.stderr, both.stderr
    assert "gradsigns: these keys" not in both.stderr


@pytest.mark.parametrize("where", ["stderr", "help", "version"])
def test_a_full_disk_never_reads_as_a_verdict_or_a_bug(marked, tmp_path, where):
    """stderr on a full disk: a bad-input error had exited 1 ("not detected"); --help or --version
    to a full disk had exited 3 ("a bug")."""
    import os
    import subprocess

    from helpers import deepsigns_argv, process_env

    argv = {"stderr": ["extract", "--model", str(tmp_path / "nowhere.onnx"), "--keys", str(marked.keys)],
            "help": ["--help"], "version": ["--version"]}[where]
    full = os.open("/dev/full", os.O_WRONLY)
    streams = {"stdout": subprocess.PIPE, "stderr": full} if where == "stderr" else \
        {"stdout": full, "stderr": subprocess.PIPE}
    try:
        proc = subprocess.run([*deepsigns_argv(), *argv], env=process_env(), stdin=subprocess.DEVNULL, timeout=120,
                              **streams)
    finally:
        os.close(full)
    assert proc.returncode == 2, proc


@pytest.mark.parametrize("broken", [False, True], ids=["closed", "a-pipe-whose-reader-is-gone"])
@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["keygen", "--help"]])
def test_help_into_a_closed_stdout_is_not_success(argv, broken):
    """With stdout closed, Python has no sys.stdout, and click had printed --help nowhere and
    exited 0; into a pipe whose reader is gone (`| head -c0`), click exited 1, "not detected"."""
    import os
    import subprocess

    from helpers import deepsigns_argv, process_env

    reader, writer = os.pipe()
    os.close(reader)
    try:
        proc = subprocess.run([*deepsigns_argv(), *argv], env=process_env(), stdin=subprocess.DEVNULL, timeout=120,
                              stdout=writer if broken else None, stderr=subprocess.PIPE, text=True,
                              preexec_fn=None if broken else lambda: os.close(1))
    finally:
        os.close(writer)
    assert proc.returncode == 141, proc
    assert_one_error_line(proc.stderr, "", "stdout was closed before the text was printed")


def test_an_option_given_twice_is_refused_and_values_that_look_like_options_are_not(marked, tmp_path):
    """click keeps the last of an option given twice without a word (`--sweep` twice swept the
    last alone); the check must not take a value for an option (a file named --keys). An option
    whose value is missing, the next word an option (`--out --force`), is refused: click had
    taken the word as the value (a bundle named --force, exit 0); such a value goes as --out=..."""
    result = run_cli("export", marked.marked, "--out", tmp_path / "a.onnx", "--out", tmp_path / "b.onnx", code=2)
    assert_one_error_line(result.stderr, result.stdout, "--out is given twice", " export --help")
    result = run_cli("keygen", "--model", marked.base, "--out", "--force", code=2)
    assert_one_error_line(result.stderr, result.stdout, "--out takes a value, and the next word is the option --force",
                          "--out=VALUE")
    result = run_cli("keygen", "--model", marked.base, "--out", "-h", code=2)  # (help's short name too)
    assert_one_error_line(result.stderr, result.stdout, "--out takes a value, and the next word is the option -h")
    result = run_cli("keygen", "--model", marked.base, "--message", "--json", "--out", tmp_path / "j.dskey", code=2)
    assert_one_error_line(result.stderr, result.stdout, "--message takes a value", "--json")
    assert list(tmp_path.iterdir()) == []
    # a message that reads "--out", then --out: one --out (the message's word is its value)
    run_json("keygen", "--model", marked.base, "--message=--out", "--out", tmp_path / "k.dskey", code=0)
    # a suspect named "--keys" (--model may be given many times): the file, not an option, is missing
    result = run_cli("extract", "--keys", marked.keys, "--model=--keys", code=2)
    assert "given twice" not in result.stderr and "--keys" in result.stderr
    result = run_cli("attack", "noise", "--model", marked.marked, "--sigma", 1, "--sigma", 2,
                     "--out", tmp_path / "n.safetensors", code=2)
    assert_one_error_line(result.stderr, result.stdout, "--sigma is given twice", "attack noise --help")


def test_empty_or_lone_values_are_refused_on_every_command_alike(marked, tmp_path):
    """(embed --onnx "" had written no ONNX without a word, export --data "" and export --image-size
    without --data were ignored, and so was --queries for keys it sets nothing of: other commands,
    or options, refused the same values)"""
    for args, needles in (
            (["embed", "--model", marked.base, "--keys", marked.keys, "--out", tmp_path / "m.safetensors",
              "--onnx", ""], ("--onnx is empty",)),
            (["export", marked.base, "--data", "", "--out", tmp_path / "m.onnx"], ("--data is empty",)),
            (["keygen", "--model", marked.base, "--data", "", "--out", tmp_path / "k.dskey"], ("--data is empty",)),
            (["export", marked.base, "--image-size", 16, "--out", tmp_path / "m.onnx"],
             ("--image-size goes with --data",)),
            (["extract", "--model", marked.onnx, "--keys", marked.keys, "--queries", 300],
             ("--queries sets what a reading of gradsigns keys may ask", "this bundle holds none"))):
        result = run_cli(*args, code=2)
        assert_one_error_line(result.stderr, result.stdout, *needles)
    assert list(tmp_path.iterdir()) == []


def test_message_with_a_lone_surrogate(tmp_path, marked):
    result = run_cli("keygen", "--model", marked.base, "--message", "bad \ud800 text",
                     "--out", tmp_path / "k.dskey", code=None)
    assert_bad_input(result, "--message", "surrogate")


@pytest.mark.parametrize("where", ["parent-is-a-file", "newline-in-name", "nul-in-name", "proc",
                                   "trailing-slash"])
def test_outputs_that_cannot_be_written(tmp_path, marked, where):
    (tmp_path / "afile").write_text("x")
    out = {"parent-is-a-file": tmp_path / "afile" / "m.onnx",
           "newline-in-name": tmp_path / "no\nfolder" / "m.onnx",
           "nul-in-name": f"{tmp_path}/m\x00.onnx",
           "proc": "/proc/m.onnx",
           "trailing-slash": f"{tmp_path}/newdir/"}[where]  # a folder, not a file (fuzz case 1030)
    before = snapshot(tmp_path)
    result = run_cli("export", marked.marked, "--out", out, code=None)
    assert_bad_input(result)  # one line even with a newline in the path
    assert snapshot(tmp_path) == before


def test_warnings_never_reach_stderr(marked, monkeypatch):
    real = api.extract

    def noisy(*args, **kwargs):
        warnings.warn("Initializing zero-element tensors is a no-op", UserWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "extract", noisy)
    result = run_cli("extract", "--model", marked.onnx, "--keys", marked.keys, "--json", code=None)
    assert result.exit_code == 0 and result.stderr == ""
    json.loads(result.stdout)


def test_a_real_process_internal_error_exit_code(tmp_path):
    """The installed script: a module:factory that raises a bug-like error is the user's code,
    so it is bad input (2); a crash of ours would be 3. Neither is ever 0 or 1."""
    (tmp_path / "crashy.py").write_text("def make(**kw):\n    raise ZeroDivisionError('boom')\n")
    proc = run_proc("train", "--arch", "crashy:make", "--epochs", 1, "--out", tmp_path / "m.safetensors",
                    env={"PYTHONPATH": str(tmp_path)})
    assert proc.returncode in (2, 3), proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout)


def test_stdout_sent_into_a_file_the_command_reads_or_writes_is_refused(marked, tmp_path):
    """`extract --keys k.dskey >> k.dskey` had appended the report to the bundle (which no command
    then opened: "added to"), `extract --model m.onnx >> m.onnx` to the suspect model, and
    `export --out x.onnx --force > x.onnx` had lost it (written into the file that the commit
    replaced); all exited 0. Under --nproc the processes' stdout is a pipe: the command checks."""
    import os
    import shutil
    import subprocess

    from helpers import ENV, deepsigns_argv, process_env

    keys, onnx, suspect = tmp_path / "k.dskey", tmp_path / "x.onnx", tmp_path / "m.onnx"
    shutil.copyfile(marked.keys, keys)
    shutil.copyfile(marked.onnx, suspect)
    sealed, model = keys.read_bytes(), suspect.read_bytes()
    onnx.write_bytes(b"an older export")
    for argv, into, what in (
            (["extract", "--model", str(marked.marked), "--keys", str(keys), "--json"], keys, "--keys"),
            (["extract", "--model", str(suspect), "--keys", str(marked.keys)], suspect, "--model"),
            (["export", str(marked.marked), "--out", str(onnx), "--force", "--json"], onnx, "--out"),
            (["train", "--arch", "mlp", "--data", "digits", "--epochs", "1", "--nproc", "2", "--out", str(onnx),
              "--force"], onnx, "--out")):
        with open(into, "ab") as stdout:
            proc = subprocess.run([*deepsigns_argv(), *argv], env=process_env(ENV), stdin=subprocess.DEVNULL,
                                  stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert_one_error_line(proc.stderr, "", f"stdout is {into}, given as {what}", "send the report to another file")
    assert suspect.read_bytes() == model
    # a file the command reads in a folder it is given (a folder of suspects); a report.txt beside is no input
    folder = tmp_path / "suspects"
    folder.mkdir()
    shutil.copyfile(marked.onnx, folder / "a.onnx")
    codes = {}
    for name in ("a.onnx", "report.txt"):
        with open(folder / name, "ab") as stdout:
            proc = subprocess.run([*deepsigns_argv(), "extract", "--model", str(folder), "--keys", str(marked.keys)],
                                  env=process_env(ENV), stdin=subprocess.DEVNULL, stdout=stdout,
                                  stderr=subprocess.PIPE, text=True, timeout=300)
        codes[name] = proc.returncode
        if name == "a.onnx":
            assert_one_error_line(proc.stderr, "", f"stdout is {folder / name}, a suspect of the folder {folder}")
    os.link(folder / "a.onnx", tmp_path / "hard.log")  # (the same file by another name, outside the folder)
    with open(tmp_path / "hard.log", "ab") as stdout:
        proc = subprocess.run([*deepsigns_argv(), "extract", "--model", str(folder), "--keys", str(marked.keys)],
                              env=process_env(ENV), stdin=subprocess.DEVNULL, stdout=stdout,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    codes["hard.log"] = proc.returncode
    assert_one_error_line(proc.stderr, "", f"stdout is {folder / 'a.onnx'}, a suspect of the folder {folder}")
    assert codes == {"a.onnx": 2, "report.txt": 0, "hard.log": 2}
    assert (folder / "a.onnx").read_bytes() == model
    assert "1 of 1 suspects detected" in (folder / "report.txt").read_text()
    # the module of an --arch factory, which the command imports (its source had taken the report)
    module = tmp_path / "arch_of_mine.py"
    module.write_text("from deepsigns_cli.zoo import ZOO\n\ndef make(input_shape, num_classes):\n"
                      "    return ZOO['mlp'](input_shape=input_shape, num_classes=num_classes)\n")
    source = module.read_bytes()
    with open(module, "ab") as stdout:
        proc = subprocess.run([*deepsigns_argv(), "train", "--arch", "arch_of_mine:make", "--epochs", "1", "--out",
                               str(tmp_path / "t.safetensors")], env=process_env({**ENV, "PYTHONPATH": str(tmp_path)}),
                              stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, "", f"stdout is {module}, the module of --arch arch_of_mine:make")
    assert module.read_bytes() == source
    # a value that names no file (the bundled data set) is no file, whatever stdout's name
    with open(tmp_path / "digits", "wb") as stdout:
        proc = subprocess.run([*deepsigns_argv(), "export", str(marked.marked), "--data", "digits", "--out",
                               str(tmp_path / "y.onnx")], env=process_env(ENV), stdin=subprocess.DEVNULL,
                              stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "y.onnx" in (tmp_path / "digits").read_text()
    assert keys.read_bytes() == sealed and onnx.read_bytes() == b"an older export"


def test_onnxruntime_keeps_no_telemetry_in_home(marked, tmp_path):
    """onnxruntime 1.31 wrote a device id and a queue of telemetry events for upload under
    ~/.cache/Microsoft at every command that ran it: nothing of ours reaches the network, or
    leaves files behind."""
    import subprocess

    from helpers import deepsigns_argv, process_env

    home = tmp_path / "home"
    home.mkdir()
    proc = subprocess.run([*deepsigns_argv(), "extract", "--model", str(marked.onnx), "--keys", str(marked.keys)],
                          env=process_env({"HOME": str(home)}), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [p for p in home.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("argv, needles", [([], ["no command given:", " COMMAND, one of", "keygen", "verify"]),
                                           (["attack"], ["no command given:", " attack COMMAND", "prune"])])
def test_no_command_says_which_are_there(argv, needles):
    """It had printed only "error: Usage: deepsigns [OPTIONS] COMMAND [ARGS]...\""""
    result = run_cli(*argv, code=2)
    assert_one_error_line(result.stderr, result.stdout, *needles)


def test_a_passphrase_file_that_is_not_there_is_not_named(marked):
    """A passphrase typed where its file's name belongs had been printed back, into a CI log."""
    result = run_cli("extract", "--model", marked.onnx, "--keys", marked.keys, "--passphrase-file",
                     "correct horse battery staple", code=2)
    line = assert_one_error_line(result.stderr, result.stdout, "--passphrase-file", "not found")
    assert "horse" not in line


@pytest.mark.parametrize("name, value", [("OMP_NUM_THREADS", "abc"), ("OMP_NUM_THREADS", ""), ("OMP_NUM_THREADS", "0"),
                                         ("OMP_NUM_THREADS", "2,"), ("OMP_DYNAMIC", "yes"), ("GOMP_SPINCOUNT", "many")])
def test_an_openmp_setting_openmp_cannot_read_is_one_line(name, value):
    """torch's OpenMP had printed "libgomp: Invalid value for environment variable ..." above
    the report, and gone on at its default."""
    proc = run_proc("inspect", SAMPLE, env={name: value})
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout, f"{name}='{value}' is not a value OpenMP")


@pytest.mark.parametrize("name, value, needle, taken", [
    ("TORCH_LOGS", "garbage", "torch could not be loaded (ValueError: Invalid log settings: garbage", "-dynamo"),
    ("TORCH_CPP_LOG_LEVEL", "bogus", "TORCH_CPP_LOG_LEVEL='bogus' is not a level", "info")])
def test_a_torch_setting_torch_refuses_is_one_line(tmp_path, name, value, needle, taken):
    """TORCH_LOGS=garbage failed torch's import, reported as a bug of ours (exit 3); an unknown
    TORCH_CPP_LOG_LEVEL had put torch's own line above the report."""
    proc = run_proc("export", SAMPLE, "--out", tmp_path / "m.onnx", env={name: value})
    assert proc.returncode == 2, proc.stderr
    line = assert_one_error_line(proc.stderr, proc.stdout, needle)
    assert name in line and not (tmp_path / "m.onnx").exists()
    proc = run_proc("export", SAMPLE, "--out", tmp_path / "m.onnx", env={name: taken})  # (a value it takes)
    assert proc.returncode == 0 and proc.stderr == "" and (tmp_path / "m.onnx").is_file(), proc.stderr


def test_openmp_settings_openmp_reads_are_taken():
    for env in ({"OMP_NUM_THREADS": " 1 "}, {"OMP_NUM_THREADS": "1,1"},
                {"OMP_NUM_THREADS": "+1", "OMP_DYNAMIC": "true"}):
        proc = run_proc("inspect", SAMPLE, "--json", env=env)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert json.loads(proc.stdout)["arch"] == "mlp"


def test_a_current_folder_that_was_removed_is_one_line(tmp_path):
    """torch's import had ended the process with "Intel oneMKL FATAL ERROR: Cannot load
    libtorch_cpu.so." (the command started in a folder removed meanwhile)."""
    import os
    import subprocess

    from helpers import deepsigns_argv, process_env

    gone = tmp_path / "gone"
    gone.mkdir()
    argv = [*deepsigns_argv(), "export", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "x.onnx")]
    proc = subprocess.run(argv, cwd=gone, preexec_fn=lambda: os.rmdir(gone), env=process_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert_one_error_line(proc.stderr, proc.stdout, "current folder was removed")
