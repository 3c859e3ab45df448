"""Cohere's Command R7B (cohere2): a parallel block after one LayerNorm, sliding layers that rotate
and full ones that attend without positions, logits times `logit_scale`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmchat.engine.families.base import Family, Raw, pattern_layers, sliding_from_pattern

if TYPE_CHECKING:
    from llmchat.engine.gguf import GGUFFile

_PATTERN = 4  # every 4th layer full (Cohere2Config's sliding_window_pattern, llama.cpp's default)


def _fields(raw: Raw, num_layers: int, source: str) -> dict[str, Any]:
    """Cohere2Attention rotates only in the layers that slide (those given a window)."""
    sliding = pattern_layers(raw, num_layers, source, _PATTERN, "sliding_window_pattern")
    window = raw.get("sliding_window")
    return {
        "parallel_block": True,
        "layer_norm": True,
        "logit_scale": float(raw["logit_scale"]),
        "rope_layers": tuple(slides and bool(window) for slides in sliding),
    }


def _gguf(file: GGUFFile, raw: Raw) -> Raw:
    """LayerNorm epsilon, logit scale and sliding layout, as llama.cpp reads them; the output matrix
    is always the token embedding."""
    sliding = sliding_from_pattern(file, _PATTERN)
    return {
        "layer_norm_eps": file.key("attention.layer_norm_epsilon"),
        "logit_scale": file.key("logit_scale"),
        "sliding_window": file.key("attention.sliding_window"),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "tie_word_embeddings": True,
    }


COHERE2 = Family(
    "cohere2",
    "cohere2",
    ("Cohere2ForCausalLM",),
    sliding="pattern",
    window_pattern=_PATTERN,
    window_pattern_key="sliding_window_pattern",
    interleaved_rope=True,
    rope_float32=True,  # transformers' Cohere 2 rotates q and k in float32
    eps_key="layer_norm_eps",
    defaults={
        "layer_norm_eps": 1e-5,
        "logit_scale": 0.0625,
        "sliding_window": 4096,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 5,
        "eos_token_id": 255001,
    },
    fields=_fields,
    gguf="cohere2",
    gguf_config=_gguf,
)

FAMILIES = (COHERE2,)
