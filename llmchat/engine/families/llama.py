"""Llama and the families converted to GGUF as llama (Mistral, Mixtral) or by LlamaModel's subclasses
(SmolLM3), and Phi-3."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmchat.engine.errors import ModelLoadError
from llmchat.engine.families.base import (
    BLOCK_NAMES,
    MOE_BLOCK_NAMES,
    Family,
    Raw,
    attention_layer_types,
    every_layer_moe,
    unpermute_qk,
)

if TYPE_CHECKING:
    from llmchat.engine.gguf import GGUFFile


def _llama_gguf(file: GGUFFile, raw: Raw) -> Raw:
    """A llama file with experts is Mixtral (convert_hf_to_gguf.py writes Mixtral as llama)."""
    experts = file.experts()
    if experts is None:
        return {}
    experts.require_every_layer(file)
    window = file.key("attention.sliding_window")
    return experts.keys() | {
        "architectures": ["MixtralForCausalLM"],
        "intermediate_size": experts.width,
        "sliding_window": window or None,
    }


LLAMA = Family(
    "llama",
    "llama",
    ("LlamaForCausalLM",),
    mlp_bias=True,
    gguf="llama",
    gguf_names=MOE_BLOCK_NAMES,  # Mixtral's experts
    gguf_config=_llama_gguf,
    gguf_values=unpermute_qk,
)
MISTRAL = Family("mistral", "mistral", ("MistralForCausalLM",), qkv_bias=False, o_bias=False, sliding="all")
MIXTRAL = Family(
    "mixtral",
    "mixtral",
    ("MixtralForCausalLM",),
    qkv_bias=False,
    o_bias=False,
    sliding="all",
    defaults={"rms_norm_eps": 1e-5, "num_local_experts": 8, "num_experts_per_tok": 2},
    fields=lambda raw, layers, source: every_layer_moe(raw, layers, source, mixtral=True),
)


def _smollm3_fields(raw: Raw, num_layers: int, source: str) -> dict[str, Any]:
    """SmolLM3Config: `no_rope_layers` (1 = RoPE, 0 = none; at least one entry per layer), else a NoPE
    layer every `no_rope_layer_interval` layers (layer i rotates unless (i + 1) % interval == 0); with
    `use_sliding_window`, the layers of `layer_types` slide, else the NoPE ones."""
    given = raw.get("no_rope_layers")
    if given is not None:
        if len(given) < num_layers:
            raise ModelLoadError(f"{source}: no_rope_layers has {len(given)} entries for {num_layers} layers")
        rope_layers = tuple(bool(flag) for flag in given[:num_layers])
    else:
        interval = int(raw.get("no_rope_layer_interval") or 4)
        rope_layers = tuple((i + 1) % interval != 0 for i in range(num_layers))
    fields: dict[str, Any] = {"rope_layers": rope_layers}
    window = raw.get("sliding_window")
    if window is not None and raw.get("use_sliding_window", False):
        sliding = attention_layer_types(raw, num_layers, source) or tuple(not r for r in rope_layers)
        fields |= {"sliding_window": int(window), "sliding_layers": sliding}
    return fields


# llama.cpp hard-codes SmolLM3's NoPE layers (hparams.n_no_rope_layer_step = 4, no GGUF key): every 4th
# layer skips RoPE, and it has no sliding window for this architecture.
_SMOLLM3_NO_ROPE_STEP = 4

SMOLLM3 = Family(
    "smollm3",
    "smollm3",
    ("SmolLM3ForCausalLM",),
    mlp_bias=True,
    defaults={
        "max_position_embeddings": 32768,
        "rope_theta": 2_000_000.0,
        "no_rope_layer_interval": 4,
        "tie_word_embeddings": True,
    },
    fields=_smollm3_fields,
    gguf="smollm3",
    gguf_config=lambda file, raw: {"no_rope_layer_interval": _SMOLLM3_NO_ROPE_STEP},
    gguf_values=unpermute_qk,
)


def _phi3_gguf(file: GGUFFile, raw: Raw) -> Raw:
    return {"sliding_window": file.key("attention.sliding_window") or None}  # Phi-4 writes 0 for "no window"


PHI3 = Family(
    "phi3",
    "phi3",
    ("Phi3ForCausalLM",),
    qkv_bias=False,
    o_bias=False,
    sliding="all",
    rope_aliases={"su": "longrope", "yarn": "longrope"},  # what early Phi-3 configs called it
    defaults={"rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "original_max_position_embeddings": 4096},
    gguf="phi3",
    # Phi-3 keeps its fused projections: attn_qkv is q|k|v, ffn_up is gate|up.
    gguf_names=BLOCK_NAMES | {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    gguf_config=_phi3_gguf,
)

FAMILIES = (LLAMA, MISTRAL, MIXTRAL, SMOLLM3, PHI3)
