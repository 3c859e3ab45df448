"""The Transformer: one decoder-only model class for every supported architecture.

The parts, in the order a token meets them:
  token embedding (× a scale for Gemma, Granite) → N × [RMSNorm → attention (fused QKV, optional q/k
  norm, RoPE, GQA, KV cache, optional sliding window, optional score soft-capping) → (Gemma: RMSNorm)
  → (Granite: × residual_scale) → residual add → RMSNorm → gated MLP (or a mixture of experts, moe.py)
  → (Gemma: RMSNorm) → (Granite: × residual_scale) → residual add] → final RMSNorm → output projection
  (logits, optionally scaled and soft-capped). OLMo 2 and EXAONE 4 drop the two norms in front of
  the branches and keep the two after them (norm_after).
Architectures differ only through ModelConfig fields; checkpoint names are mapped to this one
layout at load time (q/k/v and gate/up are fused into one matmul each, which decoding likes;
Phi-3 ships them fused already).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from llmchat.engine.config import ModelConfig
from llmchat.engine.delta_net import GatedDeltaNet
from llmchat.engine.errors import ModelLoadError
from llmchat.engine.kv_cache import KVCache
from llmchat.engine.mamba2 import Mamba2
from llmchat.engine.memory import expert_shapes, matrix_shapes
from llmchat.engine.moe import (
    MoE,
    PackedExperts,
    assemble,
    check_expert_parts,
    expert_part,
    from_in_out_interleaved,
    is_expert_target,
    missing_experts,
    set_packed_stack,
)
from llmchat.engine.packed import PackedLinear, fits_int4, layout_for
from llmchat.engine.rope import RotaryEmbedding, apply_rotary
from llmchat.engine.short_conv import ShortConv

RECOMPUTE_CHUNK = 512  # positions per pass when a cached prefix is re-run (see Transformer._match_longrope)

# cos/sin rows of one forward pass, per rotary embedding (Gemma 3: full layers', sliding layers')
RopeTables = list[tuple[torch.Tensor, torch.Tensor]]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class Linear(nn.Module):
    """y = x W^T + b, with W stored in whichever layout the device's kernels stream fastest.

    On CPU in float32, BLAS runs the matrix-vector products of decoding markedly faster over a
    row-major [in, out] matrix (measured 1.3x across the model's matrices, 2x on the output
    projection), so the checkpoint's [out, in] matrix is transposed once at load. Half-precision
    CPU kernels are the other way round (the [in, out] layout is 10-40x slower there), as is
    everything on CUDA, so those keep [out, in]. `transposed` says which one `weight` holds.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, *, transposed: bool = False) -> None:
        super().__init__()
        self.transposed = transposed
        shape = (in_features, out_features) if transposed else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        if self.bias is None:
            return x @ self.weight
        return torch.addmm(self.bias, x, self.weight)

    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of W (W^T's columns) for `ids`: how a tied output matrix serves as the embedding."""
        return self.weight.index_select(1, ids).t() if self.transposed else F.embedding(ids, self.weight)


def transposed_layout(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether projections are stored [in, out] (see Linear)."""
    return device.type == "cpu" and dtype == torch.float32


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like the reference implementations."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (offset + w), all in float32, cast back at the end.

    Llama casts the normalized x back before multiplying by the weight; Gemma multiplies first.
    The two round differently in half precision, so this is its own class rather than a weight
    with the offset folded in at load time.
    """

    def __init__(self, dim: int, eps: float, offset: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * (self.offset + self.weight.float())).to(dtype)


class LayerNorm(nn.Module):
    """Cohere's LayerNorm without bias: (x - mean) / std * w, all in float32, cast back at the end."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x - x.mean(-1, keepdim=True)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(dtype)


def make_norm(config: ModelConfig, dim: int) -> RMSNorm | OffsetRMSNorm | LayerNorm:
    """The architecture's norm over `dim` features (RMSNorm, Gemma's offset one, Cohere's LayerNorm)."""
    if config.layer_norm:
        return LayerNorm(dim, config.rms_norm_eps)
    if config.norm_offset or config.norm_weight_in_float32:  # OLMo 2 rounds like Gemma, with offset 0
        return OffsetRMSNorm(dim, config.rms_norm_eps, config.norm_offset)
    return RMSNorm(dim, config.rms_norm_eps)


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, RoPE and a KV cache.

    Layers with soft-capped scores (Gemma 2) take the plain path of `capped_attention`, since the
    fused SDPA kernel cannot transform scores between the product and the softmax; layers with
    sinks (gpt-oss) take `sink_attention`'s, since SDPA has no sink input.
    """

    def __init__(self, config: ModelConfig, layer: int, transposed: bool) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.window = config.layer_window(layer)
        self.splits = (config.q_size, config.kv_size, config.kv_size)
        # Qwen3.5: each query head's projection is followed by a gate of its own width
        self.output_gate = config.attn_output_gate
        rows = sum(self.splits) + config.q_size * self.output_gate
        self.qkv = Linear(config.hidden_size, rows, bias=config.qkv_bias, transposed=transposed)
        self.o = Linear(config.q_size, config.hidden_size, bias=config.o_bias, transposed=transposed)
        # per head (Qwen3, Gemma 3), or over the whole q / k projection (OLMoE: qk_norm_whole)
        self.qk_norm_whole = config.qk_norm_whole
        q_dim, k_dim = (config.q_size, config.kv_size) if config.qk_norm_whole else (config.head_dim, config.head_dim)
        self.q_norm = make_norm(config, q_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, k_dim) if config.qk_norm else None
        self.clip = config.clip_qkv
        self.scale = config.attn_scale  # None: SDPA's default head_dim ** -0.5
        self.softcap = config.attn_softcap
        self.rotates = config.uses_rope(layer)  # SmolLM3's NoPE layers attend without positions
        self.interleaved = config.rope.interleaved  # Cohere 2, GLM-4: adjacent pairs rotate
        self.rotate_float32 = config.rope.float32  # Cohere 2: and in float32
        self.sinks = nn.Parameter(torch.empty(config.num_heads)) if config.attn_sinks else None  # gpt-oss

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, start: int
    ) -> torch.Tensor:
        n = x.shape[0]
        projected = self.qkv(x)
        gate = None
        if self.output_gate:  # q_proj's rows per head: the head's query, then its gate
            queries, kv = projected.split((2 * self.splits[0], 2 * self.splits[1]), dim=-1)
            pairs = queries.view(n, self.num_heads, 2, self.head_dim)
            gate = pairs[:, :, 1].reshape(n, self.splits[0])
            projected = torch.cat((pairs[:, :, 0].reshape(n, self.splits[0]), kv), dim=-1)
        if self.qk_norm_whole and self.q_norm is not None and self.k_norm is not None:  # OLMoE
            q, k, v = projected.split(self.splits, dim=-1)
            projected = torch.cat((self.q_norm(q), self.k_norm(k), v), dim=-1)
        if self.clip is not None:  # OLMoE: after the norms, on q, k and v alike
            projected = projected.clamp(-self.clip, self.clip)
        heads = projected.view(n, -1, self.head_dim).transpose(0, 1)  # [q + k + v heads, n, head_dim]
        qk, v = heads[: self.num_heads + self.num_kv_heads], heads[self.num_heads + self.num_kv_heads :]
        if self.q_norm is not None and self.k_norm is not None and not self.qk_norm_whole:
            qk = torch.cat((self.q_norm(qk[: self.num_heads]), self.k_norm(qk[self.num_heads :])))
        if self.rotates:
            # queries and keys rotate alike: one pass over both
            qk = apply_rotary(qk, cos, sin, self.interleaved, self.rotate_float32)
        q, k = qk[: self.num_heads], qk[self.num_heads :]
        # A sliding layer's ring holds a query's window only for chunks within its slack: a longer
        # one is written and attended in parts (the projections above ran over all of it at once).
        part = cache.chunk_limit(self.layer) or n
        outs = [self._attend(q, k, v, cache, start, begin, min(begin + part, n)) for begin in range(0, n, part)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        out = out.transpose(0, 1).reshape(n, self.num_heads * self.head_dim)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        return self.o(out)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, start: int, begin: int, end: int
    ) -> torch.Tensor:
        """Cache the keys/values of rows [begin, end) of the chunk at `start`, then attend their queries."""
        whole = begin == 0 and end == q.shape[1]
        q, k, v = (q, k, v) if whole else (q[:, begin:end], k[:, begin:end], v[:, begin:end])
        cache.write(self.layer, start + begin, k, v)
        keys, values, positions = cache.view(self.layer, start + end)
        if self.sinks is not None:
            return sink_attention(q, keys, values, start + begin, self.window, self.scale, self.sinks, positions)
        if self.softcap is None:
            return grouped_attention(q, keys, values, start + begin, self.window, self.scale, positions)
        return capped_attention(q, keys, values, start + begin, self.window, self.scale, self.softcap, positions)


def attention_mask(
    start: int, n: int, window: int | None, device: torch.device, key_positions: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Boolean [n, keys] mask (True = may attend) for queries at positions [start, start+n).

    The keys are positions [0, start + n), or, for a ring of a sliding layer, the positions its
    slots hold (`key_positions`, -1 for a slot never written). None when every query may see every
    cached key (a single decode step inside the window of a full cache).
    """
    end = start + n
    if key_positions is None:
        if n == 1 and (window is None or end <= window):
            return None
        key_positions = torch.arange(end, device=device)
    q_pos = torch.arange(start, end, device=device)[:, None]
    k_pos = key_positions[None, :]
    allowed = (k_pos <= q_pos) & (k_pos >= 0)
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def grouped_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
    window: int | None,
    scale: float | None = None,
    key_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal scaled dot-product attention; each KV head serves a group of query heads.

    `enable_gqa` lets the fused kernel read the cached keys/values as they are instead of
    repeating them per query head. A prompt that starts at position 0 with no window is plain
    causal attention, which needs no mask at all. `key_positions`: see attention_mask.
    """
    n = q.shape[1]
    if start == 0 and window is None and n > 1 and key_positions is None:
        return F.scaled_dot_product_attention(
            q[None], keys[None], values[None], is_causal=True, scale=scale, enable_gqa=True
        )[0]
    mask = attention_mask(start, n, window, q.device, key_positions)
    return F.scaled_dot_product_attention(
        q[None], keys[None], values[None], attn_mask=mask, scale=scale, enable_gqa=True
    )[0]


def capped_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
    window: int | None,
    scale: float | None,
    softcap: float,
    key_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention whose scores are soft-capped, tanh(s / c) * c, before mask and softmax.

    The order of transformers' eager Gemma 2 path: scale, cap, mask, float32 softmax. Query heads
    are grouped per KV head ([kv_heads, group * n, head_dim]) so the cache is read as it is.
    """
    heads, n, head_dim = q.shape
    kv_heads, end = keys.shape[0], keys.shape[1]
    grouped = q.reshape(kv_heads, heads // kv_heads * n, head_dim)
    scores = grouped @ keys.transpose(1, 2)
    scores.mul_(head_dim**-0.5 if scale is None else scale).div_(softcap).tanh_().mul_(softcap)  # in place: no copies
    mask = attention_mask(start, n, window, q.device, key_positions)
    if mask is not None:
        scores.view(kv_heads, -1, n, end).masked_fill_(~mask, float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
    return (probs @ values).view(heads, n, head_dim)


def sink_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
    window: int | None,
    scale: float | None,
    sinks: torch.Tensor,
    key_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention with gpt-oss's sinks: one learned logit per query head joins its softmax as an
    extra column that takes probability mass but has no value.

    The order of transformers' eager gpt-oss path: scale, mask, append the sink column, softmax (here
    in float32), drop the column. Query heads are grouped per KV head as in `capped_attention`.
    """
    heads, n, head_dim = q.shape
    kv_heads, end = keys.shape[0], keys.shape[1]
    group = heads // kv_heads
    scores = (q.reshape(kv_heads, group * n, head_dim) @ keys.transpose(1, 2)).view(kv_heads, group, n, end)
    scores.mul_(head_dim**-0.5 if scale is None else scale)
    mask = attention_mask(start, n, window, q.device, key_positions)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    sink = sinks.to(scores.dtype).view(kv_heads, group, 1, 1).expand(kv_heads, group, n, 1)
    probs = torch.cat((scores, sink), dim=-1).softmax(-1, dtype=torch.float32)[..., :end].to(q.dtype)
    return (probs.reshape(kv_heads, group * n, end) @ values).view(heads, n, head_dim)


def _activation(config: ModelConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    if config.hidden_act not in ACTIVATIONS:
        raise ModelLoadError(f"unsupported hidden_act {config.hidden_act!r}")
    return ACTIVATIONS[config.hidden_act]


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, config: ModelConfig, transposed: bool) -> None:
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up = Linear(
            config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias, transposed=transposed
        )
        self.down = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias, transposed=transposed)
        self.act = _activation(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        return self.down(self.act(gate) * up)


class SharedMLP(nn.Module):
    """Granite 4 without experts (num_local_experts 0): the MLP branch is the layer's shared MLP alone,
    kept under the name it has beside experts (`mlp.shared`)."""

    def __init__(self, config: ModelConfig, transposed: bool) -> None:
        super().__init__()
        self.shared = MLP(config, transposed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(x)


def _pre_norm(config: ModelConfig) -> nn.Module:
    """The norm in front of a branch; none (an identity) where the outputs are normed instead (norm_after)."""
    return nn.Identity() if config.norm_after else make_norm(config, config.hidden_size)


class Block(nn.Module):
    """One decoder layer: pre-norm attention and pre-norm MLP, each with a residual connection.

    With sandwich norms (Gemma 2/3, GLM-4) each branch's output is normed again before the residual
    add. A parallel block (Cohere 2) feeds one norm's output to both: x + attn(h) + mlp(h). Granite
    multiplies each branch's output by `residual_scale` before it is added. OLMo 2 and EXAONE 4
    (norm_after) norm each branch's output only: x + post_norm(attn(x)), then + post_norm(mlp(x)).
    """

    def __init__(self, config: ModelConfig, layer: int, transposed: bool) -> None:
        super().__init__()
        self.attn_norm = _pre_norm(config)
        # what mixes the tokens: attention, or in a hybrid's recurrent layers LFM2's short convolution,
        # Qwen3.5's Gated DeltaNet or Granite 4's Mamba-2
        kind = config.layer_kind(layer)
        self.attn: Attention | None = Attention(config, layer, transposed) if kind == "attention" else None
        self.conv: ShortConv | None = ShortConv(config, layer, transposed) if kind == "conv" else None
        delta = GatedDeltaNet(config, layer, transposed) if kind == "linear_attention" else None
        self.delta: GatedDeltaNet | None = delta
        self.mamba: Mamba2 | None = Mamba2(config, layer, transposed) if kind == "mamba" else None  # Granite 4
        self.parallel = config.parallel_block
        self.mlp_norm = None if config.parallel_block else _pre_norm(config)
        self.mlp: MLP | MoE | SharedMLP = (
            MoE(config, transposed, _activation(config)) if config.is_moe_layer(layer) else MLP(config, transposed)
        )
        if not config.is_moe_layer(layer) and config.shared_expert_intermediate_size and not config.shared_expert_gate:
            self.mlp = SharedMLP(config, transposed)  # Granite 4 without experts
        post_norms = config.sandwich_norms or config.norm_after
        self.attn_post_norm = make_norm(config, config.hidden_size) if post_norms else None
        self.mlp_post_norm = make_norm(config, config.hidden_size) if post_norms else None
        self.rope_index = int(config.uses_local_rope(layer))  # which of the rotary tables it uses
        self.residual_scale = config.residual_scale  # Granite: each branch's output times it

    @property
    def mixer(self) -> Attention | ShortConv | GatedDeltaNet | Mamba2:
        """The layer's token mixer (attention, a short convolution, a DeltaNet or a Mamba-2 layer)."""
        mixer = self.attn or self.conv or self.delta or self.mamba
        assert mixer is not None
        return mixer

    def forward(self, x: torch.Tensor, rope: RopeTables, cache: KVCache, start: int) -> torch.Tensor:
        cos, sin = rope[self.rope_index]
        if self.parallel:
            h = self.attn_norm(x)
            return x + self.mixer(h, cos, sin, cache, start) + self.mlp(h)
        h = self.mixer(self.attn_norm(x), cos, sin, cache, start)
        if self.attn_post_norm is not None:
            h = self.attn_post_norm(h)
        if self.residual_scale is not None:  # Granite
            h = h * self.residual_scale
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.mlp_post_norm is not None:
            h = self.mlp_post_norm(h)
        if self.residual_scale is not None:
            h = h * self.residual_scale
        return x + h


class Transformer(nn.Module):
    """The decoder stack plus embedding and output projection.

    `embedding`: a module that serves the token rows itself (a GGUF file's, mapped: GGUFEmbedding)
    instead of a resident matrix; else tied models store the shared matrix once, in the output
    projection, and untied ones an nn.Embedding.
    """

    def __init__(self, config: ModelConfig, *, transposed: bool = False, embedding: nn.Module | None = None) -> None:
        super().__init__()
        self.config = config
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, transposed=transposed)
        self.embed: nn.Module | None = embedding
        if embedding is None and not config.tie_word_embeddings:
            self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, transposed) for i in range(config.num_layers))
        self.norm = make_norm(config, config.hidden_size)
        self.rotary: RotaryEmbedding | None = None  # every layer's, or Gemma 3's full-attention layers'
        self.local_rotary: RotaryEmbedding | None = None  # Gemma 3's sliding layers'
        # Gemma scales embeddings by sqrt(hidden) rounded to float32, then to the model's dtype the
        # way transformers does; a CPU scalar tensor multiplies tensors on any device. (Granite's
        # embedding_multiplier is a Python float there: the same wherever the dtype holds it exactly, as 12.)
        self.embed_scale = (
            torch.tensor(config.embed_scale, dtype=torch.float32, device="cpu") if config.embed_scale else None
        )
        self.final_softcap = config.final_softcap
        self.logit_scale = config.logit_scale  # Cohere 2, Granite
        self._longrope_caches: weakref.WeakSet[KVCache] = weakref.WeakSet()  # caches holding long-factor K/V

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype everything between the matmuls runs in (packed matrices have their own)."""
        return self.norm.weight.dtype

    def setup_rotary(self, length: int) -> None:
        """Precompute cos/sin for positions [0, length) on the model's device and dtype (OLMo 2: float32)."""
        c = self.config
        dtype = torch.float32 if c.rope_tables_float32 else self.dtype
        self.rotary = RotaryEmbedding(c.rope, c.head_dim, c.max_position_embeddings, length, self.device, dtype)
        if c.local_rope is not None:
            self.local_rotary = RotaryEmbedding(
                c.local_rope, c.head_dim, c.max_position_embeddings, length, self.device, dtype
            )

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embedding: rows of the embedding (columns of a tied float output matrix)."""
        x = self.lm_head.columns(ids) if self.embed is None else self.embed(ids)
        if self.embed_scale is not None:
            x = x * self.embed_scale.to(x.dtype)
        return x

    def forward(
        self, ids: torch.Tensor, cache: KVCache, start: int, *, last_only: bool = False, rope_length: int = 0
    ) -> torch.Tensor:
        """Run tokens `ids` [n] at positions [start, start+n), writing their K/V into `cache`.

        `rope_length`, when larger than start + n, is the length the sequence reaches in this
        request (a chunked prefill's total): the length-dependent RoPE variants (dynamic, longrope)
        then choose as transformers does over the request in one pass.
        Returns logits [n, vocab] (or [1, vocab] with last_only) in the model's dtype.
        """
        assert self.rotary is not None, "setup_rotary() first"
        length = max(start + ids.shape[0], rope_length)
        if self.rotary.long_after is not None:
            self._match_longrope(cache, start, length)
        x = self._decoder(ids, cache, start, length)
        if last_only:
            x = x[-1:]
        logits = self.lm_head(self.norm(x))
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def _decoder(self, ids: torch.Tensor, cache: KVCache, start: int, length: int) -> torch.Tensor:
        """Hidden states after the last layer for `ids` at positions [start, start+n)."""
        assert self.rotary is not None
        end = start + ids.shape[0]
        tables = [self.rotary.tables(start, end, length)]
        if self.local_rotary is not None:
            tables.append(self.local_rotary.tables(start, end, length))
        x = self.embed_tokens(ids)
        for block in self.layers:
            x = block(x, tables, cache, start)
        return x

    def _match_longrope(self, cache: KVCache, start: int, length: int) -> None:
        """Re-run the cached prefix when this pass switches LongRoPE between short and long factors.

        transformers' Phi-3 drops its cache and recomputes the whole sequence the first time it
        grows past original_max_position_embeddings (`prepare_inputs_for_generation`), so every
        position is computed with the factors the sequence's current length selects. The same
        holds here, in both directions (rewinding below the original length after a long turn
        recomputes with the short factors), which keeps a reused prefix equal to a fresh prefill.
        The prefix ids come from `cache.tokens`; it is re-run in chunks to bound attention memory.
        """
        assert self.rotary is not None and self.rotary.long_after is not None
        long = length > self.rotary.long_after
        if start > 0 and long != (cache in self._longrope_caches):
            prefix = cache.tokens[:start]
            assert len(prefix) == start, "the cache must record the ids of its positions"
            for begin in range(0, start, RECOMPUTE_CHUNK):
                chunk = torch.tensor(prefix[begin : begin + RECOMPUTE_CHUNK], dtype=torch.long, device=self.device)
                self._decoder(chunk, cache, begin, length)
        if long:
            self._longrope_caches.add(cache)
        else:
            self._longrope_caches.discard(cache)


# ---------------------------------------------------------------------------------------------
# Checkpoint names → internal layout

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "input_layernorm.weight": ("attn_norm.weight", None),
    "post_attention_layernorm.weight": ("mlp_norm.weight", None),
    "self_attn.q_proj.weight": ("attn.qkv.weight", 0),
    "self_attn.k_proj.weight": ("attn.qkv.weight", 1),
    "self_attn.v_proj.weight": ("attn.qkv.weight", 2),
    "self_attn.q_proj.bias": ("attn.qkv.bias", 0),
    "self_attn.k_proj.bias": ("attn.qkv.bias", 1),
    "self_attn.v_proj.bias": ("attn.qkv.bias", 2),
    "self_attn.o_proj.weight": ("attn.o.weight", None),
    "self_attn.o_proj.bias": ("attn.o.bias", None),
    "self_attn.q_norm.weight": ("attn.q_norm.weight", None),
    "self_attn.k_norm.weight": ("attn.k_norm.weight", None),
    "self_attn.sinks": ("attn.sinks", None),  # gpt-oss
    "mlp.gate_proj.weight": ("mlp.gate_up.weight", 0),
    "mlp.up_proj.weight": ("mlp.gate_up.weight", 1),
    "mlp.gate_proj.bias": ("mlp.gate_up.bias", 0),
    "mlp.up_proj.bias": ("mlp.gate_up.bias", 1),
    "mlp.down_proj.weight": ("mlp.down.weight", None),
    "mlp.down_proj.bias": ("mlp.down.bias", None),
    # Phi-3 stores q/k/v and gate/up fused already, in the order the engine fuses them.
    "self_attn.qkv_proj.weight": ("attn.qkv.weight", None),
    "mlp.gate_up_proj.weight": ("mlp.gate_up.weight", None),
    # LFM2's names (no other family uses them): its norms, q/k norms, output projection, MLP, and
    # the short convolution of its recurrent layers
    "operator_norm.weight": ("attn_norm.weight", None),
    "ffn_norm.weight": ("mlp_norm.weight", None),
    "self_attn.out_proj.weight": ("attn.o.weight", None),
    "self_attn.q_layernorm.weight": ("attn.q_norm.weight", None),
    "self_attn.k_layernorm.weight": ("attn.k_norm.weight", None),
    "feed_forward.w1.weight": ("mlp.gate_up.weight", 0),
    "feed_forward.w3.weight": ("mlp.gate_up.weight", 1),
    "feed_forward.w2.weight": ("mlp.down.weight", None),
    "conv.in_proj.weight": ("conv.in_proj.weight", None),
    "conv.in_proj.bias": ("conv.in_proj.bias", None),
    "conv.out_proj.weight": ("conv.out_proj.weight", None),
    "conv.out_proj.bias": ("conv.out_proj.bias", None),
    "conv.conv.weight": ("conv.weight", None),
    "conv.conv.bias": ("conv.bias", None),
    # Qwen3.5's Gated DeltaNet: its four input projections fused as q|k|v, z, b, a (delta_net.py)
    "linear_attn.in_proj_qkv.weight": ("delta.qkvzba.weight", 0),
    "linear_attn.in_proj_z.weight": ("delta.qkvzba.weight", 1),
    "linear_attn.in_proj_b.weight": ("delta.qkvzba.weight", 2),
    "linear_attn.in_proj_a.weight": ("delta.qkvzba.weight", 3),
    "linear_attn.conv1d.weight": ("delta.conv_weight", None),
    "linear_attn.dt_bias": ("delta.dt_bias", None),
    "linear_attn.A_log": ("delta.A_log", None),
    "linear_attn.norm.weight": ("delta.norm_weight", None),
    "linear_attn.out_proj.weight": ("delta.out_proj.weight", None),
    # Granite 4's Mamba-2 layers (mamba2.py); its MoE and shared MLP names are moe.expert_part's
    "mamba.in_proj.weight": ("mamba.in_proj.weight", None),
    "mamba.in_proj.bias": ("mamba.in_proj.bias", None),
    "mamba.conv1d.weight": ("mamba.conv_weight", None),
    "mamba.conv1d.bias": ("mamba.conv_bias", None),
    "mamba.dt_bias": ("mamba.dt_bias", None),
    "mamba.A_log": ("mamba.A_log", None),
    "mamba.D": ("mamba.D", None),
    "mamba.norm.weight": ("mamba.norm_weight", None),
    "mamba.out_proj.weight": ("mamba.out_proj.weight", None),
    "mamba.out_proj.bias": ("mamba.out_proj.bias", None),
}
# With sandwich norms (Gemma 2/3), post_attention_layernorm norms the attention output and the
# MLP's input norm is pre_feedforward_layernorm.
_SANDWICH_NAMES = {
    "post_attention_layernorm.weight": ("attn_post_norm.weight", None),
    "pre_feedforward_layernorm.weight": ("mlp_norm.weight", None),
    "post_feedforward_layernorm.weight": ("mlp_post_norm.weight", None),
}
# GLM-4 names its sandwich norms its own way; its post_attention_layernorm is the MLP's input norm.
_GLM_NORM_NAMES = {
    "post_self_attn_layernorm.weight": ("attn_post_norm.weight", None),
    "post_mlp_layernorm.weight": ("mlp_post_norm.weight", None),
}
# OLMo 2, EXAONE 4 (norm_after): post_attention_layernorm norms the attention output, and there is
# no norm in front of either branch.
_NORM_AFTER_NAMES = {
    "post_attention_layernorm.weight": ("attn_post_norm.weight", None),
    "post_feedforward_layernorm.weight": ("mlp_post_norm.weight", None),
}
# Multimodal checkpoints (config._TEXT_MODELS): the language model's tensors under these prefixes
# (transformers 5 saves Qwen3.5 as model.language_model.*, Gemma 3 as language_model.model.*), the
# vision tower's and projector's, which are not loaded, under the others.
_LANGUAGE_MODEL_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
_VISION_PREFIXES = (
    "model.visual.",
    "visual.",
    "vision_tower.",
    "model.vision_tower.",
    "multi_modal_projector.",
    "model.multi_modal_projector.",
)
_FUSED_PARTS = {"qkv": 3, "gate_up": 2, "qkvzba": 4}  # by the module's own name (the shared expert's gate_up too)


def _fused_count(target: str) -> int:
    """How many checkpoint tensors an internal fused weight is made of (a GGUF's stack of experts'
    gate|up: its two stacks)."""
    if is_expert_target(target):
        return 2
    return _FUSED_PARTS[target.rsplit(".", 2)[-2]]


def internal_name(
    name: str, tied: bool, sandwich_norms: bool = False, glm_norm_names: bool = False, *, norm_after: bool = False
) -> tuple[str, int | None] | None:
    """(internal name, part index within a fused tensor) for a checkpoint tensor; None to skip.

    `sandwich_norms`: Gemma's norm names; `glm_norm_names`: GLM-4's (ModelConfig.glm_norm_names);
    `norm_after`: OLMo 2's and EXAONE 4's (ModelConfig.norm_after)."""
    if name.startswith(_VISION_PREFIXES):  # a multimodal checkpoint's vision tower (config._TEXT_MODELS)
        return None
    for prefix, replacement in _LANGUAGE_MODEL_PREFIXES:
        if name.startswith(prefix):
            name = replacement + name.removeprefix(prefix)
            break
    if name == "model.embed_tokens.weight":
        return ("lm_head.weight" if tied else "embed.weight"), None
    if name == "lm_head.weight":
        return None if tied else ("lm_head.weight", None)
    if name in ("model.norm.weight", "model.embedding_norm.weight"):  # LFM2 calls its final norm so
        return "norm.weight", None
    match = _LAYER.match(name)
    names = {**_LAYER_NAMES, **_SANDWICH_NAMES} if sandwich_norms else _LAYER_NAMES
    if glm_norm_names:
        names = {**_LAYER_NAMES, **_GLM_NORM_NAMES}
    if norm_after:
        names = {**_LAYER_NAMES, **_NORM_AFTER_NAMES}
    if match and match.group(2) in names:
        target, part = names[match.group(2)]
        return f"layers.{match.group(1)}.{target}", part
    expert = expert_part(match.group(2)) if match else None
    if match and expert is not None:
        return f"layers.{match.group(1)}.{expert[0]}", expert[1]
    if name.endswith("rotary_emb.inv_freq") or name.startswith("mtp."):  # Qwen3.5's multi-token prediction head
        return None
    raise ModelLoadError(f"unexpected tensor {name!r} in the checkpoint (not part of this architecture)")


def packing_plan(quantized: dict[str, str], config: ModelConfig) -> dict[str, tuple[str, frozenset[str]]]:
    """Which internal matrices to keep packed, and how, from the checkpoint's quantized tensor types.

    `quantized` maps checkpoint names to GGUF types (WeightSource.quantized_types); the plan maps
    internal weight names to (layout, the types they come from). A fused matrix takes the layout
    all its parts allow (see packed.layout_for); a matrix with a float part stays float; a shape
    the int4 kernel cannot tile takes int8; the output projection takes OUTPUT_LAYOUT (float32
    logits). The layouts are final: loading builds exactly these.
    """
    sources: dict[str, set[str]] = {}
    parts: dict[str, int] = {}  # quantized pieces seen per matrix
    fused: set[str] = set()
    # [out, in] of every matrix; a stack of experts packs each expert's [out, in] alike (moe.PackedExperts)
    shapes = matrix_shapes(config) | {name: shape[1:] for name, shape in expert_shapes(config).items()}
    for name, kind in quantized.items():
        mapped = internal_name(
            name, config.tie_word_embeddings, config.sandwich_norms, config.glm_norm_names, norm_after=config.norm_after
        )
        # the MoE router is not in the shapes: it is dequantized at load
        if mapped is not None and mapped[0] in shapes:
            target, part = mapped
            sources.setdefault(target, set()).add(kind)
            parts[target] = parts.get(target, 0) + 1
            if part is not None:
                fused.add(target)
    # a matrix fused from parts some of which are stored as floats stays float
    partly_float = {t for t in fused if parts[t] < _fused_count(t)}
    plan: dict[str, tuple[str, frozenset[str]]] = {}
    for target, kinds in sources.items():
        layout = layout_for(kinds, output=target == "lm_head.weight")
        if layout is None or target == "embed.weight" or target in partly_float:
            continue
        if layout == "int4" and not fits_int4(*shapes[target]):
            layout = "int8"
        plan[target] = (layout, frozenset(kinds))
    return plan


def build_transformer(
    config: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    context_length: int,
    packed: dict[str, tuple[str, frozenset[str]]] | None = None,
    embedding: nn.Module | None = None,
) -> Transformer:
    """Build the model from checkpoint tensors, casting each once to `dtype` on `device`.

    The module is created on the meta device and the loaded tensors are assigned in place, so no
    throwaway random initialization is ever allocated. Fused tensors (qkv, gate_up) are
    concatenated as their parts arrive; projection matrices get the layout `Linear` prefers.
    Matrices named in `packed` (internal weight name -> (layout, source types), see `packing_plan`) become
    PackedLinear as soon as they are complete, so the float copy of one matrix is the most that is
    ever held besides the packed ones. `embedding`: the module that serves token rows (see
    Transformer); an untied checkpoint's embedding matrix is then not needed. A tied model whose
    output matrix is packed needs one: packed matrices are multiplied, not read by rows.
    """
    packed = packed or {}
    if config.tie_word_embeddings and "lm_head.weight" in packed and embedding is None:
        raise ValueError("a tied model with a packed output matrix needs an embedding module for its rows")
    transposed = transposed_layout(device, dtype)
    with torch.device("meta"):
        model = Transformer(config, transposed=transposed, embedding=embedding)
    expected = dict(model.state_dict())
    projections = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Linear)}
    state: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    expert_parts: dict[str, dict[int, torch.Tensor]] = {}  # stacked MoE experts (moe.assemble)
    packed_modules: dict[str, PackedLinear] = {}
    packed_experts: dict[str, PackedExperts] = {}  # stacks of experts kept packed, by internal name
    for name, tensor in tensors:
        mapped = internal_name(
            name, config.tie_word_embeddings, config.sandwich_norms, config.glm_norm_names, norm_after=config.norm_after
        )
        if mapped is None:
            continue
        target, part = mapped
        if target == "embed.weight" and embedding is not None:
            continue
        if target not in expected:
            raise ModelLoadError(f"tensor {name!r} does not fit this configuration")
        if config.experts_in_out_interleaved:  # gpt-oss's transformers layout (moe.from_in_out_interleaved)
            tensor = from_in_out_interleaved(name, tensor)
        tensor = tensor.to(device=device, dtype=torch.float32 if target in packed else dtype)
        if is_expert_target(target):  # stacked [experts, out, in]
            if part is not None:
                pieces = expert_parts.setdefault(target, {})
                pieces[part] = tensor
                check_expert_parts(target, pieces, config.num_experts)
                stacked = assemble(target, pieces, config.num_experts)
                if stacked is None:
                    continue
                tensor = stacked
                del expert_parts[target]
            if target in packed:  # packed expert by expert, from the checkpoint's [out, in]
                _check_shape(target, tensor.transpose(1, 2) if transposed else tensor, expected[target], False)
                layout, sources = packed[target]
                packed_experts[target] = PackedExperts.pack(tensor, layout, sources)
                state[target] = expected[target]  # stands in until the stack is swapped below
                continue
            state[target] = tensor.transpose(1, 2).contiguous() if transposed and tensor.dim() == 3 else tensor
            _check_shape(target, state[target], expected[target], transposed=False)
            continue
        if part is not None:
            parts.setdefault(target, {})[part] = tensor
            count = _fused_count(target)
            if len(parts[target]) < count:
                continue
            pieces = parts.pop(target)
            tensor = torch.cat([pieces[i] for i in range(count)], dim=0)
        if target in packed:  # packed from the checkpoint's [out, in], never transposed
            _check_shape(target, tensor, expected[target], transposed and target in projections)
            layout, sources = packed[target]
            packed_modules[target.removesuffix(".weight")] = PackedLinear(tensor, None, layout, sources)
            state[target] = expected[target]  # stands in until the module is swapped below
            continue
        state[target] = tensor.t().contiguous() if transposed and target in projections else tensor
        _check_shape(target, state[target], expected[target], transposed=False)
    if parts or expert_parts:
        incomplete = dict.fromkeys(parts, "") | {
            target: f" ({missing_experts(target, pieces, config.num_experts)})"
            for target, pieces in expert_parts.items()
        }
        named = ", ".join(f"{target}{lacking}" for target, lacking in sorted(incomplete.items()))
        raise ModelLoadError(f"checkpoint is missing parts of {named}")
    missing = [k for k in expected if k not in state]
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
    for stack_name, stack in packed_experts.items():
        del state[stack_name]
        set_packed_stack(model, stack_name, stack)
    for module_name, module in packed_modules.items():
        del state[f"{module_name}.weight"]
        bias = state.pop(f"{module_name}.bias", None)
        if bias is not None:
            module.bias = nn.Parameter(bias.float(), requires_grad=False)
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    result = model.load_state_dict(state, strict=False, assign=True)
    left = [
        k
        for k in result.missing_keys
        if k.rsplit(".", 1)[0] not in packed_modules and k.split(".experts.", 1)[0] not in packed_experts
    ]
    if left or result.unexpected_keys:
        raise ModelLoadError(f"checkpoint does not fit the model: {(left or result.unexpected_keys)[0]!r}")
    model.setup_rotary(context_length)
    return model.eval().requires_grad_(False)


def _check_shape(key: str, tensor: torch.Tensor, expected: torch.Tensor, transposed: bool) -> None:
    """The tensor has the shape the model expects (`transposed`: the model holds it [in, out])."""
    shape = tuple(expected.shape)[::-1] if transposed else tuple(expected.shape)
    if tuple(tensor.shape) != shape:
        raise ModelLoadError(f"tensor {key!r} has shape {tuple(tensor.shape)}, config expects {shape}")
