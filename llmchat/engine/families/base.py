"""What a family entry is, and the pieces several families share.

A `Family` is everything llmchat knows about one Hugging Face `model_type` that its files do not
say: the switches the shared Transformer reads (biases, norms, sliding rules, RoPE variants), the
defaults of transformers' config class, hooks for the few keys a family spells its own way, and
how llama.cpp's converter wrote it to GGUF (tensor names, metadata keys, value changes). The
generic readers (config.py for config.json, gguf.py for GGUF) do the rest.

Nothing here imports config.py or gguf.py at run time: they import the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from llmchat.engine.errors import ModelLoadError

if TYPE_CHECKING:
    from llmchat.engine.config import ModelConfig
    from llmchat.engine.gguf import GGUFFile

Raw = dict[str, Any]  # a config.json dict (or one gguf.py made from a file's metadata)
# config.json keys renamed to what the generic reader expects (raw, source) -> raw
KeysHook = Callable[[Raw, str], Raw]
# the family's own ModelConfig fields (raw, num_layers, source) -> fields; they override the generic ones
FieldsHook = Callable[[Raw, int, str], dict[str, Any]]
# config.json keys read off a GGUF file's metadata and tensors (file, raw so far) -> keys to add
GGUFConfigHook = Callable[["GGUFFile", Raw], Raw]
# a tensor's values as transformers holds them, from what the converter stored (config, hf name, tensor)
GGUFValuesHook = Callable[["ModelConfig", str, torch.Tensor], torch.Tensor]
# the Hugging Face name of a tensor the block-name table cannot name (None: not one of these)
GGUFTensorHook = Callable[[str], str | None]


# --- GGUF tensor names several families share ------------------------------------------------------

# Tensor names: llama.cpp (gguf-py's TENSOR_NAMES) → Hugging Face, per layer without the .weight/.bias.
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Stacked experts ([experts, out, in] per matrix) and their router.
MOE_BLOCK_NAMES = BLOCK_NAMES | {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
# OLMo 2, EXAONE 4: no norm in front of attention or MLP; post_attention_norm / post_ffw_norm norm
# their outputs (HF's post_attention_layernorm / post_feedforward_layernorm).
NORM_AFTER_BLOCK_NAMES = {part: hf for part, hf in BLOCK_NAMES.items() if part not in ("attn_norm", "ffn_norm")} | {
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


@dataclass(frozen=True)
class Family:
    """One architecture: what a model_type fixes that its config.json does not say, and its GGUF form."""

    model_type: str  # the config.json `model_type` (and the registry key)
    name: str  # ModelConfig.architecture: what `llmchat info` calls it
    hf_classes: tuple[str, ...]  # the `architectures` entries that name it
    # multimodal wrappers whose `text_config` is this family (llmchat runs their language model)
    multimodal_classes: tuple[str, ...] = ()
    qkv_bias: bool | None = None  # None: the config's `bias_key` decides
    o_bias: bool | None = None
    bias_key: str = "attention_bias"
    mlp_bias: bool = False  # the config's `mlp_bias` is honoured (llama's MLP may have biases)
    qk_norm: bool = False
    qk_norm_whole: bool = False  # OLMoE, OLMo 2: q/k norms over the whole projection
    # Which layers honour `sliding_window` (config.sliding_layers): never | all | use_sliding_window
    # (Qwen: a flag plus max_window_layers) | use_sliding_window_all (Qwen3-MoE: the flag, then every
    # layer) | use_sliding_window_even (Qwen2-MoE: the flag, then the even layers below
    # max_window_layers) | pattern (`layer_types`, else every `window_pattern`-th layer is full).
    # Families with a rule of their own set their layers in `fields`.
    sliding: str = "never"
    window_pattern: int = 0
    window_pattern_key: str | None = None  # config key that may override window_pattern
    local_rope: bool = False  # Gemma 3: sliding layers have a RoPE of their own
    interleaved_rope: bool = False  # Cohere 2, GLM-4: RoPE rotates adjacent pairs
    rope_float32: bool = False  # Cohere 2: q and k rotate in float32
    norm_after: bool = False  # OLMo 2, EXAONE 4: norms after attention and MLP only
    float32_norm_and_rope: bool = False  # OLMo 2: norm weights and RoPE applied in float32
    sinks: bool = False  # gpt-oss: attention sinks
    eps_key: str = "rms_norm_eps"  # the config key of the norms' epsilon
    # `layer_types` may name recurrent layers (checked by the family's own fields, not as attention types)
    hybrid: bool = False
    rope_aliases: Mapping[str, str] = field(default_factory=dict)  # legacy rope type names
    # the rope parameters transformers' config class fills in when a config.json has none (gpt-oss: yarn)
    default_rope: Mapping[str, Any] | None = None
    # transformers' config-class defaults for keys a config.json may leave out
    defaults: Mapping[str, Any] = field(default_factory=dict)
    keys: KeysHook | None = None
    fields: FieldsHook | None = None
    # GGUF, as llama.cpp's convert_hf_to_gguf.py writes it ("" : never written as its own architecture)
    gguf: str = ""
    gguf_names: Mapping[str, str] = field(default_factory=lambda: BLOCK_NAMES)  # per-layer part → HF name
    gguf_config: GGUFConfigHook | None = None
    gguf_values: GGUFValuesHook | None = None
    gguf_tensor: GGUFTensorHook | None = None


# --- config.json helpers several families use ------------------------------------------------------

ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


def require(raw: Raw, key: str, source: str) -> Any:
    if raw.get(key) is None:
        raise ModelLoadError(f"{source}: required key {key!r} is missing")
    return raw[key]


def attention_layer_types(raw: Raw, num_layers: int, source: str) -> tuple[bool, ...] | None:
    """Per layer: sliding or not, from `layer_types` (None when the config has none)."""
    layer_types = raw.get("layer_types")
    if not layer_types:
        return None
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
        raise ModelLoadError(f"{source}: layer_types must be a list of layer type names, not {layer_types!r:.60}")
    if len(layer_types) != num_layers:
        raise ModelLoadError(f"{source}: layer_types has {len(layer_types)} entries for {num_layers} layers")
    unknown = sorted(set(layer_types) - set(ATTENTION_LAYER_TYPES))
    if unknown:
        raise ModelLoadError(
            f"{source}: unsupported layer type(s) {', '.join(map(repr, unknown))} in layer_types; "
            f"supported: {', '.join(ATTENTION_LAYER_TYPES)}"
        )
    return tuple(t == "sliding_attention" for t in layer_types)


def pattern_layers(raw: Raw, num_layers: int, source: str, pattern: int, key: str | None) -> tuple[bool, ...]:
    """Gemma-style layouts: `layer_types`, else every `pattern`-th layer (config key `key`) is full."""
    if key:
        pattern = int(raw.get(key) or pattern)
    given = attention_layer_types(raw, num_layers, source)
    return given or tuple(bool((i + 1) % pattern) for i in range(num_layers))


def recurrent_layer_kinds(types: list[Any], kinds: Mapping[str, str], num_layers: int, source: str) -> tuple[str, ...]:
    """A hybrid's `layer_types` as ModelConfig.layer_kinds ("attention", "conv", ...), checked."""
    if len(types) != num_layers:
        raise ModelLoadError(f"{source}: layer_types has {len(types)} entries for {num_layers} layers")
    unknown = sorted({str(t) for t in types} - set(kinds))
    if unknown:
        raise ModelLoadError(f"{source}: unsupported layer type(s) {', '.join(map(repr, unknown))} in layer_types")
    return tuple(kinds[t] for t in types)


def expert_counts(raw: Raw, source: str) -> tuple[int, int]:
    """(experts, experts per token) of a mixture-of-experts config, checked."""
    experts = raw.get("num_experts") if raw.get("num_experts") is not None else raw.get("num_local_experts")
    if experts is None:
        raise ModelLoadError(f"{source}: required key 'num_experts' is missing")
    experts, used = int(experts), int(require(raw, "num_experts_per_tok", source))
    if experts > 0 and not 1 <= used <= experts:
        raise ModelLoadError(f"{source}: num_experts_per_tok {used} is not between 1 and num_experts {experts}")
    return experts, used


# --- GGUF helpers several families use -------------------------------------------------------------


def unpermute_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's conversion of Q/K rows from the half-split rotary layout to the interleaved one.

    convert_hf_to_gguf.py stores `w.reshape(heads, 2, rows // heads // 2, *rest).swapaxes(1, 2)`;
    this is its inverse, for weights [rows, cols] and biases [rows] alike.
    """
    shape = tensor.shape
    half = shape[0] // heads // 2
    return tensor.reshape(heads, half, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def unpermute_qk(config: ModelConfig, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """LlamaModel's conversion (and its subclasses') permutes the Q and K rows: undo it."""
    projection = hf_name.rsplit(".", 2)[-2]
    if projection == "q_proj":
        return unpermute_rows(tensor, config.num_heads)
    if projection == "k_proj":
        return unpermute_rows(tensor, config.num_kv_heads)
    return tensor


def sliding_from_pattern(file: GGUFFile, default_pattern: int) -> list[bool]:
    """llama.cpp's set_swa_pattern: the file's per-layer `sliding_window_pattern`, else every
    n-th layer full (0: every layer slides)."""
    layers = int(file.key("block_count") or 0)
    pattern = file.key("attention.sliding_window_pattern", default_pattern)
    if isinstance(pattern, list):
        return [bool(p) for p in pattern]
    return [pattern == 0 or i % pattern < pattern - 1 for i in range(layers)]


def per_layer_list(file: GGUFFile, name: str) -> list[Any]:
    """A key the converter writes per layer (or once for all), as one entry per layer, checked."""
    layers = int(file.key("block_count") or 0)
    value = file.key(name)
    per_layer = value if isinstance(value, list) else [value] * layers
    if len(per_layer) != layers:
        key = f"{file.architecture}.{name}"
        raise ModelLoadError(f"{file.path}: {key} has {len(per_layer)} entries for {layers} layers")
    return per_layer


@dataclass(frozen=True)
class ExpertLayout:
    """A GGUF file's experts as its tensors say (GGUFFile.experts checks them against the metadata)."""

    count: int  # {arch}.expert_count
    used: int | None  # {arch}.expert_used_count: experts per token
    width: int  # one expert's hidden width (expert_feed_forward_length, else feed_forward_length)
    sparse: list[bool]  # per layer: router and experts present (else a dense MLP)

    def keys(self) -> Raw:
        return {"num_experts": self.count, "num_local_experts": self.count, "num_experts_per_tok": self.used}

    def require_every_layer(self, file: GGUFFile) -> None:
        if not all(self.sparse):
            raise ModelLoadError(f"{file.path}: a {file.architecture} file with experts needs them in every layer")


def every_layer_moe(raw: Raw, num_layers: int, source: str, *, mixtral: bool = False) -> dict[str, Any]:
    """Mixtral, OLMoE: every layer sparse, experts as wide as intermediate_size. Mixtral always
    renormalizes the chosen experts' weights and weighs their outputs in float32."""
    experts, used = expert_counts(raw, source)
    return {
        "num_experts": experts,
        "num_experts_per_tok": used,
        "moe_intermediate_size": int(require(raw, "intermediate_size", source)),
        "norm_topk_prob": mixtral or bool(raw.get("norm_topk_prob", False)),
        "moe_float_weights": mixtral,
        "moe_layers": (experts > 0,) * num_layers,
    }
