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
    # Per-frequency divisors stored with the weights (GGUF's `rope_freqs` tensor, which is how
    # llama.cpp ships llama3 scaling): inv_freq_i / freq_factors[i].
    freq_factors: tuple[float, ...] | None = None
    # longrope (Phi-3): per-frequency divisors for sequences within / beyond the original length.
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Everything the Transformer needs to know about a checkpoint."""

    # family name: llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, qwen3_moe, mixtral, olmoe, qwen2_moe, smollm3
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
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # per layer: does it use the sliding window?
    rope_layers: tuple[bool, ...] = ()  # per layer: does it rotate q/k (SmolLM3's NoPE layers)? empty: all do
    dtype: str | None = None  # dtype the checkpoint was published in
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Gemma: norms scale by (norm_offset + weight) instead of weight, computed in float32.
    norm_offset: float = 0.0
    embed_scale: float | None = None  # Gemma: token embeddings are multiplied by sqrt(hidden_size)
    sandwich_norms: bool = False  # Gemma 2/3: a norm after attention and after the MLP as well
    attn_scale: float | None = None  # softmax scale of attention; None means head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2: scores -> tanh(scores / c) * c before the mask
    final_softcap: float | None = None  # Gemma 2: the same on the output logits
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
    rope_aliases: Mapping[str, str] = field(default_factory=dict)  # legacy rope type names
    # Mixture of experts: "" (dense), "qwen3_moe" (moe_intermediate_size, norm_topk_prob,
    # decoder_sparse_step, mlp_only_layers), "qwen2_moe" (the same plus a shared expert), "mixtral"
    # (every layer, intermediate_size, renormalized) or "olmoe" (every layer, intermediate_size, norm_topk_prob).
    moe: str = ""
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
}
SUPPORTED_ARCHITECTURES = tuple(_ARCH_TO_TYPE)
_UNSUPPORTED_HINTS = {
    "Gemma3ForConditionalGeneration": (
        "multimodal Gemma 3 (vision + text) is not supported; text-only Gemma3ForCausalLM checkpoints "
        "(e.g. gemma-3-1b) are"
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
        freq_factors=tuple(float(f) for f in raw["rope_freq_factors"]) if raw.get("rope_freq_factors") else None,
        short_factor=tuple(float(f) for f in short_factor) if short_factor is not None else None,
        long_factor=tuple(float(f) for f in long_factor) if long_factor is not None else None,
    )


def _layer_types(raw: dict[str, Any], num_layers: int, source: str) -> tuple[bool, ...] | None:
    """Per layer: sliding or not, from `layer_types` (None when the config has none)."""
    layer_types = raw.get("layer_types")
    if not layer_types:
        return None
    if len(layer_types) != num_layers:
        raise ModelLoadError(f"{source}: layer_types has {len(layer_types)} entries for {num_layers} layers")
    unknown = sorted(set(layer_types) - set(_LAYER_TYPES))
    if unknown:
        raise ModelLoadError(f"{source}: unsupported layer type(s) {', '.join(map(repr, unknown))} in layer_types")
    return tuple(t == "sliding_attention" for t in layer_types)


def _rope_layers(raw: dict[str, Any], family: _Family, num_layers: int, source: str) -> tuple[bool, ...]:
    """Per layer: does it apply RoPE (empty: every layer does).

    SmolLM3Config: `no_rope_layers` (1 = RoPE, 0 = none; at least one entry per layer), else a NoPE
    layer every `no_rope_layer_interval` layers: layer i rotates unless (i + 1) % interval == 0.
    """
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


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def from_hf_config(raw: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Normalize a parsed Hugging Face config.json."""
    model_type = _model_type(raw, source)
    family = _FAMILIES[model_type]
    raw = {**family.defaults, **raw}
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
    rope_layers = _rope_layers(raw, family, layers, source)
    window, sliding_layers = _sliding(raw, family, layers, source, rope_layers)
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
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        hidden_act=str(activation),
        rope=_rope_from(full_rope, raw, max_pos, family, source),
        local_rope=_rope_from(local_rope, raw, max_pos, family, source) if local_rope is not None else None,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias if family.qkv_bias is None else family.qkv_bias,
        o_bias=attention_bias if family.o_bias is None else family.o_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)) if model_type in ("llama", "smollm3") else False,
        qk_norm=family.qk_norm,
        qk_norm_whole=family.qk_norm_whole,
        clip_qkv=float(raw["clip_qkv"]) if raw.get("clip_qkv") is not None else None,
        sliding_window=window,
        sliding_layers=sliding_layers,
        rope_layers=rope_layers,
        dtype=raw.get("dtype") or raw.get("torch_dtype"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
        **_gemma_switches(raw, family, hidden, source),
        **_moe_fields(raw, family, layers, source),
    )
