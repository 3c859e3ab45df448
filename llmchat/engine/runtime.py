"""A loaded model: package + weights on a device + KV cache + generator, behind one object.

This is what `llmchat.load()` returns and what the CLI and the TUI's worker use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmchat.engine.chat_template import ChatTemplate
from llmchat.engine.checkpoint import build_transformer, packing_plan
from llmchat.engine.config import ModelConfig
from llmchat.engine.errors import ModelLoadError, TemplateError
from llmchat.engine.events import GenerationEvent
from llmchat.engine.generate import DEFAULT_PREFILL_CHUNK, CancelFlag, Generator
from llmchat.engine.kv_cache import KVCache
from llmchat.engine.memory import (
    MemoryEstimate,
    MemoryUsage,
    default_context_length,
    estimate,
    expert_shapes,
    measure,
    module_bytes,
    recurrent_states,
    release_freed_memory,
)
from llmchat.engine.model import Transformer
from llmchat.engine.model_type import detect as detect_traits
from llmchat.engine.package import ModelPackage, open_package
from llmchat.engine.packed import PackingReport, packing_available, prepare_kernels
from llmchat.engine.packed_cache import cache_file, restore, save
from llmchat.engine.sampling import SamplingParams
from llmchat.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llmchat.engine.gguf import GGUFWeights

EMBEDDING_NAME = "model.embed_tokens.weight"  # the checkpoint name of the token embedding
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but no CUDA GPU is available")
    return resolved


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto': float32 on CPU (fastest and exact here), bfloat16 on CUDA when supported, else float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


@dataclass(frozen=True)
class LoadInfo:
    seconds: float
    device: torch.device
    dtype: torch.dtype
    context_length: int
    plan: dict[str, tuple[str, frozenset[str]]] = field(default_factory=dict)  # what was packed (packing_plan)
    from_cache: bool = False  # the packed model came from the cache_dir (no dequantizing or packing)
    mapped_embedding: int = 0  # bytes of the GGUF file the token embedding is read from (0: loaded)
    stacks: dict[str, int] = field(default_factory=dict)  # matrices per plan entry where more than one (experts)

    @property
    def packing(self) -> str:
        """How quantized checkpoint tensors are held, in words ("float" when nothing is packed)."""
        return PackingReport.of_plan(self.plan, self.stacks).summary()


def expert_stacks(config: ModelConfig) -> dict[str, int]:
    """How many matrices each stack of experts holds (for PackingReport.of_plan)."""
    return {name: shape[0] for name, shape in expert_shapes(config).items()}


class LoadedModel:
    """A model ready to generate. Not thread-safe: one worker thread drives it."""

    def __init__(self, package: ModelPackage, model: Transformer, cache: KVCache, info: LoadInfo, prefill_chunk: int):
        self.package = package
        self.model = model
        self.cache = cache
        self.info = info
        self.traits = detect_traits(package.templates, package.tokenizer)
        self.generator = Generator(
            model,
            cache,
            package.tokenizer,
            eos_token_ids=package.eos_token_ids,
            prefill_chunk=prefill_chunk,
            reasoning_markers=self.traits.reasoning_markers,
        )
        self._template: ChatTemplate | None = None

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def tokenizer(self) -> Tokenizer:
        return self.package.tokenizer

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def dtype(self) -> torch.dtype:
        return self.info.dtype

    @property
    def context_length(self) -> int:
        return self.cache.capacity

    @property
    def template(self) -> ChatTemplate:
        """The package's default chat template (TemplateError when it has none)."""
        if self._template is None:
            self._template = self.chat_template()
        return self._template

    def chat_template(self, name: str | None = None, *, tools: bool = False) -> ChatTemplate:
        if self.package.templates is None:
            raise TemplateError(f"{self.package.path} has no chat template; use raw prompts")
        return self.package.templates.get(name, tools=tools, special_tokens=self.package.special_tokens)

    @property
    def default_sampling(self) -> SamplingParams:
        return self.package.generation.sampling

    def weights_bytes(self) -> int:
        return module_bytes(self.model)

    def memory_estimate(self) -> MemoryEstimate:
        return estimate(
            self.config,
            self.dtype,
            self.context_length,
            prefill_chunk=self.generator.prefill_chunk,
            device_type=self.device.type,
            packed=self.info.plan,
            mapped_embedding=self.info.mapped_embedding,
        )

    def memory_usage(self) -> MemoryUsage:
        return measure(self.device, self.weights_bytes() + self.cache.nbytes)

    @torch.inference_mode()
    def logits(self, ids: Sequence[int], rows: int | None = None) -> torch.Tensor:
        """float32 logits [len(ids), vocab] of a fresh forward pass (the chat's cache is untouched).

        `rows`: tokens per pass through the cache instead of one pass over all; 1 is token-by-token
        decoding, so its kernels (the packed layers' decode products) are what is measured."""
        ids = list(ids)
        cache = new_cache(self.config, max(len(ids), 1), self.device, self.dtype)
        if self.model.rotary is None or len(ids) > self.model.rotary.cos.shape[0]:
            self.model.setup_rotary(len(ids))
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)
        step = rows or max(len(ids), 1)
        parts = [self.model(tokens[start : start + step], cache, start).float() for start in range(0, len(ids), step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        sampling: SamplingParams | None = None,
        max_new_tokens: int | None = None,
        stop_on_eos: bool = True,
        stop_strings: Sequence[str] = (),
        cancel: CancelFlag | None = None,
        top_k: int = 5,
        live_sampling: Callable[[], SamplingParams] | None = None,
        answer_prefix: Sequence[int] = (),
    ) -> Iterator[GenerationEvent]:
        """Stream events for one request, reusing whatever prefix the KV cache already holds
        (`answer_prefix`: the answer's first tokens, already chosen; see Generator.generate)."""
        return self.generator.generate(
            prompt_ids,
            sampling=sampling if sampling is not None else self.default_sampling,
            max_new_tokens=max_new_tokens if max_new_tokens is not None else self.package.generation.max_new_tokens,
            stop_on_eos=stop_on_eos,
            stop_strings=stop_strings,
            cancel=cancel,
            top_k=top_k,
            live_sampling=live_sampling,
            answer_prefix=answer_prefix,
        )

    def reset(self) -> None:
        """Forget the cached conversation."""
        self.cache.truncate(0)


def new_cache(config: ModelConfig, capacity: int, device: torch.device, dtype: torch.dtype) -> KVCache:
    """A KV cache for `capacity` positions; sliding-window layers get a ring, a hybrid's recurrent
    layers a fixed state (see kv_cache.py)."""
    windows = [config.layer_window(i) for i in range(config.num_layers)]
    states = recurrent_states(config)
    return KVCache(
        config.num_layers, config.num_kv_heads, config.head_dim, capacity, device, dtype, windows=windows, states=states
    )


def _trimming(tensors: Iterator[tuple[str, torch.Tensor]], every: int = 32) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass tensors through, giving freed load temporaries back to the OS every few (and at the end)."""
    for i, item in enumerate(tensors, 1):
        yield item
        if i % every == 0:
            release_freed_memory()
    release_freed_memory()


def _counted(
    tensors: Iterator[tuple[str, torch.Tensor]], total: int, progress: Callable[[int, int], object]
) -> Iterator[tuple[str, torch.Tensor]]:
    for done, item in enumerate(tensors, start=1):
        yield item
        progress(done, total)


def serving_config(package: ModelPackage) -> ModelConfig:
    """The package's config as the model is built: no output matrix means it is the embedding."""
    config = package.config
    if not config.tie_word_embeddings and "lm_head.weight" not in package.weights.tensor_names():
        config = config.with_changes(tie_word_embeddings=True)
    return config


def packing_for(
    package: ModelPackage, device: torch.device, dtype: torch.dtype, packed: bool | None = None
) -> dict[str, tuple[str, frozenset[str]]]:
    """The packing plan `load` uses (checkpoint.packing_plan): by default on CPU in float32, where the
    kernels are; `packed=False` packs nothing; `packed=True` insists (an error without kernels)."""
    if packed is None:
        packed = dtype == torch.float32 and packing_available(device)
    elif packed and not packing_available(device):
        raise ModelLoadError(f"packed quantized weights need PyTorch's CPU int4/int8 kernels; not on {device}")
    return packing_plan(package.weights.quantized_types(), serving_config(package)) if packed else {}


def mapped_embedding_bytes(
    package: ModelPackage, plan: dict[str, tuple[str, frozenset[str]]], packed: bool | None = None
) -> int:
    """Bytes of the GGUF file the token embedding is read from on demand (gguf_tensors.GGUFEmbedding),
    or 0 when `load` holds it like the other weights.

    It is read from the file wherever it would otherwise be a copy of its own: an untied embedding,
    or a tied one whose output matrix `plan` packs (packed matrices are multiplied, not read by
    rows). A tied float output matrix serves the rows itself; the float reference (`packed=False`,
    `--dequantize`) and Hugging Face folders keep a resident embedding.
    """
    if packed is False or package.format != "gguf":
        return 0
    if package.config.tie_word_embeddings and "lm_head.weight" not in plan:
        return 0
    return _gguf_weights(package).embedding_bytes()


def _gguf_weights(package: ModelPackage) -> GGUFWeights:
    from llmchat.engine.gguf import GGUFWeights  # only GGUF packages need it (gguf-py takes 0.2 s to import)

    assert isinstance(package.weights, GGUFWeights)
    return package.weights


def load(
    path: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    *,
    context_length: int | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    progress: Callable[[int, int], object] | None = None,
    packed: bool | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a model folder onto a device, with a KV cache for `context_length` tokens.

    context_length defaults to the model's own, capped by a memory budget (see memory.py).
    `progress(done, total)` is called after each checkpoint tensor is read (a UI's progress bar).
    `packed`: keep a GGUF's quantized matrices packed (int4/int8, see packed.py) — the default on
    CPU in float32; False dequantizes them to `dtype`, the exact float reference.
    `cache_dir`: keep packed models there, so the next load of the same file skips packing.
    """
    began = time.perf_counter()
    package = open_package(path)
    dev = resolve_device(device)
    run_dtype = resolve_dtype(dtype, dev)
    config = serving_config(package)
    if context_length is None:
        context_length = default_context_length(config, run_dtype, dev)
    if context_length < 1:
        raise ModelLoadError(f"context length must be at least 1, got {context_length}")
    plan = packing_for(package, dev, run_dtype, packed)
    mapped = mapped_embedding_bytes(package, plan, packed)
    embedding = _gguf_weights(package).embedding(dev, run_dtype) if mapped else None
    # an untied embedding read from the file is not loaded at all
    skip = {EMBEDDING_NAME} if embedding is not None and not config.tie_word_embeddings else set()
    tensors = _trimming(package.weights.tensors(skip))
    if progress is not None:
        tensors = _counted(tensors, len(package.weights.tensor_names() - skip), progress)
    cached = cache_file(package.path, cache_dir, plan) if plan and cache_dir else None
    model = None
    if cached and cached.is_file():
        model = restore(config, cached, device=dev, dtype=run_dtype, embedding=embedding)
    from_cache = model is not None
    if model is not None:
        model.setup_rotary(context_length)
        model.eval().requires_grad_(False)
        if progress is not None:
            progress(1, 1)
    else:
        model = build_transformer(
            config,
            tensors,
            device=dev,
            dtype=run_dtype,
            context_length=context_length,
            packed=plan,
            embedding=embedding,
        )
        if cached is not None:
            save(model, cached, package.path)
    prepare_kernels(model)
    cache = new_cache(config, context_length, dev, run_dtype)
    info = LoadInfo(
        time.perf_counter() - began,
        dev,
        run_dtype,
        context_length,
        plan,
        from_cache=from_cache,
        mapped_embedding=mapped,
        stacks=expert_stacks(config),
    )
    return LoadedModel(package, model, cache, info, prefill_chunk)
