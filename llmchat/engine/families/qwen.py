"""Qwen 2 and 3, their mixture-of-experts models, and Qwen3.5 (Gated DeltaNet between attention layers)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch

from llmchat.engine.errors import ModelLoadError
from llmchat.engine.families.base import (
    BLOCK_NAMES,
    MOE_BLOCK_NAMES,
    Family,
    Raw,
    expert_counts,
    recurrent_layer_kinds,
    require,
)

if TYPE_CHECKING:
    from llmchat.engine.config import ModelConfig
    from llmchat.engine.gguf import GGUFFile

QWEN2 = Family(
    "qwen2", "qwen2", ("Qwen2ForCausalLM",), qkv_bias=True, o_bias=False, sliding="use_sliding_window", gguf="qwen2"
)
QWEN3 = Family("qwen3", "qwen3", ("Qwen3ForCausalLM",), qk_norm=True, sliding="use_sliding_window", gguf="qwen3")


# --- mixture of experts ------------------------------------------------------------------------------


def _qwen_moe_fields(raw: Raw, num_layers: int, source: str, *, shared: bool) -> dict[str, Any]:
    """Sparse every `decoder_sparse_step`-th layer except `mlp_only_layers`; Qwen2-MoE adds a shared expert."""
    experts, used = expert_counts(raw, source)
    step = int(raw.get("decoder_sparse_step") or 1)
    dense = {int(i) for i in raw.get("mlp_only_layers") or []}
    shared_width = int(require(raw, "shared_expert_intermediate_size", source)) if shared else 0
    return {
        "num_experts": experts,
        "num_experts_per_tok": used,
        "moe_intermediate_size": int(require(raw, "moe_intermediate_size", source)),
        "norm_topk_prob": bool(raw.get("norm_topk_prob", False)),
        "moe_layers": tuple(experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(num_layers)),
        "shared_expert_intermediate_size": shared_width,
    }


def _qwen_moe_gguf(file: GGUFFile, raw: Raw, *, renormalize: bool) -> Raw:
    """A layer with neither router nor experts is dense (transformers' mlp_only_layers); llama.cpp's
    qwen3moe renormalizes the chosen experts' weights unless `expert_weights_norm` says otherwise,
    qwen2moe does not."""
    experts = file.experts()
    if experts is None:
        return {}
    return experts.keys() | {
        "norm_topk_prob": bool(file.key("expert_weights_norm", renormalize)),
        "moe_intermediate_size": experts.width,
        "mlp_only_layers": [i for i, is_sparse in enumerate(experts.sparse) if not is_sparse],
    }


def _qwen2_moe_gguf(file: GGUFFile, raw: Raw) -> Raw:
    """Every sparse qwen2moe layer has a shared expert (ffn_*_shexp) and its gate (ffn_gate_inp_shexp)."""
    keys = _qwen_moe_gguf(file, raw, renormalize=False)
    if not keys:
        return keys
    sparse = [i not in keys["mlp_only_layers"] for i in range(int(file.key("block_count") or 0))]
    for i, is_sparse in enumerate(sparse):
        for part in _SHARED_EXPERT_NAMES if is_sparse else ():
            if f"blk.{i}.{part}.weight" not in file.tensor_info:
                raise ModelLoadError(f"{file.path}: MoE layer {i} has no shared expert blk.{i}.{part}.weight")
    first = next((i for i, is_sparse in enumerate(sparse) if is_sparse), None)
    shared = file.key("expert_shared_feed_forward_length")
    if shared is None and first is not None:
        shared = file.tensor_info[f"blk.{first}.ffn_up_shexp.weight"].shape[0]
    return keys | {"shared_expert_intermediate_size": shared, "qkv_bias": "blk.0.attn_q.bias" in file.tensor_info}


def _shared_gate_values(config: ModelConfig, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
    if hf_name.endswith("shared_expert_gate.weight"):
        return tensor.reshape(1, -1)  # a [1, hidden] projection, stored as [hidden] or [1, hidden]
    return tensor


# Qwen2-MoE's shared expert and its sigmoid gate ([hidden] or [1, hidden] in the file).
_SHARED_EXPERT_NAMES = {
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}

QWEN3_MOE = Family(
    "qwen3_moe",
    "qwen3_moe",
    ("Qwen3MoeForCausalLM",),
    qk_norm=True,
    sliding="use_sliding_window_all",
    defaults={"num_experts_per_tok": 8, "moe_intermediate_size": 768, "decoder_sparse_step": 1},
    fields=lambda raw, layers, source: _qwen_moe_fields(raw, layers, source, shared=False),
    gguf="qwen3moe",
    gguf_names=MOE_BLOCK_NAMES,
    gguf_config=lambda file, raw: _qwen_moe_gguf(file, raw, renormalize=True),
)
QWEN2_MOE = Family(
    "qwen2_moe",
    "qwen2_moe",
    ("Qwen2MoeForCausalLM",),
    o_bias=False,
    bias_key="qkv_bias",
    sliding="use_sliding_window_even",
    defaults={
        "qkv_bias": True,
        "sliding_window": 4096,
        "max_window_layers": 28,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632,
        "decoder_sparse_step": 1,
    },
    fields=lambda raw, layers, source: _qwen_moe_fields(raw, layers, source, shared=True),
    gguf="qwen2moe",
    gguf_names=MOE_BLOCK_NAMES | _SHARED_EXPERT_NAMES,
    gguf_config=_qwen2_moe_gguf,
    gguf_values=_shared_gate_values,
)


# --- Qwen3.5 -----------------------------------------------------------------------------------------

_QWEN3_5_LAYER_TYPES = {"full_attention": "attention", "linear_attention": "linear_attention"}


def _qwen3_5_fields(raw: Raw, num_layers: int, source: str) -> dict[str, Any]:
    """Qwen3.5's layout (Qwen3_5TextConfig: `layer_types`, else every full_attention_interval-th layer
    attends) and the widths of its DeltaNet layers."""
    types = raw.get("layer_types")
    if types is None:
        interval = int(raw.get("full_attention_interval") or 4)
        types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(num_layers)]
    kinds = recurrent_layer_kinds(types, _QWEN3_5_LAYER_TYPES, num_layers, source)
    key_heads, value_heads = int(raw["linear_num_key_heads"]), int(raw["linear_num_value_heads"])
    if value_heads % key_heads:
        raise ModelLoadError(f"{source}: {value_heads} linear value heads are not a multiple of {key_heads} key heads")
    return {
        "layer_kinds": kinds,
        "conv_kernel": int(raw["linear_conv_kernel_dim"]),
        "linear_key_heads": key_heads,
        "linear_value_heads": value_heads,
        "linear_key_dim": int(raw["linear_key_head_dim"]),
        "linear_value_dim": int(raw["linear_value_head_dim"]),
        "attn_output_gate": True,
        "norm_offset": 1.0,  # Qwen3_5RMSNorm: x / rms(x) * (1 + w), in float32
    }


def _qwen35_gguf(file: GGUFFile, raw: Raw) -> Raw:
    """Qwen3.5's DeltaNet widths (the ssm.* keys Qwen3NextModel's conversion writes), its layout
    (every full_attention_interval-th layer attends) and the rotary share of a head."""
    layers = int(file.key("block_count") or 0)
    interval = int(file.key("full_attention_interval") or 4)
    key_heads, value_heads = file.key("ssm.group_count"), file.key("ssm.time_step_rank")
    inner = file.key("ssm.inner_size")
    rope_dims, head_dim = file.key("rope.dimension_count"), raw.get("head_dim")
    return {
        "layer_types": ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)],
        "linear_conv_kernel_dim": file.key("ssm.conv_kernel"),
        "linear_key_head_dim": file.key("ssm.state_size"),
        "linear_num_key_heads": key_heads,
        "linear_num_value_heads": value_heads,
        "linear_value_head_dim": inner // value_heads if inner and value_heads else None,
        "partial_rotary_factor": rope_dims / head_dim if rope_dims and head_dim else None,
    }


def _tiled_to_grouped(tensor: torch.Tensor, dim: int, key_heads: int, per_key: int, width: int) -> torch.Tensor:
    """Undo the converter's V-head reorder along `dim`: llama.cpp stores the value heads tiled
    (k0 k1 .. k0 k1 ..), Hugging Face grouped by key head (k0's r heads, then k1's ...)."""
    shape = list(tensor.shape)
    split = [*shape[:dim], per_key, key_heads, width, *shape[dim + 1 :]]
    return tensor.reshape(split).transpose(dim, dim + 1).reshape(shape)


def _qwen35_values(c: ModelConfig, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Undo Qwen3NextModel's and _LinearAttentionVReorderBase's conversion: +1 on the (1 + w)
    norms, A_log stored as -exp(A_log), the conv filters squeezed, and with fewer key than value
    heads the value heads reordered to llama.cpp's tiled order in every DeltaNet tensor."""
    if hf_name.endswith("norm.weight") and not hf_name.endswith("linear_attn.norm.weight"):
        return tensor - 1.0
    part = hf_name.rsplit("linear_attn.", 1)[-1] if "linear_attn." in hf_name else ""
    if part == "A_log":
        tensor = torch.log(-tensor)
    if part == "conv1d.weight":
        tensor = tensor.unsqueeze(1)  # [channels, kernel] -> Conv1d's [channels, 1, kernel]
    key_heads, value_heads = c.linear_key_heads, c.linear_value_heads
    if not part or key_heads == value_heads:
        return tensor
    per_key, width = value_heads // key_heads, c.linear_value_dim
    if part in ("in_proj_qkv.weight", "conv1d.weight"):  # only the value rows / channels
        qk = 2 * key_heads * c.linear_key_dim
        values = _tiled_to_grouped(tensor[qk:], 0, key_heads, per_key, width)
        return torch.cat((tensor[:qk], values))
    if part == "in_proj_z.weight":
        return _tiled_to_grouped(tensor, 0, key_heads, per_key, width)
    if part in ("in_proj_a.weight", "in_proj_b.weight", "A_log", "dt_bias"):
        return _tiled_to_grouped(tensor, 0, key_heads, per_key, 1)
    if part == "out_proj.weight":
        return _tiled_to_grouped(tensor, 1, key_heads, per_key, width)
    return tensor


_QWEN35_BARE = re.compile(r"^blk\.(\d+)\.(ssm_a|ssm_dt\.bias)$")  # tensors without the usual suffix


def _qwen35_tensor(name: str) -> str | None:
    bare = _QWEN35_BARE.match(name)
    if bare is None:
        return None
    return f"model.layers.{bare.group(1)}.linear_attn.{'A_log' if bare.group(2) == 'ssm_a' else 'dt_bias'}"


# Qwen3.5 (text): zero-centred (1 + w) RMSNorms everywhere, Gated DeltaNet layers between gated
# attention layers with per-head q/k norms and a partial RoPE.
QWEN3_5 = Family(
    "qwen3_5_text",
    "qwen3_5",
    ("Qwen3_5ForCausalLM",),
    multimodal_classes=("Qwen3_5ForConditionalGeneration",),
    qk_norm=True,
    hybrid=True,
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
    fields=_qwen3_5_fields,
    gguf="qwen35",
    # post_attention_norm is the MLP's input norm (HF's post_attention_layernorm); the DeltaNet layers'
    # projections, convolution, decay and gated norm are attn_qkv, attn_gate, ssm_* (ssm_a and
    # ssm_dt.bias are A_log and dt_bias as the converter rewrites them: _qwen35_tensor, _qwen35_values).
    gguf_names=BLOCK_NAMES
    | {
        "post_attention_norm": "post_attention_layernorm",
        "attn_qkv": "linear_attn.in_proj_qkv",
        "attn_gate": "linear_attn.in_proj_z",
        "ssm_beta": "linear_attn.in_proj_b",
        "ssm_alpha": "linear_attn.in_proj_a",
        "ssm_conv1d": "linear_attn.conv1d",
        "ssm_norm": "linear_attn.norm",
        "ssm_out": "linear_attn.out_proj",
    },
    gguf_config=_qwen35_gguf,
    gguf_values=_qwen35_values,
    gguf_tensor=_qwen35_tensor,
)

FAMILIES = (QWEN2, QWEN3, QWEN3_MOE, QWEN2_MOE, QWEN3_5)
