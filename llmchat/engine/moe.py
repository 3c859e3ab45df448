"""Sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE): a router picks k experts per token.

The router is a [num_experts, hidden] projection run in the model's dtype; its softmax, the top-k
and the optional renormalization run in float32, as transformers computes them. The experts'
gated MLPs are stored stacked: `gate_up` [num_experts, 2 * width, hidden] (gate and up fused, as
the dense MLP fuses them) and `down` [num_experts, hidden, width], each expert's matrix in the
layout `Linear` prefers on the device ([in, out] for CPU float32, see model.Linear).

A decoding step (one token) runs its k chosen experts on views of the stacked weights; a prefill
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

if TYPE_CHECKING:
    from llmchat.engine.model import MLP, Linear

GATE_UP, DOWN = "mlp.gate_up_exps", "mlp.down_exps"  # internal names, after "layers.N."
EXPERT_TARGETS = (GATE_UP, DOWN)
ROUTER = "mlp.router.weight"
SHARED_GATE = "mlp.shared_gate.weight"
_SHARED = {  # Qwen2-MoE's shared expert: (internal name, part of the fused gate_up)
    "mlp.shared_expert.gate_proj.weight": ("mlp.shared.gate_up.weight", 0),
    "mlp.shared_expert.up_proj.weight": ("mlp.shared.gate_up.weight", 1),
    "mlp.shared_expert.down_proj.weight": ("mlp.shared.down.weight", None),
    "mlp.shared_expert_gate.weight": (SHARED_GATE, None),
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
    if suffix in _SHARED:
        return _SHARED[suffix]
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
    """Whether an internal name is one of the stacked expert tensors."""
    return target.split(".", 2)[-1] in EXPERT_TARGETS


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
        self.router = Linear(hidden, experts, bias=False, transposed=transposed)
        gate_up = (experts, hidden, 2 * width) if transposed else (experts, 2 * width, hidden)
        down = (experts, width, hidden) if transposed else (experts, hidden, width)
        self.gate_up_exps = nn.Parameter(torch.empty(gate_up))
        self.down_exps = nn.Parameter(torch.empty(down))
        self.act = act
        self.shared: MLP | None = None  # Qwen2-MoE's shared expert and its gate
        self.shared_gate: Linear | None = None
        if config.shared_expert_intermediate_size:
            self.shared = MLP(config.with_changes(intermediate_size=config.shared_expert_intermediate_size), transposed)
            self.shared_gate = Linear(hidden, 1, bias=False, transposed=transposed)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [n, k], expert ids [n, k]) of every token; the weights in x's dtype, or in
        float32 where the reference weighs in float32 (Mixtral)."""
        probs = self.router(x).softmax(-1, dtype=torch.float32)
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return (weights if self.float_weights else weights.to(x.dtype)), ids

    def _matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x @ weight if self.transposed else F.linear(x, weight)

    def expert(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Expert `index`'s gated MLP over rows x [m, hidden]."""
        gate, up = self._matmul(x, self.gate_up_exps[index]).split(self.width, dim=-1)
        return self._matmul(self.act(gate) * up, self.down_exps[index])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._routed(x)
        if self.shared is not None and self.shared_gate is not None:
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        """The chosen experts' weighted sum, in x's dtype."""
        weights, ids = self.route(x)
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
        return f"{self.num_experts} experts of width {self.width}, top {self.top_k}{shared}"
