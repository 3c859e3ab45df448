"""Sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE, gpt-oss): a router picks k experts per token.

The router is a [num_experts, hidden] projection run in the model's dtype; its softmax, the top-k
and the optional renormalization run in float32, as transformers computes them. The experts'
gated MLPs are stored stacked: `gate_up` [num_experts, 2 * width, hidden] (gate and up fused, as
the dense MLP fuses them) and `down` [num_experts, hidden, width], each expert's matrix in the
layout `Linear` prefers on the device ([in, out] for CPU float32, see model.Linear).

A decoding step (one token) of float stacks runs its k chosen experts on views of them; a prefill
sorts its (token, expert) pairs by expert and runs each expert that got tokens once, over all of
its tokens. Nothing loops over tokens, and experts no token chose are never touched. A token's k
weighted outputs are summed in float32 and rounded once, as transformers' default (grouped_mm)
experts do; the weights are rounded to the model's dtype first, except Mixtral's (float32).

Checkpoints name expert weights in three ways, all mapped here (`expert_part`): one matrix per
expert (`mlp.experts.3.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.3.w1.weight`),
transformers 5's fused 3D parameters (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), and
GGUF's stacked `ffn_{gate,up,down}_exps` (served as `mlp.experts.{gate,up,down}_proj.weight`).

Qwen2-MoE adds a shared expert that every token runs: a dense gated MLP (`shared`, gate and up
fused like the dense MLP's) whose output is scaled by sigmoid(shared_gate(x)), a [1, hidden]
projection, and added to the routed experts' sum (`mlp.shared_expert.*`, `mlp.shared_expert_gate`;
GGUF's `ffn_{gate,up,down}_shexp` and `ffn_gate_inp_shexp`). It is stored as plain float matrices.
Granite 4's shared MLP (`shared_mlp.*`) is the same without the gate (ModelConfig.shared_expert_gate),
and its router takes the softmax over the k chosen logits, as gpt-oss's does.

gpt-oss differs in four ways (ModelConfig.moe_bias, moe_softmax_topk, swiglu_limit): its router and
every expert matrix have biases (`mlp.router.bias`, `mlp.experts.{gate_up,down}_proj_bias`; GGUF's
`ffn_gate_inp.bias`, `ffn_{gate,up,down}_exps.bias`), the softmax runs over the k chosen logits, and the
experts' SwiGLU is clamped. Its transformers parameters are [experts, in, out] with gate and up
interleaved (columns g0 u0 g1 u1 ...); `from_in_out_interleaved` turns them into the stacked layout here.

Quantized experts (a GGUF's `*_exps` in Q4_0, Q4_K, Q8_0 ...) stay packed like the dense matrices:
each stack becomes a `packed.PackedExperts` in the layout `packed.layout_for` picks (int4 groups or
int8 rows), so a decoding step reads only its k experts' packed bytes. Its decoding step
(`MoE.decode_packed`) makes the 2k kernel calls and only a handful of other tensor operations for all
k experts together: per expert, those operations had cost more than its kernels.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from llmchat.engine.config import ModelConfig
from llmchat.engine.errors import ModelLoadError
from llmchat.engine.packed import PackedExperts

if TYPE_CHECKING:
    from llmchat.engine.model import MLP, Linear

GATE_UP, DOWN = "mlp.gate_up_exps", "mlp.down_exps"  # internal names, after "layers.N."
EXPERT_TARGETS = (GATE_UP, DOWN)
GATE_UP_BIAS, DOWN_BIAS = "mlp.gate_up_exps_bias", "mlp.down_exps_bias"  # gpt-oss: [experts, out]
EXPERT_BIASES = (GATE_UP_BIAS, DOWN_BIAS)
ROUTER = "mlp.router.weight"
ROUTER_BIAS = "mlp.router.bias"
_GPT_OSS_NAMES = {  # gpt-oss's router and expert biases (transformers' names, then GGUF's served ones)
    "mlp.router.weight": (ROUTER, None),
    "mlp.router.bias": (ROUTER_BIAS, None),
    "mlp.experts.gate_up_proj_bias": (GATE_UP_BIAS, None),
    "mlp.experts.down_proj_bias": (DOWN_BIAS, None),
    "mlp.experts.down_proj.bias": (DOWN_BIAS, None),
}
SHARED_GATE = "mlp.shared_gate.weight"
_SHARED = {  # Qwen2-MoE's shared expert: (internal name, part of the fused gate_up)
    "mlp.shared_expert.gate_proj.weight": ("mlp.shared.gate_up.weight", 0),
    "mlp.shared_expert.up_proj.weight": ("mlp.shared.gate_up.weight", 1),
    "mlp.shared_expert.down_proj.weight": ("mlp.shared.down.weight", None),
    "mlp.shared_expert_gate.weight": (SHARED_GATE, None),
}

# Granite 4 (GraniteMoeHybrid): the router, the stacked experts [experts, 2 * width, hidden] (gate rows
# first) and [experts, hidden, width] as checkpoints name them (transformers 5 renames them at load to
# router.weight and experts.{gate_up,down}_proj, also accepted), and the ungated shared MLP (its
# input_linear is gate|up fused)
_GRANITE = {
    "block_sparse_moe.router.layer.weight": (ROUTER, None),
    "block_sparse_moe.router.weight": (ROUTER, None),
    "block_sparse_moe.input_linear.weight": (GATE_UP, None),
    "block_sparse_moe.output_linear.weight": (DOWN, None),
    "shared_mlp.input_linear.weight": ("mlp.shared.gate_up.weight", None),
    "shared_mlp.output_linear.weight": ("mlp.shared.down.weight", None),
}

_PREFIX = r"(?:mlp|block_sparse_moe)"
_PER_EXPERT = re.compile(rf"^{_PREFIX}\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_PER_EXPERT_PART = {"gate_proj": 0, "w1": 0, "up_proj": 1, "w3": 1, "down_proj": None, "w2": None}
_FUSED = re.compile(rf"^{_PREFIX}\.experts\.(gate_up_proj|down_proj)$")
_STACKED = re.compile(r"^mlp\.experts\.(gate_proj|up_proj|down_proj)\.weight$")  # GGUF's *_exps
# Parts of a stacked tensor: per-expert pieces are numbered from 0 (gate_up: 2 * expert + 0/1),
# GGUF's whole stacks of gate and up are these two.
STACKED_GATE, STACKED_UP = -1, -2


def expert_part(suffix: str) -> tuple[str, int | None] | None:
    """(internal name after "layers.N.", part) of an MoE checkpoint tensor; None if it is not one.

    `suffix` is the checkpoint name after "model.layers.N.". Part None: the whole stacked tensor.
    """
    if suffix in ("mlp.gate.weight", "block_sparse_moe.gate.weight"):
        return ROUTER, None
    if suffix in _GRANITE:
        return _GRANITE[suffix]
    if suffix in _SHARED:
        return _SHARED[suffix]
    if suffix in _GPT_OSS_NAMES:
        return _GPT_OSS_NAMES[suffix]
    if suffix in ("mlp.experts.gate_proj.bias", "mlp.experts.up_proj.bias"):  # GGUF's, [experts, width] each
        return GATE_UP_BIAS, STACKED_GATE if suffix == "mlp.experts.gate_proj.bias" else STACKED_UP
    match = _PER_EXPERT.match(suffix)
    if match:
        expert, kind = int(match.group(1)), _PER_EXPERT_PART[match.group(2)]
        return (DOWN, expert) if kind is None else (GATE_UP, 2 * expert + kind)
    match = _FUSED.match(suffix)
    if match:
        return (GATE_UP if match.group(1) == "gate_up_proj" else DOWN), None
    match = _STACKED.match(suffix)
    if match:
        kind = match.group(1)
        return (DOWN, None) if kind == "down_proj" else (GATE_UP, STACKED_GATE if kind == "gate_proj" else STACKED_UP)
    return None


def is_expert_target(target: str) -> bool:
    """Whether an internal name is one of the stacked expert tensors (matrices, or gpt-oss's biases)."""
    return target.split(".", 2)[-1] in EXPERT_TARGETS + EXPERT_BIASES


def from_in_out_interleaved(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """transformers' gpt-oss experts in the stacked layout: [experts, out, in], gate rows before up rows.

    `gate_up_proj` is [experts, hidden, 2 * width] with gate and up interleaved along the last
    dimension (GptOssExperts._apply_gate reads [..., ::2] and [..., 1::2]), its bias [experts, 2 * width]
    likewise; `down_proj` is [experts, width, hidden]. Other tensors pass unchanged.
    """
    if name.endswith("mlp.experts.gate_up_proj"):
        columns = tensor.transpose(1, 2)
        return torch.cat((columns[:, 0::2], columns[:, 1::2]), dim=1)
    if name.endswith("mlp.experts.gate_up_proj_bias"):
        return torch.cat((tensor[:, 0::2], tensor[:, 1::2]), dim=1)
    if name.endswith("mlp.experts.down_proj"):
        return tensor.transpose(1, 2)
    return tensor


def assemble(target: str, pieces: dict[int, torch.Tensor], num_experts: int) -> torch.Tensor | None:
    """The stacked [num_experts, out, in] tensor from its parts, or None while some are missing."""
    if STACKED_GATE in pieces or STACKED_UP in pieces:
        if STACKED_GATE in pieces and STACKED_UP in pieces and len(pieces) == 2:
            return torch.cat((pieces[STACKED_GATE], pieces[STACKED_UP]), dim=1)
        return None
    down = target.endswith(DOWN)
    count = num_experts if down else 2 * num_experts
    if len(pieces) < count:
        return None
    if down:
        return torch.stack([pieces[e] for e in range(num_experts)])
    return torch.stack([torch.cat((pieces[2 * e], pieces[2 * e + 1])) for e in range(num_experts)])


def check_expert_parts(target: str, pieces: dict[int, torch.Tensor], num_experts: int) -> None:
    """Raise a one-line error for a part outside the config's experts or of another shape."""
    top = 2 * num_experts if not target.endswith(DOWN) else num_experts
    bad = [p for p in pieces if p >= top]
    if bad:
        expert = bad[0] // (1 if target.endswith(DOWN) else 2)
        raise ModelLoadError(f"{target}: expert {expert} is beyond the config's {num_experts} experts")
    shapes = {tuple(t.shape) for t in pieces.values()}
    if len(shapes) > 1:
        raise ModelLoadError(f"{target}: the experts' matrices differ in shape ({', '.join(map(str, sorted(shapes)))})")


def missing_experts(target: str, pieces: dict[int, torch.Tensor], num_experts: int) -> str:
    """What an incomplete stack still lacks, for a one-line error: "expert 7 of 8", "expert 5's
    up_proj of 8", or (GGUF's whole stacks) "its up_proj stack"."""
    if STACKED_GATE in pieces or STACKED_UP in pieces:
        return "its up_proj stack" if STACKED_GATE in pieces else "its gate_proj stack"
    lacking: list[str] = []
    for expert in range(num_experts):
        if target.endswith(DOWN):
            gone = [] if expert in pieces else ["down_proj"]
        else:
            gone = [name for kind, name in enumerate(("gate_proj", "up_proj")) if 2 * expert + kind not in pieces]
        if gone:
            whole = len(gone) > 1 or target.endswith(DOWN)
            lacking.append(f"expert {expert}" if whole else f"expert {expert}'s {gone[0]}")
    more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
    return f"{', '.join(lacking[:3])}{more} of {num_experts}"


def set_packed_stack(model: nn.Module, name: str, stack: PackedExperts) -> None:
    """Put packed experts in place of the float stack `name` (e.g. "layers.3.mlp.gate_up_exps")."""
    parent, _, attribute = name.rpartition(".")
    moe = model.get_submodule(parent)
    delattr(moe, attribute)  # a parameter's name cannot take a module directly
    setattr(moe, attribute, stack)


class MoE(nn.Module):
    """Router + stacked experts; out = sum over the chosen experts of weight * expert(x)
    (+ sigmoid(shared_gate(x)) * shared(x) with a shared expert)."""

    def __init__(self, config: ModelConfig, transposed: bool, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        from llmchat.engine.model import MLP, Linear  # model.py imports this module

        experts, width, hidden = config.num_experts, config.moe_intermediate_size, config.hidden_size
        self.num_experts, self.top_k, self.width = experts, config.num_experts_per_tok, width
        self.norm_topk_prob = config.norm_topk_prob
        self.float_weights = config.moe_float_weights
        self.transposed = transposed
        self.router = Linear(hidden, experts, bias=config.moe_bias, transposed=transposed)
        self.softmax_topk = config.moe_softmax_topk  # gpt-oss: top-k logits first, then their softmax
        self.limit, self.alpha = config.swiglu_limit, config.swiglu_alpha  # gpt-oss's clamped SwiGLU
        gate_up = (experts, hidden, 2 * width) if transposed else (experts, 2 * width, hidden)
        down = (experts, width, hidden) if transposed else (experts, hidden, width)
        # float stacks, or PackedExperts where the checkpoint's experts are quantized (set at load)
        self.gate_up_exps: nn.Parameter | PackedExperts = nn.Parameter(torch.empty(gate_up))
        self.down_exps: nn.Parameter | PackedExperts = nn.Parameter(torch.empty(down))
        # gpt-oss: a bias per expert and output (always float, whatever the matrices are)
        self.gate_up_exps_bias = nn.Parameter(torch.empty(experts, 2 * width)) if config.moe_bias else None
        self.down_exps_bias = nn.Parameter(torch.empty(experts, hidden)) if config.moe_bias else None
        self.act = act
        self.shared: MLP | None = None  # Qwen2-MoE's shared expert and its gate
        self.shared_gate: Linear | None = None
        if config.shared_expert_intermediate_size:
            self.shared = MLP(config.with_changes(intermediate_size=config.shared_expert_intermediate_size), transposed)
            if config.shared_expert_gate:  # Granite 4's shared MLP is added as it is
                self.shared_gate = Linear(hidden, 1, bias=False, transposed=transposed)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [n, k], expert ids [n, k]) of every token; the weights in x's dtype, or in
        float32 where the reference weighs in float32 (Mixtral)."""
        if self.softmax_topk:  # gpt-oss (GptOssTopKRouter): the k largest logits, softmax over them
            top, ids = self.router(x).float().topk(self.top_k, dim=-1)
            return top.softmax(-1).to(x.dtype), ids
        probs = self.router(x).softmax(-1, dtype=torch.float32)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return (weights if self.float_weights else weights.to(x.dtype)), ids

    def _matmul(self, x: torch.Tensor, stack: nn.Parameter | PackedExperts, index: int) -> torch.Tensor:
        """x times expert `index`'s matrix of `stack` (packed, or a view of the float stack)."""
        if isinstance(stack, PackedExperts):
            return stack.matmul(x, index)
        return x @ stack[index] if self.transposed else F.linear(x, stack[index])

    def _glu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The gated activation of gate|up rows [..., 2 * width]."""
        gate, up = gate_up.split(self.width, dim=-1)
        if self.limit is None:
            return self.act(gate) * up
        gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)  # gpt-oss (GptOssExperts._apply_gate)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def expert(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Expert `index`'s gated MLP over rows x [m, hidden]."""
        gate_up = self._matmul(x, self.gate_up_exps, index)
        if self.gate_up_exps_bias is not None:
            gate_up = gate_up + self.gate_up_exps_bias[index]
        out = self._matmul(self._glu(gate_up), self.down_exps, index)
        return out if self.down_exps_bias is None else out + self.down_exps_bias[index]

    def decode_packed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One token x [1, hidden] through its k packed experts `ids` [k] (weights [k]): what `expert`
        computes for each of them, weighed and summed in float32, with the k experts' casts, gated
        activation, weighing and sum each one tensor operation over all of them (the per-expert path
        made ~20 operations per expert besides its 2 kernel calls, which cost more than the kernels).
        The ids come to the host once (`tolist`, cheap on CPU) to pick the experts' operands."""
        gate_up_exps, down_exps = self.gate_up_exps, self.down_exps
        assert isinstance(gate_up_exps, PackedExperts) and isinstance(down_exps, PackedExperts)
        chosen = ids.tolist()
        gate_up = gate_up_exps.rows(x, chosen)  # [k, 2 * width]
        if self.gate_up_exps_bias is not None:
            gate_up = gate_up + self.gate_up_exps_bias[ids]
        hidden = self._glu(gate_up)  # [k, width]
        out = down_exps.rows(hidden, chosen)  # [k, hidden]
        if self.down_exps_bias is not None:
            out = out + self.down_exps_bias[ids]
        return (out.float() * weights.float()[:, None]).sum(0, keepdim=True).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._routed(x)
        if self.shared is not None and self.shared_gate is not None:
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        elif self.shared is not None:  # Granite 4: experts' sum plus the shared MLP
            out = out + self.shared(x)
        return out

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        """The chosen experts' weighted sum, in x's dtype."""
        weights, ids = self.route(x)
        packed = isinstance(self.gate_up_exps, PackedExperts) and isinstance(self.down_exps, PackedExperts)
        if x.shape[0] == 1 and packed:
            return self.decode_packed(x, weights[0], ids[0])
        if x.shape[0] == 1:  # decoding: the k chosen experts, on views of the stacked weights
            out = None
            for index, weight in zip(ids[0].tolist(), weights[0]):
                y = (self.expert(x, index) * weight).float()
                out = y if out is None else out + y
            assert out is not None
            return out.to(x.dtype)
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
        tokens = order // self.top_k
        pair_weights = weights.reshape(-1)[order, None]
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        outs, begin = [], 0
        for index, count in enumerate(counts):
            if count:
                rows = slice(begin, begin + count)
                outs.append((self.expert(x[tokens[rows]], index) * pair_weights[rows]).float())
                begin += count
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, tokens, torch.cat(outs))
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        shared = f", a shared expert of width {self.shared.intermediate}" if self.shared is not None else ""
        packed = f", packed {self.gate_up_exps.layout}" if isinstance(self.gate_up_exps, PackedExperts) else ""
        return f"{self.num_experts} experts of width {self.width}, top {self.top_k}{shared}{packed}"
