"""The page pool on its own: allocation all or nothing, reference counts, the prefix cache's hash chain,
duplicates left alone, least-recently-used eviction tail first, and random traffic against a model of what
each page holds, with check() after every operation."""

import numpy as np
import pytest

from kiln.ir.errors import ConfigError
from kiln.runtime.pages import PagePool, chain_key


def fill(pool, tokens, computed=None):
    """A sequence's worth of pages for ``tokens``, registered as computed up to ``computed`` (all of them)."""
    pages = pool.allocate(-(-len(tokens) // pool.page_size))
    pool.register(tokens, pages, len(tokens) if computed is None else computed)
    pool.check()
    return pages


def test_allocation_is_all_or_nothing_and_released_pages_come_back():
    pool = PagePool(num_pages=5, page_size=4)
    first = pool.allocate(3)
    assert len(set(first)) == 3 and pool.num_free() == 2 and pool.num_in_use() == 3
    assert pool.allocate(3) is None  # two are free: nothing is taken
    assert pool.num_free() == 2
    second = pool.allocate(2)
    assert set(first).isdisjoint(second) and pool.num_free() == 0
    assert pool.allocate(1) is None and pool.allocate(0) == []
    pool.release(first)
    pool.check()
    assert pool.num_free() == 3 and pool.num_in_use() == 2
    assert sorted(pool.allocate(3)) == sorted(first)  # nothing was cached: they went back to the free list
    pool.check()
    with pytest.raises(ConfigError, match="at least one page"):
        PagePool(num_pages=0, page_size=4)


def test_a_page_released_more_often_than_taken_is_a_bug():
    pool = PagePool(num_pages=2, page_size=4)
    pages = pool.allocate(1)
    pool.release(pages)
    with pytest.raises(AssertionError, match="released more often than taken"):
        pool.release(pages)


def test_chain_keys_depend_on_every_earlier_token_and_are_not_python_hash():
    page = [5, 6, 7, 8]
    assert chain_key(b"", page) == chain_key(b"", np.array(page, dtype=np.int32))  # int width does not matter
    assert chain_key(b"", page) != chain_key(chain_key(b"", [1, 2, 3, 4]), page)  # the same page after a prefix
    assert chain_key(b"", [1, 2]) != chain_key(b"", [2, 1])
    # hash((-1,)) == hash((-2,)) in CPython; the digest tells them apart
    assert chain_key(b"", [-1]) != chain_key(b"", [-2])
    assert len(chain_key(b"", page)) == 16


def test_lookup_returns_the_longest_chain_of_full_computed_pages_and_references_them():
    pool = PagePool(num_pages=8, page_size=4)
    tokens = list(range(100, 111))  # 11 tokens: two full pages and a partial one
    pages = fill(pool, tokens)
    assert [pool.is_cached(p) for p in pages] == [True, True, False]  # the partial page is not shared
    assert pool.lookup(tokens) == pages[:2]
    assert pool.lookup(tokens[:7]) == pages[:1]  # the second page is not full in the query
    assert pool.lookup(tokens[:4] + [0, 0, 0, 0]) == pages[:1]  # the chain breaks at the first differing page
    assert pool.lookup([0] + tokens[1:]) == []
    assert pool.lookup(tokens[4:8]) == []  # page 1's tokens, but at position 0: a different chain
    assert [pool.ref_count(p) for p in pages] == [4, 2, 1]
    assert pool.stats["prefix_queries_tokens"] == 11 + 7 + 8 + 11 + 4
    assert pool.stats["prefix_hit_tokens"] == 8 + 4 + 4
    pool.check()


def test_only_computed_pages_are_registered():
    pool = PagePool(num_pages=8, page_size=4)
    tokens = list(range(12))
    pages = fill(pool, tokens, computed=7)  # page 0 computed, page 1 only up to position 6
    assert [pool.is_cached(p) for p in pages] == [True, False, False]
    pool.register(tokens, pages, 8)
    assert [pool.is_cached(p) for p in pages] == [True, True, False]
    pool.register(tokens, pages, 12)
    assert [pool.is_cached(p) for p in pages] == [True, True, True]
    assert pool.num_cached() == 3
    pool.check()


def test_an_identical_chain_is_not_registered_twice():
    pool = PagePool(num_pages=8, page_size=2)
    tokens = [1, 2, 3, 4, 5]
    first = fill(pool, tokens)
    twin = fill(pool, tokens)  # the same prompt computed at the same time by another sequence
    assert pool.num_cached() == 2 and not any(pool.is_cached(p) for p in twin)
    assert pool.lookup(tokens) == first[:2]
    pool.release(first[:2])
    pool.release(first)
    pool.release(twin)
    pool.check()
    assert pool.num_in_use() == 0 and pool.num_free() == 8
    assert pool.num_cached() == 2  # first's full pages stay cached, the twin's went back to the free list
    assert sorted(pool.allocate(6)) == sorted(set(range(8)) - set(first[:2]))  # free pages go before cached ones
    pool.check()


def test_prefix_caching_off_caches_nothing():
    pool = PagePool(num_pages=4, page_size=2, prefix_caching=False)
    tokens = [1, 2, 3, 4]
    pages = fill(pool, tokens)
    assert pool.lookup(tokens) == [] and pool.num_cached() == 0
    assert pool.stats["prefix_queries_tokens"] == pool.stats["prefix_hit_tokens"] == 0
    pool.release(pages)
    assert pool.num_free() == 4


def test_eviction_takes_the_least_recently_used_and_a_chains_tail_first():
    pool = PagePool(num_pages=6, page_size=2)
    chains = {name: [10 * i + j for j in range(4)] for i, name in enumerate("abc", start=1)}
    pages = {name: fill(pool, tokens) for name, tokens in chains.items()}
    for name in "abc":  # released a, then b, then c
        pool.release(pages[name])
    pool.check()
    assert pool.num_free() == 6 and pool.num_in_use() == 0 and pool.num_cached() == 6
    # b is used again: it becomes the most recently used
    assert pool.lookup(chains["b"]) == pages["b"]
    assert pool.num_free() == 4
    pool.release(pages["b"])
    taken = pool.allocate(1)
    assert taken == [pages["a"][1]]  # a's tail, so a's head still serves a shorter prefix
    assert pool.lookup(chains["a"]) == [pages["a"][0]]
    pool.release([pages["a"][0]])  # a's head is now the most recently used
    taken += pool.allocate(2)
    assert taken[1:] == [pages["c"][1], pages["c"][0]]
    assert pool.lookup(chains["c"]) == [] and pool.lookup(chains["b"]) == pages["b"]
    assert pool.stats["evictions"] == 3
    pool.check()


def test_a_looked_up_page_is_not_evictable_while_referenced():
    pool = PagePool(num_pages=3, page_size=2)
    pages = fill(pool, [1, 2, 3, 4])
    pool.release(pages)
    held = pool.lookup([1, 2, 3, 4])
    assert held == pages and pool.num_free() == 1
    assert pool.allocate(2) is None
    other = pool.allocate(1)
    assert other[0] not in pages
    pool.check()


def test_check_catches_a_broken_pool():
    pool = PagePool(num_pages=4, page_size=2)
    pages = fill(pool, [1, 2, 3, 4])
    pool._free.append(pages[0])  # a referenced page also on the free list
    with pytest.raises(AssertionError, match="two of free, evictable and referenced"):
        pool.check()
    pool._free.pop()
    pool._registration[pages[1]] = (b"", (9, 9))  # a cached page whose key is not its tokens'
    with pytest.raises(AssertionError, match="not its tokens' digest"):
        pool.check()


def test_random_traffic_never_serves_a_page_holding_other_tokens():
    """Sequences allocate, write, register, look up and release at random over a tiny vocabulary (so
    prefixes repeat); the test keeps what each page holds. Every page a lookup returns must hold the query's
    tokens, pages are never held by two sequences unless shared through lookup, and check() holds throughout."""
    rng = np.random.default_rng(0)
    size, num_pages = 3, 16
    pool = PagePool(num_pages, size)
    content = np.full((num_pages, size), -1)
    live: list[tuple[list, list]] = []  # (tokens, pages) of each sequence
    hits = 0
    for _ in range(1500):
        if live and (rng.random() < 0.35 or pool.num_free() < 4):
            tokens, pages = live.pop(int(rng.integers(len(live))))
            pool.release(pages)
        else:
            tokens = [int(t) for t in rng.integers(0, 2, size=int(rng.integers(1, 12)))]
            shared = pool.lookup(tokens[:-1])
            for index, page in enumerate(shared):
                assert content[page].tolist() == tokens[index * size:(index + 1) * size]
            hits += len(shared)
            fresh = pool.allocate(-(-len(tokens) // size) - len(shared))
            if fresh is None:
                pool.release(shared)
            else:
                assert all(pool.ref_count(p) == 1 and not pool.is_cached(p) for p in fresh)
                pages = shared + fresh
                for position in range(len(shared) * size, len(tokens)):
                    content[pages[position // size], position % size] = tokens[position]
                pool.register(tokens, pages, len(tokens))
                live.append((tokens, pages))
        pool.check()
        held = [p for _, pages in live for p in pages]
        assert pool.num_in_use() == len(set(held))
        assert all(pool.ref_count(p) == held.count(p) for p in set(held))
    assert hits > 100 and pool.stats["evictions"] > 50  # the traffic did exercise sharing and eviction
    for _, pages in live:
        pool.release(pages)
    pool.check()
    assert pool.num_in_use() == 0
