"""A matrix of hostile command lines: each ends with one clear line on stderr (no traceback), the status the
CLI documents (2: the user's to fix, 1: kiln's, 130: Ctrl-C, 141: closed output), and nothing changed outside
the output and cache directories."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

import kiln
import kiln.cli
from kiln.cli import main

from tiny_checkpoint import snapshot, write_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    checkpoint = write_checkpoint(folder / "tiny")
    artifact = kiln.compile(checkpoint, backend="reference", max_seq_len=32, output=folder / "tiny.kiln").path
    fifo = folder / "fifo"
    os.mkfifo(fifo)
    return {"CKPT": checkpoint, "ART": artifact, "FIFO": str(fifo)}


def _fill(args, files, sandbox):
    return [files.get(a, a.replace("OUT", str(sandbox / "out"))) for a in args]


# (case id, arguments, standard input, status, what the last line says)
CASES = [
    ("empty prompt", ["run", "ART", ""], None, 2, "PROMPT is empty"),
    ("empty stdin", ["run", "ART"], b"", 2, "the prompt on standard input is empty"),
    ("stdin not UTF-8", ["run", "ART"], b"caf\xe9", 2, "standard input is not UTF-8 text"),
    ("prompt too long to generate", ["run", "ART", "Hello", "-n", "100000"], None, 2, "more than the compiled maximum"),
    ("empty stop string", ["run", "ART", "Hi", "--stop", ""], None, 2, "--stop must be a string or a sequence of"),
    ("zero threads", ["run", "CKPT", "Hi", "--threads", "0"], None, 2, "--threads must be positive"),
    ("budget inf", ["compile", "CKPT", "-o", "OUT", "--kv-cache-budget", "inf"], None, 2, "positive, finite"),
    ("budget nan", ["compile", "CKPT", "-o", "OUT", "--kv-cache-budget", "nan"], None, 2, "positive, finite"),
    ("budget negative", ["compile", "CKPT", "-o", "OUT", "--kv-cache-budget=-1GiB"], None, 2,
     "must be a positive, finite number of bytes, got '-1GiB'"),
    ("budget astronomical", ["compile", "CKPT", "-o", "OUT", "--kv-cache-budget", "1e30"], None, 2,
     "more bytes than any machine has"),
    ("budget words", ["compile", "CKPT", "-o", "OUT", "--kv-cache-budget", "5 parsecs"], None, 2, "cannot read"),
    ("max-seq-len huge", ["compile", "CKPT", "-o", "OUT", "--backend", "reference", "--max-seq-len", "1000000000"],
     None, 2, "takes 2,048,000,000,000 bytes (512 per token)"),
    ("max-num-seqs huge", ["compile", "CKPT", "-o", "OUT", "--backend", "reference", "--max-seq-len", "64",
                           "--max-num-seqs", "1000000000"], None, 2, "more than this machine's"),
    ("max-seq-len not a number", ["compile", "CKPT", "-o", "OUT", "--max-seq-len", "1e9"], None, 2,
     "invalid int value: '1e9'"),
    ("page size zero", ["compile", "CKPT", "-o", "OUT", "--page-size", "0"], None, 2, "--page-size must be positive"),
    ("negative max-seq-len", ["compile", "CKPT", "-o", "OUT", "--max-seq-len", "-5"], None, 2, "must be positive"),
    ("unknown pass", ["inspect", "CKPT", "--print-after", "fuse_everything"], None, 2,
     "--print-after 'fuse_everything' is not a pass of the pipeline"),
    ("unknown stop pass", ["inspect", "CKPT", "--stop-after", "nope"], None, 2, "--stop-after 'nope' is not a pass"),
    ("print-after on an artifact", ["inspect", "ART", "--print-after", "fuse_rope"], None, 2,
     "need a model to compile"),
    ("model is a FIFO", ["run", "FIFO", "Hi"], None, 2, "FIFO"),
    ("model is a device", ["run", "/dev/zero", "Hi"], None, 2, "/dev/zero"),
    ("model missing", ["run", "/no/such/model.gguf", "Hi"], None, 2, "not found"),
    ("text is a device", ["eval", "ppl", "ART", "--text", "/dev/zero"], None, 2, "--text /dev/zero: expected a text"),
    ("text is a FIFO", ["eval", "ppl", "ART", "--text", "FIFO"], None, 2, "FIFO"),
    ("unknown command", ["frobnicate"], None, 2, "invalid choice"),
    ("unknown flag", ["run", "ART", "Hi", "--temprature", "2"], None, 2, "unrecognized arguments"),
]


@pytest.mark.parametrize("case, args, stdin, status, message", CASES, ids=[c[0] for c in CASES])
def test_hostile_command_line(case, args, stdin, status, message, files, tmp_path, monkeypatch, capsys):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "mine.txt").write_text("the user's")
    monkeypatch.chdir(sandbox)
    monkeypatch.setenv("KILN_CACHE_DIR", str(sandbox / "cache"))
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    before = snapshot(sandbox)
    got = main(_fill(args, files, sandbox))
    out, err = capsys.readouterr()
    _assert_one_line(err, message)
    assert got == status, err
    after = {k: v for k, v in snapshot(sandbox).items() if not k.startswith(("out", "cache"))}
    assert after == before
    assert not os.path.exists(sandbox / "out")


def _assert_one_line(err: str, message: str) -> None:
    lines = err.splitlines()
    assert lines and message in lines[-1], err
    assert lines[-1].startswith(("kiln: error: ", "kiln: internal error: ", "kiln: interrupted")), err
    assert not any(line.startswith(("kiln: error", "kiln: internal", "Traceback")) for line in lines[:-1]), err


@pytest.mark.parametrize("raised, status, message", [
    (KeyboardInterrupt(), 130, "kiln: interrupted"),
    (MemoryError(), 1, "kiln: error: out of memory"),
    (RecursionError("maximum recursion depth exceeded"), 1, "internal error: RecursionError"),
    (type("PanicException", (BaseException,), {})("called `Result::unwrap()` on an `Err`\nvalue"), 1,
     "internal error: PanicException: called `Result::unwrap()` on an `Err` value"),
    (KeyError("n_layer"), 1, "internal error: KeyError"),
])
def test_any_exception_ends_in_one_line(raised, status, message, files, monkeypatch, capsys):
    def boom(args):
        raise raised

    monkeypatch.setitem(kiln.cli.COMMANDS, "run", boom)
    assert main(["run", files["ART"], "Hi"]) == status
    _assert_one_line(capsys.readouterr().err, message)


def _kiln(*args, **popen):
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, timeout=300, **popen)


def test_arguments_that_are_not_utf8(files, tmp_path):
    out = _kiln("run", files["ART"].encode(), b"caf\xe9")  # Python decodes argv with surrogateescape
    assert out.returncode == 2 and out.stderr.decode().splitlines() == [
        "kiln: error: PROMPT is not valid UTF-8 (the argument holds bytes that do not decode); pass UTF-8 text"]
    out = _kiln("run", bytes(tmp_path) + b"/caf\xe9.gguf", "Hi")
    assert out.returncode == 2
    _assert_one_line(out.stderr.decode(), "caf\\udce9.gguf' not found")


def test_stdin_that_never_ends_is_bounded(files):
    with open("/dev/zero", "rb") as zero:
        out = _kiln("run", files["ART"], stdin=zero)
    assert out.returncode == 2
    assert out.stderr.decode().splitlines() == [
        "kiln: error: standard input holds more than 64 MiB, far more than a prompt; pipe a shorter text"]


def test_closed_standard_output(files, tmp_path):
    shell = f"{sys.executable} -m kiln.cli"
    out = subprocess.run(f"{shell} run {files['ART']} Hello -n 3 --no-stream >&-", shell=True, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 141
    assert out.stderr.splitlines() == ["kiln: error: standard output was closed before all the output was written"]
    # a command with nothing to print on stdout does not care
    out = subprocess.run(f"{shell} compile {files['CKPT']} -o {tmp_path / 'x.kiln'} --backend reference "
                         f"--max-seq-len 32 >&-", shell=True, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def test_reader_that_goes_away(files):
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "run", files["ART"], "Hello", "-n", "20",
                             "--ignore-eos"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141
    assert err.splitlines() == ["kiln: error: standard output was closed before all the output was written"]
