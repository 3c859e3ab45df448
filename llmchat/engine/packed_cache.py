"""A disk cache of packed models, so that the second load of a GGUF skips dequantizing and packing.

Packing the demo model's 120 matrices takes about a second on 2 cores; reading the packed tensors
back from a safetensors file takes a tenth of that. The cache file holds the whole state of the
built model (packed buffers and float parameters) plus, in its metadata, which modules are packed
and how. Only tensors: the output projection's FBGEMM matrices are built again from its stored codes
at load (safetensors never unpickles). A token embedding the model reads from the GGUF file
(GGUFEmbedding) is not in it: the restored model is given its embedding module again. Its name
carries everything the bytes depend on: the source file (path, size, mtime), this cache format,
the torch version and the CPU capability (the int4 kernel's packing differs between instruction
sets). A file that does not match what the model expects is ignored and removed; writes go
through a temporary file and a rename, so a crash leaves no half file. Saving an entry removes the
older entries of the same source file (a model updated in place).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from llmchat.engine.config import ModelConfig
from llmchat.engine.files import replacing
from llmchat.engine.model import Transformer, transposed_layout
from llmchat.engine.moe import set_packed_stack
from llmchat.engine.packed import PackedExperts, PackedLinear

# 3: the output projection's own layout (float32 logits); 4: embeddings read from the GGUF; 5: packed experts;
# 6: packed experts as stacked buffers (packed.PackedExperts)
CACHE_FORMAT = 7  # 7: the int4 layout no longer saves PyTorch's packing (made at load, where that kernel runs)
_PLAN_KEY = "llmchat.packed"
_SOURCE_KEY = "llmchat.source"


def cache_file(source: Path, folder: Path, plan: dict[str, tuple[str, frozenset[str]]]) -> Path:
    """Where the packed model for `source` with this packing plan (checkpoint.packing_plan) lives in
    `folder`: a new name whenever its inputs change, the same in every process."""
    stat = source.stat()
    # sorted: a frozenset's order (and repr) follows the process's hash seed
    context = repr(sorted((name, layout, sorted(sources)) for name, (layout, sources) in plan.items()))
    parts = [
        str(source.resolve()),
        str(stat.st_size),
        str(stat.st_mtime_ns),
        str(CACHE_FORMAT),
        torch.__version__,
        str(torch.backends.cpu.get_cpu_capability()),
        context,
    ]
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]
    return folder / f"{source.stem}.{digest}.safetensors"


def save(model: Transformer, path: Path, source: Path) -> None:
    """Write the model's state and its packing, atomically, and drop `source`'s older entries.

    Failures only cost the cache.
    """
    packed = {  # [layout, sources] of a packed layer, [layout, sources, "experts"] of a stack of packed experts
        name: [module.layout, list(module.sources)] + (["experts"] if isinstance(module, PackedExperts) else [])
        for name, module in model.named_modules()
        if isinstance(module, PackedLinear | PackedExperts)
    }
    state = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    metadata = {_PLAN_KEY: json.dumps(packed), _SOURCE_KEY: str(source.resolve())}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path, durable=False) as temporary:  # a cache: losing it to a power cut costs a repack
            save_file(state, str(temporary), metadata=metadata)
    except OSError:
        return
    for other in path.parent.glob(f"{source.stem}.*.safetensors"):
        if other != path and _source_of(other) == str(source.resolve()):
            other.unlink(missing_ok=True)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def _source_of(path: Path) -> str | None:
    try:
        return _metadata(path).get(_SOURCE_KEY)
    except (OSError, SafetensorError):
        return None


def restore(
    config: ModelConfig,
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    embedding: torch.nn.Module | None = None,
) -> Transformer | None:
    """The model saved at `path` (with `embedding` serving its token rows, as when it was saved),
    or None (and the file removed) when it does not fit this config."""
    try:
        packed = json.loads(_metadata(path)[_PLAN_KEY])
        state = _read_tensors(path, device)
        return _assemble(config, state, packed, device, dtype, embedding)
    except (OSError, SafetensorError, KeyError, ValueError, RuntimeError):
        path.unlink(missing_ok=True)
        return None


def _read_tensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The file's tensors, read into memory of their own (safetensors' pread backend, 0.8+).

    Read through its default memory map, every tensor is a view of one private map of the file, so
    the pages of the output projection's codes stayed resident after packing had used and dropped
    them: 160 MiB of Gemma 3's RSS that no tensor held. Older safetensors map (the same numbers).
    """
    try:
        return load_file(str(path), device=str(device), backend="pread")
    except TypeError:  # safetensors before the `backend` option
        return load_file(str(path), device=str(device))


def _assemble(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    packed: dict,
    device: torch.device,
    dtype: torch.dtype,
    embedding: torch.nn.Module | None,
) -> Transformer:
    with torch.device("meta"):
        model = Transformer(config, transposed=transposed_layout(device, dtype), embedding=embedding)
    for name, (layout, sources, *experts) in packed.items():
        prefix = f"{name}."
        buffers = {key[len(prefix) :]: state.pop(key) for key in list(state) if key.startswith(prefix)}
        if experts:  # a stack of experts (its buffers under `experts.`), in place of the float stack
            buffers = {key.removeprefix("experts."): tensor for key, tensor in buffers.items()}
            set_packed_stack(model, name, PackedExperts(layout, sources, buffers))
            continue
        module = PackedLinear.from_buffers(layout, sources, buffers)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    # the tensors still to load, from the module's own tensors: state_dict() would take the output
    # projection's codes back from its matrices (2.5 s and 700 MiB for Gemma 3's 262144 rows)
    expected = {key for key, value in [*model.named_parameters(), *model.named_buffers()] if value.is_meta}
    if set(state) != expected:
        raise ValueError("the cached state does not match the model")
    for key, tensor in state.items():
        if tensor.dtype != dtype and tensor.is_floating_point():
            raise ValueError(f"cached {key} is {tensor.dtype}, not {dtype}")
    model.load_state_dict(state, strict=False, assign=True)
    return model
