"""AI2's OLMo 2 (norms after attention and MLP, q/k norms over the whole projection) and OLMoE."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmchat.engine.errors import ModelLoadError
from llmchat.engine.families.base import MOE_BLOCK_NAMES, NORM_AFTER_BLOCK_NAMES, Family, Raw, every_layer_moe

if TYPE_CHECKING:
    from llmchat.engine.gguf import GGUFFile


def _olmo2_gguf(file: GGUFFile, raw: Raw) -> Raw:
    if file.key("attention.sliding_window") is not None:
        # convert_hf_to_gguf.py writes OLMo 3 as olmo2 too, with a window: not OLMo 2's layout
        raise ModelLoadError(f"{file.path}: an olmo2 file with a sliding window (OLMo 3) is not supported")
    return {}


def _olmoe_gguf(file: GGUFFile, raw: Raw) -> Raw:
    """OLMoE: experts in every layer, as wide as feed_forward_length, never renormalized by default."""
    experts = file.experts()
    if experts is None:
        return {}
    experts.require_every_layer(file)
    return experts.keys() | {
        "norm_topk_prob": bool(file.key("expert_weights_norm", False)),
        "intermediate_size": experts.width,
        "clip_qkv": file.key("attention.clamp_kqv"),
    }


OLMO2 = Family(
    "olmo2",
    "olmo2",
    ("Olmo2ForCausalLM",),
    qk_norm=True,
    qk_norm_whole=True,
    norm_after=True,
    float32_norm_and_rope=True,
    defaults={"rms_norm_eps": 1e-5, "max_position_embeddings": 2048},
    gguf="olmo2",
    gguf_names=NORM_AFTER_BLOCK_NAMES,  # attn_q_norm / attn_k_norm span the whole projection here
    gguf_config=_olmo2_gguf,
)
OLMOE = Family(
    "olmoe",
    "olmoe",
    ("OlmoeForCausalLM",),
    qk_norm=True,
    qk_norm_whole=True,
    defaults={
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096,
        "num_local_experts": 64,  # OlmoeConfig's num_experts (num_local_experts is its alias)
        "num_experts_per_tok": 8,
    },
    fields=every_layer_moe,
    gguf="olmoe",
    gguf_names=MOE_BLOCK_NAMES,  # attn_q_norm / attn_k_norm span the whole projection here
    gguf_config=_olmoe_gguf,
)

FAMILIES = (OLMO2, OLMOE)
