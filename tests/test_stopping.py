"""StopStringMatcher against plain string references over random texts and random splits.

The reference for the whole stream is ``text[:min(text.find(stop))]``; after every piece
the emitted text must also equal a brute-force "nothing that could start a stop" prefix.
"""

import numpy as np
import pytest

from kiln.ir.errors import ConfigError
from kiln.runtime.stopping import StopStringMatcher


def reference_output(text: str, stops) -> str:
    positions = [text.find(stop) for stop in stops if stop in text]
    return text[: min(positions)] if positions else text


def reference_safe_prefix(text: str, stops) -> str:
    """Longest prefix no stop string can start in, given only ``text`` so far."""
    for start in range(len(text)):
        tail = text[start:]
        if any(tail.startswith(stop) or stop.startswith(tail) for stop in stops):
            return text[:start]
    return text


def random_split(rng, text: str) -> list[str]:
    cuts = sorted(rng.integers(0, len(text) + 1, size=rng.integers(0, len(text) + 2)).tolist())
    bounds = [0] + cuts + [len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def random_string(rng, alphabet: str, low: int, high: int) -> str:
    return "".join(rng.choice(list(alphabet), size=rng.integers(low, high)))


@pytest.mark.parametrize("seed", range(300))
def test_random_texts_and_splits(seed):
    rng = np.random.default_rng(seed)
    # A tiny alphabet makes partial matches, overlapping stops and stops inside stops common.
    alphabet = "ab c" if seed % 3 else "aab😀"
    text = random_string(rng, alphabet, 0, 40)
    stops = [random_string(rng, alphabet, 1, 6) for _ in range(rng.integers(1, 4))]
    if seed % 4 == 0 and len(text) > 4:
        # Make sure a good share of cases really contain a stop.
        start = int(rng.integers(0, len(text) - 3))
        stops.append(text[start : start + int(rng.integers(1, 4))])
    matcher = StopStringMatcher(stops)
    emitted, fed, stopped = "", "", False
    for piece in random_split(rng, text):
        out, stopped = matcher.feed(piece)
        emitted += out
        fed += piece
        if stopped:
            break
        assert emitted == reference_safe_prefix(fed, stops)
    if not stopped:
        emitted += matcher.flush()
    assert emitted == reference_output(text, stops)
    assert matcher.stopped == any(stop in text for stop in stops)


def test_longer_stop_starting_earlier_wins():
    # "bc" completes first, but "abcd" began earlier; the reference cuts at "abcd".
    matcher = StopStringMatcher(["abcd", "bc"])
    assert matcher.feed("xab") == ("x", False)
    assert matcher.feed("c") == ("", False)
    assert matcher.feed("d!") == ("", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_shorter_stop_wins_when_longer_fails():
    matcher = StopStringMatcher(["abcd", "bc"])
    assert matcher.feed("xabc") == ("x", False)
    assert matcher.feed("e") == ("a", True)


def test_flush_cuts_a_complete_stop_still_held():
    matcher = StopStringMatcher(["abcd", "bc"])
    assert matcher.feed("abc") == ("", False)
    assert matcher.flush() == "a"
    assert matcher.stopped


def test_stop_split_across_many_pieces():
    matcher = StopStringMatcher(["<|im_end|>"])
    pieces = ["Hello", " there", "<", "|im", "_", "end", "|>", "ignored"]
    outputs = [matcher.feed(piece) for piece in pieces]
    assert "".join(text for text, _ in outputs) == "Hello there"
    assert [stopped for _, stopped in outputs] == [False] * 6 + [True, True]


def test_no_stops_passes_text_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("abc") == ("abc", False)
    assert matcher.flush() == ""


def test_a_single_string_is_one_stop():
    matcher = StopStringMatcher("ab")
    assert matcher.feed("xaby") == ("x", True)


def test_empty_stop_is_rejected():
    with pytest.raises(ConfigError, match="non-empty"):
        StopStringMatcher(["ok", ""])
