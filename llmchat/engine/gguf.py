"""GGUF model files (llama.cpp's single-file format) as model packages.

A GGUF file carries the hyperparameters and the tokenizer as key/value metadata and the weights as
(often block-quantized) tensors under llama.cpp's names. Opening one turns the metadata into the
Hugging Face config.json the rest of the engine already understands, and serves the tensors under
Hugging Face names, dequantized to float32 one at a time, with llama.cpp's conversion-time changes
undone (the Q/K row permutation of the llama family, the +1 folded into Gemma's norm weights). The
file is checked when it is opened: magic, version, architecture, every tensor's type and name.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from llmchat.engine.chat_template import ChatTemplates
from llmchat.engine.config import ModelConfig, from_hf_config
from llmchat.engine.errors import ModelLoadError
from llmchat.engine.gguf_metadata import read_gguf_index
from llmchat.engine.gguf_tensors import GGUFEmbedding, TensorInfo, dequantize_bytes
from llmchat.engine.gguf_vocab import end_of_generation_ids, tokenizer_from_gguf
from llmchat.engine.package import GenerationDefaults, ModelPackage

GGUF_MAGIC = b"GGUF"
READABLE_VERSIONS = (2, 3)

# GGUF `general.architecture` → the Hugging Face class the same weights load as.
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",  # Mistral checkpoints are converted as llama too (Mixtral: with experts)
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "lfm2": "Lfm2ForCausalLM",
    "qwen35": "Qwen3_5ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "exaone4": "Exaone4ForCausalLM",
    "cohere2": "Cohere2ForCausalLM",
    "glm4": "Glm4ForCausalLM",
    "granite": "GraniteForCausalLM",
    "gpt-oss": "GptOssForCausalLM",
    "granitehybrid": "GraniteMoeHybridForCausalLM",
}
# MXFP4: gpt-oss's experts (dequantized to float at load, see gguf_tensors._mxfp4)
SUPPORTED_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in (
        *("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"),
        *("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "MXFP4"),
    )
)

# Tensor names: llama.cpp (gguf-py's TENSOR_NAMES) → Hugging Face, per layer without the .weight/.bias.
_BLOCK_NAMES = {
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
# Gemma 2/3 normalize before and after both attention and MLP: llama.cpp's ffn_norm is the norm
# in front of the MLP there, and the norm after attention has a name of its own.
_GEMMA_BLOCK_NAMES = _BLOCK_NAMES | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3 keeps its fused projections: attn_qkv is q|k|v, ffn_up is gate|up.
_PHI3_BLOCK_NAMES = _BLOCK_NAMES | {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
# Mixture of experts: the router and the experts stacked [experts, out, in] (see moe.expert_part).
_MOE_BLOCK_NAMES = _BLOCK_NAMES | {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
_EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
# Qwen2-MoE's shared expert and its sigmoid gate ([hidden] or [1, hidden] in the file).
_SHARED_EXPERT_NAMES = {
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
# GLM-4: gate|up fused in ffn_up; ffn_norm (HF's post_attention_layernorm) is the MLP's input norm,
# post_attention_norm / post_ffw_norm norm the attention's and the MLP's outputs.
_GLM4_BLOCK_NAMES = _BLOCK_NAMES | {
    "ffn_up": "mlp.gate_up_proj",
    "post_attention_norm": "post_self_attn_layernorm",
    "post_ffw_norm": "post_mlp_layernorm",
}
# OLMo 2, EXAONE 4: no norm in front of attention or MLP; post_attention_norm / post_ffw_norm norm
# their outputs (HF's post_attention_layernorm / post_feedforward_layernorm). attn_q_norm /
# attn_k_norm span the whole projection in olmo2, one head in exaone4.
_NORM_AFTER_BLOCK_NAMES = {part: hf for part, hf in _BLOCK_NAMES.items() if part not in ("attn_norm", "ffn_norm")} | {
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# LFM2: its own names for the norms, attention output and q/k norms, MLP, and the short convolution
# of its recurrent layers (shortconv.conv is stored [hidden, kernel], HF's Conv1d [hidden, 1, kernel]).
_LFM2_BLOCK_NAMES = _BLOCK_NAMES | {
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
}
# Qwen3.5: post_attention_norm is the MLP's input norm (HF's post_attention_layernorm); the DeltaNet
# layers' projections, convolution, decay and gated norm are attn_qkv, attn_gate, ssm_* (ssm_a and
# ssm_dt.bias are A_log and dt_bias as the converter rewrites them, see GGUFWeights._qwen35_to_hf).
_QWEN35_BLOCK_NAMES = _BLOCK_NAMES | {
    "post_attention_norm": "post_attention_layernorm",
    "attn_qkv": "linear_attn.in_proj_qkv",
    "attn_gate": "linear_attn.in_proj_z",
    "ssm_beta": "linear_attn.in_proj_b",
    "ssm_alpha": "linear_attn.in_proj_a",
    "ssm_conv1d": "linear_attn.conv1d",
    "ssm_norm": "linear_attn.norm",
    "ssm_out": "linear_attn.out_proj",
}
_QWEN35_BARE = re.compile(r"^blk\.(\d+)\.(ssm_a|ssm_dt\.bias)$")  # tensors without the usual suffix
# Granite 4 (GraniteHybridModel's conversion): the Mamba-2 layers' ssm_* tensors (ssm_a, ssm_d and
# ssm_dt.bias are A_log as -exp(A_log), D and dt_bias: _GRANITE4_BARE; see GGUFWeights._granite4_to_hf),
# the experts' router, and the shared MLP, whose ffn_{gate,up,down}_shexp (beside experts) or
# ffn_{gate,up,down} (without) are both served as the shared expert's (model.SharedMLP, moe._SHARED).
_GRANITE4_BLOCK_NAMES = _MOE_BLOCK_NAMES | {
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
}
_GRANITE4_BARE = re.compile(r"^blk\.(\d+)\.(ssm_a|ssm_d|ssm_dt\.bias)$")
_GRANITE4_BARE_NAMES = {"ssm_a": "A_log", "ssm_d": "D", "ssm_dt.bias": "dt_bias"}
_LAYER_NAMES = {
    "lfm2": _LFM2_BLOCK_NAMES,
    "qwen35": _QWEN35_BLOCK_NAMES,
    "granitehybrid": _GRANITE4_BLOCK_NAMES,
    "olmo2": _NORM_AFTER_BLOCK_NAMES,
    "exaone4": _NORM_AFTER_BLOCK_NAMES,
    "glm4": _GLM4_BLOCK_NAMES,
    "gemma2": _GEMMA_BLOCK_NAMES,
    "gemma3": _GEMMA_BLOCK_NAMES,
    "phi3": _PHI3_BLOCK_NAMES,
    "llama": _MOE_BLOCK_NAMES,  # Mixtral
    "qwen3moe": _MOE_BLOCK_NAMES,
    "olmoe": _MOE_BLOCK_NAMES,  # attn_q_norm / attn_k_norm span the whole projection there
    "qwen2moe": _MOE_BLOCK_NAMES | _SHARED_EXPERT_NAMES,
    # gpt-oss: its router is mlp.router, post_attention_norm the MLP's input norm (HF's
    # post_attention_layernorm), attn_sinks one logit per head; the experts' biases are *_exps.bias.
    "gpt-oss": _MOE_BLOCK_NAMES
    | {
        "ffn_gate_inp": "mlp.router",
        "post_attention_norm": "post_attention_layernorm",
        "attn_sinks": "self_attn.sinks",
    },
}
# Whether llama.cpp renormalizes the chosen experts' weights when `expert_weights_norm` is absent.
_EXPERT_WEIGHTS_NORM = {"qwen3moe": True, "olmoe": False, "qwen2moe": False}
_EMBEDDING = "token_embd.weight"
_GLOBAL_NAMES = {
    _EMBEDDING: "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors that are hyperparameters, not weights: they go into the config.
_CONFIG_TENSORS = frozenset({"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"})
_FLOAT_TYPES = frozenset({"F32", "F16", "BF16", "F64"})  # stored as plain floats: nothing to keep packed
_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_0-9.]+)\.(weight|bias)$")

# Where llama.cpp puts the sliding-window layers (set_swa_pattern): all but every n-th layer.
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}  # these scale queries by hidden/heads, not head_dim
_GEMMA_LOCAL_ROPE_BASE = 10000.0
_SMOLLM3_NO_ROPE_STEP = 4  # llama.cpp's hparams.n_no_rope_layer_step for smollm3
# llama.cpp's exaone4 without a sliding_window_pattern key: only a 64-layer model (EXAONE 4.0 32B)
# slides, every 4th layer global, over 4096 tokens unless the file says otherwise.
_EXAONE4_SWA = {"layers": 64, "pattern": 4, "window": 4096}
_COHERE2_SWA_PATTERN = 4  # llama.cpp's cohere2 default when the file has no sliding_window_pattern
# GraniteModel's conversion (llama.cpp's names for its config *_multiplier keys), HF key → GGUF key
_GRANITE_SCALES = {
    "embedding_multiplier": "embedding_scale",
    "residual_multiplier": "residual_scale",
    "attention_multiplier": "attention.scale",
    "logits_scaling": "logit_scale",
}


def hf_tensor_name(name: str, architecture: str) -> str | None:
    """The Hugging Face name of a GGUF tensor; None for unknown names."""
    if name == "token_embd_norm.weight" and architecture == "lfm2":
        return "model.embedding_norm.weight"  # LFM2's final norm, despite its name
    bare = _QWEN35_BARE.match(name) if architecture == "qwen35" else None
    if bare:
        return f"model.layers.{bare.group(1)}.linear_attn.{'A_log' if bare.group(2) == 'ssm_a' else 'dt_bias'}"
    bare = _GRANITE4_BARE.match(name) if architecture == "granitehybrid" else None
    if bare:
        return f"model.layers.{bare.group(1)}.mamba.{_GRANITE4_BARE_NAMES[bare.group(2)]}"
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _BLOCK.match(name)
    if match is None:
        return None
    layer, part, kind = match.groups()
    hf_part = _LAYER_NAMES.get(architecture, _BLOCK_NAMES).get(part)
    if hf_part == "self_attn.sinks":  # the converter added ".weight"; transformers' parameter has none
        return f"model.layers.{layer}.{hf_part}"
    return None if hf_part is None else f"model.layers.{layer}.{hf_part}.{kind}"


def unpermute_rows(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's conversion of Q/K rows from the half-split rotary layout to the interleaved one.

    convert_hf_to_gguf.py stores `w.reshape(heads, 2, rows // heads // 2, *rest).swapaxes(1, 2)`;
    this is its inverse, for weights [rows, cols] and biases [rows] alike.
    """
    shape = tensor.shape
    half = shape[0] // heads // 2
    return tensor.reshape(heads, half, 2, *shape[1:]).transpose(1, 2).reshape(shape)


class GGUFFile:
    """One GGUF file, opened and checked: metadata, tensor index, and dequantized tensors on demand.

    Tensor data is read with plain file reads, one tensor at a time, so a loaded model does not keep
    the file resident (a memory map of the whole file would stay counted against the process); the
    token embedding alone may be served from a map of its own bytes (GGUFWeights.embedding).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._check_header()
        self.metadata, self.tensor_info = self._read_index()
        self.architecture = str(self.metadata.get("general.architecture", ""))
        if self.architecture not in HF_ARCHITECTURES:
            raise ModelLoadError(
                f"{self.path}: unsupported GGUF architecture {self.architecture!r}; "
                f"supported: {', '.join(HF_ARCHITECTURES)}"
            )
        self._check_tensors()

    def _check_header(self) -> None:
        if not self.path.is_file():
            raise ModelLoadError(f"no such file: {self.path}")
        with self.path.open("rb") as handle:
            head = handle.read(8)
        if head[:4] != GGUF_MAGIC:
            raise ModelLoadError(f"{self.path} is not a GGUF file (it does not start with the bytes 'GGUF')")
        if len(head) < 8:
            raise ModelLoadError(f"{self.path} is a truncated or corrupt GGUF file: it ends inside the header")
        version = int.from_bytes(head[4:8], "little")
        if int.from_bytes(head[4:8], "big") in READABLE_VERSIONS:
            raise ModelLoadError(f"{self.path} is a big-endian GGUF file, which llmchat cannot read")
        if version not in READABLE_VERSIONS:
            raise ModelLoadError(f"{self.path}: GGUF version {version} is not supported (only versions 2 and 3)")

    def _read_index(self) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
        """Metadata and tensor index, from the header only (see gguf_metadata.py)."""
        metadata, raw = read_gguf_index(self.path, ModelLoadError)
        size = self.path.stat().st_size
        tensors = {}
        for t in raw:
            try:
                kind = GGMLQuantizationType(t.type_id)
            except ValueError:
                raise ModelLoadError(f"{self.path}: tensor {t.name!r} has an unknown ggml type {t.type_id}") from None
            n_elements = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
            block, type_size = GGML_QUANT_SIZES[kind]
            info = TensorInfo(
                t.name, kind, tuple(reversed(t.dims)), n_elements, n_elements // block * type_size, t.offset
            )
            if info.offset + info.n_bytes > size:
                raise ModelLoadError(
                    f"{self.path} is a truncated or corrupt GGUF file: tensor {t.name!r} ends past the end of the file"
                )
            tensors[t.name] = info
        return metadata, tensors

    def _check_tensors(self) -> None:
        """Fail before any weight is read: every tensor must have a known name and a readable type."""
        for name, info in self.tensor_info.items():
            if info.type not in SUPPORTED_TYPES:
                supported = ", ".join(t.name for t in sorted(SUPPORTED_TYPES))
                raise ModelLoadError(
                    f"{self.path}: tensor {name!r} is stored as {info.type.name}, which llmchat cannot "
                    f"dequantize; supported types: {supported}"
                )
            if name not in _CONFIG_TENSORS and hf_tensor_name(name, self.architecture) is None:
                raise ModelLoadError(
                    f"{self.path}: unexpected tensor {name!r} for GGUF architecture {self.architecture!r}"
                )

    @property
    def vocab_only(self) -> bool:
        """A tokenizer-only file (llama.cpp's --vocab-only): metadata but no weights."""
        return not self.tensor_info

    # -- tensors -------------------------------------------------------------------------------

    def read_tensor(self, name: str) -> torch.Tensor:
        """One tensor as stored (llama.cpp's layout), dequantized to float32, in torch dim order."""
        info = self.tensor_info[name]
        buffer = bytearray(info.n_bytes)
        with self.path.open("rb") as handle:
            handle.seek(info.offset)
            read = handle.readinto(buffer)
        if read != info.n_bytes:
            raise ModelLoadError(f"{self.path} is truncated: tensor {name!r} ends past the end of the file")
        return dequantize_bytes(np.frombuffer(buffer, dtype=np.uint8), info.type, info.shape)

    def tensor_bytes_by_type(self) -> dict[str, int]:
        """Bytes on disk per storage type, e.g. {"Q4_1": 72_000_000, "F32": 140_000}."""
        totals: Counter[str] = Counter()
        for info in self.tensor_info.values():
            totals[info.type.name] += info.n_bytes
        return dict(totals)

    def quantization(self) -> str:
        """What the file stores, e.g. "Q4_K_M": llama.cpp's file type, else the type most weights use."""
        file_type = self.metadata.get("general.file_type")
        try:
            name = LlamaFileType(file_type).name if isinstance(file_type, int) else "GUESSED"
        except ValueError:  # a file type newer than gguf-py
            name = "GUESSED"
        if name != "GUESSED":
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        counts: Counter[str] = Counter()
        for info in self.tensor_info.values():
            if len(info.shape) >= 2:
                counts[info.type.name] += info.n_elements
        return counts.most_common(1)[0][0] if counts else "none"

    # -- config ----------------------------------------------------------------------------------

    def _key(self, name: str, default: Any = None) -> Any:
        """`{architecture}.{name}` from the metadata."""
        return self.metadata.get(f"{self.architecture}.{name}", default)

    def _per_model(self, name: str) -> Any:
        """A hyperparameter that GGUF may store per layer; llmchat needs one value for all layers."""
        value = self._key(name)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise ModelLoadError(f"{self.path}: {self.architecture}.{name} differs between layers: not supported")
            value = value[0]
        return value

    def _kv_heads(self) -> int | None:
        """KV heads of the attention layers. LFM2 (and Granite 4) store them per layer, 0 for its
        convolution (Mamba-2) layers."""
        if self.architecture not in ("lfm2", "granitehybrid"):
            return self._per_model("attention.head_count_kv")
        value = self._key("attention.head_count_kv")
        heads = {int(h) for h in value if h} if isinstance(value, list) else {int(value)} if value else set()
        if len(heads) > 1:
            key = f"{self.architecture}.attention.head_count_kv"
            raise ModelLoadError(f"{self.path}: {key} differs between layers: not supported")
        return heads.pop() if heads else None

    def _lfm2_config(self) -> dict[str, Any]:
        """LFM2's layer layout (head_count_kv 0 marks a convolution layer, as the converter writes it),
        its kernel (shortconv.l_cache) and MLP width (feed_forward_length is the adjusted one already)."""
        layers = int(self._key("block_count") or 0)
        value = self._key("attention.head_count_kv")
        per_layer = value if isinstance(value, list) else [value] * layers
        if len(per_layer) != layers:
            key = "lfm2.attention.head_count_kv"
            raise ModelLoadError(f"{self.path}: {key} has {len(per_layer)} entries for {layers} layers")
        return {
            "layer_types": ["full_attention" if heads else "conv" for heads in per_layer],
            "conv_L_cache": self._key("shortconv.l_cache"),
            "norm_eps": self._key("attention.layer_norm_rms_epsilon"),
            "block_auto_adjust_ff_dim": False,
        }

    def _qwen35_config(self, head_dim: int | None) -> dict[str, Any]:
        """Qwen3.5's DeltaNet widths (the ssm.* keys Qwen3NextModel's conversion writes), its layout
        (every full_attention_interval-th layer attends) and the rotary share of a head."""
        layers = int(self._key("block_count") or 0)
        interval = int(self._key("full_attention_interval") or 4)
        key_heads, value_heads = self._key("ssm.group_count"), self._key("ssm.time_step_rank")
        inner = self._key("ssm.inner_size")
        rope_dims = self._key("rope.dimension_count")
        return {
            "layer_types": ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)],
            "linear_conv_kernel_dim": self._key("ssm.conv_kernel"),
            "linear_key_head_dim": self._key("ssm.state_size"),
            "linear_num_key_heads": key_heads,
            "linear_num_value_heads": value_heads,
            "linear_value_head_dim": inner // value_heads if inner and value_heads else None,
            "partial_rotary_factor": rope_dims / head_dim if rope_dims and head_dim else None,
        }

    def _config_tensor(self, name: str) -> list[float] | None:
        return self.read_tensor(name).tolist() if name in self.tensor_info else None

    def hf_config(self) -> dict[str, Any]:
        """A Hugging Face config.json dict equivalent to the metadata (keys absent from it are left out)."""
        arch = self.architecture
        hidden = self._key("embedding_length")
        heads = self._per_model("attention.head_count")
        head_dim = self._key("attention.key_length") or (hidden // heads if hidden and heads else None)
        raw: dict[str, Any] = {
            "architectures": [HF_ARCHITECTURES[arch]],
            "model_type": arch,
            "hidden_size": hidden,
            "intermediate_size": self._per_model("feed_forward_length"),
            "num_hidden_layers": self._key("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._kv_heads(),
            "head_dim": head_dim,
            "max_position_embeddings": self._key("context_length"),
            "rms_norm_eps": self._key("attention.layer_norm_rms_epsilon"),
            "rope_theta": self._key("rope.freq_base", 10000.0),
            "vocab_size": self._vocab_size(),
            # Tied: an embedding but no output matrix (a vocab-only file has neither).
            "tie_word_embeddings": "token_embd.weight" in self.tensor_info and "output.weight" not in self.tensor_info,
            "attention_bias": "blk.0.attn_q.bias" in self.tensor_info or "blk.0.attn_output.bias" in self.tensor_info,
            "mlp_bias": "blk.0.ffn_down.bias" in self.tensor_info,
        }
        rope_dims = self._key("rope.dimension_count")
        if rope_dims and head_dim and rope_dims != head_dim:
            raw["partial_rotary_factor"] = rope_dims / head_dim
        raw.update(self._rope_scaling())
        raw.update(self._token_ids())
        if arch in ("gemma2", "gemma3"):
            raw.update(self._gemma_config(hidden, heads, head_dim))
        elif arch == "cohere2":
            raw.update(self._cohere2_config())
        elif arch == "granite":
            raw.update(self._granite_config(head_dim))
        elif arch == "granitehybrid":
            raw.update(self._granite4_config(head_dim))
        elif arch == "glm4" and rope_dims and head_dim:
            raw["partial_rotary_factor"] = rope_dims / head_dim  # even 1.0: GLM-4's default is 0.5
        elif arch == "lfm2":
            raw.update(self._lfm2_config())
        elif arch == "qwen35":
            raw.update(self._qwen35_config(head_dim))
        elif arch == "smollm3":
            # llama.cpp hard-codes the NoPE layers (n_no_rope_layer_step = 4, no GGUF key): every
            # 4th layer skips RoPE, and it has no sliding window for this architecture.
            raw["no_rope_layer_interval"] = _SMOLLM3_NO_ROPE_STEP
        elif arch == "exaone4":
            raw.update(self._exaone4_config())
        elif arch == "olmo2" and self._key("attention.sliding_window") is not None:
            # convert_hf_to_gguf.py writes OLMo 3 as olmo2 too, with a window: not OLMo 2's layout
            raise ModelLoadError(f"{self.path}: an olmo2 file with a sliding window (OLMo 3) is not supported")
        elif arch == "phi3":
            window = self._key("attention.sliding_window")
            raw["sliding_window"] = window or None  # Phi-4 writes 0 for "no window"
        if self._key("expert_count"):
            raw.update(self._moe_config())
        elif stacked := [n for n in self.tensor_info if (m := _BLOCK.match(n)) and m.group(2) in _EXPERT_TENSORS]:
            count = self._key("expert_count")
            said = f"has no {arch}.expert_count" if count is None else f"says {arch}.expert_count is {count}"
            raise ModelLoadError(f"{self.path}: {stacked[0]} holds stacked experts, but the file {said}")
        return {key: value for key, value in raw.items() if value is not None}

    def _moe_config(self) -> dict[str, Any]:
        """Expert count, experts per token and width, and which layers are sparse, checked against the tensors.

        Mixtral is converted as llama with experts; llama.cpp's qwen3moe renormalizes the chosen
        experts' weights unless `expert_weights_norm` says otherwise, olmoe and qwen2moe do not. A
        qwen3moe/qwen2moe layer with neither a router (ffn_gate_inp) nor experts is a dense one
        (transformers' mlp_only_layers). OLMoE's experts are as wide as feed_forward_length; every
        sparse qwen2moe layer has a shared expert (ffn_*_shexp) and its gate (ffn_gate_inp_shexp).
        """
        arch, experts = self.architecture, int(self._key("expert_count"))
        layers = int(self._key("block_count") or 0)
        moe_parts = ("ffn_gate_inp", *_EXPERT_TENSORS)
        sparse = [any(f"blk.{i}.{part}.weight" in self.tensor_info for part in moe_parts) for i in range(layers)]
        for i in range(layers):
            for part in _EXPERT_TENSORS if sparse[i] else ():
                info = self.tensor_info.get(f"blk.{i}.{part}.weight")
                if info is None:
                    raise ModelLoadError(f"{self.path}: MoE layer {i} has no blk.{i}.{part}.weight")
                if len(info.shape) != 3 or info.shape[0] != experts:
                    raise ModelLoadError(
                        f"{self.path}: {arch}.expert_count is {experts} but blk.{i}.{part}.weight has shape "
                        f"{info.shape} ({info.shape[0] if len(info.shape) == 3 else 'not'} stacked experts)"
                    )
            router = self.tensor_info.get(f"blk.{i}.ffn_gate_inp.weight")
            if router is not None and router.shape[0] != experts:
                raise ModelLoadError(
                    f"{self.path}: {arch}.expert_count is {experts} but blk.{i}.ffn_gate_inp.weight routes "
                    f"to {router.shape[0]} experts"
                )
        width = self._key("expert_feed_forward_length") or self._per_model("feed_forward_length")
        raw: dict[str, Any] = {
            "num_experts": experts,
            "num_local_experts": experts,
            "num_experts_per_tok": self._key("expert_used_count"),
        }
        if arch == "llama":
            if not all(sparse):
                raise ModelLoadError(f"{self.path}: a llama file with experts needs a router in every layer")
            raw["architectures"] = ["MixtralForCausalLM"]
            raw["intermediate_size"] = width
            window = self._key("attention.sliding_window")
            raw["sliding_window"] = window or None
            return raw
        if arch == "gpt-oss":
            return raw | self._gpt_oss_config(width, sparse)
        if arch == "granitehybrid":  # experts in every layer or none; the shared MLP: _granite4_config
            if not all(sparse):
                raise ModelLoadError(f"{self.path}: a granitehybrid file with experts needs them in every layer")
            return raw | {"intermediate_size": width}
        raw["norm_topk_prob"] = bool(self._key("expert_weights_norm", _EXPERT_WEIGHTS_NORM[arch]))
        if arch == "olmoe":
            if not all(sparse):
                raise ModelLoadError(f"{self.path}: an olmoe file needs a router and experts in every layer")
            raw["intermediate_size"] = width
            raw["clip_qkv"] = self._key("attention.clamp_kqv")
            return raw
        raw["moe_intermediate_size"] = width
        raw["mlp_only_layers"] = [i for i in range(layers) if not sparse[i]]
        if arch == "qwen2moe":
            for i in range(layers):
                for part in _SHARED_EXPERT_NAMES if sparse[i] else ():
                    if f"blk.{i}.{part}.weight" not in self.tensor_info:
                        raise ModelLoadError(f"{self.path}: MoE layer {i} has no shared expert blk.{i}.{part}.weight")
            first = next((i for i in range(layers) if sparse[i]), None)
            shared = self._key("expert_shared_feed_forward_length")
            if shared is None and first is not None:
                shared = self.tensor_info[f"blk.{first}.ffn_up_shexp.weight"].shape[0]
            raw["shared_expert_intermediate_size"] = shared
            raw["qkv_bias"] = "blk.0.attn_q.bias" in self.tensor_info
        return raw

    def _gpt_oss_config(self, width: int, sparse: list[bool]) -> dict[str, Any]:
        """gpt-oss (llama.cpp's openai-moe): experts in every layer, as wide as expert_feed_forward_length;
        even layers slide (llama.cpp's set_swa_pattern(2), GptOssConfig's default layer_types).

        Its yarn RoPE is written as type, factor and original length only: the rest are GptOssConfig's
        (beta_fast 32, beta_slow 1) and its `truncate: false`, which no GGUF key carries (llama.cpp
        itself always rounds the correction range, ggml_rope_yarn_corr_dims, so it rotates a few
        frequencies slightly differently from transformers; llmchat follows transformers). A file
        without rope scaling keys rotates without scaling (not GptOssConfig's default yarn).
        """
        if not all(sparse):
            raise ModelLoadError(f"{self.path}: a gpt-oss file needs a router and experts in every layer")
        raw: dict[str, Any] = {"intermediate_size": width, "sliding_window": self._key("attention.sliding_window")}
        if self._key("rope.scaling.type") == "yarn":
            raw["rope_scaling"] = {**self._rope_scaling()["rope_scaling"], "truncate": False}
        elif self._key("rope.scaling.type") in (None, "none"):
            raw["rope_scaling"] = {"rope_type": "default"}
        return raw

    def _vocab_size(self) -> int | None:
        """Rows of the embedding (what the model computes logits for), else what the metadata says."""
        embedding = self.tensor_info.get("token_embd.weight")
        if embedding is not None:
            return embedding.shape[0]
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        return self._key("vocab_size") or (len(tokens) if tokens else None)

    def _rope_scaling(self) -> dict[str, Any]:
        """rope_scaling (old config.json style) and rope_freq_factors from keys and config tensors."""
        raw: dict[str, Any] = {}
        kind = self._key("rope.scaling.type")
        factor = self._key("rope.scaling.factor")
        original = self._key("rope.scaling.original_context_length")
        if kind == "linear" and factor:
            raw["rope_scaling"] = {"rope_type": "linear", "factor": factor}
        elif kind == "yarn":
            params = {
                "rope_type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": original,
                "beta_fast": self._key("rope.scaling.yarn_beta_fast"),
                "beta_slow": self._key("rope.scaling.yarn_beta_slow"),
                "attention_factor": self._key("rope.scaling.yarn_attn_factor"),
            }
            raw["rope_scaling"] = {key: value for key, value in params.items() if value is not None}
        elif kind not in (None, "none", "linear", "longrope"):
            raise ModelLoadError(f"{self.path}: unsupported rope scaling type {kind!r}")
        long_factor = self._config_tensor("rope_factors_long.weight")
        short_factor = self._config_tensor("rope_factors_short.weight")
        if long_factor is not None and short_factor is not None:
            raw["rope_scaling"] = {"rope_type": "longrope", "long_factor": long_factor, "short_factor": short_factor}
        if original is not None:
            raw["original_max_position_embeddings"] = original
        # llama3 scaling ships as per-frequency divisors (rope_freqs) instead of its parameters.
        raw["rope_freq_factors"] = self._config_tensor("rope_freqs.weight")
        return raw

    def _token_ids(self) -> dict[str, Any]:
        """bos and the ids that end generation: EOS plus llama.cpp's end-of-turn/-message tokens."""
        eos = [self.metadata.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
        eos_ids = list(dict.fromkeys(int(i) for i in eos if i is not None))
        return {
            "bos_token_id": self.metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos_ids or None,
        }

    def _exaone4_config(self) -> dict[str, Any]:
        """EXAONE 4's sliding layers: the per-layer `sliding_window_pattern` the converter writes (from
        layer_types or the config's pattern), else llama.cpp's fixed layout (_EXAONE4_SWA).

        llama.cpp rotates the sliding layers only, or every layer when none slides; a file without
        sliding layers is said with sliding_window 0, which config.py reads as "no window" (the
        family's default window would otherwise leave every layer without RoPE, as in transformers).
        """
        layers = int(self._key("block_count") or 0)
        window = self._key("attention.sliding_window")
        pattern = self._key("attention.sliding_window_pattern")
        if isinstance(pattern, list):
            if len(pattern) != layers:
                key = "exaone4.attention.sliding_window_pattern"
                raise ModelLoadError(f"{self.path}: {key} has {len(pattern)} entries for {layers} layers")
            sliding = [bool(p) for p in pattern]
        elif layers == _EXAONE4_SWA["layers"]:
            step = _EXAONE4_SWA["pattern"]
            sliding = [i % step < step - 1 for i in range(layers)]
            window = window or _EXAONE4_SWA["window"]
        else:
            sliding = [False] * layers
        if not window or not any(sliding):
            return {"sliding_window": 0}
        return {
            "sliding_window": window,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        }

    def _gemma_config(self, hidden: int | None, heads: int | None, head_dim: int | None) -> dict[str, Any]:
        """Soft-capping, sliding-window layout, local RoPE base and query scale, as llama.cpp reads them."""
        arch = self.architecture
        layers = int(self._key("block_count") or 0)
        window = self._key("attention.sliding_window")
        pattern = self._key("attention.sliding_window_pattern", _SWA_PATTERN[arch])
        if isinstance(pattern, list):
            sliding = [bool(p) for p in pattern]
        else:
            sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(layers)]
        if not window:
            window, sliding = None, [False] * layers
        scalar = hidden // heads if layers == _GEMMA_27B_LAYERS[arch] and hidden and heads else head_dim
        return {
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "attn_logit_softcapping": self._key("attn_logit_softcapping"),
            "final_logit_softcapping": self._key("final_logit_softcapping"),
            "query_pre_attn_scalar": scalar,
            "sliding_window": window,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "rope_local_base_freq": self._key("rope.freq_base_swa", _GEMMA_LOCAL_ROPE_BASE)
            if arch == "gemma3"
            else None,
        }

    def _cohere2_config(self) -> dict[str, Any]:
        """LayerNorm epsilon, logit scale and sliding layout of a cohere2 file, as llama.cpp reads them.

        Every layer but each `sliding_window_pattern`-th (default 4) slides and rotates; the rest
        attend fully without positions. The output matrix is always the token embedding.
        """
        layers = int(self._key("block_count") or 0)
        pattern = self._key("attention.sliding_window_pattern", _COHERE2_SWA_PATTERN)
        if isinstance(pattern, list):
            sliding = [bool(p) for p in pattern]
        else:
            sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(layers)]
        return {
            "layer_norm_eps": self._key("attention.layer_norm_epsilon"),
            "logit_scale": self._key("logit_scale"),
            "sliding_window": self._key("attention.sliding_window"),
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "tie_word_embeddings": True,
        }

    def _granite_config(self, head_dim: int | None) -> dict[str, Any]:
        """Granite's four multipliers under their config.json names, as llama.cpp reads them.

        The converter writes each key only where the config has a nonzero value. llama.cpp reads a
        missing (or 0) one as no scaling, and a missing attention scale as head_dim ** -0.5
        (GraniteConfig's default is 1); it requires logit_scale, which llmchat reads as 1 when absent.
        llama.cpp's granite switches RoPE off with rope.scaling.finetuned false: that is refused.
        """
        if self._key("rope.scaling.finetuned") is False:
            raise ModelLoadError(f"{self.path}: granite without RoPE (rope.scaling.finetuned false) is not supported")
        defaults = {"attention_multiplier": head_dim**-0.5 if head_dim else 1.0}
        return {hf: float(self._key(key) or defaults.get(hf, 1.0)) for hf, key in _GRANITE_SCALES.items()}

    def _granite4_config(self, head_dim: int | None) -> dict[str, Any]:
        """Granite 4 as GraniteHybridModel's conversion writes it: head_count_kv 0 marks a Mamba-2 layer,
        the ssm.* keys give its widths (time_step_rank is the head count), the multipliers are
        granite's, and rope.scaling.finetuned says whether attention rotates (the converter writes
        false for every hybrid, and llama.cpp then attends without positions). The shared MLP's width
        is expert_shared_feed_forward_length (else its tensors'); biases are read off the tensors;
        time_step_limit and mamba_chunk_size have no key (the config class's defaults).
        """
        layers = int(self._key("block_count") or 0)
        value = self._key("attention.head_count_kv")
        per_layer = value if isinstance(value, list) else [value] * layers
        if len(per_layer) != layers:
            key = "granitehybrid.attention.head_count_kv"
            raise ModelLoadError(f"{self.path}: {key} has {len(per_layer)} entries for {layers} layers")
        types = ["attention" if heads else "mamba" for heads in per_layer]
        first = types.index("mamba") if "mamba" in types else 0
        hidden, inner = self._key("embedding_length"), self._key("ssm.inner_size")
        heads = self._key("ssm.time_step_rank")
        shared = self._key("expert_shared_feed_forward_length")
        for part in ("ffn_up_shexp", "ffn_up"):
            info = self.tensor_info.get(f"blk.0.{part}.weight")
            if shared is None and info is not None:
                shared = info.shape[0]
        defaults = {"attention_multiplier": head_dim**-0.5 if head_dim else 1.0}
        return {
            "layer_types": types,
            "position_embedding_type": "rope" if self._key("rope.scaling.finetuned") else None,
            "mamba_n_heads": heads,
            "mamba_d_head": inner // heads if inner and heads else None,
            "mamba_expand": inner // hidden if inner and hidden else None,
            "mamba_d_state": self._key("ssm.state_size"),
            "mamba_n_groups": self._key("ssm.group_count"),
            "mamba_d_conv": self._key("ssm.conv_kernel"),
            "mamba_conv_bias": f"blk.{first}.ssm_conv1d.bias" in self.tensor_info,
            "mamba_proj_bias": f"blk.{first}.ssm_in.bias" in self.tensor_info,
            "num_local_experts": int(self._key("expert_count") or 0),
            "num_experts_per_tok": self._key("expert_used_count"),
            "shared_intermediate_size": shared,
            **{hf: float(self._key(key) or defaults.get(hf, 1.0)) for hf, key in _GRANITE_SCALES.items()},
        }

    def model_config(self) -> ModelConfig:
        """The normalized config; a vocab-only file gets placeholder zeros for the missing shape."""
        raw = self.hf_config()
        if self.vocab_only:
            for key, placeholder in (
                ("hidden_size", 0),
                ("intermediate_size", 0),
                ("num_hidden_layers", 0),
                ("num_attention_heads", 1),
            ):
                raw.setdefault(key, placeholder)
        return from_hf_config(raw, source=str(self.path))

    # -- chat ------------------------------------------------------------------------------------

    def chat_templates(self) -> ChatTemplates | None:
        """`tokenizer.chat_template` as "default" and `tokenizer.chat_template.NAME` as NAME."""
        templates: dict[str, str] = {}
        prefix = "tokenizer.chat_template."
        for key, value in self.metadata.items():
            if not isinstance(value, str):
                continue
            if key == "tokenizer.chat_template":
                templates["default"] = value
            elif key.startswith(prefix):
                templates[key.removeprefix(prefix)] = value
        return ChatTemplates(templates) if templates else None

    def special_tokens(self) -> dict[str, str]:
        """bos/eos/unk/pad token strings (what chat templates see as bos_token etc.)."""
        tokens = self.metadata.get("tokenizer.ggml.tokens") or []
        found: dict[str, str] = {}
        for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
            token_id = self.metadata.get(f"tokenizer.ggml.{key}_token_id")
            if isinstance(token_id, int) and 0 <= token_id < len(tokens):
                found[f"{name}_token"] = tokens[token_id]
        return found


class GGUFWeights:
    """A GGUF file's weights under Hugging Face names, dequantized to float32 one tensor at a time."""

    def __init__(self, file: GGUFFile, config: ModelConfig) -> None:
        self.file = file
        self.config = config
        self.heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}
        self.names = {
            name: hf
            for name in file.tensor_info
            if name not in _CONFIG_TENSORS and (hf := hf_tensor_name(name, file.architecture)) is not None
        }

    def _require_weights(self) -> None:
        if self.file.vocab_only:
            raise ModelLoadError(f"{self.file.path}: vocab-only GGUF has no weights; it can only tokenize")

    def tensor_names(self) -> set[str]:
        self._require_weights()
        return set(self.names.values())

    def quantized_types(self) -> dict[str, str]:
        self._require_weights()
        kinds = {name: self.file.tensor_info[name].type.name for name in self.names}
        return {hf: kinds[name] for name, hf in self.names.items() if kinds[name] not in _FLOAT_TYPES}

    def tensors(self, skip: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        self._require_weights()
        for name, hf_name in self.names.items():
            if hf_name not in skip:
                yield hf_name, self._to_hf(hf_name, self.file.read_tensor(name))

    def embedding_bytes(self) -> int:
        """Bytes of the token embedding in the file (0 when it has none: a vocab-only file)."""
        info = self.file.tensor_info.get(_EMBEDDING)
        return 0 if info is None else info.n_bytes

    def embedding(self, device: torch.device, dtype: torch.dtype) -> GGUFEmbedding:
        """The token embedding served by rows from the mapped file (its values need none of
        `_to_hf`'s changes: the converter stores them as they are)."""
        self._require_weights()
        if _EMBEDDING not in self.file.tensor_info:
            raise ModelLoadError(f"{self.file.path} has no token embedding ({_EMBEDDING})")
        return GGUFEmbedding(self.file.path, self.file.tensor_info[_EMBEDDING], device, dtype)

    def _qwen35_to_hf(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Undo Qwen3NextModel's and _LinearAttentionVReorderBase's conversion: +1 on the (1 + w)
        norms, A_log stored as -exp(A_log), the conv filters squeezed, and with fewer key than value
        heads the value heads reordered to llama.cpp's tiled order in every DeltaNet tensor."""
        c = self.config
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

    def _granite4_to_hf(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Undo GraniteHybridModel's conversion: Q/K rows permuted (LlamaModel's, undo_permute), the conv
        filters squeezed, A_log stored as -exp(A_log) and A, D unsqueezed to [heads, 1], the gated
        norm reshaped to [groups, inner // groups]."""
        projection = hf_name.rsplit(".", 2)[-2]
        if projection in self.heads and ".self_attn." in hf_name:
            return unpermute_rows(tensor, self.heads[projection])
        if hf_name.endswith("mamba.conv1d.weight"):
            return tensor.reshape(tensor.shape[0], 1, -1)  # [channels, kernel] -> Conv1d's [channels, 1, kernel]
        if hf_name.endswith("mamba.A_log"):
            return torch.log(-tensor.reshape(-1))
        if hf_name.endswith(("mamba.D", "mamba.norm.weight")):
            return tensor.reshape(-1)
        return tensor

    def _to_hf(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Undo what convert_hf_to_gguf.py changed in the values."""
        arch = self.file.architecture
        if arch in ("llama", "smollm3", "granite"):  # converted by LlamaModel (or a subclass), which permutes Q/K
            projection = hf_name.rsplit(".", 2)[-2]
            if projection in self.heads:
                return unpermute_rows(tensor, self.heads[projection])
        elif arch in ("gemma2", "gemma3") and hf_name.endswith("norm.weight"):
            return tensor - 1.0  # Gemma's RMSNorm scales by 1 + w; llama.cpp stores 1 + w
        elif arch == "qwen35":
            return self._qwen35_to_hf(hf_name, tensor)
        elif arch == "granitehybrid":
            return self._granite4_to_hf(hf_name, tensor)
        elif arch == "lfm2" and hf_name.endswith("conv.conv.weight"):
            return tensor.unsqueeze(1)  # [hidden, kernel] -> Conv1d's [hidden, 1, kernel]
        elif arch == "qwen2moe" and hf_name.endswith("shared_expert_gate.weight"):
            return tensor.reshape(1, -1)  # a [1, hidden] projection, stored as [hidden] or [1, hidden]
        return tensor


def _tiled_to_grouped(tensor: torch.Tensor, dim: int, key_heads: int, per_key: int, width: int) -> torch.Tensor:
    """Undo the converter's V-head reorder along `dim`: llama.cpp stores the value heads tiled
    (k0 k1 .. k0 k1 ..), Hugging Face grouped by key head (k0's r heads, then k1's ...)."""
    shape = list(tensor.shape)
    split = [*shape[:dim], per_key, key_heads, width, *shape[dim + 1 :]]
    return tensor.reshape(split).transpose(dim, dim + 1).reshape(shape)


def open_gguf_package(path: str | Path) -> ModelPackage:
    """Read and check a GGUF file (the weights stay on disk)."""
    file = GGUFFile(path)
    config = file.model_config()
    source = str(file.path)
    # GGUF carries no sampling defaults; it stops where llama.cpp stops (EOS, EOT, <|im_end|> ...).
    generation = GenerationDefaults(eos_token_ids=tuple(end_of_generation_ids(file.metadata, source)))
    return ModelPackage(
        path=file.path,
        config=config,
        weights=GGUFWeights(file, config),
        tokenizer=tokenizer_from_gguf(file.metadata, source),
        templates=file.chat_templates(),
        special_tokens=file.special_tokens(),
        generation=generation,
        format="gguf",
        quantization=file.quantization(),
        size_bytes=file.path.stat().st_size,
    )
