"""Turn one step's logits into the next token: repetition penalty, temperature, top-k, top-p, min-p.

The filters run in the order transformers' LogitsProcessor list applies them, so a
seeded kiln run and ``model.generate`` agree on which tokens are allowed and how likely.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kiln.ir.errors import ConfigError, KilnError

# top-p first looks for its nucleus among this many most likely tokens; only a very flat
# distribution needs a bigger slice (the slice grows 8x until the nucleus fits).
_NUCLEUS_FIRST_SLICE = 256


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens. Defaults are greedy decoding of up to 64 tokens.

    ``temperature == 0`` means greedy (argmax, ties go to the lowest token id);
    ``top_k == 0``, ``top_p == 1``, ``min_p == 0`` and ``repetition_penalty == 1`` switch
    that filter off. ``stop`` may be given as one string or any sequence of strings; it is
    stored as a tuple.
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

    def __post_init__(self):
        # A bare string would otherwise be read as a sequence of one-character stops.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))

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
        return self


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _bad(field: str, expected: str, found) -> None:
    raise ConfigError(f"SamplingParams.{field} must be {expected}, got {found!r}; pass a value in range")


class Sampler:
    """Picks tokens for one sequence; owns its random generator so a seed replays exactly.

    Filters, in transformers' order: repetition penalty (on raw logits), temperature,
    top-k, top-p, min-p. Each filter sees the distribution the previous one left, which
    is what makes the order matter (e.g. top-p's nucleus is taken inside the top-k set).
    """

    def __init__(self, params: SamplingParams):
        self.params = params.validate()
        # PCG64(None) draws fresh OS entropy; a seed gives the same stream on every platform.
        self._rng = np.random.Generator(np.random.PCG64(params.seed))

    def sample(self, logits: np.ndarray, previous_token_ids: Sequence[int] = ()) -> int:
        """Return the next token id for a ``[vocab]`` row of logits.

        ``previous_token_ids`` (prompt and generated so far) feed the repetition penalty.
        """
        token_ids, probs = self.distribution(logits, previous_token_ids)
        if len(token_ids) == 1:
            return int(token_ids[0])
        cumulative = np.cumsum(probs)
        # Scaling the draw by the last cumulative value absorbs rounding in the sum;
        # side="right" gives zero-probability tokens an empty interval.
        index = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
        return int(token_ids[min(index, len(token_ids) - 1)])

    def distribution(
        self, logits: np.ndarray, previous_token_ids: Sequence[int] = ()
    ) -> tuple[np.ndarray, np.ndarray]:
        """The tokens that may be drawn and their renormalised probabilities (float64).

        Greedy decoding returns the single argmax with probability 1. The order of the
        returned tokens is unspecified.
        """
        params = self.params
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.shape[0] == 0:
            raise ConfigError(f"Sampler expects one [vocab] row of logits, got shape {logits.shape}")
        scores = self._apply_repetition_penalty(logits, previous_token_ids)

        if params.temperature == 0:
            best = int(np.argmax(scores))  # first maximum, i.e. the lowest id among ties
            _check_finite(scores[best])
            return np.array([best], dtype=np.int64), np.ones(1)

        # Float64 from here on: exp of large scaled logits and the long top-p cumsum both
        # lose digits in float32.
        scores = scores.astype(np.float64, copy=True)
        scores /= params.temperature
        vocab = scores.shape[0]

        token_ids = None  # None means "every token", saving a gather when no top-k
        if 0 < params.top_k < vocab:
            # Keep every token tied with the k-th largest, as transformers does.
            kth_largest = np.partition(scores, vocab - params.top_k)[vocab - params.top_k]
            token_ids = np.flatnonzero(scores >= kth_largest)
            scores = scores[token_ids]

        largest = scores.max()
        _check_finite(largest)
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
            token_ids = np.arange(vocab, dtype=np.int64)
        return token_ids.astype(np.int64, copy=False), probs

    def _apply_repetition_penalty(self, logits: np.ndarray, previous_token_ids: Sequence[int]) -> np.ndarray:
        penalty = self.params.repetition_penalty
        if penalty == 1.0 or len(previous_token_ids) == 0:
            return logits
        seen = np.unique(np.asarray(previous_token_ids, dtype=np.int64))
        # Prompt ids can exceed the logits row when a tokenizer has more added tokens than
        # the model has output rows; those tokens cannot be sampled, so nothing to penalise.
        seen = seen[(seen >= 0) & (seen < logits.shape[0])]
        penalised = logits.copy()
        values = penalised[seen]
        # Dividing a negative logit would make it more likely, hence the two-sided rule.
        penalised[seen] = np.where(values > 0, values / penalty, values * penalty)
        return penalised


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


def _check_finite(value) -> None:
    if not np.isfinite(value):
        raise KilnError(
            f"sampling expected finite logits, found a largest logit of {value}; "
            "the backend produced NaN/inf or masked every token"
        )
