"""Turn one step's logits into the next token: a grammar's mask, logit bias, repetition/presence/frequency
penalties, temperature, top-k, top-p, min-p; and the log-probabilities of what was sampled from.

The filters after the penalties run in the order transformers' LogitsProcessor list applies them, so a seeded
kiln run and ``model.generate`` agree on which tokens are allowed and how likely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from kiln.ir.errors import ConfigError, KilnError

# top-p first looks for its nucleus among this many most likely tokens; only a very flat
# distribution needs a bigger slice (the slice grows 8x until the nucleus fits).
_NUCLEUS_FIRST_SLICE = 256

# OpenAI's ranges, which servers in front of kiln pass through unchanged
PENALTY_RANGE = (-2.0, 2.0)
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_TOP_LOGPROBS = 20


class TokenLogprob(NamedTuple):
    """A generated token's log-probability and the ``top_logprobs`` most likely tokens of the same step,
    as (token id, log-probability) pairs, most likely first (ties: lower id first)."""

    token_id: int
    logprob: float
    top_logprobs: list


class Choice(NamedTuple):
    """What :meth:`Sampler.choose` picked; ``logprob`` is None unless ``SamplingParams.logprobs``."""

    token_id: int
    logprob: TokenLogprob | None


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens. Defaults are greedy decoding of up to 64 tokens.

    ``temperature == 0`` means greedy (argmax, ties go to the lowest token id);
    ``top_k == 0``, ``top_p == 1``, ``min_p == 0``, ``repetition_penalty == 1`` and zero
    presence/frequency penalties switch that filter off. ``stop`` may be given as one string or
    any sequence of strings; it is stored as a tuple. ``logit_bias`` maps token ids (ints, or
    their decimal strings as JSON carries them) to a bias in [-100, 100]; it is stored as a
    sorted tuple of (id, bias) pairs.

    The repetition penalty (transformers') divides the logits of every token in the prompt and
    the text so far; presence and frequency penalties (OpenAI's) subtract
    ``frequency_penalty * count + presence_penalty * (count > 0)``, counting generated tokens only.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        # A bare string would otherwise be read as a sequence of one-character stops.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.logit_bias is None:
            object.__setattr__(self, "logit_bias", ())
        elif isinstance(self.logit_bias, Mapping):
            # anything that does not convert stays as given, for validate() to name
            pairs = [(_token_id_key(k), v) for k, v in self.logit_bias.items()]
            if all(k is not None for k, _ in pairs):
                object.__setattr__(self, "logit_bias", tuple(sorted(pairs)))

    def validate(self) -> "SamplingParams":
        """Raise ConfigError naming the first field out of range; return self when all are fine."""
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            _bad("temperature", "a finite number >= 0 (0 means greedy)", self.temperature)
        if not _is_int(self.top_k) or self.top_k < 0:
            _bad("top_k", "an integer >= 0 (0 switches it off)", self.top_k)
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            _bad("top_p", "in (0, 1] (1 switches it off)", self.top_p)
        if not _is_real(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            _bad("min_p", "in [0, 1] (0 switches it off)", self.min_p)
        if (
            not _is_real(self.repetition_penalty)
            or not math.isfinite(self.repetition_penalty)
            or self.repetition_penalty <= 0
        ):
            _bad("repetition_penalty", "a finite number > 0 (1 switches it off)", self.repetition_penalty)
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            _bad("seed", "None or an integer >= 0", self.seed)
        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            _bad("max_new_tokens", "an integer > 0", self.max_new_tokens)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            _bad("stop", "a string or a sequence of non-empty strings", self.stop)
        if not isinstance(self.ignore_eos, bool):
            _bad("ignore_eos", "True or False", self.ignore_eos)
        low, high = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not (low <= value <= high):
                _bad(name, f"a number in [{low:g}, {high:g}] (0 switches it off)", value)
        self._validate_logit_bias()
        if not isinstance(self.logprobs, bool):
            _bad("logprobs", "True or False", self.logprobs)
        if not _is_int(self.top_logprobs) or not (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            _bad("top_logprobs", f"an integer in [0, {MAX_TOP_LOGPROBS}]", self.top_logprobs)
        if self.top_logprobs and not self.logprobs:
            _bad("top_logprobs", "0 unless logprobs=True", self.top_logprobs)
        return self

    def _validate_logit_bias(self) -> None:
        low, high = LOGIT_BIAS_RANGE
        expected = f"a mapping of token ids (integers >= 0) to biases in [{low:g}, {high:g}]"
        if isinstance(self.logit_bias, Mapping):  # __post_init__ left it: a key is not a token id
            bad_key = next(k for k in self.logit_bias if _token_id_key(k) is None)
            _bad_described("logit_bias", expected, f"token id {bad_key!r}")
        if not isinstance(self.logit_bias, tuple):
            _bad("logit_bias", expected, self.logit_bias)
        for pair in self.logit_bias:
            if not isinstance(pair, tuple) or len(pair) != 2:
                _bad("logit_bias", expected, self.logit_bias)
            token_id, bias = pair
            if not _is_int(token_id) or token_id < 0:
                _bad_described("logit_bias", expected, f"token id {token_id!r}")
            if not _is_real(bias) or not (low <= bias <= high):
                _bad_described("logit_bias", expected, f"{bias!r} for token {token_id}")
        ids = [token_id for token_id, _ in self.logit_bias]
        if len(set(ids)) != len(ids):
            _bad("logit_bias", "one bias per token id", self.logit_bias)


def _token_id_key(key):
    """A logit_bias key as an int: ints as they are, decimal strings (JSON object keys) parsed; None otherwise."""
    if _is_int(key):
        return int(key)
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    return None


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _bad(field: str, expected: str, found) -> None:
    _bad_described(field, expected, repr(found))


def _bad_described(field: str, expected: str, found: str) -> None:
    raise ConfigError(f"SamplingParams.{field} must be {expected}, got {found}; pass a value in range")


class Sampler:
    """Picks tokens for one sequence; owns its random generator so a seed replays exactly.

    Each step's logits go through, in order: the grammar's mask (disallowed tokens get -inf), the logit bias,
    the repetition penalty, the presence and frequency penalties, then temperature, top-k, top-p and min-p
    (transformers' order). Each filter sees the distribution the previous one left, which is what makes the
    order matter (e.g. top-p's nucleus is taken inside the top-k set).

    Log-probabilities (``SamplingParams.logprobs``) are the log-softmax, over the whole vocabulary, of the
    logits after the mask, bias, penalties and temperature and before top-k/top-p/min-p truncation: the
    distribution OpenAI reports and vLLM's ``processed_logprobs``. Greedy decoding divides by no temperature,
    so its log-probabilities are those of the penalised logits. A masked token's is -inf and is never listed
    among the top alternatives.
    """

    def __init__(self, params: SamplingParams):
        self.params = params.validate()
        # PCG64(None) draws fresh OS entropy; a seed gives the same stream on every platform.
        self._rng = np.random.Generator(np.random.PCG64(params.seed))
        self._bias_ids = np.array([token_id for token_id, _ in params.logit_bias], dtype=np.int64)
        self._bias_values = np.array([bias for _, bias in params.logit_bias], dtype=np.float64)

    def sample(self, logits: np.ndarray, previous_token_ids: Sequence[int] = (), *,
               generated_token_ids: Sequence[int] = (), allowed: np.ndarray | None = None) -> int:
        """Return the next token id for a ``[vocab]`` row of logits.

        ``previous_token_ids`` (prompt and generated so far) feed the repetition penalty,
        ``generated_token_ids`` the presence and frequency penalties; ``allowed`` is a grammar's
        ``[vocab]`` boolean mask (None: every token).
        """
        return self.choose(logits, previous_token_ids, generated_token_ids=generated_token_ids,
                           allowed=allowed).token_id

    def choose(self, logits: np.ndarray, previous_token_ids: Sequence[int] = (), *,
               generated_token_ids: Sequence[int] = (), allowed: np.ndarray | None = None) -> Choice:
        """:meth:`sample`, with the token's log-probabilities when ``SamplingParams.logprobs`` asks for them."""
        scores = self.processed_logits(logits, previous_token_ids, generated_token_ids=generated_token_ids,
                                       allowed=allowed)
        token_ids, probs = self._truncate(scores)
        if len(token_ids) == 1:
            token = int(token_ids[0])
        else:
            cumulative = np.cumsum(probs)
            # Scaling the draw by the last cumulative value absorbs rounding in the sum;
            # side="right" gives zero-probability tokens an empty interval.
            index = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
            token = int(token_ids[min(index, len(token_ids) - 1)])
        if not self.params.logprobs:
            return Choice(token, None)
        return Choice(token, _logprobs_of(scores, token, self.params.top_logprobs))

    def verify(self, logits: np.ndarray, draft_token: int, draft_probs: np.ndarray,
               previous_token_ids: Sequence[int] = (), *, generated_token_ids: Sequence[int] = (),
               allowed: np.ndarray | None = None) -> Choice:
        """Speculative decoding's :meth:`choose` where a draft model proposed ``draft_token``, drawn from
        ``draft_probs`` ([vocab]): the token is ``draft_token`` or another, distributed as :meth:`choose`'s
        (speculative.accept_or_resample); log-probabilities as :meth:`choose` reports them."""
        from .speculative import accept_or_resample  # here: speculative.py imports this module

        scores = self.processed_logits(logits, previous_token_ids, generated_token_ids=generated_token_ids,
                                       allowed=allowed)
        token_ids, probs = self._truncate(scores)
        target = np.zeros(scores.shape[0], dtype=np.float64)
        target[token_ids] = probs
        if draft_probs.shape != target.shape:
            raise ConfigError(f"a draft's probabilities must be [{target.shape[0]}], got shape {draft_probs.shape}")
        token = accept_or_resample(target, draft_probs, int(draft_token), self._rng)
        if not self.params.logprobs:
            return Choice(token, None)
        return Choice(token, _logprobs_of(scores, token, self.params.top_logprobs))

    def distribution(self, logits: np.ndarray, previous_token_ids: Sequence[int] = (), *,
                     generated_token_ids: Sequence[int] = (), allowed: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """The tokens that may be drawn and their renormalised probabilities (float64).

        Greedy decoding returns the single argmax with probability 1. The order of the
        returned tokens is unspecified.
        """
        return self._truncate(self.processed_logits(logits, previous_token_ids,
                                                    generated_token_ids=generated_token_ids, allowed=allowed))

    def processed_logits(self, logits: np.ndarray, previous_token_ids: Sequence[int] = (), *,
                         generated_token_ids: Sequence[int] = (), allowed: np.ndarray | None = None) -> np.ndarray:
        """The float64 ``[vocab]`` logits after the mask, bias, penalties and temperature (none when greedy):
        what top-k/top-p/min-p truncate and what log-probabilities are the log-softmax of."""
        params = self.params
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.shape[0] == 0:
            raise ConfigError(f"Sampler expects one [vocab] row of logits, got shape {logits.shape}")
        vocab = logits.shape[0]
        # Float64 from here on: exp of large scaled logits and the long top-p cumsum both lose digits in float32.
        scores = logits.astype(np.float64, copy=True)
        if allowed is not None:
            if allowed.shape != (vocab,):
                raise ConfigError(f"a token mask must be [{vocab}] booleans, got shape {allowed.shape}")
            scores[~allowed] = -np.inf
        if self._bias_ids.size:
            if self._bias_ids.max() >= vocab:
                raise ConfigError(f"logit_bias holds token id {int(self._bias_ids.max())}, outside the model's "
                                  f"vocabulary of {vocab}")
            scores[self._bias_ids] += self._bias_values
        self._apply_repetition_penalty(scores, previous_token_ids)
        if (params.presence_penalty or params.frequency_penalty) and len(generated_token_ids):
            generated = np.asarray(generated_token_ids, dtype=np.int64)
            counts = np.bincount(generated[(generated >= 0) & (generated < vocab)], minlength=vocab)
            scores -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
        if params.temperature > 0:
            scores /= params.temperature
        return scores

    def _truncate(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-k, top-p and min-p over processed logits: the tokens left and their probabilities."""
        params = self.params
        if params.temperature == 0:
            best = int(np.argmax(scores))  # first maximum, i.e. the lowest id among ties
            check_finite(scores[best])
            return np.array([best], dtype=np.int64), np.ones(1)

        # None means "every token", saving a gather; a mask's -inf tokens are dropped first so that no
        # filter below counts them (top-k could otherwise keep them, tied at -inf)
        token_ids = None
        if np.isneginf(scores).any():
            token_ids = np.flatnonzero(~np.isneginf(scores))
            if token_ids.size == 0:
                check_finite(-np.inf)
            scores = scores[token_ids]
        count = scores.shape[0]

        if 0 < params.top_k < count:
            # Keep every token tied with the k-th largest, as transformers does.
            kth_largest = np.partition(scores, count - params.top_k)[count - params.top_k]
            keep = np.flatnonzero(scores >= kth_largest)
            token_ids = keep if token_ids is None else token_ids[keep]
            scores = scores[keep]

        largest = scores.max()
        check_finite(largest)
        probs = np.exp(scores - largest)
        probs /= probs.sum()

        if params.top_p < 1.0:
            keep = _nucleus(probs, params.top_p)
            token_ids = keep if token_ids is None else token_ids[keep]
            probs = probs[keep]
            probs /= probs.sum()

        if params.min_p > 0.0:
            # A ratio to the top probability, so the renormalisation above does not change it.
            keep = np.flatnonzero(probs >= params.min_p * probs.max())
            token_ids = keep if token_ids is None else token_ids[keep]
            probs = probs[keep]
            probs /= probs.sum()

        if token_ids is None:
            token_ids = np.arange(count, dtype=np.int64)
        return token_ids.astype(np.int64, copy=False), probs

    def _apply_repetition_penalty(self, scores: np.ndarray, previous_token_ids: Sequence[int]) -> None:
        penalty = self.params.repetition_penalty
        if penalty == 1.0 or len(previous_token_ids) == 0:
            return
        seen = np.unique(np.asarray(previous_token_ids, dtype=np.int64))
        # Prompt ids can exceed the logits row when a tokenizer has more added tokens than
        # the model has output rows; those tokens cannot be sampled, so nothing to penalise.
        seen = seen[(seen >= 0) & (seen < scores.shape[0])]
        values = scores[seen]
        # Dividing a negative logit would make it more likely, hence the two-sided rule.
        scores[seen] = np.where(values > 0, values / penalty, values * penalty)


def _logprobs_of(scores: np.ndarray, token: int, top: int) -> TokenLogprob:
    """The log-softmax of ``scores`` at ``token`` and its ``top`` largest finite entries."""
    largest = scores.max()
    logprobs = scores - (largest + np.log(np.exp(scores - largest).sum()))
    alternatives = []
    if top:
        top = min(top, logprobs.size)
        kth_largest = np.partition(logprobs, logprobs.size - top)[logprobs.size - top]
        candidates = np.flatnonzero(logprobs >= kth_largest)  # every tie at the boundary, by id
        # most likely first, the lower id first among ties
        candidates = candidates[np.lexsort((candidates, -logprobs[candidates]))][:top]
        alternatives = [(int(i), float(logprobs[i])) for i in candidates if np.isfinite(logprobs[i])]
    return TokenLogprob(token, float(logprobs[token]), alternatives)


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest most-likely set whose probability reaches top_p (at least one)."""
    count = probs.shape[0]
    slice_size = min(count, _NUCLEUS_FIRST_SLICE)
    while True:
        if slice_size < count:
            candidates = np.argpartition(-probs, slice_size - 1)[:slice_size]
        else:
            candidates = np.arange(count)
        order = candidates[np.argsort(-probs[candidates], kind="stable")]
        cumulative = np.cumsum(probs[order])
        if cumulative[-1] >= top_p or slice_size == count:
            break
        slice_size = min(count, slice_size * 8)
    # A token stays while the tokens ranked above it hold less than top_p. Shifting the
    # cumsum (rather than subtracting) keeps mass_above sorted for searchsorted.
    mass_above = np.concatenate(([0.0], cumulative[:-1]))
    kept = max(1, int(np.searchsorted(mass_above, top_p, side="left")))
    return order[:kept]


def check_finite(value) -> None:
    """Refuse a largest logit that is not finite (the step's NaN or inf, or a mask that left nothing)."""
    if not np.isfinite(value):
        raise KilnError(
            f"sampling expected finite logits, found a largest logit of {value}; "
            "the backend produced NaN/inf or masked every token"
        )
