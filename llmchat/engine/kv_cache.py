"""The KV cache: the conversation's memory, preallocated once.

Keys and values of every layer live in two tensors [layers, kv_heads, capacity, head_dim] allocated
when the model is loaded, so decoding never allocates cache memory. `tokens` records which ids the
cached positions hold, which is what lets a new request reuse the longest common prefix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    """Per-layer keys and values for up to `capacity` positions of one sequence."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if capacity < 1:
            raise ValueError("KV cache capacity must be at least 1 token")
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        # torch.empty: pages are committed by the OS as positions are written, not up front.
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.tokens: list[int] = []

    @property
    def length(self) -> int:
        """Positions currently holding valid keys/values."""
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the whole capacity (what the cache costs)."""
        return self.keys.nbytes + self.values.nbytes

    @property
    def bytes_per_token(self) -> int:
        return self.nbytes // self.capacity

    @property
    def used_bytes(self) -> int:
        """Bytes holding valid positions."""
        return self.length * self.bytes_per_token

    @property
    def free(self) -> int:
        return self.capacity - self.length

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values [kv_heads, n, head_dim] of positions [start, start + n)."""
        end = start + keys.shape[1]
        self.keys[layer, :, start:end] = keys
        self.values[layer, :, start:end] = values

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions [0, end) of one layer (no copy)."""
        return self.keys[layer, :, :end], self.values[layer, :, :end]

    def save_position(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of every layer's key and value at one position (see restore_position)."""
        return self.keys[:, :, position].clone(), self.values[:, :, position].clone()

    def restore_position(self, position: int, saved: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Put back what save_position copied (an inspector re-ran a step over the cache)."""
        self.keys[:, :, position] = saved[0]
        self.values[:, :, position] = saved[1]

    def append_tokens(self, ids: Sequence[int]) -> None:
        """Record that the positions after `length` now hold these ids."""
        if self.length + len(ids) > self.capacity:
            raise ValueError("KV cache overflow")
        self.tokens.extend(ids)

    def truncate(self, n: int) -> None:
        """Forget every position from n on (rewinding is free: the tensors are overwritten later)."""
        if n < 0:
            raise ValueError("cannot truncate to a negative length")
        del self.tokens[n:]

    def common_prefix(self, ids: Sequence[int]) -> int:
        """Length of the longest prefix of `ids` already cached."""
        n = 0
        for cached, new in zip(self.tokens, ids):
            if cached != new:
                break
            n += 1
        return n
