"""Mamba-2: the state-space layers of IBM Granite 4 (layer kind "mamba").

One input projection yields a gate z, the convolved stream xBC and a time step dt per head. xBC goes
through a causal depthwise convolution of `conv_kernel` positions (with a bias) and SiLU, then
splits into x [heads, head_dim], B and C [groups, state_size] (each group of B/C serves heads //
groups consecutive heads). With A = -exp(A_log) and dt = softplus(dt + dt_bias), every head keeps a
state S [head_dim, state_size] that each token decays and writes to,

    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T,        y_t = S_t C_t + D * x_t,

and the output is gated first, then RMS-normed per group (GraniteMoeHybridRMSNormGated:
norm(y * silu(z)) * w over inner // groups features at a time) and projected back.

A decoding step applies that recurrence once. A prefill runs the chunked (SSD) form, which gives
the same result with matrix products: within each chunk of `ssm_chunk_size` tokens the outputs are
a masked, decay-weighted (C B^T) product with the inputs, and only the state passes from chunk to
chunk. Both run in float32, as the reference computes them. dt is clamped to `ssm_dt_limit`
(time_step_limit) in the chunked form only: transformers (and mamba_ssm) clamp in their chunked
scan, not in the one-token update, and that is followed here. The layer's fixed state lives in the
cache (kv_cache.KVCache.state): the convolution's last `conv_kernel - 1` inputs and the SSM states,
kept in float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from llmchat.engine.config import ModelConfig
from llmchat.engine.kv_cache import StateSpec

if TYPE_CHECKING:
    from llmchat.engine.kv_cache import KVCache


def mamba_widths(config: ModelConfig) -> tuple[int, int, int]:
    """(inner width heads * head_dim, convolved channels inner + 2 * groups * state, in_proj rows)."""
    c = config
    inner = c.ssm_heads * c.ssm_head_dim
    channels = inner + 2 * c.ssm_groups * c.ssm_state_size
    return inner, channels, inner + channels + c.ssm_heads


def mamba_state(config: ModelConfig) -> tuple[StateSpec, ...]:
    """The fixed state of one Mamba-2 layer: its convolution window and one matrix per head."""
    c = config
    _, channels, _ = mamba_widths(c)
    return (
        StateSpec((c.conv_kernel - 1, channels)),
        StateSpec((c.ssm_heads, c.ssm_head_dim, c.ssm_state_size), float32=True),
    )


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """[..., L] -> [..., L, L]: entry (t, s) is a_{s+1} + ... + a_t for s <= t, -inf above the diagonal.

    Summed from the masked terms rather than as a difference of running sums, which stays exact
    where the log decays are large."""
    length = a.shape[-1]
    terms = a[..., :, None].expand(*a.shape, length)  # terms[..., t, s] = a_t
    below = torch.ones(length, length, dtype=torch.bool, device=a.device).tril(-1)
    sums = terms.masked_fill(~below, 0).cumsum(-2)
    return sums.masked_fill(~below.logical_or(torch.eye(length, dtype=torch.bool, device=a.device)), float("-inf"))


def recurrent_step(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, state: torch.Tensor
) -> torch.Tensor:
    """One token: x [heads, p], dt, A [heads], B, C [heads, n]; `state` [heads, p, n] is updated in place.
    Returns S C [heads, p] (without the D skip)."""
    state.mul_((dt * A).exp()[:, None, None]).add_((x * dt[:, None])[:, :, None] * B[:, None, :])
    return (state @ C[:, :, None])[..., 0]


def chunked_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    chunk: int,
) -> torch.Tensor:
    """n tokens: x [heads, n, p], dt [heads, n], A [heads], B, C [heads, n, d]; `state` [heads, p, d] is
    updated in place. Returns S_t C_t for every token [heads, n, p], as n recurrent steps would."""
    heads, n, p = x.shape
    pad = -n % chunk  # a zero time step neither decays nor writes
    if pad:
        x, B, C = (F.pad(t, (0, 0, 0, pad)) for t in (x, B, C))
        dt = F.pad(dt, (0, pad))
    blocks = (n + pad) // chunk
    written = (x * dt[..., None]).reshape(heads, blocks, chunk, p)
    B, C = (t.reshape(heads, blocks, chunk, -1) for t in (B, C))
    log_decay = (A[:, None] * dt).reshape(heads, blocks, chunk)
    to_here = log_decay.cumsum(-1)  # from the block's start to each position
    # token t reading token s's write within a block: C_t . B_s, decayed over (s, t]
    within = (C @ B.transpose(-1, -2)) * _segment_sums(log_decay).exp()
    out = within @ written  # [heads, blocks, chunk, p]
    reads = C * to_here.exp()[..., None]  # reading the state from before the block
    to_end = (to_here[..., -1:] - to_here).exp()[..., None]  # each write, decayed to the block's end
    block_decay = to_here[..., -1].exp()[..., None, None]
    for b in range(blocks):  # only the state passes from block to block
        out[:, b] += reads[:, b] @ state.transpose(-1, -2)
        state.mul_(block_decay[:, b]).add_((written[:, b] * to_end[:, b]).transpose(-1, -2) @ B[:, b])
    return out.reshape(heads, -1, p)[:, :n]


class Mamba2(nn.Module):
    """Granite 4's Mamba-2 mixer: in projection (z | xBC | dt), causal conv + SiLU, the selective scan
    over a fixed state, D skip, gated group-wise RMSNorm, out projection."""

    def __init__(self, config: ModelConfig, layer: int, transposed: bool) -> None:
        super().__init__()
        from llmchat.engine.model import Linear  # model.py imports this module

        c = config
        self.layer = layer
        self.heads, self.head_dim, self.state_size, self.groups = (
            c.ssm_heads,
            c.ssm_head_dim,
            c.ssm_state_size,
            c.ssm_groups,
        )
        self.inner, self.channels, rows = mamba_widths(c)
        self.in_proj = Linear(c.hidden_size, rows, bias=c.ssm_proj_bias, transposed=transposed)
        self.conv_weight = nn.Parameter(torch.empty(self.channels, 1, c.conv_kernel))
        self.conv_bias = nn.Parameter(torch.empty(self.channels)) if c.conv_bias else None
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.D = nn.Parameter(torch.empty(self.heads))
        self.norm_weight = nn.Parameter(torch.empty(self.inner))
        self.eps = c.rms_norm_eps
        self.out_proj = Linear(self.inner, c.hidden_size, bias=c.ssm_proj_bias, transposed=transposed)
        self.chunk = c.ssm_chunk_size
        self.dt_limit = c.ssm_dt_limit

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, start: int
    ) -> torch.Tensor:
        """Rows x [n, hidden] at positions [start, start + n); the layer's state in `cache` is the one
        after position start - 1. RoPE tables unused."""
        n, dtype = x.shape[0], x.dtype
        z, xbc, dt = self.in_proj(x).split((self.inner, self.channels, self.heads), dim=-1)
        conv_state, state = cache.state(self.layer)
        window = torch.cat((conv_state, xbc))  # [kernel - 1 + n, channels]
        mixed = F.conv1d(window.t()[None], self.conv_weight, self.conv_bias, groups=self.channels)[0].t()
        conv_state.copy_(window[window.shape[0] - conv_state.shape[0] :])
        mixed = F.silu(mixed)
        widths = (self.inner, self.groups * self.state_size, self.groups * self.state_size)
        xs, B, C = mixed.split(widths, dim=-1)
        xs = xs.float().view(n, self.heads, self.head_dim)
        per_group = self.heads // self.groups  # each group of B and C serves consecutive heads
        B, C = (t.float().view(n, self.groups, self.state_size).repeat_interleave(per_group, dim=1) for t in (B, C))
        dt = F.softplus(dt + self.dt_bias.to(dtype))  # in the model's dtype, as the reference
        A = -self.A_log.float().exp()
        if n == 1:
            y = recurrent_step(xs[0], dt[0].float(), A, B[0], C[0], state)[None]  # [1, heads, p]
        else:
            low, high = self.dt_limit
            if low > 0.0 or high != float("inf"):
                dt = dt.clamp(low, high)
            y = chunked_scan(
                xs.transpose(0, 1), dt.float().t(), A, B.transpose(0, 1), C.transpose(0, 1), state, self.chunk
            ).transpose(0, 1)
        y = y + xs * self.D.float()[:, None]
        # gate first, then an RMSNorm over each group's inner // groups features
        gated = (y.reshape(n, self.inner) * F.silu(z.float())).view(n, self.groups, -1)
        normed = (gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + self.eps)).view(n, self.inner)
        return self.out_proj((self.norm_weight.float() * normed).to(dtype))

    def extra_repr(self) -> str:
        return (
            f"heads {self.heads}x{self.head_dim}, state {self.state_size}, groups {self.groups}, "
            f"kernel {self.conv_weight.shape[-1]}, chunk {self.chunk}"
        )
