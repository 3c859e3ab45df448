"""ModelConfig: one normalized set of hyperparameters for every supported architecture.

Architectures differ by data, not by code: biases, q/k norms, sliding windows, rope scaling are
fields here, and `model.py` reads them. `from_hf_config` accepts both config.json styles found in
the wild: the old one (top-level `rope_theta`, `rope_scaling`, `torch_dtype`) and the new one
(`rope_parameters`, `dtype`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmchat.engine.errors import ModelLoadError, UnsupportedArchitectureError
from llmchat.engine.jsonfile import read_json_object


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: base frequency and an optional scaling variant."""

    theta: float = 10000.0
    type: str = "default"  # default | linear | dynamic | llama3 | yarn
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn: scale applied to cos/sin
    mscale: float | None = None  # yarn (DeepSeek style): derives attention_factor
    mscale_all_dim: float | None = None
    truncate: bool = True  # yarn: round the correction range to whole dimensions
    partial_rotary_factor: float = 1.0
    # Per-frequency divisors stored with the weights (GGUF's `rope_freqs` tensor, which is how
    # llama.cpp ships llama3 scaling): inv_freq_i / freq_factors[i].
    freq_factors: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Everything the Transformer needs to know about a checkpoint."""

    architecture: str  # family name: llama, mistral, qwen2, qwen3
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
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # per layer: does it use the sliding window?
    dtype: str | None = None  # dtype the checkpoint was published in
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

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

    def with_changes(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


# model_type → (family, q/k/v bias, o bias, q/k norm, honours sliding_window)
_FAMILIES: dict[str, tuple[str, bool | None, bool | None, bool, str]] = {
    "llama": ("llama", None, None, False, "never"),
    "mistral": ("mistral", False, False, False, "all"),
    "qwen2": ("qwen2", True, False, False, "use_sliding_window"),
    "qwen3": ("qwen3", None, None, True, "use_sliding_window"),
}
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
_ARCH_TO_TYPE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


def load_hf_config(folder: Path) -> ModelConfig:
    """Read config.json from a model folder."""
    path = folder / "config.json"
    raw = read_json_object(path, ModelLoadError)
    if raw is None:
        raise ModelLoadError(f"{folder} is not a model folder: config.json is missing")
    return from_hf_config(raw, source=str(path))


def _model_type(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in _ARCH_TO_TYPE:
            return _ARCH_TO_TYPE[arch]
    model_type = raw.get("model_type")
    if model_type in _FAMILIES and not archs:
        return model_type
    named = ", ".join(archs) if archs else f"model_type {model_type!r}"
    raise UnsupportedArchitectureError(
        f"unsupported architecture {named}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _require(raw: dict[str, Any], key: str, source: str) -> Any:
    if raw.get(key) is None:
        raise ModelLoadError(f"{source}: required key {key!r} is missing")
    return raw[key]


def _rope_from(raw: dict[str, Any], max_pos: int) -> RopeConfig:
    """Merge the old style (rope_theta + rope_scaling) and the new one (rope_parameters)."""
    params: dict[str, Any] = {}
    if raw.get("rope_scaling"):
        params.update(raw["rope_scaling"])
    if raw.get("rope_parameters"):
        params.update(raw["rope_parameters"])
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ("default", "linear", "dynamic", "llama3", "yarn"):
        raise ModelLoadError(
            f"unsupported rope scaling {rope_type!r}; supported: default, linear, dynamic, llama3, yarn"
        )
    factor = params.get("factor")
    original: int | None = params.get("original_max_position_embeddings", raw.get("original_max_position_embeddings"))
    if rope_type in ("llama3", "yarn") and original is None:
        original = max_pos
    if rope_type == "yarn" and factor is None and original:
        factor = max_pos / original
    return RopeConfig(
        theta=float(theta),
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
    )


def _sliding(raw: dict[str, Any], model_type: str, num_layers: int) -> tuple[int | None, tuple[bool, ...]]:
    """Which layers slide, and over how many tokens."""
    rule = _FAMILIES[model_type][4]
    window = raw.get("sliding_window")
    if rule == "never" or window is None:
        return None, (False,) * num_layers
    if rule == "use_sliding_window" and not raw.get("use_sliding_window", False):
        return None, (False,) * num_layers
    layer_types = raw.get("layer_types")
    if layer_types:
        if len(layer_types) != num_layers:
            raise ModelLoadError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
        return int(window), tuple(t == "sliding_attention" for t in layer_types)
    if rule == "use_sliding_window":
        first = int(raw.get("max_window_layers", num_layers))
        return int(window), tuple(i >= first for i in range(num_layers))
    return int(window), (True,) * num_layers


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def from_hf_config(raw: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """Normalize a parsed Hugging Face config.json."""
    model_type = _model_type(raw)
    family, qkv_bias, o_bias, qk_norm, _ = _FAMILIES[model_type]
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
    attention_bias = bool(raw.get("attention_bias", False))
    window, sliding_layers = _sliding(raw, model_type, layers)
    return ModelConfig(
        architecture=family,
        vocab_size=int(_require(raw, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=int(_require(raw, "intermediate_size", source)),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        hidden_act=str(raw.get("hidden_act", "silu")),
        rope=_rope_from(raw, max_pos),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias if qkv_bias is None else qkv_bias,
        o_bias=attention_bias if o_bias is None else o_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=qk_norm,
        sliding_window=window,
        sliding_layers=sliding_layers,
        dtype=raw.get("dtype") or raw.get("torch_dtype"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
    )
