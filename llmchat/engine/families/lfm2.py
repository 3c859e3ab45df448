"""Liquid's LFM2: gated short convolutions between attention layers, under names of its own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from llmchat.engine.errors import ModelLoadError
from llmchat.engine.families.base import BLOCK_NAMES, Family, Raw, per_layer_list, recurrent_layer_kinds, require

if TYPE_CHECKING:
    from llmchat.engine.config import ModelConfig
    from llmchat.engine.gguf import GGUFFile

_LAYER_TYPES = {"full_attention": "attention", "conv": "conv"}


def _keys(raw: Raw, source: str) -> Raw:
    """Lfm2Config's keys in the names the generic reader expects: `norm_eps`, `block_ff_dim` /
    `tie_embedding` (older aliases) and the MLP width, which `block_auto_adjust_ff_dim` takes as 2/3
    of intermediate_size times block_ffn_dim_multiplier, rounded up to a multiple of block_multiple_of."""
    raw = dict(raw)
    raw["rms_norm_eps"] = raw.get("norm_eps", 1e-5)
    if raw.get("block_ff_dim") is not None:
        raw["intermediate_size"] = raw["block_ff_dim"]
    if raw.get("tie_embedding") is not None:
        raw["tie_word_embeddings"] = raw["tie_embedding"]
    width = int(require(raw, "intermediate_size", source))
    if raw.get("block_auto_adjust_ff_dim"):
        width = int(2 * width / 3)
        if raw.get("block_ffn_dim_multiplier") is not None:
            width = int(raw["block_ffn_dim_multiplier"] * width)
        multiple = int(raw.get("block_multiple_of") or 1)
        width = multiple * ((width + multiple - 1) // multiple)
    raw["intermediate_size"] = width
    return raw


def _fields(raw: Raw, num_layers: int, source: str) -> dict[str, Any]:
    """`layer_types`, else the layers in full_attn_idxs attend (all of them when it is absent too)."""
    types = raw.get("layer_types")
    if types is None:
        attending = set(raw.get("full_attn_idxs") or range(num_layers))
        types = ["full_attention" if i in attending else "conv" for i in range(num_layers)]
    kinds = recurrent_layer_kinds(types, _LAYER_TYPES, num_layers, source)
    kernel = int(raw.get("conv_L_cache") or 0)
    if "conv" in kinds and kernel < 1:
        raise ModelLoadError(f"{source}: conv_L_cache must be at least 1, not {raw.get('conv_L_cache')!r}")
    return {"layer_kinds": kinds, "conv_kernel": kernel, "conv_bias": bool(raw.get("conv_bias", False))}


def _gguf(file: GGUFFile, raw: Raw) -> Raw:
    """The layer layout (head_count_kv 0 marks a convolution layer, as the converter writes it), the
    kernel (shortconv.l_cache) and the MLP width (feed_forward_length is the adjusted one already)."""
    per_layer = per_layer_list(file, "attention.head_count_kv")
    return {
        "layer_types": ["full_attention" if heads else "conv" for heads in per_layer],
        "conv_L_cache": file.key("shortconv.l_cache"),
        "norm_eps": file.key("attention.layer_norm_rms_epsilon"),
        "block_auto_adjust_ff_dim": False,
    }


def _values(config: ModelConfig, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
    if hf_name.endswith("conv.conv.weight"):
        return tensor.unsqueeze(1)  # [hidden, kernel] -> Conv1d's [hidden, 1, kernel]
    return tensor


LFM2 = Family(
    "lfm2",
    "lfm2",
    ("Lfm2ForCausalLM",),
    qkv_bias=False,
    o_bias=False,
    qk_norm=True,
    hybrid=True,
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
    keys=_keys,
    fields=_fields,
    gguf="lfm2",
    # its own names for the norms, attention output and q/k norms, MLP, and the short convolution of
    # its recurrent layers (shortconv.conv is stored [hidden, kernel]: _values)
    gguf_names=BLOCK_NAMES
    | {
        "attn_norm": "operator_norm",
        "ffn_norm": "ffn_norm",
        "attn_output": "self_attn.out_proj",
        "attn_q_norm": "self_attn.q_layernorm",
        "attn_k_norm": "self_attn.k_layernorm",
        "ffn_gate": "feed_forward.w1",
        "ffn_up": "feed_forward.w3",
        "ffn_down": "feed_forward.w2",
        "shortconv.conv": "conv.conv",
        "shortconv.in_proj": "conv.in_proj",
        "shortconv.out_proj": "conv.out_proj",
    },
    gguf_config=_gguf,
    gguf_values=_values,
    # LFM2's final norm, despite its name
    gguf_tensor=lambda name: "model.embedding_norm.weight" if name == "token_embd_norm.weight" else None,
)

FAMILIES = (LFM2,)
