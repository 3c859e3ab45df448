"""Gemma 2 and Gemma 3: (1 + w) norms, scaled embeddings, sandwich norms, soft-capping (Gemma 2),
sliding layers with a RoPE of their own (Gemma 3)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from llmchat.engine.errors import ModelLoadError
from llmchat.engine.families.base import BLOCK_NAMES, Family, Raw, sliding_from_pattern

if TYPE_CHECKING:
    from llmchat.engine.config import ModelConfig
    from llmchat.engine.gguf import GGUFFile


def _gemma_fields(raw: Raw, num_layers: int, source: str, *, attention_softcap: bool) -> dict[str, Any]:
    """ModelConfig fields that make the shared layer a Gemma layer. transformers' Gemma 3 attention never
    passes `attn_logit_softcapping` on, so only Gemma 2 caps its scores. The MLP reads
    `hidden_activation` (`hidden_act` is a leftover that transformers ignores)."""
    if raw.get("use_bidirectional_attention"):
        raise ModelLoadError(f"{source}: bidirectional attention (an embedding model) is not supported")
    final_cap = raw.get("final_logit_softcapping")
    attn_cap = raw.get("attn_logit_softcapping") if attention_softcap else None
    return {
        "hidden_act": str(raw.get("hidden_activation") or "gelu_pytorch_tanh"),
        "norm_offset": 1.0,
        "embed_scale": math.sqrt(int(raw["hidden_size"])),
        "sandwich_norms": True,
        "attn_scale": float(raw["query_pre_attn_scalar"]) ** -0.5,
        "attn_softcap": float(attn_cap) if attn_cap else None,
        "final_softcap": float(final_cap) if final_cap else None,
    }


# Where llama.cpp puts the sliding layers without a sliding_window_pattern key (set_swa_pattern)
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # these scale queries by hidden/heads, not head_dim
_LOCAL_ROPE_BASE = 10000.0


def _gemma_gguf(file: GGUFFile, raw: Raw) -> Raw:
    """Soft-capping, sliding-window layout, local RoPE base and query scale, as llama.cpp reads them."""
    arch = file.architecture
    layers = int(file.key("block_count") or 0)
    window = file.key("attention.sliding_window")
    sliding = sliding_from_pattern(file, _SWA_PATTERN[arch])
    if not window:
        window, sliding = None, [False] * layers
    hidden, heads = raw.get("hidden_size"), raw.get("num_attention_heads")
    scalar = hidden // heads if layers == _27B_LAYERS[arch] and hidden and heads else raw.get("head_dim")
    return {
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "attn_logit_softcapping": file.key("attn_logit_softcapping"),
        "final_logit_softcapping": file.key("final_logit_softcapping"),
        "query_pre_attn_scalar": scalar,
        "sliding_window": window,
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_local_base_freq": file.key("rope.freq_base_swa", _LOCAL_ROPE_BASE) if arch == "gemma3" else None,
    }


def _gemma_values(config: ModelConfig, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
    if hf_name.endswith("norm.weight"):
        return tensor - 1.0  # Gemma's RMSNorm scales by 1 + w; llama.cpp stores 1 + w
    return tensor


# Gemma normalizes before and after both attention and MLP: llama.cpp's ffn_norm is the norm in front
# of the MLP there, and the norm after attention has a name of its own.
_GGUF_NAMES = BLOCK_NAMES | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_DEFAULTS = {
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "tie_word_embeddings": True,
}

GEMMA2 = Family(
    "gemma2",
    "gemma2",
    ("Gemma2ForCausalLM",),
    sliding="pattern",
    window_pattern=2,
    defaults={
        **_DEFAULTS,
        "max_position_embeddings": 8192,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    },
    fields=lambda raw, layers, source: _gemma_fields(raw, layers, source, attention_softcap=True),
    gguf="gemma2",
    gguf_names=_GGUF_NAMES,
    gguf_config=_gemma_gguf,
    gguf_values=_gemma_values,
)
GEMMA3 = Family(
    "gemma3_text",
    "gemma3",
    ("Gemma3ForCausalLM",),
    multimodal_classes=("Gemma3ForConditionalGeneration",),
    qk_norm=True,
    sliding="pattern",
    window_pattern=6,
    window_pattern_key="sliding_window_pattern",
    local_rope=True,
    defaults={
        **_DEFAULTS,
        "max_position_embeddings": 131072,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
    },
    fields=lambda raw, layers, source: _gemma_fields(raw, layers, source, attention_softcap=False),
    gguf="gemma3",
    gguf_names=_GGUF_NAMES,
    gguf_config=_gemma_gguf,
    gguf_values=_gemma_values,
)

FAMILIES = (GEMMA2, GEMMA3)
