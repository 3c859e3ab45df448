"""IBM's Granite 3 (four multipliers on a llama layer) and Granite 4 (Mamba-2 layers between attention
layers, each followed by experts plus an ungated shared MLP)."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import torch

from llmchat.engine.errors import ModelLoadError
from llmchat.engine.families.base import (
    MOE_BLOCK_NAMES,
    Family,
    Raw,
    expert_counts,
    per_layer_list,
    recurrent_layer_kinds,
    require,
    unpermute_qk,
)

if TYPE_CHECKING:
    from llmchat.engine.config import ModelConfig
    from llmchat.engine.gguf import GGUFFile


def _multipliers(raw: Raw) -> dict[str, Any]:
    """Granite's embedding, attention and residual multipliers, and its logits divisor.

    A multiplier of 1 is left out (None), except the attention one: it replaces head_dim ** -0.5.
    """
    embedding, residual = float(raw["embedding_multiplier"]), float(raw["residual_multiplier"])
    divisor = float(raw["logits_scaling"])  # GraniteForCausalLM divides the logits by it
    return {
        "embed_scale": None if embedding == 1.0 else embedding,
        "attn_scale": float(raw["attention_multiplier"]),
        "residual_scale": None if residual == 1.0 else residual,
        "logit_scale": None if divisor == 1.0 else 1.0 / divisor,
    }


# GraniteModel's conversion (llama.cpp's names for its config *_multiplier keys), HF key → GGUF key
_SCALES = {
    "embedding_multiplier": "embedding_scale",
    "residual_multiplier": "residual_scale",
    "attention_multiplier": "attention.scale",
    "logits_scaling": "logit_scale",
}


def _gguf_multipliers(file: GGUFFile, raw: Raw) -> Raw:
    """The converter writes each key only where the config has a nonzero value. llama.cpp reads a
    missing (or 0) one as no scaling, and a missing attention scale as head_dim ** -0.5
    (GraniteConfig's default is 1); it requires logit_scale, which llmchat reads as 1 when absent."""
    head_dim = raw.get("head_dim")
    defaults = {"attention_multiplier": head_dim**-0.5 if head_dim else 1.0}
    return {hf: float(file.key(key) or defaults.get(hf, 1.0)) for hf, key in _SCALES.items()}


def _granite_gguf(file: GGUFFile, raw: Raw) -> Raw:
    """llama.cpp's granite switches RoPE off with rope.scaling.finetuned false: that is refused."""
    if file.key("rope.scaling.finetuned") is False:
        raise ModelLoadError(f"{file.path}: granite without RoPE (rope.scaling.finetuned false) is not supported")
    return _gguf_multipliers(file, raw)


# GraniteConfig's multipliers all default to 1 (the attention scale too, not head_dim ** -0.5).
_MULTIPLIER_DEFAULTS = {
    "embedding_multiplier": 1.0,
    "attention_multiplier": 1.0,
    "residual_multiplier": 1.0,
    "logits_scaling": 1.0,
}

GRANITE = Family(
    "granite",
    "granite",
    ("GraniteForCausalLM",),
    mlp_bias=True,
    defaults=_MULTIPLIER_DEFAULTS,
    fields=lambda raw, layers, source: _multipliers(raw),
    gguf="granite",
    gguf_config=_granite_gguf,
    gguf_values=unpermute_qk,  # converted by LlamaModel's subclass GraniteModel
)


# --- Granite 4 ---------------------------------------------------------------------------------------

# Its layer types: the names of its published configs (`layers_block_type`, later `layer_types`) and
# the ones transformers 5 writes
_LAYER_TYPES = {"mamba": "mamba", "linear_attention": "mamba", "attention": "attention", "full_attention": "attention"}


def _granite4_keys(raw: Raw, source: str) -> Raw:
    """The dense MLP width is the shared MLP's (`shared_intermediate_size`), `intermediate_size` the
    experts' (then `moe_intermediate_size`); `layers_block_type` is the older name of `layer_types`."""
    raw = dict(raw)
    raw["moe_intermediate_size"] = require(raw, "intermediate_size", source)
    raw["intermediate_size"] = require(raw, "shared_intermediate_size", source)
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


def _mamba_fields(raw: Raw, num_layers: int, source: str) -> dict[str, Any]:
    """The layout (GraniteMoeHybridConfig: `layer_types`, every layer Mamba-2 without them) and the
    widths of its Mamba-2 layers (mamba_d_head "auto": mamba_expand * hidden_size // heads)."""
    kinds = recurrent_layer_kinds(raw.get("layer_types") or ["mamba"] * num_layers, _LAYER_TYPES, num_layers, source)
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
    if "mamba" in kinds and kernel < 1:
        raise ModelLoadError(f"{source}: mamba_d_conv must be at least 1, not {kernel}")
    limit = raw.get("time_step_limit")
    if limit is None:
        low, high = 0.0, math.inf
    elif isinstance(limit, list | tuple) and len(limit) == 2:
        low, high = (_limit_value(v, source) for v in limit)
    else:
        raise ModelLoadError(f"{source}: time_step_limit must be a [low, high] pair, not {limit!r:.60}")
    return {
        "layer_kinds": kinds,
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


def _granite4_fields(raw: Raw, num_layers: int, source: str) -> dict[str, Any]:
    """Mamba-2 and attention layers; experts in every layer or none (softmax over the top k) plus an
    ungated shared MLP; Granite's multipliers; RoPE only with position_embedding_type "rope"."""
    experts, used = expert_counts(raw, source)
    return {
        **_multipliers(raw),
        **_mamba_fields(raw, num_layers, source),
        "num_experts": experts,
        "num_experts_per_tok": used,
        "moe_intermediate_size": int(require(raw, "moe_intermediate_size", source)),
        "moe_layers": (experts > 0,) * num_layers,
        "moe_softmax_topk": True,
        "shared_expert_intermediate_size": int(require(raw, "intermediate_size", source)),
        "shared_expert_gate": False,
        "rope_layers": () if raw.get("position_embedding_type") == "rope" else (False,) * num_layers,
    }


def _granite4_gguf(file: GGUFFile, raw: Raw) -> Raw:
    """As GraniteHybridModel's conversion writes it: head_count_kv 0 marks a Mamba-2 layer, the ssm.*
    keys give its widths (time_step_rank is the head count), the multipliers are granite's, and
    rope.scaling.finetuned says whether attention rotates (the converter writes false for every
    hybrid, and llama.cpp then attends without positions). The shared MLP's width is
    expert_shared_feed_forward_length (else its tensors'); biases are read off the tensors;
    time_step_limit and mamba_chunk_size have no key (the config class's defaults)."""
    types = ["attention" if heads else "mamba" for heads in per_layer_list(file, "attention.head_count_kv")]
    first = types.index("mamba") if "mamba" in types else 0
    hidden, inner = file.key("embedding_length"), file.key("ssm.inner_size")
    heads = file.key("ssm.time_step_rank")
    shared = file.key("expert_shared_feed_forward_length")
    for part in ("ffn_up_shexp", "ffn_up"):
        info = file.tensor_info.get(f"blk.0.{part}.weight")
        if shared is None and info is not None:
            shared = info.shape[0]
    keys = {
        "layer_types": types,
        "position_embedding_type": "rope" if file.key("rope.scaling.finetuned") else None,
        "mamba_n_heads": heads,
        "mamba_d_head": inner // heads if inner and heads else None,
        "mamba_expand": inner // hidden if inner and hidden else None,
        "mamba_d_state": file.key("ssm.state_size"),
        "mamba_n_groups": file.key("ssm.group_count"),
        "mamba_d_conv": file.key("ssm.conv_kernel"),
        "mamba_conv_bias": f"blk.{first}.ssm_conv1d.bias" in file.tensor_info,
        "mamba_proj_bias": f"blk.{first}.ssm_in.bias" in file.tensor_info,
        "num_local_experts": int(file.key("expert_count") or 0),
        "num_experts_per_tok": file.key("expert_used_count"),
        "shared_intermediate_size": shared,
        **_gguf_multipliers(file, raw),
    }
    experts = file.experts()
    if experts is not None:  # in every layer or none; the shared MLP is the dense width above
        experts.require_every_layer(file)
        keys |= experts.keys() | {"intermediate_size": experts.width}
    return keys


def _granite4_values(config: ModelConfig, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Undo GraniteHybridModel's conversion: Q/K rows permuted (LlamaModel's, undo_permute), the conv
    filters squeezed, A_log stored as -exp(A_log) and A, D unsqueezed to [heads, 1], the gated
    norm reshaped to [groups, inner // groups]."""
    if ".self_attn." in hf_name:
        return unpermute_qk(config, hf_name, tensor)
    if hf_name.endswith("mamba.conv1d.weight"):
        return tensor.reshape(tensor.shape[0], 1, -1)  # [channels, kernel] -> Conv1d's [channels, 1, kernel]
    if hf_name.endswith("mamba.A_log"):
        return torch.log(-tensor.reshape(-1))
    if hf_name.endswith(("mamba.D", "mamba.norm.weight")):
        return tensor.reshape(-1)
    return tensor


_BARE = re.compile(r"^blk\.(\d+)\.(ssm_a|ssm_d|ssm_dt\.bias)$")  # tensors without the usual suffix
_BARE_NAMES = {"ssm_a": "A_log", "ssm_d": "D", "ssm_dt.bias": "dt_bias"}


def _granite4_tensor(name: str) -> str | None:
    bare = _BARE.match(name)
    return None if bare is None else f"model.layers.{bare.group(1)}.mamba.{_BARE_NAMES[bare.group(2)]}"


GRANITE4 = Family(
    "granitemoehybrid",
    "granitemoehybrid",
    ("GraniteMoeHybridForCausalLM",),
    hybrid=True,
    defaults={
        **_MULTIPLIER_DEFAULTS,
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
    keys=_granite4_keys,
    fields=_granite4_fields,
    gguf="granitehybrid",
    # The Mamba-2 layers' ssm_* tensors (ssm_a, ssm_d and ssm_dt.bias: _granite4_tensor), the experts'
    # router, and the shared MLP, whose ffn_{gate,up,down}_shexp (beside experts) or ffn_{gate,up,down}
    # (without) are both served as the shared expert's (model.SharedMLP, moe._SHARED).
    gguf_names=MOE_BLOCK_NAMES
    | {
        "ssm_in": "mamba.in_proj",
        "ssm_conv1d": "mamba.conv1d",
        "ssm_norm": "mamba.norm",
        "ssm_out": "mamba.out_proj",
        "ffn_gate_inp": "block_sparse_moe.router.layer",
        "ffn_gate": "mlp.shared_expert.gate_proj",
        "ffn_up": "mlp.shared_expert.up_proj",
        "ffn_down": "mlp.shared_expert.down_proj",
        "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
        "ffn_up_shexp": "mlp.shared_expert.up_proj",
        "ffn_down_shexp": "mlp.shared_expert.down_proj",
    },
    gguf_config=_granite4_gguf,
    gguf_values=_granite4_values,
    gguf_tensor=_granite4_tensor,
)

FAMILIES = (GRANITE, GRANITE4)
