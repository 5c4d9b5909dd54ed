"""The KV cache's page manager: which pages each sequence owns.

Pages are handed out from a free list and reference-counted, so the same
picture serves one sequence, batches, prefix sharing (fork) and rolling back
tokens (speculative decoding).
"""

from __future__ import annotations

import numpy as np

from kiln.ir.errors import ConfigError


class PageManager:
    def __init__(self, num_pages: int, page_size: int, pages_per_seq: int):
        self.page_size = page_size
        self.pages_per_seq = pages_per_seq
        self.free = list(range(num_pages - 1, -1, -1))
        self.refcount = np.zeros(num_pages, dtype=np.int32)
        self.sequences: dict[int, list] = {}
        self.lengths: dict[int, int] = {}
        self._next_id = 0

    def add_sequence(self) -> int:
        seq_id = self._next_id
        self._next_id += 1
        self.sequences[seq_id] = []
        self.lengths[seq_id] = 0
        return seq_id

    def reserve(self, seq_id: int, total_tokens: int) -> None:
        """Make sure the sequence owns pages for ``total_tokens`` tokens; all of them or, refused, none."""
        pages = self.sequences[seq_id]
        need = -(-total_tokens // self.page_size)
        if need > self.pages_per_seq:
            raise ConfigError(f"{total_tokens} tokens need {need} pages, a sequence may hold {self.pages_per_seq}")
        if need - len(pages) > len(self.free):
            raise ConfigError(f"the KV cache is full ({len(self.refcount) - len(self.free)} of {len(self.refcount)} "
                              f"pages in use); finish or free sequences, or compile with a larger --max-num-seqs / "
                              f"--kv-cache-budget")
        while len(pages) < need:
            page = self.free.pop()
            self.refcount[page] += 1
            pages.append(page)

    def advance(self, seq_id: int, n: int) -> int:
        """Record ``n`` new tokens; returns the position of the first."""
        start = self.lengths[seq_id]
        self.reserve(seq_id, start + n)
        self.lengths[seq_id] = start + n
        return start

    def page_table(self, seq_ids) -> np.ndarray:
        table = np.zeros((len(seq_ids), self.pages_per_seq), dtype=np.int32)
        for row, seq_id in enumerate(seq_ids):
            pages = self.sequences[seq_id]
            table[row, :len(pages)] = pages
        return table

    def remove_sequence(self, seq_id: int) -> None:
        for page in self.sequences.pop(seq_id):
            self.refcount[page] -= 1
            if self.refcount[page] == 0:
                self.free.append(page)
        self.lengths.pop(seq_id)
