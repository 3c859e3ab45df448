"""Memory math (what a model will cost) and measured usage (what it costs now).

The predicted bill is weights + KV cache + a fixed overhead for activations and the runtime;
the measured side is VRAM on CUDA and the process RSS plus tensor bytes on CPU.
"""

from __future__ import annotations

import math
import os
import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch

from llmchat.engine.config import ModelConfig
from llmchat.engine.delta_net import delta_net_state
from llmchat.engine.kv_cache import StateSpec, slot_counts
from llmchat.engine.mamba2 import mamba_state, mamba_widths
from llmchat.engine.packed import DEQUANTIZE_FROM_ROWS, packed_bytes
from llmchat.engine.short_conv import conv_state

GiB = 1024**3
CPU_KV_BUDGET = 4 * GiB  # default cap on the KV cache on CPU, before the RAM share below
CPU_KV_RAM_SHARE = 0.25
CUDA_KV_FREE_SHARE = 0.5
# Resident memory of Python + torch + tokenizers before any model (measured: 225 MB RSS on CPU
# after `import llmchat`). On CUDA the bill is torch's allocator, which the runtime is not part of.
CPU_RUNTIME_BYTES = 240 * 1024**2
# Bytes per weight of the largest matrix held while it loads: a float matrix as read plus its fused
# or transposed copy (2 x dtype); a packed one as read in float32 (4) plus, while dequantizing, the
# file's blocks and their codes (about 2), plus the int8 codes it is packed from (1: the output
# projection, the largest matrix, does not keep them). Measured on Gemma 3 270M's Q8_0 262144x640
# output matrix: peak RSS 1938 MiB = 320 before loading + weights 484 + 1134 (predicted 1120).
PACKED_LOAD_BYTES = 7


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Keys + values of every attention layer for one position (a hybrid's recurrent layers keep none)."""
    return 2 * len(config.attention_layers) * config.num_kv_heads * config.head_dim * dtype_bytes(dtype)


def kv_cache_bytes(config: ModelConfig, dtype: torch.dtype, context_length: int) -> int:
    """What the KV cache for `context_length` positions allocates (sliding layers: their ring), plus
    the recurrent layers' fixed states."""
    windows = [config.layer_window(i) for i in config.attention_layers]
    per_layer = 2 * config.num_kv_heads * config.head_dim * dtype_bytes(dtype)
    return per_layer * sum(slot_counts(windows, context_length)) + recurrent_state_bytes(config, dtype)


def recurrent_states(config: ModelConfig) -> dict[int, tuple[StateSpec, ...]]:
    """The state tensors each recurrent layer of a hybrid model keeps instead of keys and values."""
    kinds = {"conv": conv_state, "linear_attention": delta_net_state, "mamba": mamba_state}
    return {i: kinds[kind](config) for i in range(config.num_layers) if (kind := config.layer_kind(i)) in kinds}


def recurrent_state_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the recurrent layers' states: fixed, whatever the context length (0 without them)."""
    specs = [spec for layer in recurrent_states(config).values() for spec in layer]
    return sum(math.prod(spec.shape) * (4 if spec.float32 else dtype_bytes(dtype)) for spec in specs)


def parameter_count(config: ModelConfig) -> int:
    """Parameters implied by the config (tied embeddings counted once)."""
    c = config
    attn = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
    attn += (c.q_size + 2 * c.kv_size) * c.qkv_bias + c.hidden_size * c.o_bias
    attn += ((c.q_size + c.kv_size) if c.qk_norm_whole else 2 * c.head_dim) * c.qk_norm  # OLMoE: whole-projection norms
    dense = 3 * c.hidden_size * c.intermediate_size + (2 * c.intermediate_size + c.hidden_size) * c.mlp_bias
    sparse = c.num_experts * (c.hidden_size + 3 * c.hidden_size * c.moe_intermediate_size)  # router + experts
    shared = 3 * c.shared_expert_intermediate_size + c.shared_expert_gate  # Granite 4's shared MLP has no gate
    sparse += c.hidden_size * shared * bool(c.shared_expert_intermediate_size)
    sparse += c.num_experts * (c.moe_bias + _expert_biases(c))  # gpt-oss: router and expert biases
    attn += c.num_heads * c.attn_sinks  # gpt-oss: a sink logit per head
    norms = 4 if c.sandwich_norms else 1 if c.parallel_block else 2  # Gemma, GLM-4: twice per branch; Cohere 2: one
    attn += c.hidden_size * c.q_size * c.attn_output_gate  # Qwen3.5's output gate
    # LFM2's short convolution in place of attention: in/out projections and one filter per channel
    conv = c.hidden_size * (4 * c.hidden_size + c.conv_kernel) + 5 * c.hidden_size * c.conv_bias
    # Qwen3.5's DeltaNet: fused in projection, conv filters, dt_bias and A_log, gated norm, out projection
    values = c.linear_value_heads * c.linear_value_dim
    conv_channels = 2 * c.linear_key_heads * c.linear_key_dim + values
    delta = c.hidden_size * (_delta_in_rows(c) + values) + conv_channels * c.conv_kernel
    delta += 2 * c.linear_value_heads + c.linear_value_dim
    # Granite 4's Mamba-2: in projection, conv filters (and biases), dt_bias, A_log and D, gated norm, out projection
    inner, channels, rows = mamba_widths(c)
    mamba = c.hidden_size * (rows + inner) + channels * (c.conv_kernel + c.conv_bias) + 3 * c.ssm_heads + inner
    mamba += (rows + c.hidden_size) * c.ssm_proj_bias
    kinds = {"conv": conv, "linear_attention": delta, "mamba": mamba}
    mixers = sum(kinds.get(c.layer_kind(i), attn) for i in range(c.num_layers))
    mlps = sum(sparse if c.is_moe_layer(i) else dense for i in range(c.num_layers))
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return mixers + c.num_layers * norms * c.hidden_size + mlps + embeddings + c.hidden_size


def active_parameter_count(config: ModelConfig) -> int:
    """Parameters one token uses: a mixture of experts runs num_experts_per_tok of its experts
    (and its shared expert, which every token runs)."""
    c = config
    idle = (c.num_experts - c.num_experts_per_tok) * (3 * c.hidden_size * c.moe_intermediate_size + _expert_biases(c))
    return parameter_count(config) - idle * sum(c.is_moe_layer(i) for i in range(c.num_layers))


def _expert_biases(c: ModelConfig) -> int:
    """Bias entries of one expert (gpt-oss: gate, up and down); 0 where experts have none."""
    return (2 * c.moe_intermediate_size + c.hidden_size) * c.moe_bias


def _delta_in_rows(c: ModelConfig) -> int:
    """Rows of a DeltaNet layer's fused input projection: q, k, v, the gate z, b and a."""
    return 2 * c.linear_key_heads * c.linear_key_dim + 2 * c.linear_value_heads * (c.linear_value_dim + 1)


def matrix_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """[out, in] of every projection, under the internal names packing plans use."""
    c = config
    shapes = {"lm_head.weight": (c.vocab_size, c.hidden_size)}
    for i in range(c.num_layers):
        if c.layer_kind(i) == "conv":  # LFM2's short convolution (short_conv.py)
            shapes[f"layers.{i}.conv.in_proj.weight"] = (3 * c.hidden_size, c.hidden_size)
            shapes[f"layers.{i}.conv.out_proj.weight"] = (c.hidden_size, c.hidden_size)
        elif c.layer_kind(i) == "linear_attention":  # Qwen3.5's Gated DeltaNet (delta_net.py)
            shapes[f"layers.{i}.delta.qkvzba.weight"] = (_delta_in_rows(c), c.hidden_size)
            shapes[f"layers.{i}.delta.out_proj.weight"] = (c.hidden_size, c.linear_value_heads * c.linear_value_dim)
        elif c.layer_kind(i) == "mamba":  # Granite 4's Mamba-2 (mamba2.py)
            inner, _, rows = mamba_widths(c)
            shapes[f"layers.{i}.mamba.in_proj.weight"] = (rows, c.hidden_size)
            shapes[f"layers.{i}.mamba.out_proj.weight"] = (c.hidden_size, inner)
        else:
            q_rows = c.q_size * (2 if c.attn_output_gate else 1)  # Qwen3.5: a gate per query head
            shapes[f"layers.{i}.attn.qkv.weight"] = (q_rows + 2 * c.kv_size, c.hidden_size)
            shapes[f"layers.{i}.attn.o.weight"] = (c.hidden_size, c.q_size)
        if c.shared_expert_intermediate_size and not c.shared_expert_gate:  # Granite 4: beside experts or alone
            width = c.shared_expert_intermediate_size
            shapes[f"layers.{i}.mlp.shared.gate_up.weight"] = (2 * width, c.hidden_size)
            shapes[f"layers.{i}.mlp.shared.down.weight"] = (c.hidden_size, width)
            continue
        if c.is_moe_layer(i):  # router: float; stacked experts: expert_shapes
            continue
        shapes[f"layers.{i}.mlp.gate_up.weight"] = (2 * c.intermediate_size, c.hidden_size)
        shapes[f"layers.{i}.mlp.down.weight"] = (c.hidden_size, c.intermediate_size)
    return shapes


def expert_shapes(config: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """[experts, out, in] of every stack of expert matrices (moe.py), under their internal names."""
    c = config
    shapes = {}
    for i in range(c.num_layers):
        if c.is_moe_layer(i):
            shapes[f"layers.{i}.mlp.gate_up_exps"] = (c.num_experts, 2 * c.moe_intermediate_size, c.hidden_size)
            shapes[f"layers.{i}.mlp.down_exps"] = (c.num_experts, c.hidden_size, c.moe_intermediate_size)
    return shapes


def _stacked_shapes(config: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """[count, out, in] of every packable entry: one matrix (matrix_shapes) or a stack of experts."""
    return {name: (1, *shape) for name, shape in matrix_shapes(config).items()} | expert_shapes(config)


def weight_bytes(
    config: ModelConfig,
    dtype: torch.dtype,
    packed: dict[str, tuple[str, frozenset[str]]],
    *,
    mapped_embedding: bool = False,
) -> int:
    """Bytes of the loaded weights: `dtype` floats, except the matrices a packing plan keeps packed.

    `mapped_embedding`: the token embedding is read from the GGUF file on demand (GGUFEmbedding),
    so it holds nothing; a tied one is the output projection's matrix, which counts either way.
    """
    total = parameter_count(config) * dtype_bytes(dtype)
    if mapped_embedding and not config.tie_word_embeddings:
        total -= config.vocab_size * config.hidden_size * dtype_bytes(dtype)
    shapes = _stacked_shapes(config)
    for target, (layout, sources) in packed.items():
        count, out, inner = shapes[target]
        total += count * (packed_bytes(layout, out, inner, sources) - out * inner * dtype_bytes(dtype))
    return total


def total_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * GiB


def model_context_length(config: ModelConfig) -> int:
    """The longest context the model is meant for: dynamic NTK scaling stretches the trained one."""
    if config.rope.type == "dynamic":
        return int(config.max_position_embeddings * config.rope.factor)
    return config.max_position_embeddings


def default_context_length(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> int:
    """The model's context, capped so the KV cache fits a memory budget.

    Budget: on CPU the smaller of 4 GiB and a quarter of RAM; on CUDA half the free VRAM.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * CUDA_KV_FREE_SHARE)
    else:
        budget = min(CPU_KV_BUDGET, int(total_ram_bytes() * CPU_KV_RAM_SHARE))
    longest = model_context_length(config)
    if kv_cache_bytes(config, dtype, longest) <= budget:
        return longest
    low, high = 1, longest // 256  # in steps of 256: the most that fit (a ring's cost stops growing)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if kv_cache_bytes(config, dtype, middle * 256) <= budget else (low, middle - 1)
    return 256 * low


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory bill of a model at one context length, in bytes."""

    weights: int
    kv_cache: int  # what llmchat allocates: full layers the whole context, sliding ones a ring (kv_cache.py)
    kv_cache_windowed: int  # the least any cache needs: sliding layers only their window, no slack
    activations: int  # one prefill chunk through a layer, plus the logits
    runtime: int  # the framework itself (CPU: Python + torch resident memory)
    load_transient: int  # while loading: the largest tensor as read plus its fused/transposed copy
    # bytes of the GGUF file the token embedding is read from on demand (GGUFEmbedding): counted as
    # 0 in the weights and the total; the pages its rows touch are resident while the OS caches them
    mapped: int = 0

    @property
    def overhead(self) -> int:
        return self.activations + self.runtime

    @property
    def total(self) -> int:
        """The peak: loading and serving never overlap (the KV cache is committed only as it fills)."""
        return self.weights + self.runtime + max(self.kv_cache + self.activations, self.load_transient)


def activation_bytes(config: ModelConfig, dtype: torch.dtype, chunk: int, context_length: int) -> int:
    """Peak transient memory of one prefill chunk: a layer's intermediate tensors, the attention
    mask and weights (the chunk against the whole cache), the rotary tables and the float32
    logits/probabilities of the sampler."""
    c, width = config, dtype_bytes(dtype)
    per_token = (
        4 * c.hidden_size  # residual stream, normed input, attention output, MLP output
        + c.q_size
        + 2 * c.kv_size  # fused q/k/v
        + 2 * (c.q_size + c.kv_size)  # rotated q and k, with rotate_half's temporary
        + 4 * c.intermediate_size  # fused gate/up, activation, product
    )
    keys = min(context_length, chunk + context_length)
    mask = chunk * keys
    scores = c.num_heads * chunk * keys * width  # attention weights of the chunk against the cache
    rotary = 2 * context_length * c.head_dim * width
    sampler = 4 * c.vocab_size * 4
    return chunk * per_token * width + mask + scores + rotary + sampler


def estimate(
    config: ModelConfig,
    dtype: torch.dtype,
    context_length: int,
    *,
    kv_dtype: torch.dtype | None = None,
    prefill_chunk: int = 512,
    device_type: str = "cpu",
    packed: dict[str, tuple[str, frozenset[str]]] | None = None,
    runtime: int | None = None,
    mapped_embedding: int = 0,
) -> MemoryEstimate:
    """The bill for a model loaded with `dtype` weights (and the matrices in `packed` packed).

    `runtime`: the framework's resident memory when the caller knows it (a process that has
    imported torch and read the package but loaded no weights measures itself); else a constant.
    `mapped_embedding`: bytes of the file the token embedding is read from on demand, 0 when it is
    loaded (runtime.mapped_embedding_bytes).
    """
    kv_per_token = kv_bytes_per_token(config, kv_dtype or dtype)
    per_layer = kv_per_token // max(1, len(config.attention_layers))
    windows = [config.layer_window(i) for i in config.attention_layers]
    windowed = sum(per_layer * min(context_length, w or context_length) for w in windows)
    windowed += recurrent_state_bytes(config, kv_dtype or dtype)
    chunk = min(prefill_chunk, context_length)
    c = config
    largest = max(
        c.vocab_size * c.hidden_size,
        c.hidden_size * (c.q_size + 2 * c.kv_size),
        2 * c.hidden_size * c.intermediate_size,
        2 * c.num_experts * c.hidden_size * c.moe_intermediate_size,  # a layer's stacked experts (gate|up)
    )
    activations = activation_bytes(config, dtype, chunk, context_length)
    if packed and chunk >= DEQUANTIZE_FROM_ROWS:  # a prefill chunk dequantizes one matrix at a time
        shapes = _stacked_shapes(config)
        dequantized = (shapes[t][1] * shapes[t][2] for t in packed if t != "lm_head.weight")  # one matrix at a time
        activations += max(dequantized, default=0) * 4
    return MemoryEstimate(
        weights=weight_bytes(config, dtype, packed or {}, mapped_embedding=mapped_embedding > 0),
        kv_cache=kv_cache_bytes(config, kv_dtype or dtype, context_length),
        kv_cache_windowed=windowed,
        activations=activations,
        runtime=(CPU_RUNTIME_BYTES if runtime is None else runtime) if device_type == "cpu" else 0,
        load_transient=largest * (PACKED_LOAD_BYTES if packed else 2 * dtype_bytes(dtype)),
        mapped=mapped_embedding,
    )


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, shared tensors counted once, plus what its
    submodules hold outside tensors (`opaque_bytes`: the packed output projection's FBGEMM matrices)."""
    seen: set[int] = set()
    total = sum(getattr(sub, "opaque_bytes", 0) for sub in module.modules())
    for tensor in list(module.parameters()) + list(module.buffers()):
        ptr = tensor.data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += tensor.nbytes
    return total


def rss_bytes() -> int:
    """Current resident set size of this process (0 where it cannot be read)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Linux's VmHWM first: `ru_maxrss` survives fork+exec, so a process started by a big parent
    (pytest with transformers loaded) would report the parent's peak as its own.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass(frozen=True)
class MemoryUsage:
    """Measured memory: VRAM on CUDA, process RSS on CPU."""

    kind: str  # "VRAM" or "RAM"
    used: int
    peak: int
    tensors: int  # weights + KV cache bytes held by the engine


def measure(device: torch.device, tensor_bytes: int) -> MemoryUsage:
    if device.type == "cuda":
        return MemoryUsage(
            "VRAM", torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device), tensor_bytes
        )
    return MemoryUsage("RAM", rss_bytes(), peak_rss_bytes(), tensor_bytes)


def release_freed_memory() -> None:
    """Hand memory that Python/torch freed back to the OS (glibc keeps freed heap chunks otherwise).

    Loading frees a float temporary per tensor (dequantized, fused, packed); glibc raises its mmap
    threshold after such frees and then keeps every later one in the heap, which left the demo's
    RSS 220 MB above its tensors. A no-op where glibc's malloc_trim is not available.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None
