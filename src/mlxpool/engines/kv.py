"""KV caches for continuous batching, cheaper to join and leave than mlx-lm's as they come.

On a GPU, what a group of newcomers costs the running batch is mostly small operations and waits, not arithmetic
(bench/join_cost.py, H200, Qwen3-0.6B shape, 32 newcomers): mlx-lm's prompt cache deep-copies each cached prefix
(12-20 ms for 32), and its batch cache reads each row's padding back from the device once per layer whenever
rows leave (20-26 ms, a wait per layer). Here a cached prefix shares the entry's arrays until it is written to,
rows with the same prefix of the same entry (many requests on one cached prompt) merge in one copy per layer, and
the batch cache keeps a host copy of the padding. Layers of other types (rotating, quantized, state-space) take
mlx-lm's path unchanged.
"""

# mypy: disallow-untyped-calls=False
# (mlx-lm's caches and batches have no type hints)
from __future__ import annotations

import copy
import itertools
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache, LRUPromptCache


class BatchKV(BatchKVCache):
    """mlx-lm's batch KV cache with `padding`, each row's left padding on the host."""

    def __init__(self, left_padding: list[int]):
        super().__init__(left_padding)
        self.padding = list(left_padding)
        self._right: list[int] | None = None

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchKV:
        """One batch cache of the row caches `caches`, each row left-padded to the longest."""
        lengths = [c.size() for c in caches]
        longest = max(lengths)
        merged = cls([longest - n for n in lengths])
        if longest == 0:
            return merged
        first = next(c for c in caches if c.keys is not None)
        _, heads, _, key_dim = first.keys.shape
        keys = mx.zeros((len(caches), heads, longest, key_dim), first.keys.dtype)
        values = mx.zeros((len(caches), heads, longest, first.values.shape[3]), first.values.dtype)
        row = 0
        # A run of rows holding the same prefix of the same arrays is copied at once (each copy is a launch).
        for (_, n), run in itertools.groupby(zip(caches, lengths, strict=True), key=lambda c: (id(c[0].keys), c[1])):
            count, source = len(list(run)), caches[row]
            if n:
                shape = (count, heads, n, key_dim)
                keys[row : row + count, :, longest - n :] = mx.broadcast_to(source.keys[..., :n, :], shape)
                shape = (count, heads, n, values.shape[3])
                values[row : row + count, :, longest - n :] = mx.broadcast_to(source.values[..., :n, :], shape)
            row += count
        merged.state = keys, values, merged.offset + longest, merged.left_padding, longest
        return merged

    def prepare(self, *, left_padding: Any = None, lengths: Any = None, right_padding: Any = None) -> None:
        super().prepare(left_padding=left_padding, lengths=lengths, right_padding=right_padding)
        if left_padding is not None:
            self.padding = [p + q for p, q in zip(self.padding, left_padding, strict=True)]
        if right_padding is not None and max(right_padding) > 0:
            self._right = list(right_padding)

    def finalize(self) -> None:
        super().finalize()
        if self._right is not None:  # the right padding was rolled to the left
            self.padding = [p + q for p, q in zip(self.padding, self._right, strict=True)]
            self._right = None

    def filter(self, batch_indices: list[int]) -> None:
        """Keep the rows `batch_indices` (as mlx-lm's, without reading the padding back)."""
        self.padding = [self.padding[i] for i in batch_indices]
        if self.keys is not None:
            self.keys = self.keys[batch_indices]
            self.values = self.values[batch_indices]
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(self.padding, default=0)
        if shift > 0:
            if self.keys is not None:
                self.keys = self.keys[..., shift:, :]
                self.values = self.values[..., shift:, :]
            self._idx -= shift
            self.left_padding -= shift
            self.padding = [p - shift for p in self.padding]

    def extend(self, other: Any) -> None:
        longest = max(self._idx, other._idx)
        ours = [p + longest - self._idx for p in self.padding]
        theirs = [p + longest - other._idx for p in other.padding]
        super().extend(other)
        self.padding = ours + theirs

    def extract(self, idx: int) -> KVCache:
        cache = KVCache()
        keys, values, start = self.keys, self.values, self.padding[idx]
        assert keys is not None and values is not None
        # A copy: a slice would keep the whole batch's buffer alive for as long as the row is cached.
        cache.keys = mx.contiguous(keys[idx : idx + 1, :, start : self._idx])
        cache.values = mx.contiguous(values[idx : idx + 1, :, start : self._idx])
        cache.offset = cache.keys.shape[2]
        return cache


class RowKV(KVCache):
    """One sequence's KV cache; rows of this type merge into a `BatchKV`.

    A row fetched from the prompt cache shares the entry's arrays (`shared`) until it is written to: MLX's slice
    assignment changes the array object it is given, which is the entry's.
    """

    shared = False

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchKV:
        return BatchKV.merge(caches)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        if self.shared:
            assert self.keys is not None and self.values is not None
            self.keys, self.values = self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
            self.shared = False
        return super().update_and_fetch(keys, values)  # type: ignore[no-any-return]

    @property
    def nbytes(self) -> int:
        """The bytes of the tokens it holds (a shared row's arrays are longer: the rest is the entry's)."""
        if self.keys is None or self.values is None:
            return 0
        size = int(self.keys.nbytes + self.values.nbytes)
        return size * self.offset // self.keys.shape[2] if self.shared else size


def as_rows(cache: list[Any]) -> list[Any]:
    """`cache` with its plain KV layers as `RowKV`s (sharing their arrays); other kinds of cache as they are."""
    if not all(type(layer) is KVCache for layer in cache):  # RowKVs already, or another kind
        return cache
    rows = []
    for layer in cache:
        row = RowKV()
        row.keys, row.values, row.offset = layer.keys, layer.values, layer.offset
        rows.append(row)
    return rows


def prefix_of(cache: list[Any], size: int, length: int) -> list[Any]:
    """The first `length` of the `size` tokens in `cache`: rows sharing its arrays (plain KV layers), or a trimmed
    deep copy."""
    if not all(type(layer) is KVCache for layer in cache):
        copied = copy.deepcopy(cache)
        if length < size:
            for layer in copied:
                layer.trim(size - length)
        return copied
    rows = []
    for layer in cache:
        row = RowKV()
        row.keys, row.values, row.offset, row.shared = layer.keys, layer.values, length, True
        rows.append(row)
    return rows


class PromptCache(LRUPromptCache):
    """mlx-lm's LRU prompt cache, handing out its entries' arrays (copied on write) instead of deep copies."""

    def fetch_nearest_cache(self, model: Any, tokens: list[int]) -> tuple[list[Any] | None, list[int]]:
        """The KV of the longest cached prefix of `tokens` (at most all but the last), and the tokens after it."""
        found = self._trie.search(model, tokens)
        best, length = None, 0
        if found.exact is not None:
            best, length = found.exact, len(tokens)
        elif found.longer is not None and found.common_prefix > len(found.shorter or ()):
            best, length = found.longer, min(len(tokens) - 1, found.common_prefix)
        elif found.shorter is not None:
            best, length = found.shorter, len(found.shorter)
        if best is None:
            return None, tokens
        entry = self._trie.get(found.model, best).prompt_cache
        if length < len(best) and not all(layer.is_trimmable() for layer in entry):
            return None, tokens
        return prefix_of(entry, len(best), length), tokens[length:]
