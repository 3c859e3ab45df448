"""Write a tiny Hugging Face model folder as a GGUF file, the way llama.cpp's convert_hf_to_gguf.py does.

This is test-side code and deliberately independent of `llmchat.engine.gguf`: tensor names come
from gguf-py's own HF→GGUF table (the one the converter uses), the llama family's Q/K rows get the
converter's permutation, Gemma norms get its +1, llama3 RoPE scaling becomes a `rope_freqs`
tensor, and the vocabulary is written as `tokenizer.ggml.*` keys (gpt2 model). Matrices are
quantized with `gguf.quants.quantize` where it supports the asked type and the row length;
everything else is stored as F32, like the converter keeps norms and biases.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType
from safetensors import safe_open

# config.json model_type → GGUF architecture (Mistral is converted as llama).
GGUF_ARCH = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "qwen3": gguf.MODEL_ARCH.QWEN3,
    "gemma2": gguf.MODEL_ARCH.GEMMA2,
    "gemma3": gguf.MODEL_ARCH.GEMMA3,
    "gemma3_text": gguf.MODEL_ARCH.GEMMA3,
    "phi3": gguf.MODEL_ARCH.PHI3,
    "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE,
    "mixtral": gguf.MODEL_ARCH.LLAMA,  # Mixtral is converted as llama with experts
    "olmoe": gguf.MODEL_ARCH.OLMOE,
    "qwen2_moe": gguf.MODEL_ARCH.QWEN2MOE,
    "smollm3": gguf.MODEL_ARCH.SMOLLM3,  # LlamaModel's conversion; llama.cpp fixes the NoPE step at 4
    "olmo2": gguf.MODEL_ARCH.OLMO2,  # Olmo2Model: no Q/K permutation; a window only for OLMo 3
    "exaone4": gguf.MODEL_ARCH.EXAONE4,  # Exaone4Model: no Q/K permutation; the sliding layers as a list
    "granite": gguf.MODEL_ARCH.GRANITE,  # GraniteModel(LlamaModel): Q/K permuted, four scales, no head_dim
    "cohere2": gguf.MODEL_ARCH.COHERE2,  # Cohere2Model: no Q/K permutation (llama.cpp's rope pairs neighbours too)
    "glm4": gguf.MODEL_ARCH.GLM4,  # Glm4Model: likewise; gate_up_proj stays fused as ffn_up
    "lfm2": gguf.MODEL_ARCH.LFM2,  # LFM2Model: head_count_kv 0 marks a conv layer; conv filters squeezed
    "gpt_oss": gguf.MODEL_ARCH.GPT_OSS,  # GptOssModel: experts split from gate_up and transposed (_gpt_oss_parts)
    "qwen3_5_text": gguf.MODEL_ARCH.QWEN35,  # Qwen3_5TextModel: DeltaNet tensors rewritten, V heads tiled
    # GraniteHybridModel(Mamba2Model, GraniteMoeModel): Mamba-2 tensors rewritten, experts and shared MLP split
    "granitemoehybrid": gguf.MODEL_ARCH.GRANITE_HYBRID,
}
# Converted by LlamaModel or a subclass: Q/K rows permuted, vocab size and rotary dimensions written.
_LLAMA_CONVERSIONS = (
    gguf.MODEL_ARCH.LLAMA,
    gguf.MODEL_ARCH.SMOLLM3,
    gguf.MODEL_ARCH.GRANITE,
    gguf.MODEL_ARCH.GRANITE_HYBRID,
)
# GraniteModel.set_gguf_parameters: each multiplier the config has (and is not 0), under llama.cpp's name.
_GRANITE_SCALES = {
    "attention_multiplier": gguf.GGUFWriter.add_attention_scale,
    "embedding_multiplier": gguf.GGUFWriter.add_embedding_scale,
    "residual_multiplier": gguf.GGUFWriter.add_residual_scale,
    "logits_scaling": gguf.GGUFWriter.add_logit_scale,
}
# One matrix per expert, as save_pretrained writes them: the converter stacks them per layer.
_EXPERT = re.compile(r"^(model\.layers\.\d+\.(?:mlp|block_sparse_moe)\.experts)\.(\d+)\.(\w+)\.weight$")
_FILE_TYPES = {
    GGMLQuantizationType.F32: gguf.LlamaFileType.ALL_F32,
    GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    GGMLQuantizationType.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    GGMLQuantizationType.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    GGMLQuantizationType.MXFP4: gguf.LlamaFileType.MOSTLY_MXFP4_MOE,  # gpt-oss: the experts only
}


def _rope_params(config: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """rope_parameters (new style, nested per layer type for Gemma 3) or rope_scaling + rope_theta
    (old style), as the converter merges them."""
    given = config.get("rope_parameters") or config.get("rope_scaling") or {}
    params = dict(given.get(layer_type, given))
    if layer_type == "sliding_attention" and layer_type not in given:
        params = {"rope_theta": config.get("rope_local_base_freq", 10000.0)}
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    return params


def _permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _llama3_rope_factors(params: dict[str, Any], dim: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors for rope_type llama3."""
    base = params.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = params.get("factor", 8.0)
    low_freq_factor = params.get("low_freq_factor", 1.0)
    high_freq_factor = params.get("high_freq_factor", 4.0)
    old_context_len = params.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _lfm2_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """LFM2Model.set_gguf_parameters' view of the config: KV heads per layer (0 for conv layers), the
    norm epsilon, and the MLP width as block_auto_adjust_ff_dim derives it."""
    width = config["intermediate_size"]
    if config["block_auto_adjust_ff_dim"]:
        width = int(2 * width / 3)
        if config["block_ffn_dim_multiplier"] is not None:
            width = int(config["block_ffn_dim_multiplier"] * width)
        multiple = config["block_multiple_of"]
        width = multiple * ((width + multiple - 1) // multiple)
    kv_heads = [config["num_key_value_heads"] if t != "conv" else 0 for t in config["layer_types"]]
    return {**config, "intermediate_size": width, "num_key_value_heads": kv_heads, "rms_norm_eps": config["norm_eps"]}


def _grouped_to_tiled(tensor: torch.Tensor, dim: int, key_heads: int, per_key: int, width: int) -> torch.Tensor:
    """_LinearAttentionVReorderBase._reorder_v_heads: value heads from grouped-by-key to tiled order."""
    shape = list(tensor.shape)
    split = [*shape[:dim], key_heads, per_key, width, *shape[dim + 1 :]]
    return tensor.reshape(split).transpose(dim, dim + 1).reshape(shape)


def _qwen35_tensor(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> tuple[str, torch.Tensor]:
    """Qwen3NextModel.modify_tensors after _LinearAttentionVReorderBase's: the value heads tiled,
    A_log as -exp(A_log), dt_bias as dt_proj.bias, conv filters squeezed, (1 + w) norms as 1 + w."""
    key_heads, value_heads = config["linear_num_key_heads"], config["linear_num_value_heads"]
    per_key, width = value_heads // key_heads, config["linear_value_head_dim"]
    if key_heads != value_heads and "linear_attn." in name:
        if ".in_proj_qkv." in name or ".conv1d" in name:
            qk = 2 * key_heads * config["linear_key_head_dim"]
            tensor = torch.cat((tensor[:qk], _grouped_to_tiled(tensor[qk:], 0, key_heads, per_key, width)))
        elif ".in_proj_z." in name:
            tensor = _grouped_to_tiled(tensor, 0, key_heads, per_key, width)
        elif ".in_proj_a." in name or ".in_proj_b." in name or name.endswith((".A_log", ".dt_bias")):
            tensor = _grouped_to_tiled(tensor, 0, key_heads, per_key, 1)
        elif ".out_proj." in name:
            tensor = _grouped_to_tiled(tensor, 1, key_heads, per_key, width)
    if name.endswith(".A_log"):
        tensor = -torch.exp(tensor)
    elif name.endswith(".dt_bias"):
        name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
    elif "conv1d" in name:
        tensor = tensor.squeeze()
    elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        tensor = tensor + 1
    return name, tensor


def _granite4_attention(config: dict[str, Any]) -> list[bool]:
    """Per layer: does it attend (GraniteHybridModel.get_attn_layers, which reads the layer type
    names of published configs; transformers 5 writes full_attention / linear_attention)."""
    types = config.get("layer_types") or config.get("layers_block_type")
    return [t in ("attention", "full_attention") for t in types]


def _granite4_hparams(config: dict[str, Any]) -> dict[str, Any]:
    """GraniteHybridModel's view of the config: KV heads per layer (0 for Mamba-2 layers), the vocab
    size padded to a multiple of 8 (its set_vocab, with Mamba-2 layers), no head_dim (GraniteModel)."""
    attends = _granite4_attention(config)
    vocab = config["vocab_size"]
    if not all(attends):
        vocab = -(vocab // -8) * 8
    kv_heads = [config["num_key_value_heads"] if a else 0 for a in attends]
    return {**config, "num_key_value_heads": kv_heads, "vocab_size": vocab, "head_dim": None}


def _granite4_tensors(name: str, tensor: torch.Tensor, config: dict[str, Any]) -> list[tuple[str, torch.Tensor, bool]]:
    """GraniteHybridModel.modify_tensors (after LlamaModel's Q/K permutation): (GGUF name, tensor,
    may be quantized). Experts' gate|up and the shared MLP split (ffn_*_shexp beside experts,
    ffn_{gate,up,down} without), dt_bias as ssm_dt.bias, conv filters squeezed, A_log as -exp(A_log)
    and A, D as [heads, 1], the gated norm as [groups, inner // groups]. Norms, filters, the router
    and the bare tensors are kept in F32, as the converter keeps them."""
    match = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GRANITE_HYBRID, config["num_hidden_layers"])
    if match is None:
        new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new_name is not None, f"gguf-py has no name for {name}"
        return [(new_name, tensor, not new_name.endswith("_norm.weight"))]
    bid, part = match.groups()
    experts = bool(config.get("num_local_experts"))
    if part == "block_sparse_moe.input_linear.weight":
        gate, up = tensor.split(config["intermediate_size"], dim=-2)
        return [(f"blk.{bid}.ffn_gate_exps.weight", gate, True), (f"blk.{bid}.ffn_up_exps.weight", up, True)]
    shared = "shexp" if experts else ""
    if part == "shared_mlp.input_linear.weight":
        gate, up = tensor.split(config["shared_intermediate_size"], dim=-2)
        suffix = f"_{shared}" if shared else ""
        return [(f"blk.{bid}.ffn_gate{suffix}.weight", gate, True), (f"blk.{bid}.ffn_up{suffix}.weight", up, True)]
    if part == "shared_mlp.output_linear.weight":
        return [(f"blk.{bid}.ffn_down{'_' + shared if shared else ''}.weight", tensor, True)]
    if part == "mamba.dt_bias":
        name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
    elif part == "mamba.conv1d.weight":
        tensor = tensor.squeeze()
    elif part in ("mamba.A_log", "mamba.D"):
        tensor = tensor.reshape(-1, 1)
        tensor = -torch.exp(tensor) if part == "mamba.A_log" else tensor
    elif part == "mamba.norm.weight":
        groups = config["mamba_n_groups"]
        tensor = tensor.reshape(groups, -1)
    new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
    assert new_name is not None, f"gguf-py has no name for {name}"
    keep_float = new_name.endswith(("_norm.weight", "ssm_conv1d.weight", "ffn_gate_inp.weight"))
    return [(new_name, tensor, not keep_float and new_name.endswith(".weight"))]


def _write_hparams(writer: gguf.GGUFWriter, config: dict[str, Any], arch: gguf.MODEL_ARCH) -> None:
    """TextModel.set_gguf_parameters plus the per-architecture additions."""
    if arch == gguf.MODEL_ARCH.GRANITE_HYBRID:
        config = _granite4_hparams(config)
    if arch == gguf.MODEL_ARCH.LFM2:
        config = _lfm2_hparams(config)
        writer.add_vocab_size(config["vocab_size"])
        writer.add_shortconv_l_cache(config["conv_L_cache"])
    if arch == gguf.MODEL_ARCH.QWEN35:  # Qwen3NextModel.set_gguf_parameters + the MRoPE sections
        types = config["layer_types"]
        interval = types.index("full_attention") + 1
        assert types == ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(len(types))], (
            "llama.cpp's qwen35 knows full_attention_interval only"
        )
        writer.add_ssm_conv_kernel(config["linear_conv_kernel_dim"])
        writer.add_ssm_state_size(config["linear_key_head_dim"])
        writer.add_ssm_group_count(config["linear_num_key_heads"])
        writer.add_ssm_time_step_rank(config["linear_num_value_heads"])
        writer.add_ssm_inner_size(config["linear_value_head_dim"] * config["linear_num_value_heads"])
        writer.add_full_attention_interval(interval)
        factor = _rope_params(config).get("partial_rotary_factor", 0.25)
        writer.add_rope_dimension_count(int(config["head_dim"] * factor))
        writer.add_rope_dimension_sections([11, 11, 10, 0])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    if config.get("rms_norm_eps") is not None:
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("layer_norm_eps") is not None:  # TextModel writes either epsilon it finds
        writer.add_layer_norm_eps(config["layer_norm_eps"])
    params = _rope_params(config)
    rope_type = params.get("rope_type")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(params["factor"])
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(params["factor"])
        writer.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
        if params.get("beta_fast") is not None:
            writer.add_rope_scaling_yarn_beta_fast(params["beta_fast"])
        if params.get("beta_slow") is not None:
            writer.add_rope_scaling_yarn_beta_slow(params["beta_slow"])
    writer.add_rope_freq_base(params["rope_theta"])
    if config.get("head_dim") is not None and arch != gguf.MODEL_ARCH.GRANITE:  # GraniteModel drops head_dim
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if arch in _LLAMA_CONVERSIONS:
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    if arch == gguf.MODEL_ARCH.GEMMA2:
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_sliding_window(config["sliding_window"])
    if arch == gguf.MODEL_ARCH.GEMMA3:
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_sliding_window(config["sliding_window"])
        writer.add_rope_freq_base_swa(_rope_params(config, "sliding_attention")["rope_theta"])
        # The converter leaves the layer pattern to llama.cpp's Gemma 3 default (5 sliding, 1 full);
        # a model with another pattern is written with the explicit per-layer list other converters use.
        sliding = [t == "sliding_attention" for t in config.get("layer_types") or []]
        if sliding and sliding != [i % 6 < 5 for i in range(len(sliding))]:
            writer.add_sliding_window_pattern(sliding)
    experts = config.get("num_experts") or config.get("num_local_experts")
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
        if config["model_type"] == "qwen3_moe":
            writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
            writer.add_expert_weights_norm(bool(config.get("norm_topk_prob", False)))
        elif config["model_type"] == "qwen2_moe":
            writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
            writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
        elif config["model_type"] == "olmoe":
            if config.get("clip_qkv") is not None:
                writer.add_clamp_kqv(config["clip_qkv"])
        elif config["model_type"] == "gpt_oss":  # GptOssModel.set_gguf_parameters
            writer.add_sliding_window(config["sliding_window"])
            writer.add_expert_feed_forward_length(config["intermediate_size"])
        elif config.get("sliding_window"):
            writer.add_sliding_window(config["sliding_window"])
        if config["model_type"] in ("qwen2_moe", "olmoe") and config.get("norm_topk_prob"):
            writer.add_expert_weights_norm(True)  # llama.cpp's default for these is not to renormalize
    if arch == gguf.MODEL_ARCH.COHERE2:  # Cohere2Model.set_gguf_parameters (no sliding_window_pattern key)
        writer.add_logit_scale(config["logit_scale"])
        writer.add_sliding_window(config["sliding_window"])
        writer.add_vocab_size(config["vocab_size"])
        rotary_pct = config.get("rotary_pct", 1.0)  # published configs have it; transformers' class does not
        writer.add_rope_dimension_count(int(rotary_pct * (config["hidden_size"] // config["num_attention_heads"])))
        writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    if arch in (gguf.MODEL_ARCH.GRANITE, gguf.MODEL_ARCH.GRANITE_HYBRID):
        for key, add in _GRANITE_SCALES.items():
            if config.get(key):
                add(writer, config[key])
    if arch == gguf.MODEL_ARCH.GRANITE_HYBRID:  # GraniteMoeModel's shared width, then the Mamba-2 keys
        if not experts:  # TextModel writes the config's 0 experts too
            writer.add_expert_count(0)
            writer.add_expert_used_count(config["num_experts_per_tok"])
        writer.add_expert_shared_feed_forward_length(config["shared_intermediate_size"])
        writer.add_ssm_conv_kernel(config["mamba_d_conv"])
        writer.add_ssm_state_size(config["mamba_d_state"])
        writer.add_ssm_group_count(config["mamba_n_groups"])
        writer.add_ssm_inner_size(config["mamba_expand"] * config["hidden_size"])
        writer.add_ssm_time_step_rank(config["mamba_n_heads"])
        use_rope = all(_granite4_attention(config))  # a hybrid never rotates in llama.cpp
        writer.add_rope_scaling_finetuned(use_rope)
        if not use_rope:
            writer.add_context_length(2**20)  # overwrites the one above (a duplicated-key warning)
    if arch == gguf.MODEL_ARCH.GLM4:  # Glm4Model.set_gguf_parameters
        factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))
        writer.add_rope_dimension_count(int(head_dim * factor))
    if arch == gguf.MODEL_ARCH.EXAONE4:  # Exaone4Model.set_gguf_parameters
        writer.add_vocab_size(config["vocab_size"])
        if config.get("sliding_window") is not None:
            writer.add_sliding_window(config["sliding_window"])
            if "layer_types" in config:
                writer.add_sliding_window_pattern([t == "sliding_attention" for t in config["layer_types"]])
            elif isinstance(config.get("sliding_window_pattern"), int):
                step = config["sliding_window_pattern"]
                writer.add_sliding_window_pattern([(i + 1) % step != 0 for i in range(config["num_hidden_layers"])])
    if arch == gguf.MODEL_ARCH.PHI3:
        writer.add_rope_dimension_count(int(params.get("partial_rotary_factor", 1.0) * head_dim))
        writer.add_sliding_window(config.get("sliding_window") or 0)
        original = params.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
        if original is not None:
            writer.add_rope_scaling_orig_ctx_len(original)


def _write_vocab(writer: gguf.GGUFWriter, folder: Path, size: int = 0) -> None:
    """_set_vocab_gpt2 + SpecialVocab: tokens by id, types, merges, special ids, flags, template;
    ids up to `size` that the tokenizer lacks are [PAD{id}] tokens of type UNUSED."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = dict(tokenizer["model"]["vocab"])
    added = {token["content"]: token for token in tokenizer.get("added_tokens", [])}
    vocab.update({content: token["id"] for content, token in added.items()})
    by_id = {index: token for token, index in vocab.items()}
    tokens = [by_id[i] for i in range(len(by_id))]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), size)]
    types = []
    for token in tokens:
        if token.startswith("[PAD") and token not in vocab:
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            types.append(gguf.TokenType.CONTROL if added[token]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer_config.get("bos_token"):
        writer.add_bos_token_id(vocab[tokenizer_config["bos_token"]])
    if tokenizer_config.get("eos_token"):
        writer.add_eos_token_id(vocab[tokenizer_config["eos_token"]])
    if tokenizer_config.get("add_bos_token") is not None:
        writer.add_add_bos_token(tokenizer_config["add_bos_token"])
    if tokenizer_config.get("chat_template"):
        writer.add_chat_template(tokenizer_config["chat_template"])


def _gpt_oss_parts(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor, bool]]:
    """GptOssModel.filter_tensors / modify_tensors for float weights: (HF name, tensor, is an expert matrix).

    The sinks get ".weight"; gate_up_proj ([experts, hidden, 2 * width], gate and up interleaved) is
    transposed and split into gate_proj and up_proj ([experts, width, hidden], the even and odd rows),
    its bias likewise; down_proj is transposed. The rest pass unchanged.
    """
    if name.endswith("sinks"):
        return [(name + ".weight", tensor, False)]
    if name.endswith("mlp.experts.gate_up_proj_bias"):
        base = name.removesuffix("gate_up_proj_bias")
        return [(base + "gate_proj.bias", tensor[..., ::2], False), (base + "up_proj.bias", tensor[..., 1::2], False)]
    if name.endswith("mlp.experts.down_proj_bias"):
        return [(name.replace("down_proj_bias", "down_proj.bias"), tensor, False)]
    if name.endswith("mlp.experts.gate_up_proj"):
        rows = tensor.transpose(-1, -2)
        gate, up = name.replace("gate_up_proj", "gate_proj.weight"), name.replace("gate_up_proj", "up_proj.weight")
        return [(gate, rows[:, ::2, :].contiguous(), True), (up, rows[:, 1::2, :].contiguous(), True)]
    if name.endswith("mlp.experts.down_proj"):
        return [(name + ".weight", tensor.transpose(-1, -2).contiguous(), True)]
    return [(name, tensor, False)]


def _store(tensor: torch.Tensor, qtype: GGMLQuantizationType) -> tuple[np.ndarray, GGMLQuantizationType]:
    """Quantize a matrix to `qtype` when gguf-py can; vectors and misfits stay F32."""
    data = tensor.to(torch.float32).numpy()
    if data.ndim < 2 or qtype == GGMLQuantizationType.F32:
        return data, GGMLQuantizationType.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    if data.shape[-1] % block_size:
        return data, GGMLQuantizationType.F32
    return gguf.quants.quantize(data, qtype), qtype


def export_gguf(
    folder: Path,
    out: Path,
    *,
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    architecture: str | None = None,
    vocab_only: bool = False,
    raw_types: dict[str, GGMLQuantizationType] | None = None,
) -> Path:
    """Write `folder` (a tiny HF model) to the GGUF file `out` and return it.

    `architecture` overrides general.architecture (to make an unsupported file); `raw_types`
    stores the named GGUF tensors as random bytes of another type (e.g. IQ2_XXS).
    """
    config = json.loads((folder / "config.json").read_text())
    arch = GGUF_ARCH[config["model_type"]]
    writer = gguf.GGUFWriter(out, architecture or gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(folder.name)
    if not vocab_only:
        _write_hparams(writer, config, arch)
        writer.add_file_type(_FILE_TYPES[qtype])
        _write_tensors(writer, folder, config, arch, qtype, raw_types or {})
    padded = _granite4_hparams(config)["vocab_size"] if arch == gguf.MODEL_ARCH.GRANITE_HYBRID else 0
    _write_vocab(writer, folder, padded)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _write_tensors(
    writer: gguf.GGUFWriter,
    folder: Path,
    config: dict[str, Any],
    arch: gguf.MODEL_ARCH,
    qtype: GGMLQuantizationType,
    raw_types: dict[str, GGMLQuantizationType],
) -> None:
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    dense_names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, config["num_hidden_layers"])
    n_head = config["num_attention_heads"]
    n_kv_head = config.get("num_key_value_heads", n_head)
    rng = np.random.default_rng(0)
    params = _rope_params(config)
    if arch in _LLAMA_CONVERSIONS and params.get("rope_type") == "llama3":
        dim = config.get("head_dim") or config["hidden_size"] // n_head
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(params, dim).numpy())
    if arch == gguf.MODEL_ARCH.PHI3 and params.get("long_factor"):
        writer.add_tensor("rope_factors_long.weight", np.asarray(params["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.asarray(params["short_factor"], dtype=np.float32))
    stacks: dict[str, dict[int, torch.Tensor]] = {}  # "model.layers.N.mlp.experts.gate_proj" -> expert -> matrix
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                if arch == gguf.MODEL_ARCH.GEMMA2 and name == "lm_head.weight":
                    continue
                tensor = handle.get_tensor(name).to(torch.float32)
                expert = _EXPERT.match(name)
                if expert:
                    stacks.setdefault(f"{expert.group(1)}.{expert.group(3)}", {})[int(expert.group(2))] = tensor
                    continue
                if arch == gguf.MODEL_ARCH.GPT_OSS:
                    for part_name, part, expert_part in _gpt_oss_parts(name, tensor):
                        new_name = names.get_name(part_name, try_suffixes=(".weight", ".bias"))
                        assert new_name is not None, f"gguf-py has no name for {part_name}"
                        # an MXFP4 file (MOSTLY_MXFP4_MOE) has its experts in MXFP4, the rest as floats; the
                        # converter keeps the router (FFN_GATE_INP) in F32 whatever the file type
                        kind = qtype if expert_part or qtype != GGMLQuantizationType.MXFP4 else GGMLQuantizationType.F32
                        if new_name.endswith("ffn_gate_inp.weight"):
                            kind = GGMLQuantizationType.F32
                        data, stored = _store(part, kind)
                        raw_dtype = stored if stored != GGMLQuantizationType.F32 else None
                        writer.add_tensor(new_name, data, raw_dtype=raw_dtype)
                    continue
                if arch in _LLAMA_CONVERSIONS:  # LlamaModel.modify_tensors
                    if name.endswith(("q_proj.weight", "q_proj.bias")):
                        tensor = _permute(tensor, n_head, n_head)
                    if name.endswith(("k_proj.weight", "k_proj.bias")):
                        tensor = _permute(tensor, n_head, n_kv_head)
                if arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3) and name.endswith("norm.weight"):
                    tensor = tensor + 1
                if arch == gguf.MODEL_ARCH.COHERE2 and name.endswith(".bias"):  # Cohere2Model.modify_tensors
                    assert not tensor.any(), f"the converter refuses the nonzero bias {name}"
                    continue
                if arch == gguf.MODEL_ARCH.LFM2 and "conv.conv" in name:  # LFM2Model.modify_tensors
                    tensor = tensor.squeeze(1)
                if arch == gguf.MODEL_ARCH.QWEN35:
                    name, tensor = _qwen35_tensor(name, tensor, config)
                if arch == gguf.MODEL_ARCH.GRANITE_HYBRID:
                    for new_name, part, quantizable in _granite4_tensors(name, tensor, config):
                        data, stored = _store(part, qtype if quantizable else GGMLQuantizationType.F32)
                        raw_dtype = stored if stored != GGMLQuantizationType.F32 else None
                        writer.add_tensor(new_name, data, raw_dtype=raw_dtype)
                    continue
                new_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if new_name is None and arch in (gguf.MODEL_ARCH.QWEN3MOE, gguf.MODEL_ARCH.QWEN2MOE):
                    # a dense layer (mlp_only_layers), which llama.cpp's qwen3moe/qwen2moe lack: qwen3's names
                    new_name = dense_names.get_name(name, try_suffixes=(".weight", ".bias"))
                assert new_name is not None, f"gguf-py has no name for {name}"
                if new_name.endswith("ffn_gate_inp_shexp.weight"):
                    tensor = tensor.squeeze()  # the converter squeezes [1, hidden]; llama.cpp reads [hidden]
                if new_name in raw_types:
                    _add_random(writer, new_name, tuple(tensor.shape), raw_types[new_name], rng)
                    continue
                data, stored = _store(tensor, qtype)
                writer.add_tensor(new_name, data, raw_dtype=stored if stored != GGMLQuantizationType.F32 else None)
    for name, by_expert in sorted(stacks.items()):
        tensor = torch.stack([by_expert[e] for e in range(len(by_expert))])  # [experts, out, in]
        new_name = names.get_name(name + ".weight", try_suffixes=(".weight",))
        assert new_name is not None, f"gguf-py has no name for {name}"
        data, stored = _store(tensor, qtype)
        writer.add_tensor(new_name, data, raw_dtype=stored if stored != GGMLQuantizationType.F32 else None)


def _add_random(
    writer: gguf.GGUFWriter,
    name: str,
    shape: tuple[int, ...],
    qtype: GGMLQuantizationType,
    rng: np.random.Generator,
) -> None:
    """A tensor of `shape` stored as random bytes of `qtype` (for types gguf-py cannot quantize to)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    row_bytes = -(-shape[-1] // block_size) * type_size  # whole blocks, even for a short row
    data = rng.integers(0, 256, size=(*shape[:-1], row_bytes), dtype=np.uint8)
    writer.add_tensor(name, data, raw_dtype=qtype)


def write_typed_tensors(out: Path, qtypes: list[GGMLQuantizationType], *, columns: int = 256, rows: int = 2) -> Path:
    """A llama GGUF holding one [rows, columns] tensor of random bytes per type, named blk.N.ffn_down.weight."""
    rng = np.random.default_rng(1)
    writer = gguf.GGUFWriter(out, "llama")
    for index, qtype in enumerate(qtypes):
        _add_random(writer, f"blk.{index}.ffn_down.weight", (rows, columns), qtype, rng)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def quantized_copy(folder: Path, out: Path, qtype: GGMLQuantizationType) -> Path:
    """A copy of `folder` whose matrices hold what quantizing them to `qtype` leaves of them: the model
    a quantized GGUF export holds, built without llmchat. Quantization works row by row, so quantizing
    the HF matrix equals quantizing the converter's (Q/K-permuted) one and permuting back."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, out)
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    for path in out.glob("*.safetensors"):
        tensors = load_file(str(path))
        for name, tensor in tensors.items():
            if tensor.ndim == 2 and tensor.shape[-1] % block == 0:
                values = gguf.quants.dequantize(gguf.quants.quantize(tensor.numpy(), qtype), qtype)
                tensors[name] = torch.from_numpy(np.ascontiguousarray(values))
        save_file(tensors, str(path), metadata={"format": "pt"})
    return out
