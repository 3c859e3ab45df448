"""Gated DeltaNet: the linear-attention layers of Qwen3.5 (layer kind "linear_attention").

Each token is projected to q, k, v (which pass through a causal depthwise convolution of
`conv_kernel` positions and SiLU), a gate z, a write strength beta = sigmoid(b) and a decay
g = -exp(A_log) * softplus(a + dt_bias). Instead of attending over a growing cache, every value head
keeps a matrix state S [key_dim, value_dim] that each token first decays, then corrects by the
delta rule (write beta * (v - S^T k) along k), and that the token's query reads: o = S^T q, with q
and k L2-normalized and q scaled by key_dim ** -0.5. The output is RMS-normed per head, gated by
silu(z) and projected back.

A decoding step applies that recurrence once. A prefill runs the chunked form, which gives the same
result with matrix products: within each chunk of CHUNK tokens the corrections are solved at once
(a unit lower-triangular system), and only the state passes from chunk to chunk. Everything runs in
float32, as the reference computes it. The layer's fixed state lives in the cache (kv_cache.KVCache.state):
the convolution's last `conv_kernel - 1` inputs and the recurrent matrices, kept in float32.
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

CHUNK = 64  # tokens per block of the chunked prefill (the reference's chunk size)


def delta_net_state(config: ModelConfig) -> tuple[StateSpec, ...]:
    """The fixed state of one DeltaNet layer: its convolution window and one matrix per value head."""
    c = config
    conv_channels = 2 * c.linear_key_heads * c.linear_key_dim + c.linear_value_heads * c.linear_value_dim
    return (
        StateSpec((c.conv_kernel - 1, conv_channels)),
        StateSpec((c.linear_value_heads, c.linear_key_dim, c.linear_value_dim), float32=True),
    )


def _l2_normalized(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def recurrent_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> torch.Tensor:
    """One token: q, k [heads, dk], v [heads, dv], g, beta [heads]; `state` [heads, dk, dv] is updated in
    place. Returns the output [heads, dv]."""
    state.mul_(g.exp()[:, None, None])
    predicted = torch.einsum("hkv,hk->hv", state, k)
    state.add_(k[:, :, None] * ((v - predicted) * beta[:, None])[:, None, :])
    return torch.einsum("hkv,hk->hv", state, q)


def chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> torch.Tensor:
    """n tokens: q, k [heads, n, dk], v [heads, n, dv], g, beta [heads, n]; `state` [heads, dk, dv] is
    updated in place. Returns the outputs [heads, n, dv], as n recurrent steps would."""
    heads, n, dk = k.shape
    dv = v.shape[-1]
    pad = -n % CHUNK  # zero keys, values and decays change nothing
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, pad)) for t in (g, beta))
    blocks = (n + pad) // CHUNK
    q, k, v = (t.reshape(heads, blocks, CHUNK, -1) for t in (q, k, v))
    g, beta = (t.reshape(heads, blocks, CHUNK) for t in (g, beta))
    decay = g.cumsum(-1)  # log of the decay from the block's start to each position
    causal = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril()
    # decay between positions j <= i of a block (0 above the diagonal)
    between = (decay[..., :, None] - decay[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    # the block's delta-rule corrections at once: (I + strictly lower (beta k k^T * decay))^-1
    system = (k_beta @ k.transpose(-1, -2)) * between
    corrected = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    reads = torch.linalg.solve_triangular(system, k_beta * decay.exp()[..., None], upper=False, unitriangular=True)
    within = (q @ k.transpose(-1, -2)) * between  # queries reading the block's own writes
    q_decayed = q * decay.exp()[..., None]
    k_decayed = k * (decay[..., -1:] - decay).exp()[..., None]  # each write, decayed to the block's end
    block_decay = decay[..., -1].exp()[..., None, None]
    out = torch.empty(heads, blocks, CHUNK, dv, dtype=v.dtype, device=v.device)
    for b in range(blocks):  # only the state passes from block to block
        new = corrected[:, b] - reads[:, b] @ state
        out[:, b] = q_decayed[:, b] @ state + within[:, b] @ new
        state.mul_(block_decay[:, b]).add_(k_decayed[:, b].transpose(-1, -2) @ new)
    return out.reshape(heads, -1, dv)[:, :n]


class GatedDeltaNet(nn.Module):
    """Qwen3.5's linear attention: in projections (q|k|v, z, b, a fused into one matmul), causal conv,
    the gated delta rule over a fixed state, a gated RMSNorm per head, out projection."""

    def __init__(self, config: ModelConfig, layer: int, transposed: bool) -> None:
        super().__init__()
        from llmchat.engine.model import Linear  # model.py imports this module

        c = config
        self.layer = layer
        self.key_heads, self.value_heads = c.linear_key_heads, c.linear_value_heads
        self.key_dim, self.value_dim = c.linear_key_dim, c.linear_value_dim
        keys, values = self.key_heads * self.key_dim, self.value_heads * self.value_dim
        self.conv_channels = 2 * keys + values
        self.splits = (self.conv_channels, values, self.value_heads, self.value_heads)  # qkv, z, b, a
        self.qkvzba = Linear(c.hidden_size, sum(self.splits), bias=False, transposed=transposed)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_channels, 1, c.conv_kernel))
        self.dt_bias = nn.Parameter(torch.empty(self.value_heads))
        self.A_log = nn.Parameter(torch.empty(self.value_heads))
        self.norm_weight = nn.Parameter(torch.empty(self.value_dim))
        self.eps = c.rms_norm_eps
        self.out_proj = Linear(values, c.hidden_size, bias=False, transposed=transposed)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, start: int
    ) -> torch.Tensor:
        """Rows x [n, hidden] at positions [start, start + n); the layer's state in `cache` is the one
        after position start - 1. RoPE tables unused."""
        n, dtype = x.shape[0], x.dtype
        qkv, z, b, a = self.qkvzba(x).split(self.splits, dim=-1)
        conv_state, state = cache.state(self.layer)
        window = torch.cat((conv_state, qkv))  # [kernel - 1 + n, channels]
        mixed = F.silu(F.conv1d(window.t()[None], self.conv_weight, groups=self.conv_channels)[0].t())
        conv_state.copy_(window[window.shape[0] - conv_state.shape[0] :])
        keys = self.key_heads * self.key_dim
        q, k, v = mixed.float().split((keys, keys, self.value_heads * self.value_dim), dim=-1)
        q, k = (t.view(n, self.key_heads, self.key_dim) for t in (q, k))
        if self.value_heads != self.key_heads:  # each q/k head serves a group of consecutive value heads
            q, k = (t.repeat_interleave(self.value_heads // self.key_heads, dim=1) for t in (q, k))
        q = _l2_normalized(q) * self.key_dim**-0.5
        k = _l2_normalized(k)
        v = v.view(n, self.value_heads, self.value_dim)
        beta = b.float().sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        if n == 1:
            out = recurrent_step(q[0], k[0], v[0], g[0], beta[0], state)[None]  # [1, heads, dv]
        else:
            out = chunked(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), g.t(), beta.t(), state)
            out = out.transpose(0, 1)  # [n, heads, dv]
        # gated RMSNorm per head: normed (cast back, then weighted, as the reference) times silu(z)
        out = out.to(dtype).float()
        normed = (out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        gated = (self.norm_weight * normed) * F.silu(z.view(n, self.value_heads, self.value_dim).float())
        return self.out_proj(gated.to(dtype).reshape(n, -1))

    def extra_repr(self) -> str:
        return (
            f"key heads {self.key_heads}x{self.key_dim}, value heads {self.value_heads}x{self.value_dim}, "
            f"kernel {self.conv_weight.shape[-1]}"
        )
