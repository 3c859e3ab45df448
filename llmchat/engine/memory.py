"""Memory math (what a model will cost) and measured usage (what it costs now).

The predicted bill is weights + KV cache + a fixed overhead for activations and the runtime;
the measured side is VRAM on CUDA and the process RSS plus tensor bytes on CPU.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass

import torch

from llmchat.engine.config import ModelConfig

GiB = 1024**3
CPU_KV_BUDGET = 4 * GiB  # default cap on the KV cache on CPU, before the RAM share below
CPU_KV_RAM_SHARE = 0.25
CUDA_KV_FREE_SHARE = 0.5
RUNTIME_OVERHEAD = 300 * 1024**2  # torch runtime, activations of a prefill chunk, tokenizer


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
    per_layer = attn + mlp + 2 * c.hidden_size
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return c.num_layers * per_layer + embeddings + c.hidden_size


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
    weights: int
    kv_cache: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead


def estimate(config: ModelConfig, dtype: torch.dtype, context_length: int) -> MemoryEstimate:
    return MemoryEstimate(
        weights=parameter_count(config) * dtype_bytes(dtype),
        kv_cache=kv_bytes_per_token(config, dtype) * context_length,
        overhead=RUNTIME_OVERHEAD,
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
    """Peak resident set size of this process so far."""
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
