"""The compile-time accuracy gate: the compiled artifact against the source model on a short built-in text.

Before ``kiln.compile`` installs an artifact it loads the staged directory with the runtime (the same Engine
``kiln.load`` gives), feeds it a short built-in text (tokenized with the artifact's tokenizer; fixed token ids
for a model without one), and compares the next-token distribution at every position with the source
model's in torch eager (the module capture exported, called the way capture called it): top-1 agreement (the
fraction of positions whose argmax agrees) and mean KL(reference || compiled), both in float64. The numbers go
into the manifest (``accuracy``) and ``kiln inspect`` shows them; below the thresholds the compile is refused
(``accuracy_gate="refuse"``, the default), installed with a warning (``"warn"``), or not checked (``"off"``).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np

from kiln.ir.errors import ConfigError

GATE_MODES = ("refuse", "warn", "off")
MAX_TOKENS = 64  # positions scored at most (fewer when the compiled max_seq_len is shorter)

# Thresholds, and why these two numbers. Measured with the gate itself (64 tokens of the built-in text on
# SmolLM2-135M-Instruct, whose reference is its GGUF dequantized to fp32; 48 fixed ids on the tiny models;
# "broken" rows corrupt a correct TVM artifact's logits, or perturb one weight of the torch reference):
#
#   SmolLM2, TVM, the GGUF's own blocks, float activations   top-1 100%    mean KL 2.5e-11
#   SmolLM2, TVM, the GGUF's own blocks, int8 activations    top-1 90.6%   mean KL 0.0105
#   SmolLM2, TVM, int4-g128 (+44% perplexity, README)        top-1 48.4%   mean KL 0.93
#   SmolLM2 broken: logits x2 / x0.5 / reversed              top-1 100/100/0%  mean KL 0.96 / 1.3 / 19
#   SmolLM2 broken: one layer's o_proj x2, down_proj zeroed  top-1 72/70%  mean KL 0.19 / 0.55
#   SmolLM2 broken: noise of 10% of the logits' spread       top-1 80%     mean KL 0.21
#   SmolLM2, one layer's v_proj x1.1 (passes: as small as quantization noise)  top-1 94%  mean KL 0.003
#   tiny random models, int8 / int4 / int4-g128              top-1 48-100% mean KL <= 1.1e-3
#   tiny random models broken: logits reversed/shifted/negated  top-1 0%   mean KL 0.025-0.09
#   tiny random models broken: noise as large as the logits' spread  top-1 17-31%  mean KL 0.013
#
# KL is the measure that matters on a trained model: a correct compile stays under ~0.02 while a too
# aggressive quantization or a broken kernel lands at 0.2 and above, so the gate sits at 0.1, ten times the
# worst correct compile measured. KL cannot judge a model whose outputs are near uniform (the tiny random
# test models: their whole distance from uniform, log V - H, is 0.013 nats, so even garbage scores a KL
# below 0.1). There top-1 agreement is the witness that catches an output that is wrong outright (a
# permuted, shifted or negated row moves every argmax), and it has to be loose, because on such flat rows
# the top two logits often sit within the rounding and quantization flips half the argmaxes while KL stays
# under 1e-3 (phi3 int4-g128: 47.9%). 40% keeps those compiles passing and still refuses wrong rows and
# noise-sized errors. On a trained model a low KL goes with a high top-1 agreement, so the top-1 floor does
# not bind before KL does (with int8 activations SmolLM2's top-1 is 90.6%: a 90% floor would be too tight
# for 64 tokens).
MIN_TOP1_AGREEMENT = 0.4
MAX_MEAN_KL = 0.1

# Public-domain English: the opening of Lincoln's Gettysburg Address (1863) and a sentence of Thoreau's
# Walden (1854). Cut at MAX_TOKENS tokens.
TEXT = ("Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived in "
        "Liberty, and dedicated to the proposition that all men are created equal. I went to the woods because I "
        "wished to live deliberately, to front only the essential facts of life, and see if I could not learn what "
        "it had to teach.")


class _Unjudgeable(Exception):
    """The gate cannot judge this compile (the reference itself is not finite)."""


class AccuracyWarning(UserWarning):
    """A compile installed with ``accuracy_gate="warn"`` although it failed the accuracy gate."""


@dataclass
class AccuracyResult:
    reference: str  # "torch eager"
    text: str  # "built-in text" or "fixed token ids"
    tokens: int
    top1_agreement: float
    mean_kl: float | None  # None when the compiled logits are not finite
    max_kl: float | None
    seconds: float
    mode: str

    @property
    def passed(self) -> bool:
        return self.mean_kl is not None and self.top1_agreement >= MIN_TOP1_AGREEMENT and self.mean_kl <= MAX_MEAN_KL

    def to_json(self) -> dict:
        return {"mode": self.mode, "reference": self.reference, "text": self.text, "tokens": self.tokens,
                "top1_agreement": round(self.top1_agreement, 6),
                "mean_kl": None if self.mean_kl is None else float(f"{self.mean_kl:.6g}"),
                "max_kl": None if self.max_kl is None else float(f"{self.max_kl:.6g}"),
                "thresholds": thresholds(), "passed": self.passed, "seconds": round(self.seconds, 3)}


def thresholds() -> dict:
    return {"min_top1_agreement": MIN_TOP1_AGREEMENT, "max_mean_kl": MAX_MEAN_KL}


def check_mode(mode) -> str:
    if mode not in GATE_MODES:
        raise ConfigError(f"accuracy_gate must be one of {', '.join(GATE_MODES)} (refuse: a compile whose logits "
                          f"disagree with the source model is not installed; warn: installed with a warning; off: "
                          f"not checked), got {mode!r}")
    return mode


def fixed_token_ids(vocab_size: int, count: int) -> list:
    """``count`` deterministic token ids spread over ``[0, vocab_size)`` (a linear congruential sequence), for
    a model without a tokenizer."""
    ids, state = [], 12345
    for _ in range(count):
        state = (state * 1103515245 + 12345) % 2**31
        ids.append((state >> 8) % vocab_size)
    return ids


def gate_tokens(engine, limit: int) -> tuple[list, str]:
    """The token ids the gate scores: the built-in text through the artifact's tokenizer (with BOS as the
    model expects it), else fixed ids; at most ``limit``."""
    from kiln.evaluate import encode_text

    if engine.tokenizer is not None:
        ids = encode_text(engine, TEXT)[:limit]
        if len(ids) >= 2 and all(0 <= i < engine.vocab_size for i in ids):
            return ids, "built-in text"
    return fixed_token_ids(engine.vocab_size, limit), "fixed token ids"


def torch_eager_logits(model):
    """ids -> logits [T, vocab] of ``model`` in torch eager, called as capture called it."""
    import torch

    from kiln.frontend.capture import _HFCausalLM, _Plain, is_transformers_model

    wrapper = _HFCausalLM(model) if is_transformers_model(model) else _Plain(model)

    def run(ids):
        with torch.no_grad():
            out = wrapper(torch.as_tensor([list(ids)], dtype=torch.long))
        return out[0].detach().float().cpu().numpy()

    return run


def compare(reference: np.ndarray, compiled: np.ndarray) -> tuple[float, float | None, float | None]:
    """(top-1 agreement, mean KL(reference || compiled), max KL) over the rows; KL None when the compiled rows
    are not all finite."""
    if reference.shape != compiled.shape:
        raise ConfigError(f"the compiled model's logits have shape {compiled.shape}, the source model's "
                          f"{reference.shape}; they cannot be compared")
    top1 = float((reference.argmax(axis=-1) == compiled.argmax(axis=-1)).mean())
    if not np.isfinite(compiled).all():
        return top1, None, None
    log_p, log_q = _log_softmax64(reference), _log_softmax64(compiled)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return top1, float(kl.mean()), float(kl.max())


def _log_softmax64(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    rows -= rows.max(axis=-1, keepdims=True)
    rows -= np.log(np.exp(rows).sum(axis=-1, keepdims=True))
    return rows


def cannot_run_here(backend: str, target: str) -> str | None:
    """Why an artifact for ``backend``/``target`` cannot run on this machine (a cross-compile), or None."""
    if target == "cpu":
        return None
    if backend == "tvm":
        from kiln.backends.tvm.executor import import_tvm

        if not import_tvm().cuda(0).exist:
            return f"compiled for {target} and this machine has no CUDA GPU"
    elif backend == "onnxruntime":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return f"compiled for {target} and this onnxruntime has no CUDAExecutionProvider"
    return None


def measure(artifact_path: str, reference_fn, *, reference: str = "torch eager", mode: str = "refuse",
            max_tokens: int = MAX_TOKENS) -> AccuracyResult:
    """Load the artifact at ``artifact_path`` (staged or installed) and score it against ``reference_fn``
    (ids -> logits [T, vocab]) on the built-in text."""
    from kiln.runtime.engine import Engine

    start = time.perf_counter()
    with Engine.from_path(artifact_path) as engine:
        ids, text = gate_tokens(engine, min(max_tokens, engine.max_seq_len))
        compiled = np.asarray(engine.logits(ids))
    expected = np.asarray(reference_fn(ids))
    if not np.isfinite(expected).all():
        raise _Unjudgeable(f"the source model's own logits ({reference}) are not finite")
    top1, kl, kl_max = compare(expected, compiled)
    return AccuracyResult(reference=reference, text=text, tokens=len(ids), top1_agreement=top1, mean_kl=kl,
                          max_kl=kl_max, seconds=time.perf_counter() - start, mode=mode)


def run_gate(artifact_path: str, model, *, mode: str, backend: str, target: str, progress) -> dict:
    """The gate on a staged artifact: its ``accuracy`` manifest entry. Refuses (ConfigError) a compile below
    the thresholds when ``mode`` is "refuse"; warns and returns when "warn"."""
    check_mode(mode)
    if mode == "off":
        return {"mode": "off", "skipped": "--accuracy-gate off"}
    why = cannot_run_here(backend, target)
    if why is None and model is None:
        why = "no source model to compare with"
    if why is not None:
        _say(progress, f"accuracy not checked: {why}")
        return {"mode": mode, "skipped": why}
    reference_fn = torch_eager_logits(model)
    try:
        with progress.stage("checking accuracy against torch eager"):
            result = measure(artifact_path, reference_fn, mode=mode)
    except _Unjudgeable as err:
        _say(progress, f"accuracy not checked: {err}")
        return {"mode": mode, "skipped": str(err)}
    record = result.to_json()
    if progress.enabled:
        progress.stream.write(f"kiln: {describe(record)}\n")
        progress.stream.flush()
    if result.passed:
        return record
    message = failure_message(record)
    if mode == "refuse":
        raise ConfigError(message + "; or pass --accuracy-gate warn (accuracy_gate='warn') to install it anyway")
    _say(progress, f"warning: {message}; installed anyway (--accuracy-gate warn)", warn=True)
    return record


def failure_message(record: dict) -> str:
    kl = "not finite" if record["mean_kl"] is None else f"{record['mean_kl']:.4g}"
    return (f"the compiled model disagrees with {record['reference']} on {record['tokens']} tokens of "
            f"{record['text']}: top-1 agreement {record['top1_agreement']:.1%} (gate: >= "
            f"{record['thresholds']['min_top1_agreement']:.0%}), mean KL {kl} (gate: <= "
            f"{record['thresholds']['max_mean_kl']:g}); a kernel is wrong or the quantization is too aggressive: "
            f"try --quantize none (or int8, int4) or --activations float")


def describe(record) -> str | None:
    """The one line ``kiln inspect`` (and a compile) prints for a manifest's ``accuracy`` entry."""
    if not isinstance(record, dict):
        return None
    if "skipped" in record:
        return f"accuracy: not checked ({record['skipped']})"
    if "min_cosine" in record:  # an embedding model's gate (kiln/embedding.py)
        try:
            failed = "" if record["passed"] else " FAILED, installed with --accuracy-gate warn"
            return (f"accuracy vs torch eager on {record['texts']} texts: lowest cosine {record['min_cosine']:.7f} "
                    f"(gate: >= {record['threshold']}){failed}")
        except (KeyError, TypeError, ValueError):
            return "accuracy: unreadable entry in the manifest"
    try:
        kl = "not finite" if record["mean_kl"] is None else f"{record['mean_kl']:.4g}"
        limits = record["thresholds"]
        failed = "" if record["passed"] else " FAILED, installed with --accuracy-gate warn"
        return (f"accuracy vs {record['reference']} on {record['tokens']} tokens: top-1 agreement "
                f"{record['top1_agreement']:.1%}, mean KL {kl} (gate: >= {limits['min_top1_agreement']:.0%}, "
                f"<= {limits['max_mean_kl']:g}){failed}")
    except (KeyError, TypeError, ValueError):
        return "accuracy: unreadable entry in the manifest"


def _say(progress, line: str, warn: bool = False) -> None:
    if progress.enabled:
        progress.stream.write(f"kiln: {line}\n")
        progress.stream.flush()
    elif warn:
        warnings.warn(line.removeprefix("warning: "), AccuracyWarning, stacklevel=6)
