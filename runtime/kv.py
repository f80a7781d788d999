"""Bookkeeping for TVM's paged KV cache object (sequence ids, forks, forward begin/end, pages).

The cache keeps each sequence's K/V in pages of `page_size` tokens, in a tree of blocks: a
forked child shares its parent's pages up to the fork position. Appending n tokens to a
sequence of length L takes `new_pages(L, n)` fresh pages, because a sequence's last block
always starts on a page boundary (TVM keeps every shared block a whole number of pages).

TVM allocates those pages inside `kv_state_begin_forward` and has no way back when it runs
out: the check fails after the sequence lengths were already bumped, which leaves the cache
inconsistent. So every caller checks `free_pages()` against `new_pages` *before* `begin`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import tvm_ffi

if TYPE_CHECKING:
    from kiln.runtime.executor import Executor


def new_pages(length: int, append: int, page_size: int) -> int:
    """Fresh pages a sequence of `length` tokens takes to append `append` more."""
    return -(-(length + append) // page_size) - -(-length // page_size)


class PagedKV:
    """One paged KV cache: sequences are added or forked, extended by forward passes, and
    removed. `executor`: where the cache lives (kiln.runtime.executor; default: here)."""

    def __init__(self, cache: Any, page_size: int = 16, executor: Executor | None = None):
        self.cache = cache
        self.page_size = page_size
        get = executor.builtin if executor is not None else tvm_ffi.get_global_func
        self._read = executor.read if executor is not None else int
        self._add = get("vm.builtin.kv_state_add_sequence")
        self._remove = get("vm.builtin.kv_state_remove_sequence")
        self._fork = get("vm.builtin.kv_state_fork_sequence")
        self._begin = get("vm.builtin.kv_state_begin_forward")
        self._popn = get("vm.builtin.kv_state_popn")
        self._end = get("vm.builtin.kv_state_end_forward")
        self._free_pages = get("vm.builtin.attention_kv_cache_get_num_available_pages")
        self.total_pages = self.free_pages()
        self.lengths: dict[int, int] = {}  # tokens each sequence holds (after `begin`)
        # Sequences that are, or were forked from, a fork: their K/V spans more than one block
        # (kiln.runtime.step_graph keys its graphs by page count for one block only).
        self.forked: set[int] = set()

    def add(self, seq_id: int) -> None:
        self._add(self.cache, seq_id)
        self.lengths[seq_id] = 0

    def remove(self, seq_id: int) -> None:
        self._remove(self.cache, seq_id)
        self.lengths.pop(seq_id, None)
        self.forked.discard(seq_id)

    def fork(self, parent: int, child: int, length: int) -> None:
        """New sequence `child` sharing the first `length` tokens of `parent`. At a page
        boundary this shares whole pages and allocates none."""
        self._fork(self.cache, parent, child, length)
        self.lengths[child] = length
        self.forked.update((parent, child))

    def begin(self, seq_ids: Sequence[int], lengths: Sequence[int]) -> None:
        self._begin(self.cache, tvm_ffi.Shape(list(seq_ids)), tvm_ffi.Shape(list(lengths)))
        for seq_id, n in zip(seq_ids, lengths, strict=True):
            self.lengths[seq_id] = self.lengths.get(seq_id, 0) + n

    def end(self) -> None:
        self._end(self.cache)

    def undo_begin(self, seq_ids: Sequence[int]) -> None:
        """Take back a `begin` of one token for each of `seq_ids` that no pass ran: their
        lengths (and a page the token started) as they were."""
        self._end(self.cache)
        for seq_id in seq_ids:
            self._popn(self.cache, seq_id, 1)
            self.lengths[seq_id] -= 1

    def free_pages(self) -> int:
        return int(self._read(self._free_pages(self.cache)))

    def new_pages(self, length: int, append: int) -> int:
        return new_pages(length, append, self.page_size)

    def close(self) -> None:
        """Let go of the cache and its functions (handles into a Disco session)."""
        self.cache = None
        self._add = self._remove = self._fork = self._begin = self._end = self._popn = None
        self._free_pages = None
