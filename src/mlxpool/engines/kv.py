"""KV caches for continuous batching, cheaper to join and leave than mlx-lm's as they come.

On a GPU, what a group of newcomers costs the running batch is mostly small operations and waits, not arithmetic
(bench/join_cost.py, H200, Qwen3-0.6B shape, 32 newcomers): mlx-lm's prompt cache deep-copies each cached prefix
(12-20 ms for 32), and its batch cache reads each row's padding back from the device once per layer whenever
rows leave (20-26 ms, a wait per layer). Here a cached prefix is a slice of the entry's arrays (MLX arrays are
values: writing to a slice makes a new array, the entry stays as it was), and the batch cache keeps a host copy
of the padding. Layers of other types (rotating, quantized, state-space) take mlx-lm's path unchanged.
"""

# mypy: disallow-untyped-calls=False
# (mlx-lm's caches and batches have no type hints)
from __future__ import annotations

import copy
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
        if all(c.size() == 0 for c in caches):  # mlx-lm's would make a plain BatchKVCache
            return cls([0] * len(caches))
        return super().merge(caches)  # type: ignore[no-any-return]

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
    """One sequence's KV cache; rows of this type merge into a `BatchKV`."""

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchKV:
        return BatchKV.merge(caches)


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
    """The first `length` of the `size` tokens in `cache`: slices of its arrays (plain KV layers), or a trimmed deep
    copy."""
    if not all(type(layer) is KVCache for layer in cache):
        copied = copy.deepcopy(cache)
        if length < size:
            for layer in copied:
                layer.trim(size - length)
        return copied
    rows = []
    for layer in cache:
        row = RowKV()
        # New array objects: an update of the row rebinds them and leaves the entry's alone.
        row.keys, row.values, row.offset = layer.keys[..., :length, :], layer.values[..., :length, :], length
        rows.append(row)
    return rows


class PromptCache(LRUPromptCache):
    """mlx-lm's LRU prompt cache, handing out slices of its entries instead of deep copies."""

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
