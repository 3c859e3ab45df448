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

Recurrent layers of a hybrid model (LFM2's short convolutions) keep no keys and values: each holds
a fixed-size state (`state`) that every forward pass updates in place, the summary of all positions
so far. Such a state cannot be truncated, so the cache keeps copies of it at the points a chat
returns to (`take_snapshot`: the generator takes one where the prompt's last token starts, which is
where regenerating resumes, and one every few dozen decoded tokens); going back to length n needs n
to be the current length or a snapshot, and `resume_point` finds the nearest such point at or before
n (the rest is prefilled again). An inspector re-reading an earlier step re-runs the steps from the
snapshot before it over saved copies (save_positions / restore_positions) and leaves the cache as it was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch


class StateSpec(NamedTuple):
    """One state tensor a recurrent layer keeps: its shape, and whether it is held in float32 whatever
    the cache's dtype (DeltaNet's recurrent state, as the reference keeps it)."""

    shape: tuple[int, ...]
    float32: bool = False


RING_SLACK = 1024  # positions a sliding layer keeps beyond its window (see the module docstring)
MAX_SNAPSHOTS = 16  # copies of the recurrent states kept, the newest (see the module docstring)


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
        states: Mapping[int, Sequence[StateSpec]] | None = None,
    ) -> None:
        """`windows`: each layer's sliding window (None: the whole context); none given, none slide.
        `states`: the recurrent layers and the state tensors each keeps instead of keys and values."""
        if capacity < 1:
            raise ValueError("KV cache capacity must be at least 1 token")
        windows = tuple(windows) or (None,) * num_layers
        if len(windows) != num_layers:
            raise ValueError(f"{len(windows)} windows for {num_layers} layers")
        states = dict(states or {})
        attending = [i for i in range(num_layers) if i not in states]
        counts = slot_counts([windows[i] for i in attending], capacity, slack)
        self.ring = ring_size([windows[i] for i in attending], capacity, slack) or capacity
        sliding = [layer for layer, count in zip(attending, counts, strict=True) if count != capacity]
        full = [layer for layer, count in zip(attending, counts, strict=True) if count == capacity]
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
        self._states = {
            layer: tuple(
                torch.zeros(spec.shape, device=device, dtype=torch.float32 if spec.float32 else dtype) for spec in specs
            )
            for layer, specs in states.items()
        }
        self._state_tensors = [tensor for tensors in self._states.values() for tensor in tensors]
        self._snapshots: dict[int, list[torch.Tensor]] = {}  # length -> copies of _state_tensors there
        self.capacity = capacity
        self.tokens: list[int] = []

    @property
    def length(self) -> int:
        """Positions currently holding valid keys/values."""
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the whole capacity (what the cache costs), recurrent states and their
        snapshots included."""
        kv = self.keys.nbytes + self.values.nbytes + self.ring_keys.nbytes + self.ring_values.nbytes
        return kv + self.state_bytes + self.snapshot_bytes

    @property
    def state_bytes(self) -> int:
        """Bytes of the recurrent layers' states: fixed, whatever the length."""
        return sum(state.nbytes for state in self._state_tensors)

    @property
    def snapshot_bytes(self) -> int:
        """Bytes of the kept copies of the recurrent states (at most MAX_SNAPSHOTS of them)."""
        return len(self._snapshots) * self.state_bytes

    @property
    def recurrent_layers(self) -> list[int]:
        """The layers that keep a state instead of keys and values."""
        return list(self._states)

    def state(self, layer: int) -> tuple[torch.Tensor, ...]:
        """A recurrent layer's state tensors, which its forward pass reads and updates in place."""
        return self._states[layer]

    def take_snapshot(self) -> None:
        """Keep a copy of the recurrent states at the current length (the newest MAX_SNAPSHOTS stay)."""
        if not self._states:
            return
        self._snapshots.pop(self.length, None)
        self._snapshots[self.length] = [state.clone() for state in self._state_tensors]
        while len(self._snapshots) > MAX_SNAPSHOTS:
            del self._snapshots[next(iter(self._snapshots))]

    @property
    def snapshots(self) -> list[int]:
        """The lengths at which copies of the recurrent states are kept."""
        return sorted(self._snapshots)

    def _load_states(self, n: int) -> None:
        """Set the recurrent states to what they were at length n (0: the empty state; else a snapshot)."""
        for i, state in enumerate(self._state_tensors):
            if n == 0:
                state.zero_()
            else:
                state.copy_(self._snapshots[n][i])

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position takes in every layer (a ring slot costs what a position costs)."""
        layers = self.keys.shape[0] + self.ring_keys.shape[0]
        if not layers:  # every layer is recurrent
            return 0
        per_layer = self.keys[0, :, 0].nbytes if self.keys.shape[0] else self.ring_keys[0, :, 0].nbytes
        return 2 * layers * per_layer

    @property
    def used_bytes(self) -> int:
        """Bytes holding valid positions: every one in full layers, at most a ring's in sliding ones;
        plus the recurrent layers' fixed states and their snapshots."""
        full_layers, ring_layers = self.keys.shape[0], self.ring_keys.shape[0]
        per_layer = self.bytes_per_token // max(1, full_layers + ring_layers)
        kv = per_layer * (full_layers * self.length + ring_layers * min(self.length, self.ring))
        return kv + self.state_bytes + self.snapshot_bytes

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

    def save_positions(self, begin: int, end: int) -> tuple[torch.Tensor, ...]:
        """A copy of every layer's keys and values at positions [begin, end) and of the recurrent
        states, then the states set to those at `begin` (it must be resumable): what re-running those
        positions needs and overwrites. restore_positions puts it all back."""
        positions = torch.arange(begin, end)
        slots = positions % self.ring
        saved = (
            self.keys[:, :, begin:end].clone(),
            self.values[:, :, begin:end].clone(),
            self.ring_keys[:, :, slots].clone(),
            self.ring_values[:, :, slots].clone(),
            self._slot_positions[:, slots].clone(),
            *(state.clone() for state in self._state_tensors),
        )
        if begin != self.length:
            self._load_states(begin)
        return saved

    def restore_positions(self, begin: int, end: int, saved: tuple[torch.Tensor, ...]) -> None:
        """Put back what save_positions copied (an inspector re-ran steps over the cache)."""
        slots = torch.arange(begin, end) % self.ring
        self.keys[:, :, begin:end] = saved[0]
        self.values[:, :, begin:end] = saved[1]
        self.ring_keys[:, :, slots] = saved[2]
        self.ring_values[:, :, slots] = saved[3]
        for table in self._slot_tables:
            table[:, slots.to(table.device)] = saved[4].to(table.device)
        for state, copy in zip(self._state_tensors, saved[5:], strict=True):
            state.copy_(copy)

    def append_tokens(self, ids: Sequence[int]) -> None:
        """Record that the positions after `length` now hold these ids."""
        if self.length + len(ids) > self.capacity:
            raise ValueError("KV cache overflow")
        self.tokens.extend(ids)

    def resumable(self, n: int) -> bool:
        """Whether the cache can go on from length `n` (<= length): every ring still holds the
        positions a query at n attends to (the window before it), and the recurrent layers' states
        at n are known (n is the current length, 0, or a snapshot). Always true without either."""
        if not 0 <= n <= self.length:
            return False
        if self._states and n not in (0, self.length) and n not in self._snapshots:
            return False
        if not self.ring_keys.shape[0]:
            return True
        needed = torch.arange(max(0, n - self._widest + 1), n)
        return bool((self._slot_positions[:, needed % self.ring] == needed).all())

    def resume_point(self, n: int) -> int:
        """The longest length m <= n the cache can go on from (see resumable): n itself, else the
        nearest snapshot of the recurrent states before it, else 0 (everything is computed again)."""
        n = max(0, min(n, self.length))
        if self.resumable(n):
            return n
        return max((m for m in self._snapshots if m < n and self.resumable(m)), default=0)

    def truncate(self, n: int) -> None:
        """Forget every position from n on (rewinding is free: the tensors are overwritten later).

        A ring that no longer holds the window before n (see `resumable`) is a ValueError: the
        caller prefills again from a length that is resumable (0 always is).
        """
        if n < 0:
            raise ValueError("cannot truncate to a negative length")
        n = min(n, self.length)
        if not self.resumable(n):
            raise ValueError(f"the cache no longer holds the state at {n} (sliding windows or recurrent layers)")
        if n != self.length:
            self._load_states(n)
        del self.tokens[n:]
        for later in [m for m in self._snapshots if m > n]:
            del self._snapshots[later]

    def common_prefix(self, ids: Sequence[int]) -> int:
        """Length of the longest prefix of `ids` already cached."""
        n = 0
        for cached, new in zip(self.tokens, ids):
            if cached != new:
                break
            n += 1
        return n
