"""ModelConfig: one normalized set of hyperparameters for every supported architecture.

Architectures differ by data, not by code: biases, q/k norms, sliding windows, rope scaling,
Gemma's norm offset and soft-capping are fields here, and `model.py` reads them. `from_hf_config`
accepts both config.json styles found in the wild: the old one (top-level `rope_theta`,
`rope_scaling`, `torch_dtype`) and the new one (`rope_parameters`, `dtype`), and fills in the
defaults transformers' config classes would when a key is absent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmchat.engine.errors import ModelLoadError, UnsupportedArchitectureError
from llmchat.engine.jsonfile import read_json_object

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: base frequency and an optional scaling variant."""

    theta: float = 10000.0
    type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn, longrope: scale applied to cos/sin
    mscale: float | None = None  # yarn (DeepSeek style): derives attention_factor
    mscale_all_dim: float | None = None
    truncate: bool = True  # yarn: round the correction range to whole dimensions
    partial_rotary_factor: float = 1.0
    # Cohere 2, GLM-4: rotate adjacent pairs (x0, x1), (x2, x3) ... of the rotary part instead of
    # (x_i, x_{i+d/2}); cos/sin repeat each frequency twice in a row.
    interleaved: bool = False
    float32: bool = False  # Cohere 2: q/k rotate in float32 and are rounded back (only for interleaved)
    # Per-frequency divisors stored with the weights (GGUF's `rope_freqs` tensor, which is how
    # llama.cpp ships llama3 scaling): inv_freq_i / freq_factors[i].
    freq_factors: tuple[float, ...] | None = None
    # longrope (Phi-3): per-frequency divisors for sequences within / beyond the original length.
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Everything the Transformer needs to know about a checkpoint."""

    # family name: llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, qwen3_moe, mixtral, olmoe, qwen2_moe, smollm3,
    # cohere2, glm4, granite, olmo2, exaone4, gpt_oss, lfm2, qwen3_5, granitemoehybrid
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections
    o_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3)
    qk_norm_whole: bool = False  # OLMoE: the q/k norms span the whole projection (q_size, kv_size), not a head
    clip_qkv: float | None = None  # OLMoE: q, k (after their norms) and v are clamped to [-clip, clip]
    attn_sinks: bool = False  # gpt-oss: a learned logit per head joins every softmax (takes mass, adds no value)
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # per layer: does it use the sliding window?
    rope_layers: tuple[bool, ...] = ()  # per layer: does it rotate q/k (SmolLM3's NoPE layers)? empty: all do
    dtype: str | None = None  # dtype the checkpoint was published in
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Gemma: norms scale by (norm_offset + weight) instead of weight, computed in float32.
    norm_offset: float = 0.0
    # Token embeddings are multiplied by it: Gemma's sqrt(hidden_size), Granite's embedding_multiplier
    embed_scale: float | None = None
    sandwich_norms: bool = False  # Gemma 2/3: a norm after attention and after the MLP as well
    norm_after: bool = False  # OLMo 2, EXAONE 4: each branch's output is normed, nothing before it
    # OLMo 2: norms multiply by their weight in float32 and cast after (Olmo2RMSNorm, as Gemma's do);
    # Llama's cast first. Only half precision rounds the two apart.
    norm_weight_in_float32: bool = False
    # OLMo 2: cos/sin stay float32 (Olmo2RotaryEmbedding never rounds them), so q/k rotate in float32
    rope_tables_float32: bool = False
    attn_scale: float | None = None  # softmax scale of attention; None means head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2: scores -> tanh(scores / c) * c before the mask
    final_softcap: float | None = None  # Gemma 2: the same on the output logits
    logit_scale: float | None = None  # Cohere 2, Granite (1 / logits_scaling): the output logits are multiplied by it
    residual_scale: float | None = None  # Granite: attention and MLP outputs times it before their residual add
    parallel_block: bool = False  # Cohere 2: x + attn(norm(x)) + mlp(norm(x)), one norm per layer
    layer_norm: bool = False  # Cohere 2: norms subtract the mean (a LayerNorm without bias), eps rms_norm_eps
    # GLM-4: its sandwich norms are post_self_attn_layernorm and post_mlp_layernorm, and
    # post_attention_layernorm is the MLP's input norm (Gemma names them otherwise)
    glm_norm_names: bool = False
    # Gemma 3: sliding layers rotate with their own (local) RoPE; None means every layer uses `rope`.
    local_rope: RopeConfig | None = None
    # Mixture of experts (Qwen3-MoE, Mixtral): 0 experts means every layer has the dense MLP.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # width of one expert's gated MLP
    norm_topk_prob: bool = False  # renormalize the chosen experts' router probabilities to sum 1
    moe_float_weights: bool = False  # Mixtral: expert outputs are weighted in float32, then rounded
    moe_layers: tuple[bool, ...] = ()  # per layer: sparse MoE block (True) or dense MLP
    # Qwen2-MoE: every sparse block also runs a shared expert of this width, scaled by a sigmoid gate
    shared_expert_intermediate_size: int = 0
    # gpt-oss: the router and every expert have biases; the softmax runs over the k chosen router logits
    # (top-k first); the experts' SwiGLU is clamped: (clamp(up, ±limit) + 1) * g * sigmoid(alpha * g),
    # g = clamp(gate, max=limit) (swiglu_limit None: the plain act(gate) * up)
    moe_bias: bool = False
    moe_softmax_topk: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    # gpt-oss: transformers' fused expert parameters are [experts, in, out], gate and up interleaved
    experts_in_out_interleaved: bool = False
    # Hybrid models: per layer, what mixes the tokens: "attention" (keys and values in a growing cache)
    # or "conv" (LFM2's gated short convolution: a fixed state, short_conv.py), "linear_attention" (Qwen3.5's
    # Gated DeltaNet, delta_net.py), "mamba" (Granite 4's Mamba-2, mamba2.py). Empty: every layer attends.
    layer_kinds: tuple[str, ...] = ()
    conv_kernel: int = 0  # LFM2's conv_L_cache, Qwen3.5's linear_conv_kernel_dim: positions a convolution sees
    conv_bias: bool = False  # LFM2: biases on the convolution and its projections
    # Qwen3.5's Gated DeltaNet layers (kind "linear_attention", delta_net.py): heads and their widths
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_dim: int = 0
    linear_value_dim: int = 0
    # Qwen3.5: q_proj also yields a gate per head (interleaved with the queries); the attention output
    # is multiplied by sigmoid(gate) before o_proj
    attn_output_gate: bool = False
    # Granite 4's Mamba-2 layers (kind "mamba", mamba2.py; conv_kernel and conv_bias are theirs too):
    # heads of head_dim, state_size wide B/C in groups, the SSD chunk, in/out projection biases and
    # the (low, high) clamp of the time step (time_step_limit)
    ssm_heads: int = 0
    ssm_head_dim: int = 0
    ssm_state_size: int = 0
    ssm_groups: int = 1
    ssm_chunk_size: int = 256
    ssm_proj_bias: bool = False
    ssm_dt_limit: tuple[float, float] = (0.0, math.inf)
    # Qwen2-MoE's shared expert is scaled by sigmoid(shared_gate(x)); Granite 4's shared MLP has no gate
    shared_expert_gate: bool = True

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer, or None when it attends to the whole context."""
        if self.sliding_window is None or not self.sliding_layers[layer]:
            return None
        return self.sliding_window

    def uses_rope(self, layer: int) -> bool:
        """Whether a layer rotates its queries and keys (SmolLM3 leaves some without position encoding)."""
        return not self.rope_layers or self.rope_layers[layer]

    def layer_kind(self, layer: int) -> str:
        """What mixes the tokens in a layer: "attention" or "conv" (see layer_kinds)."""
        return self.layer_kinds[layer] if self.layer_kinds else "attention"

    @property
    def attention_layers(self) -> list[int]:
        """The layers that keep keys and values (all but a hybrid model's recurrent ones)."""
        return [i for i in range(self.num_layers) if self.layer_kind(i) == "attention"]

    def is_moe_layer(self, layer: int) -> bool:
        """Whether a layer's MLP is a sparse mixture of experts."""
        return self.num_experts > 0 and bool(self.moe_layers) and self.moe_layers[layer]

    def uses_local_rope(self, layer: int) -> bool:
        """Whether a layer rotates with `local_rope` (Gemma 3's sliding layers) instead of `rope`."""
        return self.local_rope is not None and self.sliding_layers[layer]

    def with_changes(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


@dataclass(frozen=True)
class _Family:
    """What a model_type fixes that its config.json does not say."""

    name: str
    qkv_bias: bool | None = None  # None: the config's `attention_bias` decides
    o_bias: bool | None = None
    qk_norm: bool = False
    qk_norm_whole: bool = False  # OLMoE: q/k norms over the whole projection
    bias_key: str = "attention_bias"  # the config key that decides q/k/v (and o) biases when they are None
    # Which layers honour `sliding_window`: never | all | use_sliding_window (Qwen: a flag plus
    # max_window_layers) | use_sliding_window_all (Qwen3-MoE: the flag alone, then every layer) |
    # use_sliding_window_even (Qwen2-MoE: the flag, then the even layers below max_window_layers) |
    # pattern (Gemma: `layer_types`, else every `window_pattern`-th layer is full) |
    # use_sliding_window_nope (SmolLM3: the flag, then `layer_types`, else the layers without RoPE).
    sliding: str = "never"
    window_pattern: int = 0
    window_pattern_key: str | None = None  # config key that may override window_pattern
    gemma: bool = False  # (1 + w) norms, scaled embeddings, sandwich norms, query_pre_attn_scalar
    local_rope: bool = False  # Gemma 3: sliding layers have a RoPE of their own
    nope: bool = False  # SmolLM3: `no_rope_layers` (else every `no_rope_layer_interval`-th layer) skips RoPE
    norm_after: bool = False  # OLMo 2, EXAONE 4: norms after attention and MLP only (ModelConfig.norm_after)
    # EXAONE 4: with a window configured only the sliding layers rotate; the global ones attend without positions
    rope_on_sliding_only: bool = False
    float32_norm_and_rope: bool = False  # OLMo 2: norm weights and RoPE applied in float32, rounded after
    # Granite: embedding_multiplier, attention_multiplier (the softmax scale), residual_multiplier, logits_scaling
    granite: bool = False
    interleaved_rope: bool = False  # Cohere 2, GLM-4: RoPE rotates adjacent pairs (RopeConfig.interleaved)
    # Cohere 2: parallel attention + MLP after one LayerNorm (eps `layer_norm_eps`), logits times
    # `logit_scale`, and only the sliding layers rotate (full ones attend without positions)
    cohere: bool = False
    glm_norms: bool = False  # GLM-4: sandwich RMSNorms under GLM's names (ModelConfig.glm_norm_names)
    eps_key: str = "rms_norm_eps"  # the config key of the norms' epsilon
    # Hybrid: "lfm2" (`layer_types` of full_attention / conv, else `full_attn_idxs`; conv_L_cache,
    # conv_bias; norm_eps; the MLP width derived from block_ff_dim as LFM2's config class does) or
    # "qwen3_5" (`layer_types` of full_attention / linear_attention, else every
    # `full_attention_interval`-th layer attends; the linear_* widths; gated attention output) or
    # "granite4" (`layer_types` / `layers_block_type` of mamba / attention; the mamba_* widths).
    hybrid: str = ""
    rope_aliases: Mapping[str, str] = field(default_factory=dict)  # legacy rope type names
    # Mixture of experts: "" (dense), "qwen3_moe" (moe_intermediate_size, norm_topk_prob,
    # decoder_sparse_step, mlp_only_layers), "qwen2_moe" (the same plus a shared expert), "mixtral"
    # (every layer, intermediate_size, renormalized) or "olmoe" (every layer, intermediate_size, norm_topk_prob)
    # or "granite4" (every layer or none, softmax over the top k, an ungated shared MLP of shared_intermediate_size).
    moe: str = ""
    sinks: bool = False  # gpt-oss: attention sinks (ModelConfig.attn_sinks)
    # the rope parameters transformers' config class fills in when a config.json has none (gpt-oss: yarn)
    default_rope: Mapping[str, Any] | None = None
    # transformers' config-class defaults for keys a config.json may leave out
    defaults: Mapping[str, Any] = field(default_factory=dict)


_GEMMA_DEFAULTS = {
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "tie_word_embeddings": True,
}
_FAMILIES: dict[str, _Family] = {
    "llama": _Family("llama"),
    "mistral": _Family("mistral", qkv_bias=False, o_bias=False, sliding="all"),
    "qwen2": _Family("qwen2", qkv_bias=True, o_bias=False, sliding="use_sliding_window"),
    "qwen3": _Family("qwen3", qk_norm=True, sliding="use_sliding_window"),
    "gemma2": _Family(
        "gemma2",
        sliding="pattern",
        window_pattern=2,
        gemma=True,
        defaults={
            **_GEMMA_DEFAULTS,
            "max_position_embeddings": 8192,
            "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0,
        },
    ),
    "gemma3_text": _Family(
        "gemma3",
        qk_norm=True,
        sliding="pattern",
        window_pattern=6,
        window_pattern_key="sliding_window_pattern",
        gemma=True,
        local_rope=True,
        defaults={
            **_GEMMA_DEFAULTS,
            "max_position_embeddings": 131072,
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
        },
    ),
    "qwen3_moe": _Family(
        "qwen3_moe",
        qk_norm=True,
        sliding="use_sliding_window_all",
        moe="qwen3_moe",
        defaults={"num_experts_per_tok": 8, "moe_intermediate_size": 768, "decoder_sparse_step": 1},
    ),
    "mixtral": _Family(
        "mixtral",
        qkv_bias=False,
        o_bias=False,
        sliding="all",
        moe="mixtral",
        defaults={"rms_norm_eps": 1e-5, "num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    "olmoe": _Family(
        "olmoe",
        qk_norm=True,
        qk_norm_whole=True,
        moe="olmoe",
        defaults={
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 4096,
            "num_local_experts": 64,  # OlmoeConfig's num_experts (num_local_experts is its alias)
            "num_experts_per_tok": 8,
        },
    ),
    "qwen2_moe": _Family(
        "qwen2_moe",
        o_bias=False,
        bias_key="qkv_bias",
        sliding="use_sliding_window_even",
        moe="qwen2_moe",
        defaults={
            "qkv_bias": True,
            "sliding_window": 4096,
            "max_window_layers": 28,
            "num_experts_per_tok": 4,
            "moe_intermediate_size": 1408,
            "shared_expert_intermediate_size": 5632,
            "decoder_sparse_step": 1,
        },
    ),
    "smollm3": _Family(
        "smollm3",
        sliding="use_sliding_window_nope",
        nope=True,
        defaults={
            "max_position_embeddings": 32768,
            "rope_theta": 2_000_000.0,
            "no_rope_layer_interval": 4,
            "tie_word_embeddings": True,
        },
    ),
    # GraniteConfig's multipliers all default to 1 (the attention scale too, not head_dim ** -0.5).
    "granite": _Family(
        "granite",
        granite=True,
        defaults={
            "embedding_multiplier": 1.0,
            "attention_multiplier": 1.0,
            "residual_multiplier": 1.0,
            "logits_scaling": 1.0,
        },
    ),
    "cohere2": _Family(
        "cohere2",
        sliding="pattern",
        window_pattern=4,
        window_pattern_key="sliding_window_pattern",
        interleaved_rope=True,
        cohere=True,
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
    ),
    "glm4": _Family(
        "glm4",
        o_bias=False,
        interleaved_rope=True,
        glm_norms=True,
        defaults={
            "head_dim": 128,
            "num_key_value_heads": 2,
            "partial_rotary_factor": 0.5,
            "attention_bias": True,
            "rms_norm_eps": 1.5625e-07,
            "max_position_embeddings": 131072,
            "eos_token_id": [151329, 151336, 151338],
        },
    ),
    "olmo2": _Family(
        "olmo2",
        qk_norm=True,
        qk_norm_whole=True,
        norm_after=True,
        float32_norm_and_rope=True,
        defaults={"rms_norm_eps": 1e-5, "max_position_embeddings": 2048},
    ),
    "exaone4": _Family(
        "exaone4",
        qkv_bias=False,
        o_bias=False,
        qk_norm=True,
        sliding="exaone4",
        norm_after=True,
        rope_on_sliding_only=True,
        defaults={
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 2048,
            "sliding_window": 4096,
            "sliding_window_pattern": 4,
        },
    ),
    "lfm2": _Family(
        "lfm2",
        qkv_bias=False,
        o_bias=False,
        qk_norm=True,
        hybrid="lfm2",
        defaults={
            "max_position_embeddings": 128_000,
            "rope_theta": 1_000_000.0,
            "norm_eps": 1e-5,
            "tie_word_embeddings": True,
            "conv_L_cache": 3,
            "conv_bias": False,
            "block_multiple_of": 256,
            "block_ffn_dim_multiplier": 1.0,
            "block_auto_adjust_ff_dim": True,
        },
    ),
    # Qwen3.5 (text): zero-centred (1 + w) RMSNorms everywhere, Gated DeltaNet layers between gated
    # attention layers with per-head q/k norms and a partial RoPE.
    "qwen3_5_text": _Family(
        "qwen3_5",
        qkv_bias=None,
        o_bias=None,
        qk_norm=True,
        hybrid="qwen3_5",
        defaults={
            "head_dim": 256,
            "max_position_embeddings": 32768,
            "partial_rotary_factor": 0.25,
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 128,
            "linear_value_head_dim": 128,
            "linear_num_key_heads": 16,
            "linear_num_value_heads": 32,
            "full_attention_interval": 4,
        },
    ),
    # GptOssConfig: head_dim 64 (not hidden / heads), q/k/v/o biases, even layers slide (layer_types
    # otherwise), yarn RoPE without truncation when the config names no rope parameters.
    "gpt_oss": _Family(
        "gpt_oss",
        sliding="pattern",
        window_pattern=2,
        moe="gpt_oss",
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
    ),
    # Granite 4 (GraniteMoeHybridConfig): Mamba-2 layers between attention layers (RoPE only with
    # position_embedding_type "rope"), each followed by top-k experts plus an ungated shared MLP (the
    # shared MLP alone without experts), and Granite's four multipliers.
    "granitemoehybrid": _Family(
        "granitemoehybrid",
        granite=True,
        hybrid="granite4",
        moe="granite4",
        defaults={
            "embedding_multiplier": 1.0,
            "attention_multiplier": 1.0,
            "residual_multiplier": 1.0,
            "logits_scaling": 1.0,
            "intermediate_size": 11008,
            "shared_intermediate_size": 1024,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "max_position_embeddings": 2048,
            "mamba_n_heads": 128,
            "mamba_n_groups": 1,
            "mamba_d_state": 256,
            "mamba_d_head": "auto",
            "mamba_d_conv": 4,
            "mamba_expand": 2,
            "mamba_chunk_size": 256,
            "mamba_conv_bias": True,
            "mamba_proj_bias": False,
        },
    ),
    "phi3": _Family(
        "phi3",
        qkv_bias=False,
        o_bias=False,
        sliding="all",
        rope_aliases={"su": "longrope", "yarn": "longrope"},  # what early Phi-3 configs called it
        defaults={"rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "original_max_position_embeddings": 4096},
    ),
}
_ARCH_TO_TYPE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Phi3ForCausalLM": "phi3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "OlmoeForCausalLM": "olmoe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "SmolLM3ForCausalLM": "smollm3",
    "Lfm2ForCausalLM": "lfm2",
    "Qwen3_5ForCausalLM": "qwen3_5_text",
    "Olmo2ForCausalLM": "olmo2",
    "Exaone4ForCausalLM": "exaone4",
    "GraniteForCausalLM": "granite",
    "Cohere2ForCausalLM": "cohere2",
    "Glm4ForCausalLM": "glm4",
    "GptOssForCausalLM": "gpt_oss",
    "GraniteMoeHybridForCausalLM": "granitemoehybrid",
}
SUPPORTED_ARCHITECTURES = tuple(_ARCH_TO_TYPE)
_UNSUPPORTED_HINTS = {
    "Gemma3ForConditionalGeneration": (
        "a multimodal Gemma 3 config needs its text_config (llmchat runs the language model; text-only "
        "Gemma3ForCausalLM checkpoints load as they are)"
    ),
}
_LAYER_TYPES = ("full_attention", "sliding_attention")


def load_hf_config(folder: Path) -> ModelConfig:
    """Read config.json from a model folder."""
    path = folder / "config.json"
    raw = read_json_object(path, ModelLoadError)
    if raw is None:
        raise ModelLoadError(f"{folder} is not a model folder: config.json is missing")
    return from_hf_config(raw, source=str(path))


def _model_type(raw: dict[str, Any], source: str) -> str:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in _ARCH_TO_TYPE:
            return _ARCH_TO_TYPE[arch]
    model_type = raw.get("model_type")
    if model_type in _FAMILIES and not archs:
        return model_type
    for arch in archs:
        if arch in _UNSUPPORTED_HINTS:
            raise UnsupportedArchitectureError(f"{source}: {arch}: {_UNSUPPORTED_HINTS[arch]}")
    named = ", ".join(archs) if archs else f"model_type {model_type!r}"
    raise UnsupportedArchitectureError(
        f"{source}: unsupported architecture {named}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _require(raw: dict[str, Any], key: str, source: str) -> Any:
    if raw.get(key) is None:
        raise ModelLoadError(f"{source}: required key {key!r} is missing")
    return raw[key]


def _rope_parameters(raw: dict[str, Any], family: _Family) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The rope parameters of full-attention layers and, where the family has one, of sliding layers.

    Old style: top-level `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`). New
    style: `rope_parameters`, nested per layer type for Gemma 3. Scaling applies to full layers only.
    """
    scaling = dict(raw.get("rope_scaling") or {})
    given = raw.get("rope_parameters") or {}
    if not scaling and not given and family.default_rope is not None:  # gpt-oss: yarn unless told otherwise
        given = dict(family.default_rope)
    nested = any(key in given for key in _LAYER_TYPES)
    full = {**scaling, **((given.get("full_attention") or {}) if nested else given)}
    full.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    if not family.local_rope:
        return full, None
    local = dict(given.get("sliding_attention") or {}) if nested else {}
    local.setdefault("rope_theta", raw.get("rope_local_base_freq", 10000.0))
    return full, local


def _rope_from(params: dict[str, Any], raw: dict[str, Any], max_pos: int, family: _Family, source: str) -> RopeConfig:
    """A RopeConfig from one (merged) rope parameter dict, with transformers' defaults."""
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    rope_type = family.rope_aliases.get(rope_type, rope_type)
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(f"{source}: unsupported rope scaling {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
    factor = params.get("factor")
    original: int | None = params.get("original_max_position_embeddings")
    if rope_type in ("llama3", "yarn", "longrope"):
        # transformers gives a top-level original_max_position_embeddings priority (Phi-3 keeps it there).
        original = raw.get("original_max_position_embeddings") or original or max_pos
    if rope_type == "yarn" and factor is None and original:
        factor = max_pos / original
    short_factor = long_factor = None
    if rope_type == "longrope":
        short_factor, long_factor = params.get("short_factor"), params.get("long_factor")
        if not isinstance(short_factor, list) or not isinstance(long_factor, list):
            raise ModelLoadError(f"{source}: longrope scaling needs short_factor and long_factor lists")
        if factor is None:  # Phi-3 states the stretch as max_position_embeddings / original length
            factor = max_pos / original if original else 1.0
    return RopeConfig(
        theta=float(params["rope_theta"]),
        type=rope_type,
        factor=float(factor if factor is not None else 1.0),
        original_max_position_embeddings=int(original) if original is not None else None,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
        partial_rotary_factor=float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))),
        interleaved=family.interleaved_rope,
        float32=family.cohere,  # transformers' Cohere 2 rotates q and k in float32
        freq_factors=tuple(float(f) for f in raw["rope_freq_factors"]) if raw.get("rope_freq_factors") else None,
        short_factor=tuple(float(f) for f in short_factor) if short_factor is not None else None,
        long_factor=tuple(float(f) for f in long_factor) if long_factor is not None else None,
    )


def _layer_types(raw: dict[str, Any], num_layers: int, source: str) -> tuple[bool, ...] | None:
    """Per layer: sliding or not, from `layer_types` (None when the config has none)."""
    layer_types = raw.get("layer_types")
    if not layer_types:
        return None
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
        raise ModelLoadError(f"{source}: layer_types must be a list of layer type names, not {layer_types!r:.60}")
    if len(layer_types) != num_layers:
        raise ModelLoadError(f"{source}: layer_types has {len(layer_types)} entries for {num_layers} layers")
    unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
    if unknown:
        raise ModelLoadError(
            f"{source}: unsupported layer type(s) {', '.join(map(repr, unknown))} in layer_types; "
            f"supported: {', '.join(_LAYER_TYPES)}"
        )
    return tuple(t == "sliding_attention" for t in layer_types)


def _exaone4_pattern(raw: dict[str, Any], num_layers: int, source: str) -> tuple[bool, ...]:
    """Per layer: sliding or not, from EXAONE 4's `sliding_window_pattern` (when there are no layer_types).

    An int p: every p-th layer is global, the others slide (Exaone4Config.__post_init__). A string
    of "L" (local) and "G" (global), e.g. "LLLG": repeated from layer 0, the last layer always
    global (Exaone4Config's docstring; transformers itself cannot expand a string, so published
    configs carry layer_types as well). None or 0: no layer slides.
    """
    pattern = raw.get("sliding_window_pattern")
    if isinstance(pattern, str) and pattern and set(pattern) <= {"L", "G"}:
        return tuple(i != num_layers - 1 and pattern[i % len(pattern)] == "L" for i in range(num_layers))
    if isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 0:
        return tuple(pattern > 0 and (i + 1) % pattern != 0 for i in range(num_layers))
    if pattern is None:
        return (False,) * num_layers
    raise ModelLoadError(f"{source}: unsupported sliding_window_pattern {pattern!r} (an int or a string of L and G)")


def _rope_layers(raw: dict[str, Any], family: _Family, num_layers: int, source: str) -> tuple[bool, ...]:
    """Per layer: does it apply RoPE (empty: every layer does).

    SmolLM3Config: `no_rope_layers` (1 = RoPE, 0 = none; at least one entry per layer), else a NoPE
    layer every `no_rope_layer_interval` layers: layer i rotates unless (i + 1) % interval == 0.
    """
    if family.hybrid == "granite4":  # GraniteMoeHybridModel rotates only with position_embedding_type "rope"
        return () if raw.get("position_embedding_type") == "rope" else (False,) * num_layers
    if not family.nope:
        return ()
    given = raw.get("no_rope_layers")
    if given is not None:
        if len(given) < num_layers:
            raise ModelLoadError(f"{source}: no_rope_layers has {len(given)} entries for {num_layers} layers")
        return tuple(bool(flag) for flag in given[:num_layers])
    interval = int(raw.get("no_rope_layer_interval") or 4)
    return tuple((i + 1) % interval != 0 for i in range(num_layers))


def _sliding(
    raw: dict[str, Any], family: _Family, num_layers: int, source: str, rope_layers: tuple[bool, ...] = ()
) -> tuple[int | None, tuple[bool, ...]]:
    """Which layers slide, and over how many tokens."""
    rule = family.sliding
    window = raw.get("sliding_window")
    if rule == "pattern":
        # Gemma: the layer types also pick the RoPE (Gemma 3), so they count even without a window.
        # Old configs have no layer_types: Gemma 2 alternates (even layers slide), Gemma 3 makes
        # every `sliding_window_pattern`-th layer full.
        key = family.window_pattern_key
        pattern = int(raw.get(key) or family.window_pattern) if key else family.window_pattern
        types = _layer_types(raw, num_layers, source) or tuple(bool((i + 1) % pattern) for i in range(num_layers))
        return (int(window) if window else None), types
    if rule == "never" or window is None:
        return None, (False,) * num_layers
    if rule.startswith("use_sliding_window") and not raw.get("use_sliding_window", False):
        return None, (False,) * num_layers
    if rule == "exaone4":  # Exaone4Config: `layer_types`, else `sliding_window_pattern`
        if not window:  # 0: what a GGUF without sliding layers says (gguf.py), as None does
            return None, (False,) * num_layers
        return int(window), _layer_types(raw, num_layers, source) or _exaone4_pattern(raw, num_layers, source)
    if rule == "use_sliding_window_all":  # transformers' Qwen3-MoE: one window for every layer
        return int(window), (True,) * num_layers
    given = _layer_types(raw, num_layers, source)
    if given is not None:
        return int(window), given
    if rule == "use_sliding_window":
        first = int(raw.get("max_window_layers", num_layers))
        return int(window), tuple(i >= first for i in range(num_layers))
    if rule == "use_sliding_window_nope":  # SmolLM3Config: the NoPE layers slide
        return int(window), tuple(not rotates for rotates in rope_layers)
    if rule == "use_sliding_window_even":  # transformers' Qwen2MoeConfig: layers 0, 2, 4 ... below the limit
        below = int(raw.get("max_window_layers", num_layers))
        return int(window), tuple(i % 2 == 0 and i < below for i in range(num_layers))
    return int(window), (True,) * num_layers


def _gemma_switches(raw: dict[str, Any], family: _Family, hidden: int, source: str) -> dict[str, Any]:
    """ModelConfig fields that make the shared layer a Gemma layer."""
    if not family.gemma:
        return {}
    if raw.get("use_bidirectional_attention"):
        raise ModelLoadError(f"{source}: bidirectional attention (an embedding model) is not supported")
    final_cap = raw.get("final_logit_softcapping")
    # transformers' Gemma 3 attention never passes `attn_logit_softcapping` on, so it is ignored here too.
    attn_cap = raw.get("attn_logit_softcapping") if family.name == "gemma2" else None
    return {
        "norm_offset": 1.0,
        "embed_scale": math.sqrt(hidden),
        "sandwich_norms": True,
        "attn_scale": float(raw["query_pre_attn_scalar"]) ** -0.5,
        "attn_softcap": float(attn_cap) if attn_cap else None,
        "final_softcap": float(final_cap) if final_cap else None,
    }


def _cohere_switches(raw: dict[str, Any], family: _Family) -> dict[str, Any]:
    """ModelConfig fields that make the shared layer a Cohere 2 (parallel, LayerNorm) or GLM-4 (four norms) layer."""
    if family.glm_norms:
        return {"sandwich_norms": True, "glm_norm_names": True}
    if not family.cohere:
        return {}
    return {"parallel_block": True, "layer_norm": True}


def _logit_scale(raw: dict[str, Any], family: _Family) -> float | None:
    """What the output logits are multiplied by (Cohere 2: `logit_scale`); None for no scaling."""
    if family.cohere:
        return float(raw["logit_scale"])
    if family.granite:  # GraniteForCausalLM divides the logits by logits_scaling
        divisor = float(raw["logits_scaling"])
        return None if divisor == 1.0 else 1.0 / divisor
    return None


def _granite_switches(raw: dict[str, Any], family: _Family) -> dict[str, Any]:
    """Granite's embedding, attention and residual multipliers (its logits_scaling: `_logit_scale`).

    A multiplier of 1 is left out (None), except the attention one: it replaces head_dim ** -0.5.
    """
    if not family.granite:
        return {}
    embedding, residual = float(raw["embedding_multiplier"]), float(raw["residual_multiplier"])
    return {
        "embed_scale": None if embedding == 1.0 else embedding,
        "attn_scale": float(raw["attention_multiplier"]),
        "residual_scale": None if residual == 1.0 else residual,
    }


def _moe_fields(raw: dict[str, Any], family: _Family, num_layers: int, source: str) -> dict[str, Any]:
    """ModelConfig fields of a mixture-of-experts family (nothing for a dense one)."""
    if not family.moe:
        return {}
    experts = raw.get("num_experts") if raw.get("num_experts") is not None else raw.get("num_local_experts")
    if experts is None:
        raise ModelLoadError(f"{source}: required key 'num_experts' is missing")
    experts, used = int(experts), int(_require(raw, "num_experts_per_tok", source))
    if experts > 0 and not 1 <= used <= experts:
        raise ModelLoadError(f"{source}: num_experts_per_tok {used} is not between 1 and num_experts {experts}")
    if family.moe == "gpt_oss":  # every layer sparse, intermediate_size wide, biases, clamped SwiGLU
        return {
            "num_experts": experts,
            "num_experts_per_tok": used,
            "moe_intermediate_size": int(_require(raw, "intermediate_size", source)),
            "moe_layers": (experts > 0,) * num_layers,
            "moe_bias": True,
            "moe_softmax_topk": True,
            "swiglu_limit": float(raw["swiglu_limit"]),
            "swiglu_alpha": float(raw["swiglu_alpha"]),
            "experts_in_out_interleaved": True,
        }
    if family.moe == "granite4":  # every layer sparse (or none), softmax over the top k, an ungated shared MLP
        return {
            "num_experts": experts,
            "num_experts_per_tok": used,
            "moe_intermediate_size": int(_require(raw, "moe_intermediate_size", source)),
            "moe_layers": (experts > 0,) * num_layers,
            "moe_softmax_topk": True,
            "shared_expert_intermediate_size": int(_require(raw, "intermediate_size", source)),
            "shared_expert_gate": False,
        }
    if family.moe in ("mixtral", "olmoe"):  # every layer sparse, experts as wide as intermediate_size
        width = int(_require(raw, "intermediate_size", source))
        mixtral = family.moe == "mixtral"  # always renormalized, weighted in float32
        return {
            "num_experts": experts,
            "num_experts_per_tok": used,
            "moe_intermediate_size": width,
            "norm_topk_prob": mixtral or bool(raw.get("norm_topk_prob", False)),
            "moe_float_weights": mixtral,
            "moe_layers": (experts > 0,) * num_layers,
        }
    step = int(raw.get("decoder_sparse_step") or 1)
    dense = {int(i) for i in raw.get("mlp_only_layers") or []}
    shared = int(_require(raw, "shared_expert_intermediate_size", source)) if family.moe == "qwen2_moe" else 0
    return {
        "num_experts": experts,
        "num_experts_per_tok": used,
        "moe_intermediate_size": int(_require(raw, "moe_intermediate_size", source)),
        "norm_topk_prob": bool(raw.get("norm_topk_prob", False)),
        "moe_layers": tuple(experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(num_layers)),
        "shared_expert_intermediate_size": shared,
    }


_LFM2_LAYER_TYPES = {"full_attention": "attention", "conv": "conv"}


def _lfm2_keys(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """LFM2's config keys in the names the rest of from_hf_config reads, as Lfm2Config derives them:
    `norm_eps`, `block_ff_dim` / `tie_embedding` (older aliases) and the MLP width, which
    `block_auto_adjust_ff_dim` takes as 2/3 of intermediate_size times block_ffn_dim_multiplier,
    rounded up to a multiple of block_multiple_of."""
    raw = dict(raw)
    raw["rms_norm_eps"] = raw.get("norm_eps", 1e-5)
    if raw.get("block_ff_dim") is not None:
        raw["intermediate_size"] = raw["block_ff_dim"]
    if raw.get("tie_embedding") is not None:
        raw["tie_word_embeddings"] = raw["tie_embedding"]
    width = int(_require(raw, "intermediate_size", source))
    if raw.get("block_auto_adjust_ff_dim"):
        width = int(2 * width / 3)
        if raw.get("block_ffn_dim_multiplier") is not None:
            width = int(raw["block_ffn_dim_multiplier"] * width)
        multiple = int(raw.get("block_multiple_of") or 1)
        width = multiple * ((width + multiple - 1) // multiple)
    raw["intermediate_size"] = width
    return raw


_QWEN3_5_LAYER_TYPES = {"full_attention": "attention", "linear_attention": "linear_attention"}


def _qwen3_5_fields(raw: dict[str, Any], num_layers: int, source: str) -> dict[str, Any]:
    """Qwen3.5's layout (Qwen3_5TextConfig: `layer_types`, else every full_attention_interval-th layer
    attends) and the widths of its DeltaNet layers."""
    types = raw.get("layer_types")
    if types is None:
        interval = int(raw.get("full_attention_interval") or 4)
        types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(num_layers)]
    if len(types) != num_layers:
        raise ModelLoadError(f"{source}: layer_types has {len(types)} entries for {num_layers} layers")
    unknown = sorted(set(types) - set(_QWEN3_5_LAYER_TYPES))
    if unknown:
        raise ModelLoadError(f"{source}: unsupported layer type(s) {', '.join(map(repr, unknown))} in layer_types")
    key_heads, value_heads = int(raw["linear_num_key_heads"]), int(raw["linear_num_value_heads"])
    if value_heads % key_heads:
        raise ModelLoadError(f"{source}: {value_heads} linear value heads are not a multiple of {key_heads} key heads")
    return {
        "layer_kinds": tuple(_QWEN3_5_LAYER_TYPES[t] for t in types),
        "conv_kernel": int(raw["linear_conv_kernel_dim"]),
        "linear_key_heads": key_heads,
        "linear_value_heads": value_heads,
        "linear_key_dim": int(raw["linear_key_head_dim"]),
        "linear_value_dim": int(raw["linear_value_head_dim"]),
        "attn_output_gate": True,
        "norm_offset": 1.0,  # Qwen3_5RMSNorm: x / rms(x) * (1 + w), in float32
    }


# Granite 4's layer types: the names of its published configs (`layers_block_type`, later `layer_types`)
# and the ones transformers 5 writes
_GRANITE4_LAYER_TYPES = {
    "mamba": "mamba",
    "linear_attention": "mamba",
    "attention": "attention",
    "full_attention": "attention",
}


def _granite4_keys(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Granite 4's config keys in the names the rest of from_hf_config reads: the dense MLP width is
    the shared MLP's (`shared_intermediate_size`), `intermediate_size` the experts' (then
    `moe_intermediate_size`); `layers_block_type` is the older name of `layer_types`."""
    raw = dict(raw)
    raw["moe_intermediate_size"] = _require(raw, "intermediate_size", source)
    raw["intermediate_size"] = _require(raw, "shared_intermediate_size", source)
    if raw.get("layer_types") is None and raw.get("layers_block_type") is not None:
        raw["layer_types"] = raw["layers_block_type"]
    return raw


def _limit_value(value: Any, source: str) -> float:
    """One bound of time_step_limit: a number, or infinity as JSON cannot spell it ("Infinity",
    "inf", or transformers 5's {"__float__": "Infinity"})."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ModelLoadError(f"{source}: time_step_limit bound {value!r} is not a number") from None


def _granite4_fields(raw: dict[str, Any], num_layers: int, source: str) -> dict[str, Any]:
    """Granite 4's layout (GraniteMoeHybridConfig: `layer_types`, every layer Mamba-2 without them)
    and the widths of its Mamba-2 layers (mamba_d_head "auto": mamba_expand * hidden_size // heads)."""
    types = raw.get("layer_types")
    if types is None:
        types = ["mamba"] * num_layers
    if len(types) != num_layers:
        raise ModelLoadError(f"{source}: layer_types has {len(types)} entries for {num_layers} layers")
    unknown = sorted(set(types) - set(_GRANITE4_LAYER_TYPES))
    if unknown:
        raise ModelLoadError(f"{source}: unsupported layer type(s) {', '.join(map(repr, unknown))} in layer_types")
    heads, groups = int(raw["mamba_n_heads"]), int(raw["mamba_n_groups"])
    inner = int(raw["mamba_expand"]) * int(raw["hidden_size"])
    head_dim = inner // heads if raw["mamba_d_head"] == "auto" else int(raw["mamba_d_head"])
    if head_dim * heads != inner:
        raise ModelLoadError(
            f"{source}: {heads} Mamba heads of {head_dim} do not make mamba_expand * hidden_size = {inner}"
        )
    if heads % groups:
        raise ModelLoadError(f"{source}: {heads} Mamba heads are not a multiple of mamba_n_groups {groups}")
    kernel = int(raw["mamba_d_conv"])
    if "mamba" in (_GRANITE4_LAYER_TYPES[t] for t in types) and kernel < 1:
        raise ModelLoadError(f"{source}: mamba_d_conv must be at least 1, not {kernel}")
    limit = raw.get("time_step_limit")
    if limit is None:
        low, high = 0.0, math.inf
    elif isinstance(limit, list | tuple) and len(limit) == 2:
        low, high = (_limit_value(v, source) for v in limit)
    else:
        raise ModelLoadError(f"{source}: time_step_limit must be a [low, high] pair, not {limit!r:.60}")
    return {
        "layer_kinds": tuple(_GRANITE4_LAYER_TYPES[t] for t in types),
        "conv_kernel": kernel,
        "conv_bias": bool(raw["mamba_conv_bias"]),
        "ssm_heads": heads,
        "ssm_head_dim": head_dim,
        "ssm_state_size": int(raw["mamba_d_state"]),
        "ssm_groups": groups,
        "ssm_chunk_size": int(raw["mamba_chunk_size"]),
        "ssm_proj_bias": bool(raw["mamba_proj_bias"]),
        "ssm_dt_limit": (low, high),
    }


def _hybrid_fields(raw: dict[str, Any], family: _Family, num_layers: int, source: str) -> dict[str, Any]:
    """ModelConfig fields of a hybrid family: which layers are recurrent, and their shape."""
    if family.hybrid == "qwen3_5":
        return _qwen3_5_fields(raw, num_layers, source)
    if family.hybrid == "granite4":
        return _granite4_fields(raw, num_layers, source)
    if family.hybrid != "lfm2":
        return {}
    types = raw.get("layer_types")
    if types is None:  # Lfm2Config: the layers in full_attn_idxs attend (all of them when it is absent too)
        attending = set(raw.get("full_attn_idxs") or range(num_layers))
        types = ["full_attention" if i in attending else "conv" for i in range(num_layers)]
    if len(types) != num_layers:
        raise ModelLoadError(f"{source}: layer_types has {len(types)} entries for {num_layers} layers")
    unknown = sorted(set(types) - set(_LFM2_LAYER_TYPES))
    if unknown:
        raise ModelLoadError(f"{source}: unsupported layer type(s) {', '.join(map(repr, unknown))} in layer_types")
    kernel = int(raw.get("conv_L_cache") or 0)
    if "conv" in types and kernel < 1:
        raise ModelLoadError(f"{source}: conv_L_cache must be at least 1, not {raw.get('conv_L_cache')!r}")
    return {
        "layer_kinds": tuple(_LFM2_LAYER_TYPES[t] for t in types),
        "conv_kernel": kernel,
        "conv_bias": bool(raw.get("conv_bias", False)),
    }


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


# Multimodal checkpoints whose language model llmchat runs on its own (the vision tower is not loaded):
# their config nests it under text_config, their weights under model.language_model or
# language_model.model (checkpoint.internal_name).
_TEXT_MODELS = {
    "Qwen3_5ForConditionalGeneration": "Qwen3_5ForCausalLM",
    "Gemma3ForConditionalGeneration": "Gemma3ForCausalLM",
}


def _text_model(raw: dict[str, Any]) -> dict[str, Any]:
    """The text model's config of a multimodal checkpoint in _TEXT_MODELS (else `raw` as it is)."""
    text = next((_TEXT_MODELS[a] for a in raw.get("architectures") or [] if a in _TEXT_MODELS), None)
    if text is None or not isinstance(raw.get("text_config"), dict):
        return raw
    inner = dict(raw["text_config"])
    for key in ("tie_word_embeddings", "dtype", "torch_dtype"):  # the wrapper's say wins
        if key in raw:
            inner[key] = raw[key]
    return inner | {"architectures": [text]}


def from_hf_config(raw: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Normalize a parsed Hugging Face config.json."""
    raw = _text_model(raw)
    model_type = _model_type(raw, source)
    family = _FAMILIES[model_type]
    raw = {**family.defaults, **raw}
    if family.hybrid == "lfm2":
        raw = _lfm2_keys(raw, source)
    if family.hybrid == "granite4":
        raw = _granite4_keys(raw, source)
    hidden = int(_require(raw, "hidden_size", source))
    heads = int(_require(raw, "num_attention_heads", source))
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    layers = int(_require(raw, "num_hidden_layers", source))
    if hidden % heads and not raw.get("head_dim"):
        raise ModelLoadError(f"{source}: hidden_size {hidden} is not divisible by {heads} heads and no head_dim")
    if heads % kv_heads:
        raise ModelLoadError(f"{source}: {heads} attention heads are not a multiple of {kv_heads} KV heads")
    head_dim = int(raw.get("head_dim") or hidden // heads)
    max_pos = int(raw.get("max_position_embeddings") or 2048)
    attention_bias = bool(raw.get(family.bias_key, False))
    if not family.hybrid:  # checked even where the family ignores them: no linear-attention or mamba layers
        _layer_types(raw, layers, source)
    rope_layers = _rope_layers(raw, family, layers, source)
    window, sliding_layers = _sliding(raw, family, layers, source, rope_layers)
    if family.rope_on_sliding_only and window is not None:  # Exaone4Attention: global NoPE with a window
        rope_layers = sliding_layers
    if family.cohere:  # Cohere2Attention rotates only in layers that slide (those given a window)
        rope_layers = tuple(slides and window is not None for slides in sliding_layers)
    full_rope, local_rope = _rope_parameters(raw, family)
    # Gemma's MLP reads `hidden_activation` (its `hidden_act` is a leftover that transformers ignores).
    activation = raw.get("hidden_activation") or "gelu_pytorch_tanh" if family.gemma else raw.get("hidden_act", "silu")
    return ModelConfig(
        architecture=family.name,
        vocab_size=int(_require(raw, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size", source)),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rms_norm_eps=float(raw.get(family.eps_key, 1e-6)),
        hidden_act=str(activation),
        rope=_rope_from(full_rope, raw, max_pos, family, source),
        local_rope=_rope_from(local_rope, raw, max_pos, family, source) if local_rope is not None else None,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias if family.qkv_bias is None else family.qkv_bias,
        o_bias=attention_bias if family.o_bias is None else family.o_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)) if model_type in ("llama", "smollm3", "granite") else False,
        qk_norm=family.qk_norm,
        qk_norm_whole=family.qk_norm_whole,
        norm_after=family.norm_after,
        norm_weight_in_float32=family.float32_norm_and_rope,
        rope_tables_float32=family.float32_norm_and_rope,
        clip_qkv=float(raw["clip_qkv"]) if raw.get("clip_qkv") is not None else None,
        sliding_window=window,
        sliding_layers=sliding_layers,
        rope_layers=rope_layers,
        dtype=raw.get("dtype") or raw.get("torch_dtype"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
        logit_scale=_logit_scale(raw, family),
        **_gemma_switches(raw, family, hidden, source),
        **_cohere_switches(raw, family),
        **_granite_switches(raw, family),
        **_moe_fields(raw, family, layers, source),
        attn_sinks=family.sinks,
        **_hybrid_fields(raw, family, layers, source),
    )
