"""The KV cache's pages: a free list, reference counts and the prefix cache.

A page is shared only once it is full and its tokens' K/V are computed, so shared pages are never written
again; such pages are found by a hash chain over their tokens and, once unreferenced, stay cached until
an allocation evicts the least recently used.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from kiln.ir.errors import ConfigError

_ROOT_KEY = b""  # the parent key of page 0


def chain_key(parent: bytes, tokens) -> bytes:
    """The prefix-cache key of a page: a digest of the previous page's key and this page's token ids, so
    equal keys mean equal tokens from position 0 on. blake2b rather than hash(), which Python salts per
    process and which collides easily on tuples of small ints."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return digest.digest()


class PagePool:
    """Pages of the KV cache: a free list, reference counts, and the prefix cache (full pages keyed by a
    hash chain over their tokens, LRU-evicted when unreferenced).

    Every page is exactly one of: free (no reference, not cached), evictable (no reference, cached) or
    referenced (held by at least one sequence, cached or not).
    """

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True):
        if num_pages < 1 or page_size < 1:
            raise ConfigError(f"a KV cache needs at least one page of at least one token, got {num_pages} pages "
                              f"of {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.prefix_caching = prefix_caching
        self._refcount = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: page 0 is handed out first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._key_of: dict[int, bytes] = {}  # cached page -> its chain key
        self._page_of: dict[bytes, int] = {}  # chain key -> cached page
        self._registration: dict[int, tuple[bytes, tuple]] = {}  # cached page -> (parent key, tokens), for check()
        self.stats = {"prefix_queries_tokens": 0, "prefix_hit_tokens": 0, "evictions": 0}

    # counts -------------------------------------------------------------------
    def num_free(self) -> int:
        """Pages allocatable now: free ones and unreferenced cached ones."""
        return len(self._free) + len(self._evictable)

    def num_in_use(self) -> int:
        """Pages some sequence holds."""
        return self.num_pages - self.num_free()

    def num_cached(self) -> int:
        """Pages in the prefix map, referenced or not."""
        return len(self._key_of)

    def ref_count(self, page: int) -> int:
        return self._refcount[page]

    def is_cached(self, page: int) -> bool:
        return page in self._key_of

    # allocation ---------------------------------------------------------------
    def allocate(self, n: int) -> list[int] | None:
        """``n`` pages with one reference each, or None (and nothing taken) when fewer are available. Free
        pages go first; then the least recently used unreferenced cached pages are evicted."""
        assert n >= 0, n
        if n > self.num_free():
            return None
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._evictable.popitem(last=False)
                self._forget(page)
                self.stats["evictions"] += 1
            self._refcount[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: list[int]) -> None:
        """Drop one reference on each page; an unreferenced page becomes free, or evictable if cached.
        A sequence's pages are released last first, so its chain's tail is evicted before its head: a head
        still serves shorter prefixes, a tail without its head serves nothing."""
        for page in reversed(pages):
            assert self._refcount[page] > 0, f"page {page} released more often than taken"
            self._refcount[page] -= 1
            if self._refcount[page] == 0:
                if page in self._key_of:
                    self._evictable[page] = None  # the most recently used end
                else:
                    self._free.append(page)

    # prefix cache -------------------------------------------------------------
    def match(self, tokens: list[int]) -> list[int]:
        """The longest chain of cached full pages holding ``tokens[0:k*page_size]``, taking no reference and
        counting nothing (the scheduler asks before it commits to an admission)."""
        if not self.prefix_caching:
            return []
        size = self.page_size
        pages, parent = [], _ROOT_KEY
        for start in range(0, len(tokens) - size + 1, size):
            key = chain_key(parent, tokens[start:start + size])
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
            parent = key
        return pages

    def lookup(self, tokens: list[int]) -> list[int]:
        """:meth:`match`, taking a reference on each page returned; [] when prefix caching is off."""
        if not self.prefix_caching:
            return []
        pages = self.match(tokens)
        for page in pages:
            if self._refcount[page] == 0:
                del self._evictable[page]
            self._refcount[page] += 1
        self.stats["prefix_queries_tokens"] += len(tokens)
        self.stats["prefix_hit_tokens"] += len(pages) * self.page_size
        return pages

    def register(self, tokens: list[int], pages: list[int], num_computed: int) -> None:
        """Enter each full page among ``pages`` whose tokens are all computed (< ``num_computed``) in the
        prefix map. A chain already cached under another page (the same prompt computed twice at once)
        keeps that page; this one stays private and is freed on release."""
        if not self.prefix_caching:
            return
        assert num_computed <= len(tokens), (num_computed, len(tokens))
        size = self.page_size
        full = min(len(pages), num_computed // size)
        # Pages up to the last cached one were entered by earlier calls: hash only the ones after it.
        start = full
        while start > 0 and pages[start - 1] not in self._key_of:
            start -= 1
        parent = self._key_of[pages[start - 1]] if start else _ROOT_KEY
        for index in range(start, full):
            page = pages[index]
            assert self._refcount[page] > 0, f"page {page} registered without a reference"
            page_tokens = tuple(tokens[index * size:(index + 1) * size])
            key = chain_key(parent, page_tokens)
            if key not in self._page_of:
                self._page_of[key] = page
                self._key_of[page] = key
                self._registration[page] = (parent, page_tokens)
            parent = key

    def _forget(self, page: int) -> None:
        del self._page_of[self._key_of.pop(page)]
        del self._registration[page]

    # invariants ---------------------------------------------------------------
    def check(self) -> None:
        """Assert the pool's invariants: every page is exactly one of free, evictable or referenced;
        reference counts are >= 0; free pages are not cached and evictable ones are; the prefix map and its
        inverse agree, and each entry's key is the digest of its parent key and the tokens it was
        registered with."""
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert all(count >= 0 for count in self._refcount), "a negative reference count"
        referenced = {page for page, count in enumerate(self._refcount) if count > 0}
        assert not (free & evictable) and not (free & referenced) and not (evictable & referenced), \
            "a page is in two of free, evictable and referenced"
        assert free | evictable | referenced == set(range(self.num_pages)), "a page is lost"
        cached = set(self._key_of)
        assert not (free & cached), "a free page is still cached"
        assert evictable <= cached, "an evictable page is not cached"
        assert len(self._page_of) == len(self._key_of) == len(self._registration)
        for page, key in self._key_of.items():
            assert self._page_of[key] == page, f"the prefix map and page {page} disagree"
            parent, tokens = self._registration[page]
            assert len(tokens) == self.page_size and chain_key(parent, tokens) == key, \
                f"page {page}'s key is not its tokens' digest"
