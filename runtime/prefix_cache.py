"""Prompt-prefix caching on top of the paged KV cache's fork.

Each entry is a KV-cache sequence of its own that holds the K/V of a token prefix, a whole
number of pages long. The engine makes one by forking a request's sequence (which shares the
request's pages and allocates none) when another request is about to be admitted, and when the
request finishes, then with its reply (a conversation's next turn finds the whole last one).
A later request whose prompt starts with an entry's tokens forks the entry instead of
recomputing them. Entries are evicted least recently used first, when the engine runs short
of pages or holds `max_entries`; removing one frees only the pages no other sequence shares.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from kiln.runtime.kv import PagedKV


class PrefixCache:
    def __init__(self, kv: PagedKV, new_seq_id: Callable[[], int], max_entries: int = 64):
        self.kv = kv
        self.page_size = kv.page_size
        self.max_entries = max_entries
        self._new_seq_id = new_seq_id
        self._entries: OrderedDict[int, np.ndarray] = OrderedDict()  # seq id -> tokens, LRU first

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, tokens: Sequence[int]) -> tuple[int, int] | None:
        """The entry sharing the longest page-aligned prefix with `tokens`, leaving at least
        one token to compute (its logits start generation): (entry seq id, length)."""
        limit = (len(tokens) - 1) // self.page_size * self.page_size
        if limit <= 0 or not self._entries:
            return None
        query = np.asarray(tokens[:limit], dtype=np.int64)
        best, best_len = None, 0
        for seq_id, cached in self._entries.items():
            n = min(len(cached), limit)
            differ = np.flatnonzero(cached[:n] != query[:n])
            common = int(differ[0]) if differ.size else n
            common = common // self.page_size * self.page_size
            if common > best_len:
                best, best_len = seq_id, common
        if best is None:
            return None
        self._entries.move_to_end(best)
        return best, best_len

    def insert(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Keep the whole pages of `tokens`, whose K/V sequence `seq_id` holds."""
        length = len(tokens) // self.page_size * self.page_size
        if length == 0:
            return
        prefix = np.asarray(tokens[:length], dtype=np.int64)
        for other, cached in list(self._entries.items()):
            if len(cached) >= length and np.array_equal(cached[:length], prefix):
                self._entries.move_to_end(other)  # already cached
                return
            if len(cached) < length and np.array_equal(prefix[: len(cached)], cached):
                self._evict(other)  # the new entry covers it
        entry = self._new_seq_id()
        self.kv.fork(seq_id, entry, length)
        self._entries[entry] = prefix
        while len(self._entries) > self.max_entries:
            self.evict_one()

    def evict_one(self) -> bool:
        """Drop the least recently used entry; False when there is none."""
        if not self._entries:
            return False
        self._evict(next(iter(self._entries)))
        return True

    def clear(self) -> None:
        while self.evict_one():
            pass

    def _evict(self, seq_id: int) -> None:
        del self._entries[seq_id]
        self.kv.remove(seq_id)
