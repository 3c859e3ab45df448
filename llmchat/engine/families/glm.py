"""Zhipu's GLM-4: interleaved partial RoPE and sandwich RMSNorms under GLM's names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmchat.engine.families.base import BLOCK_NAMES, Family, Raw

if TYPE_CHECKING:
    from llmchat.engine.gguf import GGUFFile


def _gguf(file: GGUFFile, raw: Raw) -> Raw:
    rope_dims, head_dim = file.key("rope.dimension_count"), raw.get("head_dim")
    if rope_dims and head_dim:
        return {"partial_rotary_factor": rope_dims / head_dim}  # even 1.0: GLM-4's default is 0.5
    return {}


GLM4 = Family(
    "glm4",
    "glm4",
    ("Glm4ForCausalLM",),
    o_bias=False,
    interleaved_rope=True,
    defaults={
        "head_dim": 128,
        "num_key_value_heads": 2,
        "partial_rotary_factor": 0.5,
        "attention_bias": True,
        "rms_norm_eps": 1.5625e-07,
        "max_position_embeddings": 131072,
        "eos_token_id": [151329, 151336, 151338],
    },
    # its sandwich norms are post_self_attn_layernorm and post_mlp_layernorm, and
    # post_attention_layernorm is the MLP's input norm (ModelConfig.glm_norm_names)
    fields=lambda raw, layers, source: {"sandwich_norms": True, "glm_norm_names": True},
    gguf="glm4",
    # gate|up fused in ffn_up; ffn_norm (HF's post_attention_layernorm) is the MLP's input norm,
    # post_attention_norm / post_ffw_norm norm the attention's and the MLP's outputs.
    gguf_names=BLOCK_NAMES
    | {
        "ffn_up": "mlp.gate_up_proj",
        "post_attention_norm": "post_self_attn_layernorm",
        "post_ffw_norm": "post_mlp_layernorm",
    },
    gguf_config=_gguf,
)

FAMILIES = (GLM4,)
