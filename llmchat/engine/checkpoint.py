"""From a checkpoint's tensors to the Transformer: names, packing plan, build.

Checkpoints name their tensors their family's way (Llama's `self_attn.q_proj`, LFM2's
`feed_forward.w1`, Qwen3.5's `linear_attn.in_proj_qkv`, a multimodal wrapper's
`model.language_model.` …); `internal_name` maps each to the one internal layout model.py builds, with
q/k/v and gate/up fused into one matrix each. `packing_plan` decides, from a GGUF's tensor types,
which matrices stay packed (int4/int8) and how; `build_transformer` makes the model from the tensors
with that plan, holding at most one float copy of a matrix at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from llmchat.engine.config import ModelConfig
from llmchat.engine.errors import ModelLoadError
from llmchat.engine.memory import expert_shapes, matrix_shapes
from llmchat.engine.model import Linear, Transformer, transposed_layout
from llmchat.engine.moe import (
    PackedExperts,
    assemble,
    check_expert_parts,
    expert_part,
    from_in_out_interleaved,
    is_expert_target,
    missing_experts,
    set_packed_stack,
)
from llmchat.engine.packed import PackedLinear, fits_int4, layout_for

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "input_layernorm.weight": ("attn_norm.weight", None),
    "post_attention_layernorm.weight": ("mlp_norm.weight", None),
    "self_attn.q_proj.weight": ("attn.qkv.weight", 0),
    "self_attn.k_proj.weight": ("attn.qkv.weight", 1),
    "self_attn.v_proj.weight": ("attn.qkv.weight", 2),
    "self_attn.q_proj.bias": ("attn.qkv.bias", 0),
    "self_attn.k_proj.bias": ("attn.qkv.bias", 1),
    "self_attn.v_proj.bias": ("attn.qkv.bias", 2),
    "self_attn.o_proj.weight": ("attn.o.weight", None),
    "self_attn.o_proj.bias": ("attn.o.bias", None),
    "self_attn.q_norm.weight": ("attn.q_norm.weight", None),
    "self_attn.k_norm.weight": ("attn.k_norm.weight", None),
    "self_attn.sinks": ("attn.sinks", None),  # gpt-oss
    "mlp.gate_proj.weight": ("mlp.gate_up.weight", 0),
    "mlp.up_proj.weight": ("mlp.gate_up.weight", 1),
    "mlp.gate_proj.bias": ("mlp.gate_up.bias", 0),
    "mlp.up_proj.bias": ("mlp.gate_up.bias", 1),
    "mlp.down_proj.weight": ("mlp.down.weight", None),
    "mlp.down_proj.bias": ("mlp.down.bias", None),
    # Phi-3 stores q/k/v and gate/up fused already, in the order the engine fuses them.
    "self_attn.qkv_proj.weight": ("attn.qkv.weight", None),
    "mlp.gate_up_proj.weight": ("mlp.gate_up.weight", None),
    # LFM2's names (no other family uses them): its norms, q/k norms, output projection, MLP, and
    # the short convolution of its recurrent layers
    "operator_norm.weight": ("attn_norm.weight", None),
    "ffn_norm.weight": ("mlp_norm.weight", None),
    "self_attn.out_proj.weight": ("attn.o.weight", None),
    "self_attn.q_layernorm.weight": ("attn.q_norm.weight", None),
    "self_attn.k_layernorm.weight": ("attn.k_norm.weight", None),
    "feed_forward.w1.weight": ("mlp.gate_up.weight", 0),
    "feed_forward.w3.weight": ("mlp.gate_up.weight", 1),
    "feed_forward.w2.weight": ("mlp.down.weight", None),
    "conv.in_proj.weight": ("conv.in_proj.weight", None),
    "conv.in_proj.bias": ("conv.in_proj.bias", None),
    "conv.out_proj.weight": ("conv.out_proj.weight", None),
    "conv.out_proj.bias": ("conv.out_proj.bias", None),
    "conv.conv.weight": ("conv.weight", None),
    "conv.conv.bias": ("conv.bias", None),
    # Qwen3.5's Gated DeltaNet: its four input projections fused as q|k|v, z, b, a (delta_net.py)
    "linear_attn.in_proj_qkv.weight": ("delta.qkvzba.weight", 0),
    "linear_attn.in_proj_z.weight": ("delta.qkvzba.weight", 1),
    "linear_attn.in_proj_b.weight": ("delta.qkvzba.weight", 2),
    "linear_attn.in_proj_a.weight": ("delta.qkvzba.weight", 3),
    "linear_attn.conv1d.weight": ("delta.conv_weight", None),
    "linear_attn.dt_bias": ("delta.dt_bias", None),
    "linear_attn.A_log": ("delta.A_log", None),
    "linear_attn.norm.weight": ("delta.norm_weight", None),
    "linear_attn.out_proj.weight": ("delta.out_proj.weight", None),
    # Granite 4's Mamba-2 layers (mamba2.py); its MoE and shared MLP names are moe.expert_part's
    "mamba.in_proj.weight": ("mamba.in_proj.weight", None),
    "mamba.in_proj.bias": ("mamba.in_proj.bias", None),
    "mamba.conv1d.weight": ("mamba.conv_weight", None),
    "mamba.conv1d.bias": ("mamba.conv_bias", None),
    "mamba.dt_bias": ("mamba.dt_bias", None),
    "mamba.A_log": ("mamba.A_log", None),
    "mamba.D": ("mamba.D", None),
    "mamba.norm.weight": ("mamba.norm_weight", None),
    "mamba.out_proj.weight": ("mamba.out_proj.weight", None),
    "mamba.out_proj.bias": ("mamba.out_proj.bias", None),
}
# With sandwich norms (Gemma 2/3), post_attention_layernorm norms the attention output and the
# MLP's input norm is pre_feedforward_layernorm.
_SANDWICH_NAMES = {
    "post_attention_layernorm.weight": ("attn_post_norm.weight", None),
    "pre_feedforward_layernorm.weight": ("mlp_norm.weight", None),
    "post_feedforward_layernorm.weight": ("mlp_post_norm.weight", None),
}
# GLM-4 names its sandwich norms its own way; its post_attention_layernorm is the MLP's input norm.
_GLM_NORM_NAMES = {
    "post_self_attn_layernorm.weight": ("attn_post_norm.weight", None),
    "post_mlp_layernorm.weight": ("mlp_post_norm.weight", None),
}
# OLMo 2, EXAONE 4 (norm_after): post_attention_layernorm norms the attention output, and there is
# no norm in front of either branch.
_NORM_AFTER_NAMES = {
    "post_attention_layernorm.weight": ("attn_post_norm.weight", None),
    "post_feedforward_layernorm.weight": ("mlp_post_norm.weight", None),
}
# Multimodal checkpoints (families.MULTIMODAL): the language model's tensors under these prefixes
# (transformers 5 saves Qwen3.5 as model.language_model.*, Gemma 3 as language_model.model.*), the
# vision tower's and projector's, which are not loaded, under the others.
_LANGUAGE_MODEL_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
_VISION_PREFIXES = (
    "model.visual.",
    "visual.",
    "vision_tower.",
    "model.vision_tower.",
    "multi_modal_projector.",
    "model.multi_modal_projector.",
)
_FUSED_PARTS = {"qkv": 3, "gate_up": 2, "qkvzba": 4}  # by the module's own name (the shared expert's gate_up too)


def check_names(config: ModelConfig, names: Iterable[str]) -> None:
    """Raise the loader's errors (build_transformer) for a checkpoint whose tensor names cannot make
    this model, from the names alone: `llmchat info` reads no weights, yet should not describe a
    folder that fails to load (a MoE checkpoint with an expert missing, a tensor of another family)."""
    with torch.device("meta"):
        model = Transformer(config, transposed=False)
    expected = dict(model.state_dict())
    tables = layer_names(config)
    whole: set[str] = set()
    parts: dict[str, set[int]] = {}
    for name in names:
        mapped = internal_name(name, config.tie_word_embeddings, tables)
        if mapped is None:
            continue
        target, part = mapped
        if target not in expected:
            raise ModelLoadError(f"tensor {name!r} does not fit this configuration")
        if part is None:
            whole.add(target)
        else:
            parts.setdefault(target, set()).add(part)
    incomplete: dict[str, str] = {}
    for target, present in parts.items():
        if not is_expert_target(target):
            if len(present) < _fused_count(target):
                incomplete[target] = ""
            continue
        pieces = dict.fromkeys(present, torch.empty((1, 1, 1), device="meta"))
        if assemble(target, pieces, config.num_experts) is None:  # the loader's own rule for a whole stack
            incomplete[target] = f" ({missing_experts(target, pieces, config.num_experts)})"
    if incomplete:
        named = ", ".join(f"{target}{lacking}" for target, lacking in sorted(incomplete.items()))
        raise ModelLoadError(f"checkpoint is missing parts of {named}")
    missing = [k for k in expected if k not in whole and k not in parts]
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[0]!r}")


def _fused_count(target: str) -> int:
    """How many checkpoint tensors an internal fused weight is made of (a GGUF's stack of experts'
    gate|up: its two stacks)."""
    if is_expert_target(target):
        return 2
    return _FUSED_PARTS[target.rsplit(".", 2)[-2]]


# The layer names by norm layout: pre-norm (most families), Gemma's sandwich norms, GLM-4's, and
# OLMo 2's / EXAONE 4's norms after each branch.
NAMES_BY_LAYOUT = {
    "pre": _LAYER_NAMES,
    "sandwich": {**_LAYER_NAMES, **_SANDWICH_NAMES},
    "glm": {**_LAYER_NAMES, **_GLM_NORM_NAMES},
    "norm_after": {**_LAYER_NAMES, **_NORM_AFTER_NAMES},
}


def layer_names(config: ModelConfig) -> dict[str, tuple[str, int | None]]:
    """The checkpoint → internal names of a family's layers (its norm layout decides a few)."""
    if config.norm_after:
        return NAMES_BY_LAYOUT["norm_after"]
    if config.glm_norm_names:
        return NAMES_BY_LAYOUT["glm"]
    return NAMES_BY_LAYOUT["sandwich" if config.sandwich_norms else "pre"]


def internal_name(
    name: str, tied: bool, names: dict[str, tuple[str, int | None]] = _LAYER_NAMES
) -> tuple[str, int | None] | None:
    """(internal name, part index within a fused tensor) for a checkpoint tensor; None to skip.

    `names`: the family's layer names (`layer_names(config)`)."""
    if name.startswith(_VISION_PREFIXES):  # a multimodal checkpoint's vision tower (families.MULTIMODAL)
        return None
    for prefix, replacement in _LANGUAGE_MODEL_PREFIXES:
        if name.startswith(prefix):
            name = replacement + name.removeprefix(prefix)
            break
    if name == "model.embed_tokens.weight":
        return ("lm_head.weight" if tied else "embed.weight"), None
    if name == "lm_head.weight":
        return None if tied else ("lm_head.weight", None)
    if name in ("model.norm.weight", "model.embedding_norm.weight"):  # LFM2 calls its final norm so
        return "norm.weight", None
    match = _LAYER.match(name)
    if match and match.group(2) in names:
        target, part = names[match.group(2)]
        return f"layers.{match.group(1)}.{target}", part
    expert = expert_part(match.group(2)) if match else None
    if match and expert is not None:
        return f"layers.{match.group(1)}.{expert[0]}", expert[1]
    if name.endswith("rotary_emb.inv_freq") or name.startswith("mtp."):  # Qwen3.5's multi-token prediction head
        return None
    raise ModelLoadError(f"unexpected tensor {name!r} in the checkpoint (not part of this architecture)")


def packing_plan(quantized: dict[str, str], config: ModelConfig) -> dict[str, tuple[str, frozenset[str]]]:
    """Which internal matrices to keep packed, and how, from the checkpoint's quantized tensor types.

    `quantized` maps checkpoint names to GGUF types (WeightSource.quantized_types); the plan maps
    internal weight names to (layout, the types they come from). A fused matrix takes the layout
    all its parts allow (see packed.layout_for); a matrix with a float part stays float; a shape
    the int4 kernel cannot tile takes int8; the output projection takes OUTPUT_LAYOUT (float32
    logits). The layouts are final: loading builds exactly these.
    """
    sources: dict[str, set[str]] = {}
    parts: dict[str, int] = {}  # quantized pieces seen per matrix
    fused: set[str] = set()
    # [out, in] of every matrix; a stack of experts packs each expert's [out, in] alike (moe.PackedExperts)
    shapes = matrix_shapes(config) | {name: shape[1:] for name, shape in expert_shapes(config).items()}
    names = layer_names(config)
    for name, kind in quantized.items():
        mapped = internal_name(name, config.tie_word_embeddings, names)
        # the MoE router is not in the shapes: it is dequantized at load
        if mapped is not None and mapped[0] in shapes:
            target, part = mapped
            sources.setdefault(target, set()).add(kind)
            parts[target] = parts.get(target, 0) + 1
            if part is not None:
                fused.add(target)
    # a matrix fused from parts some of which are stored as floats stays float
    partly_float = {t for t in fused if parts[t] < _fused_count(t)}
    plan: dict[str, tuple[str, frozenset[str]]] = {}
    for target, kinds in sources.items():
        layout = layout_for(kinds, output=target == "lm_head.weight")
        if layout is None or target == "embed.weight" or target in partly_float:
            continue
        if layout == "int4" and not fits_int4(*shapes[target]):
            layout = "int8"
        plan[target] = (layout, frozenset(kinds))
    return plan


def build_transformer(
    config: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    context_length: int,
    packed: dict[str, tuple[str, frozenset[str]]] | None = None,
    embedding: nn.Module | None = None,
) -> Transformer:
    """Build the model from checkpoint tensors, casting each once to `dtype` on `device`.

    The module is created on the meta device and the loaded tensors are assigned in place, so no
    throwaway random initialization is ever allocated. Fused tensors (qkv, gate_up) are
    concatenated as their parts arrive; projection matrices get the layout `Linear` prefers.
    Matrices named in `packed` (internal weight name -> (layout, source types), see `packing_plan`) become
    PackedLinear as soon as they are complete, so the float copy of one matrix is the most that is
    ever held besides the packed ones. `embedding`: the module that serves token rows (see
    Transformer); an untied checkpoint's embedding matrix is then not needed. A tied model whose
    output matrix is packed needs one: packed matrices are multiplied, not read by rows.
    """
    packed = packed or {}
    if config.tie_word_embeddings and "lm_head.weight" in packed and embedding is None:
        raise ValueError("a tied model with a packed output matrix needs an embedding module for its rows")
    transposed = transposed_layout(device, dtype)
    with torch.device("meta"):
        model = Transformer(config, transposed=transposed, embedding=embedding)
    expected = dict(model.state_dict())
    projections = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Linear)}
    state: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    expert_parts: dict[str, dict[int, torch.Tensor]] = {}  # stacked MoE experts (moe.assemble)
    packed_modules: dict[str, PackedLinear] = {}
    packed_experts: dict[str, PackedExperts] = {}  # stacks of experts kept packed, by internal name
    names = layer_names(config)
    for name, tensor in tensors:
        mapped = internal_name(name, config.tie_word_embeddings, names)
        if mapped is None:
            continue
        target, part = mapped
        if target == "embed.weight" and embedding is not None:
            continue
        if target not in expected:
            raise ModelLoadError(f"tensor {name!r} does not fit this configuration")
        if config.experts_in_out_interleaved:  # gpt-oss's transformers layout (moe.from_in_out_interleaved)
            tensor = from_in_out_interleaved(name, tensor)
        tensor = tensor.to(device=device, dtype=torch.float32 if target in packed else dtype)
        if is_expert_target(target):  # stacked [experts, out, in]
            if part is not None:
                pieces = expert_parts.setdefault(target, {})
                pieces[part] = tensor
                check_expert_parts(target, pieces, config.num_experts)
                stacked = assemble(target, pieces, config.num_experts)
                if stacked is None:
                    continue
                tensor = stacked
                del expert_parts[target]
            if target in packed:  # packed expert by expert, from the checkpoint's [out, in]
                _check_shape(target, tensor.transpose(1, 2) if transposed else tensor, expected[target], False)
                layout, sources = packed[target]
                packed_experts[target] = PackedExperts.pack(tensor, layout, sources)
                state[target] = expected[target]  # stands in until the stack is swapped below
                continue
            state[target] = tensor.transpose(1, 2).contiguous() if transposed and tensor.dim() == 3 else tensor
            _check_shape(target, state[target], expected[target], transposed=False)
            continue
        if part is not None:
            parts.setdefault(target, {})[part] = tensor
            count = _fused_count(target)
            if len(parts[target]) < count:
                continue
            pieces = parts.pop(target)
            tensor = torch.cat([pieces[i] for i in range(count)], dim=0)
        if target in packed:  # packed from the checkpoint's [out, in], never transposed
            _check_shape(target, tensor, expected[target], transposed and target in projections)
            layout, sources = packed[target]
            packed_modules[target.removesuffix(".weight")] = PackedLinear(tensor, None, layout, sources)
            state[target] = expected[target]  # stands in until the module is swapped below
            continue
        state[target] = tensor.t().contiguous() if transposed and target in projections else tensor
        _check_shape(target, state[target], expected[target], transposed=False)
    if parts or expert_parts:
        incomplete = dict.fromkeys(parts, "") | {
            target: f" ({missing_experts(target, pieces, config.num_experts)})"
            for target, pieces in expert_parts.items()
        }
        named = ", ".join(f"{target}{lacking}" for target, lacking in sorted(incomplete.items()))
        raise ModelLoadError(f"checkpoint is missing parts of {named}")
    missing = [k for k in expected if k not in state]
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
    for stack_name, stack in packed_experts.items():
        del state[stack_name]
        set_packed_stack(model, stack_name, stack)
    for module_name, module in packed_modules.items():
        del state[f"{module_name}.weight"]
        bias = state.pop(f"{module_name}.bias", None)
        if bias is not None:
            module.bias = nn.Parameter(bias.float(), requires_grad=False)
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    result = model.load_state_dict(state, strict=False, assign=True)
    left = [
        k
        for k in result.missing_keys
        if k.rsplit(".", 1)[0] not in packed_modules and k.split(".experts.", 1)[0] not in packed_experts
    ]
    if left or result.unexpected_keys:
        raise ModelLoadError(f"checkpoint does not fit the model: {(left or result.unexpected_keys)[0]!r}")
    model.setup_rotary(context_length)
    return model.eval().requires_grad_(False)


def _check_shape(key: str, tensor: torch.Tensor, expected: torch.Tensor, transposed: bool) -> None:
    """The tensor has the shape the model expects (`transposed`: the model holds it [in, out])."""
    shape = tuple(expected.shape)[::-1] if transposed else tuple(expected.shape)
    if tuple(tensor.shape) != shape:
        raise ModelLoadError(f"tensor {key!r} has shape {tuple(tensor.shape)}, config expects {shape}")
