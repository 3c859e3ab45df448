"""The Transformer: one decoder-only model class for every supported architecture.

The parts, in the order a token meets them:
  token embedding (× a scale for Gemma, Granite) → N × [RMSNorm → attention (fused QKV, optional q/k
  norm, RoPE, GQA, KV cache, optional sliding window, optional score soft-capping) → (Gemma: RMSNorm)
  → (Granite: × residual_scale) → residual add → RMSNorm → gated MLP (or a mixture of experts, moe.py)
  → (Gemma: RMSNorm) → (Granite: × residual_scale) → residual add] → final RMSNorm → output projection
  (logits, optionally scaled and soft-capped). OLMo 2 and EXAONE 4 drop the two norms in front of
  the branches and keep the two after them (norm_after).
Hybrid models mix tokens in some layers with a recurrent kind instead of attention (short_conv.py,
delta_net.py, mamba2.py; `Block.mixer`). Architectures differ only through ModelConfig fields;
checkpoint.py maps every family's checkpoint names to this one layout (q/k/v and gate/up fused into
one matmul each, which decoding likes), plans which matrices stay packed, and builds the model.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llmchat.engine import fused_decode, q4kernel
from llmchat.engine.config import ModelConfig
from llmchat.engine.delta_net import GatedDeltaNet
from llmchat.engine.errors import ModelLoadError
from llmchat.engine.kv_cache import KVCache
from llmchat.engine.mamba2 import Mamba2
from llmchat.engine.moe import MoE
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
    if n == 1 and q.device.type == "cpu":
        return decode_attention(q, keys, values, mask, scale)
    return F.scaled_dot_product_attention(
        q[None], keys[None], values[None], attn_mask=mask, scale=scale, enable_gqa=True
    )[0]


def decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """A decode step's attention on CPU (one query a head): two grouped matrix products, each KV head's
    cached keys and values read once for its group of query heads, the softmax in float32.

    Why not SDPA: its fused CPU kernel splits work by query blocks, and with one query it took 3.5 ms a
    layer at 4096 cached tokens against 0.5 ms so (demo shape: 9 query heads on 3 KV heads, 2 cores).
    In float32, llmchat's kernel (q4kernel.Int4Kernel.attention) does the two products in one pass over
    the rows each, split by positions between the threads: 0.68 ms a layer through torch.bmm at 4110
    cached tokens (9 GB/s; small-M products on cold rows), against the figure in the README."""
    heads, _, head_dim = q.shape
    kv_heads = keys.shape[0]
    if q.dtype == keys.dtype == values.dtype == torch.float32 and _rows_contiguous(keys, values):
        kernel = q4kernel.available()
        if kernel is not None:
            return kernel.attention(q, keys, values, mask, head_dim**-0.5 if scale is None else scale)
    grouped = q.reshape(kv_heads, heads // kv_heads, head_dim)
    scores = torch.bmm(grouped, keys.transpose(1, 2)).float()
    scores.mul_(head_dim**-0.5 if scale is None else scale)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.bmm(weights, values).view(heads, 1, head_dim)


def _rows_contiguous(*tensors: torch.Tensor) -> bool:
    """[KV, L, D] views whose rows of D are contiguous (what llmchat's attention kernel reads)."""
    return all(t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in tensors)


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


def attention_probs(
    q: torch.Tensor,
    keys: torch.Tensor,
    start: int,
    window: int | None,
    scale: float | None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    key_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention weights the paths above apply, in float32: [heads, n, keys] for queries at
    [start, start + n) over the cached keys, and a sink's share per head and query (gpt-oss), or None.

    The inspector's view of attention (the fused SDPA kernel never materializes them); the same
    order as the eager paths: scale, soft cap, mask, the sink column, softmax.
    """
    heads, n, head_dim = q.shape
    kv_heads, end = keys.shape[0], keys.shape[1]
    group = heads // kv_heads
    scores = (q.float().reshape(kv_heads, group * n, head_dim) @ keys.float().transpose(1, 2)).view(heads, n, end)
    scores = scores * (head_dim**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    mask = attention_mask(start, n, window, q.device, key_positions)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        return scores.softmax(-1), None
    column = sinks.float().view(heads, 1, 1).expand(heads, n, 1)
    probs = torch.cat((scores, column), dim=-1).softmax(-1)
    return probs[..., :end], probs[..., end]


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
        # the attribute holding it, looked up once: `mixer` runs in every layer of every decode step
        self._mixer = {"attention": "attn", "conv": "conv", "linear_attention": "delta", "mamba": "mamba"}[kind]
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
        return self._modules[self._mixer]  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, rope: RopeTables, cache: KVCache, start: int) -> torch.Tensor:
        cos, sin = rope[self.rope_index]
        if x.shape[0] == 1 and x.dtype == torch.float32 and x.device.type == "cpu" and self.attn is not None:
            fused = fused_decode.plan(self, cache)  # a decode step in two kernel calls (fused_decode.py)
            if fused is not None and cos.shape[-1] == self.attn.head_dim:
                return fused(x, cos, sin, start)
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
        return self.output(x[-1:] if last_only else x)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from hidden states [n, hidden]: the final norm, the output projection, Cohere's and
        Granite's scale and Gemma 2's soft cap. The inspector's logit lens applies it to the residual
        stream after any layer."""
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
