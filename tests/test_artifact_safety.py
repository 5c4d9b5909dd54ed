"""Nothing a user owns is deleted or overwritten: `kiln compile -o` and Artifact.save replace only a kiln
artifact, atomically; killed compiles leave nothing behind for long; a damaged cache entry is rebuilt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import kiln
from kiln.cli import main
from kiln.ir.errors import ConfigError, KilnError
from kiln.ir.files import install_directory

from tiny_checkpoint import read_manifest, snapshot, write_checkpoint

COMPILE = ["--backend", "reference", "--max-seq-len", "32"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def run_cli(capsys, *args):
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def error_lines(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("kiln: error")]


def _user_files(root):
    (root / "notes.txt").write_text("precious")
    (root / "data").mkdir()
    (root / "data" / "table.csv").write_text("1,2,3")


@pytest.mark.parametrize("case", ["directory", "current directory", "empty path", "file", "empty directory",
                                  "symlink to an artifact", "foreign manifest"])
def test_compile_refuses_what_is_not_an_artifact(case, checkpoint, tmp_path, monkeypatch, capsys):
    _user_files(tmp_path)
    target = {"directory": tmp_path / "data", "current directory": ".", "empty path": "",
              "file": tmp_path / "notes.txt", "empty directory": tmp_path / "empty",
              "symlink to an artifact": tmp_path / "link", "foreign manifest": tmp_path / "webapp"}[case]
    if case == "empty directory":
        (tmp_path / "empty").mkdir()
    if case == "symlink to an artifact":
        kiln.compile(checkpoint, backend="reference", max_seq_len=32, output=tmp_path / "real.kiln")
        os.symlink(tmp_path / "real.kiln", tmp_path / "link")
    if case == "foreign manifest":  # a web app's manifest.json is not a kiln manifest
        (tmp_path / "webapp").mkdir()
        (tmp_path / "webapp" / "manifest.json").write_text('{"name": "my app", "format": "webmanifest"}')
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    status, out, err = run_cli(capsys, "compile", checkpoint, "-o", target, *COMPILE)
    assert status == 2 and len(error_lines(err)) == 1 and "Traceback" not in err, err
    assert {"directory": "is not a kiln artifact", "current directory": "is not a kiln artifact",
            "empty path": "is empty", "file": "is a file", "empty directory": "is not a kiln artifact",
            "symlink to an artifact": "symbolic link", "foreign manifest": "is not a kiln artifact"}[case] in err
    assert snapshot(tmp_path) == before  # untouched, and no temporary or .old-* entry left behind


def test_save_refuses_what_is_not_an_artifact(checkpoint, tmp_path):
    art = kiln.compile(checkpoint, backend="reference", max_seq_len=32)
    _user_files(tmp_path)
    before = snapshot(tmp_path)
    for target in (tmp_path / "data", tmp_path / "notes.txt", tmp_path, ""):
        with pytest.raises(ConfigError):
            art.save(target)
    assert snapshot(tmp_path) == before
    saved = art.save(tmp_path / "model.kiln")
    assert read_manifest(saved)["files"] == read_manifest(art.path)["files"]
    assert art.save(saved) == saved  # onto an artifact: replaced
    assert sorted(os.listdir(tmp_path)) == ["data", "model.kiln", "notes.txt"]


def test_compile_replaces_an_artifact_in_one_swap(checkpoint, tmp_path, capsys):
    target = tmp_path / "model.kiln"
    assert run_cli(capsys, "compile", checkpoint, "-o", target, *COMPILE)[0] == 0
    (target / "stray.txt").write_text("left by someone")  # part of the old artifact: replaced with it
    assert run_cli(capsys, "compile", checkpoint, "-o", target, "--backend", "reference", "--max-seq-len", "48")[0] == 0
    assert read_manifest(target)["kv_cache"]["max_seq_len"] == 48
    assert sorted(os.listdir(tmp_path)) == ["model.kiln"]
    assert not (target / "stray.txt").exists()
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o777 & ~_umask())  # not the staging dir's 0700


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_directory_swapped_in_after_the_check_is_put_back(tmp_path):
    """install_directory checks what it swapped out; if a user's directory took the artifact's place between
    the check and the swap, it goes back untouched."""
    staged, path = tmp_path / "staged", tmp_path / "out"
    staged.mkdir()
    (staged / "new").write_text("new artifact")
    path.mkdir()
    (path / "mine").write_text("the user's")
    answers = iter([True, False])  # an artifact at the check; something else once swapped out
    with pytest.raises(KilnError, match="changed while"):
        install_directory(str(staged), str(path), lambda p: next(answers), "kiln artifact", KilnError)
    assert (path / "mine").read_text() == "the user's" and (staged / "new").read_text() == "new artifact"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_directories_are_removed_on_the_next_compile(checkpoint, tmp_path, capsys):
    dead, live = _dead_pid(), os.getppid()
    stale = [tmp_path / f".model.kiln.kiln-tmp-{dead}-abc", tmp_path / f".other.kiln.kiln-old-{dead}-x"]
    kept = [tmp_path / f".model.kiln.kiln-tmp-{live}-def", tmp_path / ".hidden", tmp_path / "x.kiln-tmp-1-a"]
    for folder in stale + kept:
        folder.mkdir()
        (folder / "file").write_text("x")
    assert run_cli(capsys, "compile", checkpoint, "-o", tmp_path / "model.kiln", *COMPILE)[0] == 0
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)


def _compile_process(checkpoint, target):
    return subprocess.Popen([sys.executable, "-m", "kiln.cli", "compile", str(checkpoint), "-o", str(target),
                             "--max-seq-len", "32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_staging(folder, proc, timeout=300):
    """The staging directory, once the compile has made it (TVM's build keeps it there for seconds)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        staging = [n for n in os.listdir(folder) if ".kiln-tmp-" in n]
        if staging and os.listdir(os.path.join(folder, staging[0])):
            return staging[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the compile never staged its output")


def test_sigterm_during_a_compile_removes_its_staging_directory(checkpoint, tmp_path):
    proc = _compile_process(checkpoint, tmp_path / "model.kiln")
    _wait_for_staging(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.splitlines()[-1] == "kiln: terminated", err
    assert os.listdir(tmp_path) == []


def test_a_killed_compile_is_cleaned_up_by_the_next(checkpoint, tmp_path, capsys):
    proc = _compile_process(checkpoint, tmp_path / "model.kiln")
    staging = _wait_for_staging(tmp_path, proc)
    proc.kill()
    proc.communicate()
    assert os.listdir(tmp_path) == [staging]
    assert run_cli(capsys, "compile", checkpoint, "-o", tmp_path / "model.kiln", *COMPILE)[0] == 0
    assert os.listdir(tmp_path) == ["model.kiln"]


@pytest.mark.parametrize("damage", ["flipped byte", "missing manifest", "truncated weights",
                                    "a file in its place"])
def test_a_damaged_cache_entry_is_rebuilt_with_a_notice(damage, checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    args = ["run", checkpoint, "Hello", "-n", "6", "--ignore-eos", *COMPILE]
    status, first, _ = run_cli(capsys, *args)
    assert status == 0
    (entry,) = [os.path.join(root, d) for root, dirs, _ in os.walk(tmp_path / "cache") for d in dirs
                if d == "model.kiln"]
    if damage == "flipped byte":
        weights = os.path.join(entry, "weights.safetensors")
        data = bytearray(open(weights, "rb").read())
        data[-1] ^= 0xFF
        open(weights, "wb").write(bytes(data))
    elif damage == "missing manifest":
        os.unlink(os.path.join(entry, "manifest.json"))
    elif damage == "truncated weights":
        with open(os.path.join(entry, "weights.safetensors"), "r+b") as f:
            f.truncate(100)
    else:
        import shutil

        shutil.rmtree(entry)
        open(entry, "w").write("junk")
    status, second, err = run_cli(capsys, *args)
    assert status == 0, err
    assert second == first
    notices = [line for line in err.splitlines() if "is unusable" in line]
    assert len(notices) == 1 and "rebuilding it" in notices[0], err
    status, third, err = run_cli(capsys, *args)  # and the rebuilt entry is used from then on
    assert status == 0 and third == first and "using the compiled model" in err
