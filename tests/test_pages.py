"""The KV cache's page manager on its own: reservations within bounds, a full cache refused with the typed
error, pages handed back on removal and reused, no page ever owned twice."""

import numpy as np
import pytest

from kiln.ir.errors import ConfigError
from kiln.runtime.pages import PageManager


def test_advance_reserves_whole_pages_and_returns_positions():
    pages = PageManager(num_pages=8, page_size=4, pages_per_seq=3)
    seq = pages.add_sequence()
    assert pages.advance(seq, 5) == 0  # tokens 0..4: two pages of 4
    assert pages.advance(seq, 3) == 5  # tokens 5..7 fill the second page
    assert len(set(pages.page_table([seq])[0, :2].tolist())) == 2
    assert pages.advance(seq, 1) == 8  # token 8 opens a third
    table = pages.page_table([seq])
    assert table.shape == (1, 3) and table.dtype == np.int32
    assert len(set(table[0].tolist())) == 3 and all(0 <= p < 8 for p in table[0])


def test_a_sequence_may_hold_pages_per_seq_pages_and_no_more():
    pages = PageManager(num_pages=8, page_size=4, pages_per_seq=3)
    seq = pages.add_sequence()
    pages.reserve(seq, 12)  # exactly 3 pages
    with pytest.raises(ConfigError, match="13 tokens need 4 pages, a sequence may hold 3"):
        pages.reserve(seq, 13)
    with pytest.raises(ConfigError, match="need 4 pages"):
        pages.advance(pages.add_sequence(), 13)


def test_sequences_never_share_a_page_and_the_table_rows_are_theirs():
    pages = PageManager(num_pages=9, page_size=2, pages_per_seq=3)
    seqs = [pages.add_sequence() for _ in range(3)]
    for n, seq in zip((6, 3, 5), seqs):
        pages.advance(seq, n)
    table = pages.page_table(seqs)
    held = [table[0, :3], table[1, :2], table[2, :3]]
    flat = np.concatenate(held).tolist()
    assert len(flat) == len(set(flat)) == 8
    assert table[1, 2] == 0  # a row is padded past the pages its sequence holds


def test_a_full_cache_is_refused_with_the_typed_error_and_freed_pages_are_reused():
    pages = PageManager(num_pages=4, page_size=4, pages_per_seq=4)
    first, second = pages.add_sequence(), pages.add_sequence()
    pages.advance(first, 8)
    pages.advance(second, 8)
    third = pages.add_sequence()
    with pytest.raises(ConfigError, match=r"the KV cache is full \(4 of 4 pages in use\)"):
        pages.advance(third, 1)
    given_back = set(pages.page_table([first])[0, :2].tolist())
    pages.remove_sequence(first)
    pages.remove_sequence(third)
    fourth = pages.add_sequence()
    assert pages.advance(fourth, 8) == 0
    assert set(pages.page_table([fourth])[0, :2].tolist()) == given_back
    with pytest.raises(ConfigError, match="the KV cache is full"):
        pages.advance(fourth, 1)


def test_random_traffic_keeps_every_page_owned_once():
    """Sequences come, grow and go at random; after every step each page is free or held by exactly one
    sequence, and a reservation fails only when the free pages cannot cover it."""
    rng = np.random.default_rng(0)
    num_pages, page_size, per_seq = 12, 3, 5
    pages = PageManager(num_pages, page_size, per_seq)
    live: dict = {}
    for _ in range(400):
        if live and rng.random() < 0.3:
            seq = int(rng.choice(list(live)))
            pages.remove_sequence(seq)
            del live[seq]
            continue
        seq = pages.add_sequence() if not live or rng.random() < 0.4 else int(rng.choice(list(live)))
        live.setdefault(seq, 0)
        grow = int(rng.integers(1, 5))
        if live[seq] + grow > per_seq * page_size:
            pages.remove_sequence(seq)
            del live[seq]
            continue
        need = -(-(live[seq] + grow) // page_size) - -(-live[seq] // page_size)
        free = num_pages - sum(-(-n // page_size) for n in live.values())
        if need > free:
            with pytest.raises(ConfigError, match="the KV cache is full"):
                pages.advance(seq, grow)
            pages.remove_sequence(seq)
            del live[seq]
        else:
            assert pages.advance(seq, grow) == live[seq]
            live[seq] += grow
        held = [p for s, n in live.items() for p in pages.page_table([s])[0, :-(-n // page_size)].tolist()]
        assert len(held) == len(set(held)) == sum(-(-n // page_size) for n in live.values())


def test_a_refused_reservation_takes_no_pages():
    pages = PageManager(num_pages=4, page_size=4, pages_per_seq=4)
    pages.advance(pages.add_sequence(), 8)  # two of the four pages
    greedy = pages.add_sequence()
    with pytest.raises(ConfigError, match="the KV cache is full"):
        pages.reserve(greedy, 16)  # needs four
    modest = pages.add_sequence()
    pages.reserve(modest, 8)  # the two free pages are still free
