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


def _write_hparams(writer: gguf.GGUFWriter, config: dict[str, Any], arch: gguf.MODEL_ARCH) -> None:
    """TextModel.set_gguf_parameters plus the per-architecture additions."""
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
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
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if arch in (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.SMOLLM3):
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
        elif config.get("sliding_window"):
            writer.add_sliding_window(config["sliding_window"])
        if config["model_type"] in ("qwen2_moe", "olmoe") and config.get("norm_topk_prob"):
            writer.add_expert_weights_norm(True)  # llama.cpp's default for these is not to renormalize
    if arch == gguf.MODEL_ARCH.PHI3:
        writer.add_rope_dimension_count(int(params.get("partial_rotary_factor", 1.0) * head_dim))
        writer.add_sliding_window(config.get("sliding_window") or 0)
        original = params.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
        if original is not None:
            writer.add_rope_scaling_orig_ctx_len(original)


def _write_vocab(writer: gguf.GGUFWriter, folder: Path) -> None:
    """_set_vocab_gpt2 + SpecialVocab: tokens by id, types, merges, special ids, flags, template."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = dict(tokenizer["model"]["vocab"])
    added = {token["content"]: token for token in tokenizer.get("added_tokens", [])}
    vocab.update({content: token["id"] for content, token in added.items()})
    by_id = {index: token for token, index in vocab.items()}
    tokens = [by_id[i] for i in range(len(by_id))]
    types = []
    for token in tokens:
        if token in added:
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
    _write_vocab(writer, folder)
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
    if arch in (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.SMOLLM3) and params.get("rope_type") == "llama3":
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
                if arch in (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.SMOLLM3):  # LlamaModel.modify_tensors
                    if name.endswith(("q_proj.weight", "q_proj.bias")):
                        tensor = _permute(tensor, n_head, n_head)
                    if name.endswith(("k_proj.weight", "k_proj.bias")):
                        tensor = _permute(tensor, n_head, n_kv_head)
                if arch in (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3) and name.endswith("norm.weight"):
                    tensor = tensor + 1
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
