"""ModelConfig: one normalized set of hyperparameters for every supported architecture.

Architectures differ by data, not by code: biases, q/k norms, sliding windows, rope scaling,
Gemma's norm offset and soft-capping are fields here, and `model.py` reads them. `from_hf_config`
accepts both config.json styles found in the wild: the old one (top-level `rope_theta`,
`rope_scaling`, `torch_dtype`) and the new one (`rope_parameters`, `dtype`), and fills in the
defaults transformers' config classes would when a key is absent. What one architecture does its
own way lives in its family entry (llmchat/engine/families/); this module reads what they share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmchat.engine.errors import ModelLoadError, UnsupportedArchitectureError
from llmchat.engine.families import BY_CLASS, BY_MODEL_TYPE, MULTIMODAL, SUPPORTED_ARCHITECTURES, Family
from llmchat.engine.families.base import ATTENTION_LAYER_TYPES, attention_layer_types, pattern_layers, require
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


def load_hf_config(folder: Path) -> ModelConfig:
    """Read config.json from a model folder."""
    path = folder / "config.json"
    raw = read_json_object(path, ModelLoadError)
    if raw is None:
        raise ModelLoadError(f"{folder} is not a model folder: config.json is missing")
    return from_hf_config(raw, source=str(path))


def _family(raw: dict[str, Any], source: str) -> Family:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in BY_CLASS:
            return BY_CLASS[arch]
    model_type = raw.get("model_type")
    if model_type in BY_MODEL_TYPE and not archs:
        return BY_MODEL_TYPE[model_type]
    for arch in archs:
        if arch in MULTIMODAL:  # _text_model found no text_config
            raise UnsupportedArchitectureError(
                f"{source}: {arch}: a multimodal config needs its text_config (llmchat runs the language "
                f"model; text-only {MULTIMODAL[arch]} checkpoints load as they are)"
            )
    named = ", ".join(archs) if archs else f"model_type {model_type!r}"
    raise UnsupportedArchitectureError(
        f"{source}: unsupported architecture {named}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _rope_parameters(raw: dict[str, Any], family: Family) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The rope parameters of full-attention layers and, where the family has one, of sliding layers.

    Old style: top-level `rope_theta` + `rope_scaling` (+ Gemma 3's `rope_local_base_freq`). New
    style: `rope_parameters`, nested per layer type for Gemma 3. Scaling applies to full layers only.
    """
    scaling = dict(raw.get("rope_scaling") or {})
    given = raw.get("rope_parameters") or {}
    if not scaling and not given and family.default_rope is not None:  # gpt-oss: yarn unless told otherwise
        given = dict(family.default_rope)
    nested = any(key in given for key in ATTENTION_LAYER_TYPES)
    full = {**scaling, **((given.get("full_attention") or {}) if nested else given)}
    full.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    if not family.local_rope:
        return full, None
    local = dict(given.get("sliding_attention") or {}) if nested else {}
    local.setdefault("rope_theta", raw.get("rope_local_base_freq", 10000.0))
    return full, local


def _rope_from(params: dict[str, Any], raw: dict[str, Any], max_pos: int, family: Family, source: str) -> RopeConfig:
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
        float32=family.rope_float32,
        freq_factors=tuple(float(f) for f in raw["rope_freq_factors"]) if raw.get("rope_freq_factors") else None,
        short_factor=tuple(float(f) for f in short_factor) if short_factor is not None else None,
        long_factor=tuple(float(f) for f in long_factor) if long_factor is not None else None,
    )


def _sliding(raw: dict[str, Any], family: Family, num_layers: int, source: str) -> tuple[int | None, tuple[bool, ...]]:
    """Which layers slide, and over how many tokens, by the family's rule (Family.sliding)."""
    rule = family.sliding
    window = raw.get("sliding_window")
    if rule == "pattern":
        # Gemma: the layer types also pick the RoPE (Gemma 3), so they count even without a window.
        types = pattern_layers(raw, num_layers, source, family.window_pattern, family.window_pattern_key)
        return (int(window) if window else None), types
    if rule == "never" or window is None:
        return None, (False,) * num_layers
    if rule.startswith("use_sliding_window") and not raw.get("use_sliding_window", False):
        return None, (False,) * num_layers
    if rule == "use_sliding_window_all":  # transformers' Qwen3-MoE: one window for every layer
        return int(window), (True,) * num_layers
    given = attention_layer_types(raw, num_layers, source)
    if given is not None:
        return int(window), given
    if rule == "use_sliding_window":
        first = int(raw.get("max_window_layers", num_layers))
        return int(window), tuple(i >= first for i in range(num_layers))
    if rule == "use_sliding_window_even":  # transformers' Qwen2MoeConfig: layers 0, 2, 4 ... below the limit
        below = int(raw.get("max_window_layers", num_layers))
        return int(window), tuple(i % 2 == 0 and i < below for i in range(num_layers))
    return int(window), (True,) * num_layers


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _text_model(raw: dict[str, Any]) -> dict[str, Any]:
    """The text model's config of a multimodal checkpoint (families.MULTIMODAL; else `raw` as it is):
    the language model runs on its own, its weights under model.language_model or language_model.model
    (checkpoint.internal_name), the vision tower is not loaded."""
    text = next((MULTIMODAL[a] for a in raw.get("architectures") or [] if a in MULTIMODAL), None)
    if text is None or not isinstance(raw.get("text_config"), dict):
        return raw
    inner = dict(raw["text_config"])
    for key in ("tie_word_embeddings", "dtype", "torch_dtype"):  # the wrapper's say wins
        if key in raw:
            inner[key] = raw[key]
    return inner | {"architectures": [text]}


def from_hf_config(raw: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Normalize a parsed Hugging Face config.json: the fields every family reads the same way, then
    the family's own (Family.fields), which win."""
    raw = _text_model(raw)
    family = _family(raw, source)
    raw = {**family.defaults, **raw}
    if family.keys is not None:
        raw = family.keys(raw, source)
    hidden = int(require(raw, "hidden_size", source))
    heads = int(require(raw, "num_attention_heads", source))
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    layers = int(require(raw, "num_hidden_layers", source))
    if hidden % heads and not raw.get("head_dim"):
        raise ModelLoadError(f"{source}: hidden_size {hidden} is not divisible by {heads} heads and no head_dim")
    if heads % kv_heads:
        raise ModelLoadError(f"{source}: {heads} attention heads are not a multiple of {kv_heads} KV heads")
    head_dim = int(raw.get("head_dim") or hidden // heads)
    max_pos = int(raw.get("max_position_embeddings") or 2048)
    attention_bias = bool(raw.get(family.bias_key, False))
    if not family.hybrid:  # checked even where the family ignores them: no linear-attention or mamba layers
        attention_layer_types(raw, layers, source)
    window, sliding_layers = _sliding(raw, family, layers, source)
    full_rope, local_rope = _rope_parameters(raw, family)
    fields: dict[str, Any] = {
        "architecture": family.name,
        "vocab_size": int(require(raw, "vocab_size", source)),
        "hidden_size": hidden,
        "intermediate_size": int(require(raw, "intermediate_size", source)),
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": max_pos,
        "rms_norm_eps": float(raw.get(family.eps_key, 1e-6)),
        "hidden_act": str(raw.get("hidden_act", "silu")),
        "rope": _rope_from(full_rope, raw, max_pos, family, source),
        "local_rope": _rope_from(local_rope, raw, max_pos, family, source) if local_rope is not None else None,
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "qkv_bias": attention_bias if family.qkv_bias is None else family.qkv_bias,
        "o_bias": attention_bias if family.o_bias is None else family.o_bias,
        "mlp_bias": bool(raw.get("mlp_bias", False)) if family.mlp_bias else False,
        "qk_norm": family.qk_norm,
        "qk_norm_whole": family.qk_norm_whole,
        "norm_after": family.norm_after,
        "norm_weight_in_float32": family.float32_norm_and_rope,
        "rope_tables_float32": family.float32_norm_and_rope,
        "clip_qkv": float(raw["clip_qkv"]) if raw.get("clip_qkv") is not None else None,
        "sliding_window": window,
        "sliding_layers": sliding_layers,
        "dtype": raw.get("dtype") or raw.get("torch_dtype"),
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_ids": _eos_ids(raw.get("eos_token_id")),
        "attn_sinks": family.sinks,
    }
    if family.fields is not None:
        fields.update(family.fields(raw, layers, source))
    return ModelConfig(**fields)
