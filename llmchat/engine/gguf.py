"""GGUF model files (llama.cpp's single-file format) as model packages.

A GGUF file carries the hyperparameters and the tokenizer as key/value metadata and the weights as
(often block-quantized) tensors under llama.cpp's names. Opening one turns the metadata into the
Hugging Face config.json the rest of the engine already understands, and serves the tensors under
Hugging Face names, dequantized to float32 one at a time, with llama.cpp's conversion-time changes
undone (the Q/K row permutation of the llama family, the +1 folded into Gemma's norm weights). The
file is checked when it is opened: magic, version, architecture, every tensor's type and name. What
each architecture's conversion wrote its own way (tensor names, metadata keys, value changes) is in
its family entry (llmchat/engine/families/); this module reads what they share.
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
from llmchat.engine.families import BY_GGUF, EXPERT_TENSORS, ExpertLayout
from llmchat.engine.gguf_metadata import read_gguf_index
from llmchat.engine.gguf_tensors import GGUFEmbedding, TensorInfo, dequantize_bytes
from llmchat.engine.gguf_vocab import end_of_generation_ids, tokenizer_from_gguf
from llmchat.engine.package import GenerationDefaults, ModelPackage

GGUF_MAGIC = b"GGUF"
READABLE_VERSIONS = (2, 3)

# MXFP4: gpt-oss's experts (dequantized to float at load, see gguf_tensors._mxfp4)
SUPPORTED_TYPES = frozenset(
    GGMLQuantizationType[name]
    for name in (
        *("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"),
        *("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "MXFP4"),
    )
)

# GGUF architecture → the Hugging Face class it was converted from (Mixtral: llama with experts)
HF_ARCHITECTURES = {arch: family.hf_classes[0] for arch, family in BY_GGUF.items()}
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


def hf_tensor_name(name: str, architecture: str) -> str | None:
    """The Hugging Face name of a GGUF tensor; None for unknown names."""
    family = BY_GGUF[architecture]
    special = family.gguf_tensor(name) if family.gguf_tensor is not None else None
    if special is not None:
        return special
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _BLOCK.match(name)
    if match is None:
        return None
    layer, part, kind = match.groups()
    hf_part = family.gguf_names.get(part)
    if hf_part == "self_attn.sinks":  # the converter added ".weight"; transformers' parameter has none
        return f"model.layers.{layer}.{hf_part}"
    return None if hf_part is None else f"model.layers.{layer}.{hf_part}.{kind}"


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

    def key(self, name: str, default: Any = None) -> Any:
        """`{architecture}.{name}` from the metadata."""
        return self.metadata.get(f"{self.architecture}.{name}", default)

    def per_model(self, name: str) -> Any:
        """A hyperparameter that GGUF may store per layer; llmchat needs one value for all layers."""
        value = self.key(name)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise ModelLoadError(f"{self.path}: {self.architecture}.{name} differs between layers: not supported")
            value = value[0]
        return value

    def _kv_heads(self) -> int | None:
        """KV heads of the attention layers. Hybrids (LFM2, Granite 4) store them per layer, 0 for their
        recurrent layers."""
        value = self.key("attention.head_count_kv")
        heads = {int(h) for h in value if h} if isinstance(value, list) else {int(value)} if value else set()
        if len(heads) > 1:
            key = f"{self.architecture}.attention.head_count_kv"
            raise ModelLoadError(f"{self.path}: {key} differs between layers: not supported")
        return heads.pop() if heads else None

    def _config_tensor(self, name: str) -> list[float] | None:
        return self.read_tensor(name).tolist() if name in self.tensor_info else None

    def hf_config(self) -> dict[str, Any]:
        """A Hugging Face config.json dict equivalent to the metadata (keys absent from it are left out):
        the keys every architecture writes alike, then its family's own (Family.gguf_config)."""
        arch = self.architecture
        hidden = self.key("embedding_length")
        heads = self.per_model("attention.head_count")
        head_dim = self.key("attention.key_length") or (hidden // heads if hidden and heads else None)
        raw: dict[str, Any] = {
            "architectures": [HF_ARCHITECTURES[arch]],
            "model_type": arch,
            "hidden_size": hidden,
            "intermediate_size": self.per_model("feed_forward_length"),
            "num_hidden_layers": self.key("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._kv_heads(),
            "head_dim": head_dim,
            "max_position_embeddings": self.key("context_length"),
            "rms_norm_eps": self.key("attention.layer_norm_rms_epsilon"),
            "rope_theta": self.key("rope.freq_base", 10000.0),
            "vocab_size": self._vocab_size(),
            # Tied: an embedding but no output matrix (a vocab-only file has neither).
            "tie_word_embeddings": "token_embd.weight" in self.tensor_info and "output.weight" not in self.tensor_info,
            "attention_bias": "blk.0.attn_q.bias" in self.tensor_info or "blk.0.attn_output.bias" in self.tensor_info,
            "mlp_bias": "blk.0.ffn_down.bias" in self.tensor_info,
        }
        rope_dims = self.key("rope.dimension_count")
        if rope_dims and head_dim and rope_dims != head_dim:
            raw["partial_rotary_factor"] = rope_dims / head_dim
        raw.update(self._rope_scaling())
        raw.update(self._token_ids())
        family = BY_GGUF[arch]
        count = self.key("expert_count")
        stacked = [n for n in self.tensor_info if (m := _BLOCK.match(n)) and m.group(2) in EXPERT_TENSORS]
        if stacked and not count:
            said = f"has no {arch}.expert_count" if count is None else f"says {arch}.expert_count is {count}"
            raise ModelLoadError(f"{self.path}: {stacked[0]} holds stacked experts, but the file {said}")
        if family.gguf_config is not None:
            raw.update(family.gguf_config(self, raw))
        return {key: value for key, value in raw.items() if value is not None}

    def experts(self) -> ExpertLayout | None:
        """The experts as the tensors hold them, checked against the metadata (None: a dense file).

        A layer with neither a router (ffn_gate_inp) nor experts is a dense one; every other layer
        needs all three stacked matrices, each with expert_count experts, and a router to as many.
        """
        if not self.key("expert_count"):
            return None
        arch, experts = self.architecture, int(self.key("expert_count"))
        layers = int(self.key("block_count") or 0)
        moe_parts = ("ffn_gate_inp", *EXPERT_TENSORS)
        sparse = [any(f"blk.{i}.{part}.weight" in self.tensor_info for part in moe_parts) for i in range(layers)]
        for i in range(layers):
            for part in EXPERT_TENSORS if sparse[i] else ():
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
        width = self.key("expert_feed_forward_length") or self.per_model("feed_forward_length")
        return ExpertLayout(experts, self.key("expert_used_count"), int(width), sparse)

    def _vocab_size(self) -> int | None:
        """Rows of the embedding (what the model computes logits for), else what the metadata says."""
        embedding = self.tensor_info.get("token_embd.weight")
        if embedding is not None:
            return embedding.shape[0]
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        return self.key("vocab_size") or (len(tokens) if tokens else None)

    def _rope_scaling(self) -> dict[str, Any]:
        """rope_scaling (old config.json style) and rope_freq_factors from keys and config tensors."""
        raw: dict[str, Any] = {}
        kind = self.key("rope.scaling.type")
        factor = self.key("rope.scaling.factor")
        original = self.key("rope.scaling.original_context_length")
        if kind == "linear" and factor:
            raw["rope_scaling"] = {"rope_type": "linear", "factor": factor}
        elif kind == "yarn":
            params = {
                "rope_type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": original,
                "beta_fast": self.key("rope.scaling.yarn_beta_fast"),
                "beta_slow": self.key("rope.scaling.yarn_beta_slow"),
                "attention_factor": self.key("rope.scaling.yarn_attn_factor"),
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
        self._values = BY_GGUF[file.architecture].gguf_values
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

    def _to_hf(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Undo what convert_hf_to_gguf.py changed in the values (Family.gguf_values)."""
        return tensor if self._values is None else self._values(self.config, hf_name, tensor)


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
