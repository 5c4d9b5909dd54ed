"""Perplexity of a compiled model over sliding windows, and how far one model's predictions are from another's.

Windows follow Hugging Face's "perplexity of fixed-length models": every token
after the first is scored exactly once, with the tokens before it in its window
(at most window - 1) as context, and windows advance by ``stride``. Runs on the
runtime alone (numpy and an Engine); nothing here imports torch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from kiln.ir.errors import ConfigError

ROW_CHUNK = 64  # rows of a window's logits normalised at once in float64 (64 x 49,152 x 8 B = 25 MB)


@dataclass(frozen=True)
class Window:
    """One model call: input ``ids[begin:end - 1]``, scoring tokens ``score_from .. end - 1``.

    Logits row ``r`` of the call predicts token ``begin + r + 1``; the window's last token is
    only a target, so it is not fed.
    """

    begin: int
    score_from: int
    end: int

    @property
    def input_slice(self) -> slice:
        return slice(self.begin, self.end - 1)

    @property
    def scored_rows(self) -> slice:
        return slice(self.score_from - 1 - self.begin, self.end - 1 - self.begin)

    @property
    def num_scored(self) -> int:
        return self.end - self.score_from


def check_window(window: int, stride: int) -> None:
    if not isinstance(window, int) or window < 2:
        raise ConfigError(f"the window must be at least 2 tokens (one of context, one scored), got {window!r}")
    if not isinstance(stride, int) or stride < 1:
        raise ConfigError(f"the stride must be a positive number of tokens, got {stride!r}")
    if stride >= window:
        raise ConfigError(f"the stride ({stride}) must be smaller than the window ({window}): each window's first "
                          f"new token needs at least one token of context before it in the same window")


def sliding_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """Windows of at most ``window`` tokens starting every ``stride`` tokens; each scores the tokens
    the previous one did not reach, so tokens 1 .. num_tokens - 1 are each scored once."""
    check_window(window, stride)
    if num_tokens < 2:
        raise ConfigError(f"perplexity needs at least 2 tokens (one of context, one scored), got {num_tokens}")
    windows = []
    scored_to = 1  # token 0 has no context and is never scored
    for begin in range(0, num_tokens, stride):
        end = min(begin + window, num_tokens)
        windows.append(Window(begin=begin, score_from=scored_to, end=end))
        scored_to = end
        if end == num_tokens:
            break
    return windows


def target_log_probs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log softmax(logits)[row, targets[row]] for each row, in float64."""
    out = np.empty(len(targets), dtype=np.float64)
    for start in range(0, len(targets), ROW_CHUNK):
        rows = logits[start:start + ROW_CHUNK].astype(np.float64)
        rows -= rows.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(rows).sum(axis=-1))
        out[start:start + ROW_CHUNK] = rows[np.arange(len(rows)), targets[start:start + ROW_CHUNK]] - log_norm
    return out


def _log_softmax64(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    rows -= rows.max(axis=-1, keepdims=True)
    rows -= np.log(np.exp(rows).sum(axis=-1, keepdims=True))
    return rows


@dataclass
class ScoreStats:
    """Running totals over scored positions: negative log-likelihood and, when given a reference
    model's logits, top-1 agreement with it and KL(reference || this model)."""

    tokens: int = 0
    nll: float = 0.0
    compared: int = 0
    top1_agree: int = 0
    kl: float = 0.0
    seconds: float = 0.0

    def add(self, logits: np.ndarray, targets: np.ndarray, reference: np.ndarray | None = None) -> None:
        targets = np.asarray(targets, dtype=np.int64)
        self.tokens += len(targets)
        self.nll -= float(target_log_probs(logits, targets).sum())
        if reference is None:
            return
        if reference.shape != logits.shape:
            raise ConfigError(f"comparing logits of shape {logits.shape} with reference logits of shape "
                              f"{reference.shape}; both models must score the same windows over the same vocabulary")
        self.compared += len(targets)
        self.top1_agree += int((logits.argmax(axis=-1) == reference.argmax(axis=-1)).sum())
        for start in range(0, len(targets), ROW_CHUNK):
            log_p = _log_softmax64(reference[start:start + ROW_CHUNK])
            log_q = _log_softmax64(logits[start:start + ROW_CHUNK])
            self.kl += float((np.exp(log_p) * (log_p - log_q)).sum())

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def top1_agreement(self) -> float:
        return self.top1_agree / self.compared if self.compared else float("nan")

    @property
    def mean_kl(self) -> float:
        return self.kl / self.compared if self.compared else float("nan")


LogitsFn = Callable[[Sequence[int]], np.ndarray]  # token ids [n] -> logits [n, vocab]


def score_windows(logits_fns: dict[str, LogitsFn], token_ids: Sequence[int], window: int, stride: int,
                  reference: str | None = None,
                  on_window: Callable[[int, int, dict], None] | None = None) -> dict[str, ScoreStats]:
    """Score ``token_ids`` with every model in ``logits_fns`` over the same windows, in lockstep.

    With ``reference`` (one of the names), every other model is also compared with it position by
    position (top-1 agreement, KL). Only one window's logits per model are held at a time.
    ``on_window(done, total, stats)`` is called after each window. Each ScoreStats' ``seconds``
    is the time spent in that model's calls.
    """
    if reference is not None and reference not in logits_fns:
        raise ConfigError(f"the reference {reference!r} is not one of the models: {', '.join(logits_fns)}")
    windows = sliding_windows(len(token_ids), window, stride)
    ids = np.asarray(token_ids, dtype=np.int64)
    order = ([reference] if reference else []) + [name for name in logits_fns if name != reference]
    stats = {name: ScoreStats() for name in order}
    for done, w in enumerate(windows, 1):
        feed = ids[w.input_slice].tolist()
        targets = ids[w.score_from:w.end]
        reference_rows = None
        for name in order:
            start = time.perf_counter()
            logits = np.asarray(logits_fns[name](feed))
            stats[name].seconds += time.perf_counter() - start
            if logits.ndim != 2 or logits.shape[0] != len(feed):
                raise ConfigError(f"{name}: expected logits [{len(feed)}, vocab] for window {w}, found shape "
                                  f"{logits.shape}")
            rows = logits[w.scored_rows]
            if name == reference:
                reference_rows = rows
                stats[name].add(rows, targets)
            else:
                stats[name].add(rows, targets, reference_rows)
        if on_window is not None:
            on_window(done, len(windows), stats)
    return stats


@dataclass
class PerplexityResult:
    perplexity: float
    tokens: int  # scored tokens: all but the first
    windows: int
    seconds: float


def encode_text(engine, text: str) -> list[int]:
    """Token ids of ``text`` with BOS as the model expects it (the tokenizer's post-processor, or the
    artifact's add_bos_token)."""
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ConfigError("this artifact has no tokenizer, so it cannot score text; compile a source that has one "
                          "(a GGUF file or a checkpoint directory with tokenizer.json)")
    ids = tokenizer.encode(text)
    bos = tokenizer.bos_token_id
    if bos is not None and engine.manifest.get("tokenizer", {}).get("add_bos_token") and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def perplexity(engine, token_ids: Sequence[int], window: int = 512, stride: int = 256,
               on_window: Callable[[int, int, ScoreStats], None] | None = None) -> PerplexityResult:
    """Perplexity of ``engine`` (a loaded artifact) on ``token_ids`` with its compiled prefill.

    ``on_window(done, total, stats)`` is called after each window (progress).
    """
    windows = sliding_windows(len(token_ids), window, stride)
    longest = max(w.end - 1 - w.begin for w in windows)
    if longest > engine.max_seq_len:
        raise ConfigError(f"a window of {window} tokens feeds {longest} tokens at once, more than this artifact's "
                          f"compiled maximum of {engine.max_seq_len}; use a smaller --window or recompile with "
                          f"--max-seq-len {longest} or more")
    def progress(done, total, all_stats):
        if on_window is not None:
            on_window(done, total, all_stats["model"])

    stats = score_windows({"model": engine.logits}, token_ids, window, stride, on_window=progress)["model"]
    return PerplexityResult(perplexity=stats.perplexity, tokens=stats.tokens, windows=len(windows),
                            seconds=stats.seconds)
