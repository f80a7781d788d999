"""Bookkeeping for TVM's paged KV cache object (sequence ids, forward begin/end)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tvm_ffi


def _builtin(name: str) -> Any:
    return tvm_ffi.get_global_func(f"vm.builtin.{name}")


class PagedKV:
    """One paged KV cache: sequences are added, extended by forward passes, and removed."""

    def __init__(self, cache: Any):
        self.cache = cache
        self._add = _builtin("kv_state_add_sequence")
        self._remove = _builtin("kv_state_remove_sequence")
        self._begin = _builtin("kv_state_begin_forward")
        self._end = _builtin("kv_state_end_forward")
        self._free_pages = _builtin("attention_kv_cache_get_num_available_pages")

    def add(self, seq_id: int) -> None:
        self._add(self.cache, seq_id)

    def remove(self, seq_id: int) -> None:
        self._remove(self.cache, seq_id)

    def begin(self, seq_ids: Sequence[int], lengths: Sequence[int]) -> None:
        self._begin(self.cache, tvm_ffi.Shape(list(seq_ids)), tvm_ffi.Shape(list(lengths)))

    def end(self) -> None:
        self._end(self.cache)

    def free_pages(self) -> int:
        return int(self._free_pages(self.cache))
