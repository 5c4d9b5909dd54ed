"""The compile-time accuracy gate (kiln/accuracy.py): a compile is scored against the source model in torch eager
on a short built-in text before it is installed; the numbers go into the manifest and `kiln inspect`; a
compile whose logits disagree is refused (nothing installed), or installed with a warning, or not checked."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest

import kiln
from kiln.accuracy import MAX_MEAN_KL, MIN_TOP1_AGREEMENT, AccuracyWarning, compare, fixed_token_ids, run_gate
from kiln.backends.reference.executor import ReferenceExecutor
from kiln.cli import main
from kiln.ir.errors import ConfigError
from kiln.progress import QUIET

from tiny_checkpoint import read_manifest, write_checkpoint
from tiny_models import tiny_model

MAX_SEQ_LEN = 48


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def reference_artifact(checkpoint, tmp_path_factory):
    """The tiny checkpoint (with its character tokenizer) compiled on the reference backend, gate on."""
    return kiln.compile(checkpoint, backend="reference", max_seq_len=MAX_SEQ_LEN,
                        output=tmp_path_factory.mktemp("ref") / "tiny.kiln").path


def broken_kernel(monkeypatch, corrupt):
    """Make the reference backend's step return corrupt(logits): a kernel that computes the wrong thing."""
    step = ReferenceExecutor.step
    monkeypatch.setattr(ReferenceExecutor, "step", lambda self, function, inputs: corrupt(step(self, function, inputs)))


REVERSED = lambda logits: np.ascontiguousarray(logits[:, ::-1])  # noqa: E731 - every argmax moves
SHARPENED = lambda logits: logits * 300.0  # noqa: E731 - the same argmax, a far too confident distribution


# (a) correct compiles pass and record their numbers -----------------------------------------------------------
def test_reference_compile_passes_and_records_the_numbers(reference_artifact):
    accuracy = read_manifest(reference_artifact)["accuracy"]
    assert accuracy["passed"] is True and accuracy["mode"] == "refuse"
    assert accuracy["reference"] == "torch eager" and accuracy["text"] == "built-in text"
    assert accuracy["tokens"] == MAX_SEQ_LEN  # the text is longer than 48 characters: cut at max_seq_len
    assert accuracy["top1_agreement"] == 1.0 and accuracy["mean_kl"] < 1e-9  # fp32 through numpy
    assert accuracy["thresholds"] == {"min_top1_agreement": MIN_TOP1_AGREEMENT, "max_mean_kl": MAX_MEAN_KL}


def test_tvm_int4_compile_of_a_flat_model_passes(tmp_path):
    """int4 on the tiny random llama flips about a quarter of the argmaxes of its near-uniform rows (measured
    77% top-1 agreement) while KL stays near 2e-4: the gate lets it through, as it should."""
    art = kiln.compile(tiny_model("llama"), backend="tvm", quantize="int4", max_seq_len=MAX_SEQ_LEN,
                       output=tmp_path / "int4.kiln")
    accuracy = art.manifest["accuracy"]
    assert accuracy["passed"] is True and accuracy["text"] == "fixed token ids" and accuracy["tokens"] == MAX_SEQ_LEN
    assert MIN_TOP1_AGREEMENT <= accuracy["top1_agreement"] < 1.0
    assert 0 < accuracy["mean_kl"] < 1e-3
    assert kiln.load(art).logits([1, 2, 3]).shape == (3, 128)  # installed and loadable as usual


# (b) a broken compile is refused (nothing installed), or installed with a warning ---------------------------
@pytest.mark.parametrize("corrupt, fragment", [(REVERSED, "top-1 agreement 0.0% (gate: >= 40%)"),
                                               (SHARPENED, "top-1 agreement 100.0%")], ids=["reversed", "sharpened"])
def test_a_broken_kernel_is_refused_and_nothing_is_installed(checkpoint, tmp_path, monkeypatch, corrupt, fragment):
    broken_kernel(monkeypatch, corrupt)
    output = tmp_path / "out" / "tiny.kiln"
    with pytest.raises(ConfigError) as info:
        kiln.compile(checkpoint, backend="reference", max_seq_len=MAX_SEQ_LEN, output=output)
    message = str(info.value)
    assert "\n" not in message and fragment in message and "mean KL" in message and "(gate: <= 0.1)" in message
    assert "--quantize none" in message and "--accuracy-gate warn" in message
    if corrupt is SHARPENED:  # the argmax is intact: KL alone refuses it
        assert float(message.split("mean KL ")[1].split(" ")[0]) > MAX_MEAN_KL
    assert os.listdir(tmp_path / "out") == []  # no artifact, no staging directory left


def test_a_refused_compile_leaves_the_existing_artifact_and_no_temporary_directory(checkpoint, reference_artifact,
                                                                                   tmp_path, monkeypatch):
    import shutil

    existing = tmp_path / "tiny.kiln"
    shutil.copytree(reference_artifact, existing)
    before = read_manifest(existing)
    broken_kernel(monkeypatch, REVERSED)
    with pytest.raises(ConfigError, match="disagrees with torch eager"):
        kiln.compile(checkpoint, backend="reference", max_seq_len=MAX_SEQ_LEN, output=existing)
    assert read_manifest(existing) == before and sorted(os.listdir(tmp_path)) == ["tiny.kiln"]
    # without an output path the artifact is staged in a temporary directory: removed as well
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    with pytest.raises(ConfigError, match="disagrees with torch eager"):
        kiln.compile(checkpoint, backend="reference", max_seq_len=MAX_SEQ_LEN)
    assert os.listdir(tmp_path / "tmp") == []


def test_warn_installs_the_broken_compile_with_a_warning(checkpoint, tmp_path, monkeypatch):
    broken_kernel(monkeypatch, REVERSED)
    with pytest.warns(AccuracyWarning, match="top-1 agreement 0.0%.*installed anyway"):
        art = kiln.compile(checkpoint, backend="reference", max_seq_len=MAX_SEQ_LEN, output=tmp_path / "w.kiln",
                           accuracy_gate="warn")
    accuracy = art.manifest["accuracy"]
    assert accuracy["passed"] is False and accuracy["mode"] == "warn" and accuracy["top1_agreement"] == 0.0


def test_off_checks_nothing(checkpoint, tmp_path, monkeypatch):
    broken_kernel(monkeypatch, REVERSED)
    art = kiln.compile(checkpoint, backend="reference", max_seq_len=MAX_SEQ_LEN, output=tmp_path / "off.kiln",
                       accuracy_gate="off")
    assert art.manifest["accuracy"] == {"mode": "off", "skipped": "--accuracy-gate off"}


def test_the_command_line_refuses_in_one_line_or_warns(checkpoint, tmp_path, monkeypatch, capsys):
    broken_kernel(monkeypatch, REVERSED)
    args = ["compile", checkpoint, "-o", str(tmp_path / "cli.kiln"), "--backend", "reference", "--max-seq-len",
            str(MAX_SEQ_LEN)]
    assert main(args) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("kiln: error")]
    assert "disagrees with torch eager on 48 tokens of built-in text: top-1 agreement 0.0%" in line
    assert "kiln: checking accuracy against torch eager..." in err and not os.path.exists(tmp_path / "cli.kiln")
    assert main(args + ["--accuracy-gate", "warn"]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("kiln: warning: the compiled model disagrees")]
    assert read_manifest(tmp_path / "cli.kiln")["accuracy"]["passed"] is False


def test_bad_gate_modes_are_refused(checkpoint, capsys):
    with pytest.raises(ConfigError, match="accuracy_gate must be one of refuse, warn, off"):
        kiln.compile(checkpoint, backend="reference", accuracy_gate="maybe")
    assert main(["compile", checkpoint, "-o", "x", "--accuracy-gate", "maybe"]) == 2
    assert "invalid choice: 'maybe'" in capsys.readouterr().err


# (c) kiln inspect shows the result ------------------------------------------------------------------------------
def test_inspect_prints_the_accuracy_line(reference_artifact, capsys):
    assert main(["inspect", reference_artifact]) == 0
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("accuracy")]
    assert line.startswith("accuracy vs torch eager on 48 tokens: top-1 agreement 100.0%, mean KL ")
    assert line.endswith("(gate: >= 40%, <= 0.1)")
    assert main(["inspect", reference_artifact, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["artifact"]["accuracy"]["top1_agreement"] == 1.0


# the pieces -------------------------------------------------------------------------------------------------------
def test_compare_measures_top1_and_kl_in_float64():
    rows = np.array([[2.0, 0.0, -1.0], [3.0, 0.0, 1.0]], dtype=np.float32)
    assert compare(rows, rows) == (1.0, 0.0, 0.0)
    top1, kl, kl_max = compare(rows, rows[:, ::-1])
    p = np.exp(rows.astype(np.float64))
    p /= p.sum(axis=1, keepdims=True)
    per_row = (p * (np.log(p) - np.log(p[:, ::-1]))).sum(axis=1)
    assert top1 == 0.0 and kl == pytest.approx(per_row.mean(), rel=1e-12) and kl_max == pytest.approx(per_row.max())
    assert compare(rows, np.full_like(rows, np.nan))[1] is None  # not finite: refused, never "passed"


def test_fixed_token_ids_stay_in_the_vocabulary_and_never_change():
    ids = fixed_token_ids(128, 64)
    assert len(ids) == 64 and all(0 <= i < 128 for i in ids) and len(set(ids)) > 40
    assert ids[:6] == fixed_token_ids(128, 6) == [22, 39, 28, 22, 28, 98]


def test_a_cross_compile_is_recorded_as_not_checked(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime can run a cuda artifact")
    record = run_gate(str(tmp_path), tiny_model("llama"), mode="refuse", backend="onnxruntime", target="cuda",
                      progress=QUIET)
    assert record == {"mode": "refuse", "skipped": "compiled for cuda and this onnxruntime has no "
                                                   "CUDAExecutionProvider"}
