"""OpenAI's gpt-oss: attention sinks, alternating sliding layers, YaRN, and experts with biases and a
clamped SwiGLU (MXFP4 in its GGUF files, dequantized at load: gguf_tensors)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmchat.engine.families.base import MOE_BLOCK_NAMES, Family, Raw, expert_counts, require

if TYPE_CHECKING:
    from llmchat.engine.gguf import GGUFFile


def _fields(raw: Raw, num_layers: int, source: str) -> dict[str, Any]:
    """Every layer sparse, intermediate_size wide, router and experts with biases, the softmax over
    the k chosen router logits, the clamped SwiGLU; transformers' fused expert parameters are
    [experts, in, out] with gate and up interleaved."""
    experts, used = expert_counts(raw, source)
    return {
        "num_experts": experts,
        "num_experts_per_tok": used,
        "moe_intermediate_size": int(require(raw, "intermediate_size", source)),
        "moe_layers": (experts > 0,) * num_layers,
        "moe_bias": True,
        "moe_softmax_topk": True,
        "swiglu_limit": float(raw["swiglu_limit"]),
        "swiglu_alpha": float(raw["swiglu_alpha"]),
        "experts_in_out_interleaved": True,
    }


def _gguf(file: GGUFFile, raw: Raw) -> Raw:
    """llama.cpp's openai-moe: experts in every layer, as wide as expert_feed_forward_length; even
    layers slide (llama.cpp's set_swa_pattern(2), GptOssConfig's default layer_types).

    Its yarn RoPE is written as type, factor and original length only: the rest are GptOssConfig's
    (beta_fast 32, beta_slow 1) and its `truncate: false`, which no GGUF key carries (llama.cpp
    itself always rounds the correction range, ggml_rope_yarn_corr_dims, so it rotates a few
    frequencies slightly differently from transformers; llmchat follows transformers). A file
    without rope scaling keys rotates without scaling (not GptOssConfig's default yarn).
    """
    keys: Raw = {"sliding_window": file.key("attention.sliding_window")}
    experts = file.experts()
    if experts is not None:
        experts.require_every_layer(file)
        keys |= experts.keys() | {"intermediate_size": experts.width}
    if file.key("rope.scaling.type") == "yarn":
        keys["rope_scaling"] = {**raw["rope_scaling"], "truncate": False}
    elif file.key("rope.scaling.type") in (None, "none"):
        keys["rope_scaling"] = {"rope_type": "default"}
    return keys


# GptOssConfig: head_dim 64 (not hidden / heads), q/k/v/o biases, even layers slide (layer_types
# otherwise), yarn RoPE without truncation when the config names no rope parameters.
GPT_OSS = Family(
    "gpt_oss",
    "gpt_oss",
    ("GptOssForCausalLM",),
    sliding="pattern",
    window_pattern=2,
    sinks=True,
    default_rope={
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
    },
    defaults={
        "head_dim": 64,
        "attention_bias": True,
        "sliding_window": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 150000.0,
        "max_position_embeddings": 131072,
        "num_local_experts": 128,
        "num_experts_per_tok": 4,
        "intermediate_size": 2880,
        "swiglu_alpha": 1.702,
        "swiglu_limit": 7.0,
    },
    fields=_fields,
    gguf="gpt-oss",
    # its router is mlp.router, post_attention_norm the MLP's input norm (HF's post_attention_layernorm),
    # attn_sinks one logit per head; the experts' biases are *_exps.bias.
    gguf_names=MOE_BLOCK_NAMES
    | {
        "ffn_gate_inp": "mlp.router",
        "post_attention_norm": "post_attention_layernorm",
        "attn_sinks": "self_attn.sinks",
    },
    gguf_config=_gguf,
)

FAMILIES = (GPT_OSS,)
