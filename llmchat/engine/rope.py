"""Rotary position embeddings (RoPE) and their scaling variants.

RoPE rotates each (x_i, x_{i+d/2}) pair of a query/key by an angle position * inv_freq_i. The
scaling variants only change inv_freq (and, for YaRN, a constant on cos/sin): `linear` stretches
positions, `dynamic` (NTK) raises the base once the sequence outgrows the trained length, `llama3`
rescales low frequencies smoothly, `yarn` blends interpolation and extrapolation per frequency,
`longrope` (Phi-3) divides each frequency by a per-frequency factor, one set for sequences within
the original training length and one for longer ones.

Cohere 2 and GLM-4 pair the dimensions differently: (x_0, x_1), (x_2, x_3) ... (RopeConfig.interleaved,
GPT-J's layout and llama.cpp's "normal" rope); their cos/sin tables repeat each frequency twice in a row.
"""

from __future__ import annotations

import math

import torch

from llmchat.engine.config import RopeConfig
from llmchat.engine.errors import ModelLoadError


def rotary_dim(rope: RopeConfig, head_dim: int) -> int:
    return int(head_dim * rope.partial_rotary_factor)


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return 1.0 / (base**exponents)


def _llama3(rope: RopeConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    old_len = rope.original_max_position_embeddings
    assert old_len is not None, "config.py fills original_max_position_embeddings for llama3"
    low_wavelen = old_len / rope.low_freq_factor
    high_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    base, factor, original = rope.theta, rope.factor, rope.original_max_position_embeddings
    assert original is not None, "config.py fills original_max_position_embeddings for yarn"

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight

    def mscale(scale: float, m: float = 1.0) -> float:
        return 0.1 * m * math.log(scale) + 1.0 if scale > 1 else 1.0

    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            attention = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention = mscale(factor)
    return inv_freq, float(attention)


def _longrope(rope: RopeConfig, dim: int, seq_len: int | None) -> tuple[torch.Tensor, float]:
    """transformers' `_compute_longrope_parameters`: long factors once seq_len passes the original length."""
    original = rope.original_max_position_embeddings
    assert original is not None and rope.short_factor is not None and rope.long_factor is not None
    factors = rope.long_factor if seq_len and seq_len > original else rope.short_factor
    if len(factors) != dim // 2:
        raise ModelLoadError(f"longrope has {len(factors)} factors for {dim // 2} rotary frequencies")
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * rope.theta**exponents)
    attention = rope.attention_factor
    if attention is None:
        attention = 1.0 if rope.factor <= 1.0 else math.sqrt(1 + math.log(rope.factor) / math.log(original))
    return inv_freq, float(attention)


def inverse_frequencies(
    rope: RopeConfig, head_dim: int, max_position_embeddings: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """inv_freq [rotary_dim/2] (float32) and the cos/sin scale for a sequence of `seq_len` tokens.

    Only `dynamic` and `longrope` depend on seq_len: past the trained length the dynamic base grows
    with the sequence, and longrope switches from its short factors to its long ones.
    """
    dim = rotary_dim(rope, head_dim)
    if rope.type == "yarn":
        return _yarn(rope, dim)
    if rope.type == "longrope":
        return _longrope(rope, dim, seq_len)
    if rope.type == "dynamic":
        length = max(seq_len or 0, max_position_embeddings)
        base = rope.theta * ((rope.factor * length / max_position_embeddings) - (rope.factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    inv_freq = _base_inv_freq(rope.theta, dim)
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        inv_freq = _llama3(rope, inv_freq)
    if rope.freq_factors is not None:
        if len(rope.freq_factors) != inv_freq.numel():
            raise ModelLoadError(f"rope_freqs has {len(rope.freq_factors)} factors for {inv_freq.numel()} frequencies")
        inv_freq = inv_freq / torch.tensor(rope.freq_factors, dtype=torch.float32)
    return inv_freq, 1.0


def cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, scale: float, interleaved: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [len(positions), rotary_dim] for the half-split (or the interleaved) rotation."""
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat((angles, angles), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


class RotaryEmbedding:
    """Precomputed cos/sin for every position up to the context length.

    Two variants depend on the length of the sequence; like transformers (`dynamic_rope_update`),
    a forward pass chooses by the length its sequence reaches (its last position + 1):
    - `dynamic` past the trained length: the rows come from the frequencies of that length.
    - `longrope`: a sequence longer than `original_max_position_embeddings` uses the long factors,
      a shorter one the short factors. Both tables are precomputed, so choosing is one comparison.
      Keeping the KV cache consistent when a sequence crosses that length is the model's job
      (`Transformer._match_longrope`).
    """

    def __init__(
        self,
        rope: RopeConfig,
        head_dim: int,
        max_position_embeddings: int,
        length: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.rope = rope
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.device, self.dtype = device, dtype
        self.cos, self.sin = self._table(inverse_frequencies(rope, head_dim, max_position_embeddings), length)
        self.dynamic = rope.type == "dynamic"
        # longrope: passes ending after this many positions use the long table
        self.long_after: int | None = None
        if rope.type == "longrope":
            assert rope.original_max_position_embeddings is not None, "config.py fills it for longrope"
            self.long_after = rope.original_max_position_embeddings
            long = inverse_frequencies(rope, head_dim, max_position_embeddings, self.long_after + 1)
            self.long_cos, self.long_sin = self._table(long, length)

    @property
    def length(self) -> int:
        """Positions the tables cover."""
        return self.cos.shape[0]

    def _table(self, freqs: tuple[torch.Tensor, float], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = cos_sin(freqs[0], torch.arange(length), freqs[1], self.rope.interleaved)
        return cos.to(self.device, self.dtype), sin.to(self.device, self.dtype)

    def tables(self, start: int, end: int, length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for positions [start, end) of a sequence `length` long (default: end)."""
        length = max(length, end)
        if self.long_after is not None and length > self.long_after:
            return self.long_cos[start:end], self.long_sin[start:end]
        if self.dynamic and length > self.max_position_embeddings:
            inv_freq, scale = inverse_frequencies(self.rope, self.head_dim, self.max_position_embeddings, length)
            cos, sin = cos_sin(inv_freq, torch.arange(start, end), scale, self.rope.interleaved)
            return cos.to(self.device, self.dtype), sin.to(self.device, self.dtype)
        return self.cos[start:end], self.sin[start:end]


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False, float32: bool = False
) -> torch.Tensor:
    """Rotate x [heads, tokens, head_dim] by cos/sin [tokens, rotary_dim] (half-split layout, or
    `interleaved`: adjacent pairs, with tables from cos_sin(..., interleaved=True), computed in
    float32 if `float32` and rounded back, as transformers' Cohere 2 does). Half-split with float32
    tables (OLMo 2's) and a half-precision x: rotated in float32, rounded back once."""
    if interleaved:
        if float32 and x.dtype != torch.float32:
            return _apply_interleaved(x.float(), cos, sin).to(x.dtype)
        return _apply_interleaved(x, cos, sin)
    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        half = dim // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos + rotated * sin).to(x.dtype)
    rot, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat(((rot * cos + rotated * sin).to(x.dtype), rest), dim=-1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x_0, x_1, x_2, x_3 ...) -> (-x_1, x_0, -x_3, x_2 ...): transformers' Cohere/GLM rotate_half."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def _apply_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary for adjacent pairs; a partial rotary (GLM-4) rotates the first rotary_dim features."""
    dim = cos.shape[-1]
    if dim == x.shape[-1]:
        return x * cos + _rotate_pairs(x) * sin
    rot, rest = x[..., :dim], x[..., dim:]
    return torch.cat((rot * cos + _rotate_pairs(rot) * sin, rest), dim=-1)
