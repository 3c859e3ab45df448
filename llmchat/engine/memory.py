"""Memory math (what a model will cost) and measured usage (what it costs now).

The predicted bill is weights + KV cache + a fixed overhead for activations and the runtime;
the measured side is VRAM on CUDA and the process RSS plus tensor bytes on CPU.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch

from llmchat.engine.config import ModelConfig
from llmchat.engine.packed import DEQUANTIZE_FROM_ROWS, packed_bytes

GiB = 1024**3
CPU_KV_BUDGET = 4 * GiB  # default cap on the KV cache on CPU, before the RAM share below
CPU_KV_RAM_SHARE = 0.25
CUDA_KV_FREE_SHARE = 0.5
# Resident memory of Python + torch + tokenizers before any model (measured: 225 MB RSS on CPU
# after `import llmchat`). On CUDA the bill is torch's allocator, which the runtime is not part of.
CPU_RUNTIME_BYTES = 240 * 1024**2


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """Keys + values of every layer for one position."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype_bytes(dtype)


def parameter_count(config: ModelConfig) -> int:
    """Parameters implied by the config (tied embeddings counted once)."""
    c = config
    attn = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
    attn += (c.q_size + 2 * c.kv_size) * c.qkv_bias + c.hidden_size * c.o_bias + 2 * c.head_dim * c.qk_norm
    mlp = 3 * c.hidden_size * c.intermediate_size + (2 * c.intermediate_size + c.hidden_size) * c.mlp_bias
    per_layer = attn + mlp + (4 if c.sandwich_norms else 2) * c.hidden_size  # Gemma norms each branch twice
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return c.num_layers * per_layer + embeddings + c.hidden_size


def matrix_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """[out, in] of every projection, under the internal names packing plans use."""
    c = config
    shapes = {"lm_head.weight": (c.vocab_size, c.hidden_size)}
    for i in range(c.num_layers):
        shapes[f"layers.{i}.attn.qkv.weight"] = (c.q_size + 2 * c.kv_size, c.hidden_size)
        shapes[f"layers.{i}.attn.o.weight"] = (c.hidden_size, c.q_size)
        shapes[f"layers.{i}.mlp.gate_up.weight"] = (2 * c.intermediate_size, c.hidden_size)
        shapes[f"layers.{i}.mlp.down.weight"] = (c.hidden_size, c.intermediate_size)
    return shapes


def weight_bytes(config: ModelConfig, dtype: torch.dtype, packed: dict[str, tuple[str, frozenset[str]]]) -> int:
    """Bytes of the loaded weights: `dtype` floats, except the matrices a packing plan keeps packed."""
    total = parameter_count(config) * dtype_bytes(dtype)
    shapes = matrix_shapes(config)
    for target, (layout, _) in packed.items():
        out, inner = shapes[target]
        total += packed_bytes(layout, out, inner) - out * inner * dtype_bytes(dtype)
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
    fits = budget // kv_bytes_per_token(config, dtype)
    if fits >= model_context_length(config):
        return model_context_length(config)
    return max(256, fits - fits % 256)


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory bill of a model at one context length, in bytes."""

    weights: int
    kv_cache: int  # what llmchat allocates: every layer holds the whole context
    kv_cache_windowed: int  # the least a cache needs when sliding-window layers keep only their window
    activations: int  # one prefill chunk through a layer, plus the logits
    runtime: int  # the framework itself (CPU: Python + torch resident memory)
    load_transient: int  # while loading: the largest tensor as read plus its fused/transposed copy

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
) -> MemoryEstimate:
    """The bill for a model loaded with `dtype` weights (and the matrices in `packed` packed).

    `runtime`: the framework's resident memory when the caller knows it (a process that has
    imported torch and read the package but loaded no weights measures itself); else a constant.
    """
    kv_per_token = kv_bytes_per_token(config, kv_dtype or dtype)
    per_layer = kv_per_token // config.num_layers
    windowed = sum(
        per_layer * min(context_length, config.layer_window(i) or context_length) for i in range(config.num_layers)
    )
    chunk = min(prefill_chunk, context_length)
    c = config
    largest = max(
        c.vocab_size * c.hidden_size,
        c.hidden_size * (c.q_size + 2 * c.kv_size),
        2 * c.hidden_size * c.intermediate_size,
    )
    activations = activation_bytes(config, dtype, chunk, context_length)
    if packed and chunk >= DEQUANTIZE_FROM_ROWS:  # a prefill chunk dequantizes one matrix at a time
        shapes = matrix_shapes(config)
        activations += max((shapes[t][0] * shapes[t][1] for t in packed if t != "lm_head.weight"), default=0) * 4
    return MemoryEstimate(
        weights=weight_bytes(config, dtype, packed or {}),
        kv_cache=kv_per_token * context_length,
        kv_cache_windowed=windowed,
        activations=activations,
        runtime=(CPU_RUNTIME_BYTES if runtime is None else runtime) if device_type == "cpu" else 0,
        load_transient=2 * largest * dtype_bytes(dtype),
    )


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, shared tensors counted once."""
    seen: set[int] = set()
    total = 0
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
