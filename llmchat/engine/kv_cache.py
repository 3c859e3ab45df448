"""The KV cache: the conversation's memory, preallocated once.

Keys and values are allocated when the model is loaded, so decoding never allocates cache memory.
Layers that attend to the whole context hold every position: [layers, kv_heads, capacity, head_dim].
Sliding-window layers (Mistral, Qwen2's upper layers, Gemma 2/3's local layers) only ever look at
their last `window` positions, so they hold a ring of `window + slack` slots instead, position p in
slot p % ring: Gemma 3 270M at 32k tokens keeps 237 MiB instead of 1152.

The slack is what a rewind may cost nothing: regenerating or branching goes back to an earlier
length, and from length n on a sliding layer needs positions n - window + 1 .. n - 1 as they were.
Going back at most `slack + 1` positions finds them all still in the ring; going further back,
some were overwritten by later positions, and `resumable` says so: the caller prefills again from
the start (what llama.cpp does with its sliding-window cache too). A prefill chunk longer than the
slack is attended in parts of at most `chunk_limit` positions, each written before it is attended,
so the ring always holds the window of every query.

`tokens` records which ids the cached positions hold, which is what lets a new request reuse the
longest common prefix; each ring slot records the position it holds, which is what the attention
mask of a sliding layer is made from.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RING_SLACK = 1024  # positions a sliding layer keeps beyond its window (see the module docstring)


def ring_size(windows: Sequence[int | None], capacity: int, slack: int | None = None) -> int | None:
    """Slots of the ring the sliding layers share (the widest window + slack), or None when no
    layer slides or such a ring would not be smaller than the capacity."""
    slack = RING_SLACK if slack is None else slack
    widest = max((w for w in windows if w is not None), default=None)
    return widest + slack if widest is not None and widest + slack < capacity else None


def slot_counts(windows: Sequence[int | None], capacity: int, slack: int | None = None) -> list[int]:
    """Positions each layer holds: its ring or the whole capacity (what KVCache allocates)."""
    ring = ring_size(windows, capacity, slack)
    return [capacity if ring is None or w is None else ring for w in windows]


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
        *,
        windows: Sequence[int | None] = (),
        slack: int | None = None,
    ) -> None:
        """`windows`: each layer's sliding window (None: the whole context); none given, none slide."""
        if capacity < 1:
            raise ValueError("KV cache capacity must be at least 1 token")
        windows = tuple(windows) or (None,) * num_layers
        if len(windows) != num_layers:
            raise ValueError(f"{len(windows)} windows for {num_layers} layers")
        counts = slot_counts(windows, capacity, slack)
        self.ring = ring_size(windows, capacity, slack) or capacity
        sliding = [i for i in range(num_layers) if counts[i] != capacity]
        full = [i for i in range(num_layers) if counts[i] == capacity]
        # layer -> (in the ring?, index in its tensor)
        self._where = {layer: (False, i) for i, layer in enumerate(full)} | {
            layer: (True, i) for i, layer in enumerate(sliding)
        }
        self._windows = windows
        self._widest = max((windows[i] or 0 for i in sliding), default=0)
        # torch.empty: pages are committed by the OS as positions are written, not up front.
        self.keys = torch.empty((len(full), num_kv_heads, capacity, head_dim), device=device, dtype=dtype)
        self.values = torch.empty_like(self.keys)
        self.ring_keys = torch.empty((len(sliding), num_kv_heads, self.ring, head_dim), device=device, dtype=dtype)
        self.ring_values = torch.empty_like(self.ring_keys)
        # The position each slot of each ring holds (-1: never written), on the host for `resumable`
        # and on the device for the attention mask. Per layer: within one forward pass the first
        # layer has written the whole chunk before the next one writes any of it. A ring's slots at
        # and past its `_ring_used` were never written (their memory is not read).
        self._slot_positions = torch.full((len(sliding), self.ring), -1, dtype=torch.long)
        self._slot_positions_device = self._slot_positions.to(device)  # the same tensor on the CPU
        self._slot_tables = [self._slot_positions]
        if self._slot_positions_device is not self._slot_positions:
            self._slot_tables.append(self._slot_positions_device)
        self._ring_used = [0] * len(sliding)
        self.capacity = capacity
        self.tokens: list[int] = []

    @property
    def length(self) -> int:
        """Positions currently holding valid keys/values."""
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the whole capacity (what the cache costs)."""
        return self.keys.nbytes + self.values.nbytes + self.ring_keys.nbytes + self.ring_values.nbytes

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position takes in every layer (a ring slot costs what a position costs)."""
        layers = self.keys.shape[0] + self.ring_keys.shape[0]
        per_layer = self.keys[0, :, 0].nbytes if self.keys.shape[0] else self.ring_keys[0, :, 0].nbytes
        return 2 * layers * per_layer

    @property
    def used_bytes(self) -> int:
        """Bytes holding valid positions: every one in full layers, at most a ring's in sliding ones."""
        full_layers, ring_layers = self.keys.shape[0], self.ring_keys.shape[0]
        per_layer = self.bytes_per_token // max(1, full_layers + ring_layers)
        return per_layer * (full_layers * self.length + ring_layers * min(self.length, self.ring))

    @property
    def free(self) -> int:
        return self.capacity - self.length

    def chunk_limit(self, layer: int) -> int | None:
        """The most positions one write may add to this layer before they are attended (a ring
        holds a query's window only while the chunk fits its slack); None: no limit."""
        in_ring, _ = self._where[layer]
        window = self._windows[layer]
        return self.ring - window + 1 if in_ring and window is not None else None

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys/values [kv_heads, n, head_dim] of positions [start, start + n)."""
        n = keys.shape[1]
        in_ring, index = self._where[layer]
        if not in_ring:
            self.keys[index, :, start : start + n] = keys
            self.values[index, :, start : start + n] = values
            return
        if n > self.ring:
            raise ValueError(f"{n} positions do not fit a ring of {self.ring}")
        first = start % self.ring
        head = min(n, self.ring - first)  # up to the ring's end, the rest from its start
        for target, source in ((self.ring_keys, keys), (self.ring_values, values)):
            target[index, :, first : first + head] = source[:, :head]
            target[index, :, : n - head] = source[:, head:]
        self._record_slots(index, start, n)

    def _record_slots(self, index: int, start: int, n: int) -> None:
        for table in self._slot_tables:
            positions = torch.arange(start, start + n, device=table.device)
            table[index, positions % self.ring] = positions  # on the device too: no copy per step
        self._ring_used[index] = max(self._ring_used[index], min(self.ring, start + n))

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys and values a query before `end` may attend to in one layer (no copy), and the
        position each holds: None for a full layer, whose slot i is position i < end; a ring's
        slots carry theirs (-1 for one never written), for the attention mask."""
        in_ring, index = self._where[layer]
        if not in_ring:
            return self.keys[index, :, :end], self.values[index, :, :end], None
        used = self._ring_used[index]
        return (
            self.ring_keys[index, :, :used],
            self.ring_values[index, :, :used],
            self._slot_positions_device[index, :used],
        )

    def save_position(self, position: int) -> tuple[torch.Tensor, ...]:
        """A copy of every layer's key and value at one position (see restore_position)."""
        slot = position % self.ring
        return (
            self.keys[:, :, position].clone(),
            self.values[:, :, position].clone(),
            self.ring_keys[:, :, slot].clone(),
            self.ring_values[:, :, slot].clone(),
            self._slot_positions[:, slot].clone(),
        )

    def restore_position(self, position: int, saved: tuple[torch.Tensor, ...]) -> None:
        """Put back what save_position copied (an inspector re-ran a step over the cache)."""
        slot = position % self.ring
        self.keys[:, :, position] = saved[0]
        self.values[:, :, position] = saved[1]
        self.ring_keys[:, :, slot] = saved[2]
        self.ring_values[:, :, slot] = saved[3]
        for table in self._slot_tables:
            table[:, slot] = saved[4].to(table.device)

    def append_tokens(self, ids: Sequence[int]) -> None:
        """Record that the positions after `length` now hold these ids."""
        if self.length + len(ids) > self.capacity:
            raise ValueError("KV cache overflow")
        self.tokens.extend(ids)

    def resumable(self, n: int) -> bool:
        """Whether the cache can go on from length `n` (<= length) as it is: every ring still holds
        the positions a query at n attends to (the window before it). Always true without rings."""
        if not 0 <= n <= self.length:
            return False
        if not self.ring_keys.shape[0]:
            return True
        needed = torch.arange(max(0, n - self._widest + 1), n)
        return bool((self._slot_positions[:, needed % self.ring] == needed).all())

    def truncate(self, n: int) -> None:
        """Forget every position from n on (rewinding is free: the tensors are overwritten later).

        A ring that no longer holds the window before n (see `resumable`) is a ValueError: the
        caller prefills again from a length that is resumable (0 always is).
        """
        if n < 0:
            raise ValueError("cannot truncate to a negative length")
        n = min(n, self.length)
        if not self.resumable(n):
            raise ValueError(f"the sliding-window layers no longer hold the positions before {n}")
        del self.tokens[n:]

    def common_prefix(self, ids: Sequence[int]) -> int:
        """Length of the longest prefix of `ids` already cached."""
        n = 0
        for cached, new in zip(self.tokens, ids):
            if cached != new:
                break
            n += 1
        return n
