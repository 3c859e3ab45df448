"""A decode step's plain decoder layer in two calls of llmchat's kernel (q4kernel.c) instead of some
thirty tensor operations.

Why: on a small model the decode step is dominated by the cost of launching operations, not by the
arithmetic: the demo's 30 layers ran ~25 torch operations and 4 kernel calls each, 3-5 us apiece, for
a step of ~21 ms of which the matrix products were ~5 ms. A layer that is exactly Llama's (RMSNorm,
attention with half-split RoPE over a full float32 cache, RMSNorm, SiLU-gated MLP, int4 matrices,
optional biases, Qwen3's per-head q/k RMSNorm) runs as `llmchat_decode_layer_in` (norm, q/k/v, RoPE,
cache write, scores), torch's softmax, and `llmchat_decode_layer_out` (values, output projection,
residual, norm, MLP, residual).

The arithmetic is the module path's (the same int4 x int8 products, float32 elsewhere; sums in another
order), so the logits agree with it within float32 rounding (tests/test_fused_decode.py). Any other
layer, a layer whose modules carry hooks (the inspector's views), or llmchat's kernel switched off:
the modules run as before.
"""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from llmchat.engine import q4kernel
from llmchat.engine.packed import PackedLinear

if TYPE_CHECKING:
    from llmchat.engine.kv_cache import KVCache
    from llmchat.engine.model import Block


class _Int4Matrix(ctypes.Structure):
    _fields_ = [
        ("nibbles", ctypes.c_void_p),
        ("scales", ctypes.c_void_p),
        ("zeros", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
    ]


class _DecodeLayer(ctypes.Structure):
    _fields_ = [
        ("qkv", _Int4Matrix),
        ("o", _Int4Matrix),
        ("gate_up", _Int4Matrix),
        ("down", _Int4Matrix),
        ("attn_norm", ctypes.c_void_p),
        ("mlp_norm", ctypes.c_void_p),
        ("q_norm", ctypes.c_void_p),
        ("k_norm", ctypes.c_void_p),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("hidden", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("intermediate", ctypes.c_int64),
        ("keys", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
        ("head_stride", ctypes.c_int64),
        ("normed", ctypes.c_void_p),
        ("qkv_out", ctypes.c_void_p),
        ("scores", ctypes.c_void_p),
        ("attended", ctypes.c_void_p),
        ("partial", ctypes.c_void_p),
        ("branch", ctypes.c_void_p),
        ("gate_up_out", ctypes.c_void_p),
        ("product", ctypes.c_void_p),
    ]


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


class FusedLayer:
    """One block's decode step through the kernel; holds every tensor whose address it passes."""

    def __init__(self, block: Block, cache: KVCache, index: int, kernel: q4kernel.Int4Kernel) -> None:
        from llmchat.engine.model import MLP

        attn, mlp = block.attn, block.mlp
        assert attn is not None
        self.kernel = kernel
        self.heads, self.head_dim = attn.num_heads, attn.head_dim
        # a mixture of experts runs as its module after the kernel's attention half (`experts`)
        self.experts = None if isinstance(mlp, MLP) else (block.mlp_norm, mlp)
        # the modules whose hooks (an inspector's) send the step through the modules instead
        self.mlp_modules = [mlp, block.mlp_norm, mlp.gate_up, mlp.down] if isinstance(mlp, MLP) else []
        hidden = attn.o.out_features
        intermediate = mlp.intermediate if isinstance(mlp, MLP) else 0
        capacity = cache.keys.shape[2]
        self._held: list[torch.Tensor | None] = []
        matrices = {name: _Int4Matrix() for name in ("gate_up", "down")}  # NULL: no MLP in the kernel
        linears = [("qkv", attn.qkv), ("o", attn.o)]
        if isinstance(mlp, MLP):
            linears += [("gate_up", mlp.gate_up), ("down", mlp.down)]
        for name, layer in linears:
            scales, zeros = layer._row_scales()
            bias = None if layer.bias is None else layer.bias.detach()
            self._held += [layer.nibbles, scales, zeros, bias]
            pointers = (layer.nibbles.data_ptr(), scales.data_ptr(), _pointer(zeros), _pointer(bias))
            matrices[name] = _Int4Matrix(*pointers, layer.out_features, layer.in_features)
        threads = max(os.cpu_count() or 1, torch.get_num_threads())
        sizes = {
            "normed": hidden,
            "qkv_out": attn.qkv.out_features,
            "scores": self.heads * capacity,
            "attended": self.heads * self.head_dim,
            "partial": threads * self.heads * self.head_dim,
            "branch": hidden,
            "gate_up_out": 2 * intermediate,
            "product": intermediate,
        }
        # one set for all the layers of the cache's model (they run one after the other)
        shared: dict[tuple[str, int], torch.Tensor] = cache.__dict__.setdefault("_fused_scratch", {})
        for key in sizes.items():
            if key not in shared:
                shared[key] = torch.empty(key[1])
        scratch = {name: shared[name, size] for name, size in sizes.items()}
        self._scores = scratch["scores"]
        keys, values = cache.keys[index], cache.values[index]  # [kv_heads, capacity, head_dim]
        head_norms = [None if norm is None else norm.weight for norm in (attn.q_norm, attn.k_norm)]
        mlp_norm = block.mlp_norm.weight if self.experts is None else None  # type: ignore[union-attr]
        self._held += [block.attn_norm.weight, mlp_norm, *head_norms, keys, values, *scratch.values()]  # type: ignore[union-attr]
        self.layer = _DecodeLayer(
            matrices["qkv"],
            matrices["o"],
            matrices["gate_up"],
            matrices["down"],
            block.attn_norm.weight.data_ptr(),  # type: ignore[union-attr]
            _pointer(mlp_norm),
            *(_pointer(weight) for weight in head_norms),
            block.attn_norm.eps,  # type: ignore[union-attr]
            self.head_dim**-0.5 if attn.scale is None else attn.scale,
            hidden,
            self.heads,
            attn.num_kv_heads,
            self.head_dim,
            intermediate,
            keys.data_ptr(),
            values.data_ptr(),
            capacity * self.head_dim,
            *(tensor.data_ptr() for tensor in scratch.values()),
        )
        self.hidden = hidden

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: int) -> torch.Tensor:
        """x [1, hidden] float32 at `position`, cos/sin [1, head_dim]: the layer's output [1, hidden]."""
        threads = torch.get_num_threads()
        x = x.contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        library = self.kernel.library
        layer = ctypes.addressof(self.layer)
        library.llmchat_decode_layer_in(layer, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), position, threads)
        length = position + 1
        weights = torch.softmax(self._scores[: self.heads * length].view(self.heads, length), dim=-1)
        y = torch.empty((1, self.hidden))
        library.llmchat_decode_layer_out(layer, x.data_ptr(), weights.data_ptr(), position, y.data_ptr(), threads)
        if self.experts is not None:
            norm, experts = self.experts
            y = y + experts(norm(y))
        return y


def _hooked(*modules: torch.nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def plan(block: Block, cache: KVCache) -> FusedLayer | None:
    """The block's fused decode step for this cache, made once (and again for a new cache), or None
    where the layer is not exactly what the kernel computes (see the module docstring)."""
    cached = block.__dict__.get("_fused")
    if cached is not None and cached[0] is cache.keys:
        fused = cached[1]
    else:
        fused = _make(block, cache)
        block.__dict__["_fused"] = (cache.keys, fused)
    if fused is None:
        return None
    attn = block.attn
    assert attn is not None
    if _hooked(attn, block.attn_norm, attn.qkv, attn.o, *fused.mlp_modules):
        return None
    return fused


def _make(block: Block, cache: KVCache) -> FusedLayer | None:
    from llmchat.engine.model import MLP, Attention, RMSNorm
    from llmchat.engine.moe import MoE

    kernel = q4kernel.available()
    attn, mlp = block.attn, block.mlp
    if kernel is None or not isinstance(attn, Attention) or block._mixer != "attn":
        return None
    if block.parallel or block.attn_post_norm is not None or block.mlp_post_norm is not None:
        return None
    if block.residual_scale is not None or not isinstance(mlp, MLP | MoE):
        return None
    norms = [block.attn_norm]
    linears = [attn.qkv, attn.o]
    if isinstance(mlp, MLP):  # in the kernel; a mixture of experts runs as its module after it
        if mlp.act is not F.silu:
            return None
        norms.append(block.mlp_norm)
        linears += [mlp.gate_up, mlp.down]
    if attn.q_norm is not None or attn.k_norm is not None:  # Qwen3's, of each head: the same RMSNorm
        norms += [attn.q_norm, attn.k_norm]
    if attn.qk_norm_whole or not all(type(norm) is RMSNorm and norm.weight.dtype == torch.float32 for norm in norms):
        return None
    if len({norm.eps for norm in norms}) != 1:  # type: ignore[union-attr]
        return None
    plain = not (attn.output_gate or attn.clip is not None or attn.sinks is not None)
    if not plain or attn.softcap is not None or not attn.rotates or attn.interleaved or attn.rotate_float32:
        return None
    if attn.window is not None or attn.head_dim % 2:
        return None
    if not all(isinstance(layer, PackedLinear) and layer.layout == "int4" for layer in linears):
        return None
    in_ring, index = cache._where[attn.layer]
    if in_ring or cache.keys.dtype != torch.float32 or cache.keys.device.type != "cpu":
        return None
    if not (cache.keys.is_contiguous() and cache.values.is_contiguous()):
        return None
    return FusedLayer(block, cache, index, kernel)
