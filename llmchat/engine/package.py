"""Finding and reading a model package: a Hugging Face model folder (or a GGUF file, see gguf.py).

A package is config.json + safetensors weights + tokenizer.json/tokenizer_config.json, optionally
a chat template file and generation_config.json. Reading a package checks everything that can be
checked without loading the weights, so bad input fails fast with one clear line.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from llmchat.engine.chat_template import ChatTemplates, read_special_tokens
from llmchat.engine.config import ModelConfig, load_hf_config
from llmchat.engine.errors import ModelLoadError, TokenizerError
from llmchat.engine.gguf_metadata import read_gguf_metadata
from llmchat.engine.gguf_vocab import tokenizer_from_gguf
from llmchat.engine.jsonfile import read_json_object
from llmchat.engine.knobs import KNOBS
from llmchat.engine.quantized import open_safetensors
from llmchat.engine.sampling import SamplingParams
from llmchat.engine.tokenizer import Tokenizer
from llmchat.engine.weights import safetensors_files

# What a chat gets when neither the package nor the user says otherwise.
DEFAULT_SAMPLING = SamplingParams(temperature=0.7, top_k=40, top_p=0.95, min_p=0.05)
DEFAULT_MAX_NEW_TOKENS = 1024
_SAMPLING_KEYS = tuple(knob.name for knob in KNOBS if knob.generation_config)


@dataclass(frozen=True)
class GenerationDefaults:
    """Defaults from generation_config.json layered over the built-in ones."""

    sampling: SamplingParams = DEFAULT_SAMPLING
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, gen: dict[str, Any]) -> GenerationDefaults:
        changes = {k: gen[k] for k in _SAMPLING_KEYS if gen.get(k) is not None}
        if gen.get("do_sample") is False:
            changes["temperature"] = 0.0
        try:
            sampling = DEFAULT_SAMPLING.replace(**changes)
        except ValueError as exc:
            raise ModelLoadError(f"generation_config.json: {exc}") from None
        eos = gen.get("eos_token_id")
        eos_ids = (eos,) if isinstance(eos, int) else tuple(eos or ())
        return cls(sampling, int(gen.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), eos_ids)


class WeightSource(Protocol):
    """Where a package's tensors come from, under Hugging Face names, read one at a time."""

    def tensor_names(self) -> set[str]: ...

    def tensors(self, skip: Collection[str] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) one at a time; the names in `skip` are not read at all."""
        ...

    def quantized_types(self) -> dict[str, str]:
        """Names of the tensors stored block-quantized (GGUF), with their type, e.g. "Q4_1".

        Those can be kept packed at load (see packed.py); float tensors are not listed.
        """
        ...


@dataclass
class ModelPackage:
    """Everything in a model folder except the weights' values."""

    path: Path
    config: ModelConfig
    weights: WeightSource
    tokenizer: Tokenizer
    templates: ChatTemplates | None
    special_tokens: dict[str, str]
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    format: str = "safetensors"  # safetensors | gguf
    quantization: str = "none"  # what the file stores: none, or e.g. "Q4_1", "gptq 4-bit"
    size_bytes: int = 0  # bytes of the weight files on disk

    @property
    def name(self) -> str:
        return self.path.stem if self.format == "gguf" else self.path.name

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Ids that end an answer: generation config, model config and the tokenizer's EOS."""
        ids = list(self.generation.eos_token_ids) + list(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return tuple(dict.fromkeys(ids))


def gguf_in_folder(folder: Path) -> Path | None:
    """The GGUF file a folder stands for: a folder that is not a Hugging Face package (no
    config.json) and holds exactly one .gguf file opens as that file. None when it holds none (or
    is a package); several are a ModelLoadError naming them, since which one is meant is a guess."""
    if not folder.is_dir() or (folder / "config.json").exists():
        return None
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ModelLoadError(f"{folder} holds several GGUF files ({names}); name the one to use")
    return found[0] if found else None


def resolve_path(path: str | Path) -> Path:
    """Check that `path` names a model folder or a GGUF file (or a folder holding one) and return it."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelLoadError(f"no such file or directory: {folder}")
    folder = gguf_in_folder(folder) or folder
    if folder.is_file():
        if folder.suffix == ".gguf":
            return folder
        if folder.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
            raise ModelLoadError(
                f"{folder} is a pickle checkpoint; llmchat refuses to load pickles because unpickling can run "
                "arbitrary code. Use a safetensors model folder."
            )
        raise ModelLoadError(f"{folder} is a file, not a model folder")
    return folder


def open_package(path: str | Path) -> ModelPackage:
    """Read and validate a model folder or GGUF file (the weights stay on disk)."""
    folder = resolve_path(path)
    if folder.is_file():  # resolve_path only lets GGUF files through
        from llmchat.engine.gguf import open_gguf_package  # gguf.py builds on this module

        return open_gguf_package(folder)
    config = load_hf_config(folder)
    files = safetensors_files(folder)
    weights, quantization = open_safetensors(folder, files)  # refuses unsupported quantization formats
    tokenizer = Tokenizer.from_folder(folder)
    gen = read_json_object(folder / "generation_config.json", ModelLoadError)
    generation = GenerationDefaults.from_dict(gen) if gen is not None else GenerationDefaults()
    return ModelPackage(
        path=folder,
        config=config,
        weights=weights,
        quantization=quantization,
        size_bytes=sum(f.stat().st_size for f in files),
        tokenizer=tokenizer,
        templates=ChatTemplates.from_folder(folder),
        special_tokens=read_special_tokens(folder),
        generation=generation,
    )


def open_tokenizer(path: str | Path) -> Tokenizer:
    """Only the tokenizer of a model: a model folder's tokenizer.json, or a GGUF file's vocabulary
    (reading just the GGUF header, never the weights)."""
    target = Path(path).expanduser()
    try:
        target = gguf_in_folder(target) or target
    except ModelLoadError as exc:
        raise TokenizerError(str(exc)) from None
    if target.is_dir():
        return Tokenizer.from_folder(target)
    if not target.exists():
        raise TokenizerError(f"no such file or directory: {target}")
    return tokenizer_from_gguf(read_gguf_metadata(target, TokenizerError), str(target))
