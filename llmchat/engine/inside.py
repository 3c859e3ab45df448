"""What happens inside the layers, on demand: the inspector's layer views, as plain numbers.

Ordinary decoding pays nothing for these: the hooks that observe a pass are installed for that pass
only (`_Observer`) and removed after it, and the pass itself is one the inspector runs again:

- `inside_step`: one step of an answer re-read over the KV cache (Generator.step_logits, fresh),
  i.e. about one decode step. Per layer: the logit lens (the final norm and output projection
  applied to the residual stream after that layer), the residual's norm and what the token mixer
  and the MLP added to it; the attention weights of the step's query over every earlier position,
  per head (sliding windows, GQA groups and gpt-oss's sinks as the model applies them); the experts
  the router chose, with their weights; a recurrent layer's state size and how much the step
  changed it.
- `prompt_heatmap`: every prompt position's next-token distribution, from one prefill of the prompt
  (Generator.teacher_force): how surprising each token of the prompt was to the model.
- `answer_experts`: the experts every answer token was routed to, from one prefill of the answer.
- `quantization_diff`: an answer of packed weights teacher-forced through the float reference of the
  same file too: per token the KL divergence, the chosen token's rank under each, where greedy flips.

Tensors never leave this module; the views are frozen dataclasses of floats and ints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from llmchat.engine.model import Attention, Block, attention_probs
from llmchat.engine.moe import MoE

if TYPE_CHECKING:
    from llmchat.engine.generate import Generator

LENS_TOP = 5  # candidates the logit lens reads out per layer


@dataclass(frozen=True)
class Candidate:
    token_id: int
    text: str
    prob: float


@dataclass(frozen=True)
class LayerReadout:
    """The residual stream after one layer (layer -1: the embeddings, before the first)."""

    layer: int
    kind: str  # "embedding", "attention", "conv", "linear_attention", "mamba"
    top: tuple[Candidate, ...]  # the logit lens: what the model would say if it stopped here
    chosen_prob: float | None  # the probability the lens gives the token the answer chose
    chosen_rank: int | None  # 0: the lens' first choice
    residual_norm: float
    mixer_added: float  # norm of what the layer's token mixer (attention, convolution ...) added
    mlp_added: float  # norm of what its MLP (or experts) added


@dataclass(frozen=True)
class AttentionPattern:
    """One attention layer's weights for the step's query: weights[head][position], positions 0..step."""

    layer: int
    window: int | None  # a sliding layer's window (it sees only the last `window` positions)
    kv_head_of: tuple[int, ...]  # per query head, the KV head it reads (grouped-query attention)
    weights: tuple[tuple[float, ...], ...]
    sink: tuple[float, ...] | None  # gpt-oss: per head, the share its sink took (attending to nothing)


@dataclass(frozen=True)
class Route:
    """The experts one MoE layer sent a token to, and the weights their outputs were summed with."""

    layer: int
    experts: tuple[int, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class StateChange:
    """A recurrent layer's fixed-size state and how much one step changed it."""

    layer: int
    kind: str
    state_bytes: int
    state_norm: float  # after the step
    update_norm: float  # of the step's change


@dataclass(frozen=True)
class StepInside:
    """The layer views of one step: the pass over the token at `position` (the last of the sequence so
    far), which chose `chosen_id` to follow it. Routes are that token's; attention is its query's."""

    position: int
    chosen_id: int | None
    lens: tuple[LayerReadout, ...]
    attention: tuple[AttentionPattern, ...]
    routes: tuple[Route, ...]
    states: tuple[StateChange, ...]


@dataclass(frozen=True)
class PromptToken:
    """How likely the model found one prompt token, given the tokens before it."""

    index: int
    token_id: int
    text: str
    prob: float | None  # None for the first token (nothing predicts it)
    rank: int | None
    entropy: float | None  # bits, of the distribution it was drawn against
    top: tuple[Candidate, ...] = ()


@dataclass(frozen=True)
class AnswerExperts:
    """Every answer token's routes, and each MoE layer's load: how many tokens each expert took."""

    tokens: tuple[tuple[Route, ...], ...]
    load: dict[int, tuple[int, ...]] = field(default_factory=dict)  # layer -> count per expert


# --- observing one pass ---------------------------------------------------------------------------


class _Observer:
    """Hooks on a Transformer for the passes inside `observe()`; each pass overwrites the last's record.

    Only the last row of each pass is kept (the step's own token), except the routes with `all_rows`.
    """

    def __init__(self, model: torch.nn.Module, cache: Any, *, all_rows: bool = False) -> None:
        self.model, self.cache, self.all_rows = model, cache, all_rows
        self.start = 0
        self.rows = 0
        self.embedding: torch.Tensor | None = None
        self.after: dict[int, torch.Tensor] = {}  # layer -> residual after it
        self.middle: dict[int, torch.Tensor] = {}  # layer -> residual after its mixer (or what it added)
        self.mlp_out: dict[int, torch.Tensor] = {}  # parallel blocks: what the MLP added
        self.attention: dict[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = {}
        self.routes: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.states: dict[int, tuple[float, float]] = {}
        self._before: dict[int, list[torch.Tensor]] = {}
        self._handles: list[Any] = []
        self._patched: list[tuple[torch.nn.Module, str]] = []

    def __enter__(self) -> _Observer:
        self._handles.append(self.model.register_forward_pre_hook(self._on_pass, with_kwargs=True))
        for index, block in enumerate(self.model.layers):
            assert isinstance(block, Block)
            self._handles.append(block.register_forward_pre_hook(self._on_block_input(index)))
            self._handles.append(block.register_forward_hook(self._on_block_output(index)))
            if block.parallel:
                self._handles.append(block.mixer.register_forward_hook(self._keep(self.middle, index)))
                self._handles.append(block.mlp.register_forward_hook(self._keep(self.mlp_out, index)))
            elif block.mlp_norm is not None:
                self._handles.append(block.mlp_norm.register_forward_pre_hook(self._on_middle(index)))
            mixer = block.mixer
            if isinstance(mixer, Attention):
                self._patch(mixer, "_attend", self._attend_observer(mixer))
            elif index in self.cache.recurrent_layers:
                self._handles.append(mixer.register_forward_pre_hook(self._on_state_before(index)))
                self._handles.append(mixer.register_forward_hook(self._on_state_after(index)))
            if isinstance(block.mlp, MoE):
                self._patch(block.mlp, "route", self._route_observer(block.mlp, index))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        for module, name in self._patched:
            del module.__dict__[name]

    def _patch(self, module: torch.nn.Module, name: str, replacement: Callable[..., Any]) -> None:
        object.__setattr__(module, name, replacement)  # an instance attribute shadows the method
        self._patched.append((module, name))

    # hooks

    def _on_pass(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids, _, start = args[:3]
        self.start, self.rows = int(start), int(ids.shape[0])
        self.routes.clear()

    def _on_block_input(self, index: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            if index == 0:
                self.embedding = args[0][-1].detach().float().clone()

        return hook

    def _on_block_output(self, index: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> None:
            self.after[index] = output[-1].detach().float().clone()

        return hook

    def _on_middle(self, index: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            self.middle[index] = args[0][-1].detach().float().clone()

        return hook

    def _keep(self, into: dict[int, torch.Tensor], index: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> None:
            into[index] = output[-1].detach().float().clone()

        return hook

    def _attend_observer(self, attention: Attention) -> Callable[..., torch.Tensor]:
        original = attention._attend

        def observed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: Any, start: int, begin: int, end: int):
            out = original(q, k, v, cache, start, begin, end)
            if end == q.shape[1]:  # the part holding the pass's last query
                keys, _, positions = cache.view(attention.layer, start + end)
                query = q[:, end - 1 : end]
                probs, sink = attention_probs(
                    query, keys, start + end - 1, attention.window, attention.scale, attention.softcap,
                    attention.sinks, positions,
                )  # fmt: skip
                self.attention[attention.layer] = (probs[:, 0], None if sink is None else sink[:, 0], positions)
            return out

        return observed

    def _route_observer(self, moe: MoE, index: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        original = moe.route

        def observed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            weights, ids = original(x)
            kept = (weights, ids) if self.all_rows else (weights[-1:], ids[-1:])
            self.routes.setdefault(index, []).append((kept[0].detach().float().clone(), kept[1].detach().clone()))
            return weights, ids

        return observed

    def _on_state_before(self, index: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...]) -> None:
            self._before[index] = [t.detach().float().clone() for t in self.cache.state(index)]

        return hook

    def _on_state_after(self, index: int) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            after = [t.detach().float() for t in self.cache.state(index)]
            change = sum(float((a - b).pow(2).sum()) for a, b in zip(after, self._before.pop(index), strict=True))
            self.states[index] = (math.sqrt(sum(float(a.pow(2).sum()) for a in after)), math.sqrt(change))

        return hook


@contextmanager
def observe(generator: Generator, *, all_rows: bool = False) -> Iterator[_Observer]:
    """The hooks for the passes run inside the block (and never outside it)."""
    with _Observer(generator.model, generator.cache, all_rows=all_rows) as observer:
        yield observer


# --- the views ------------------------------------------------------------------------------------


def _readouts(
    generator: Generator, residuals: torch.Tensor, chosen: int | None
) -> list[tuple[tuple[Candidate, ...], float | None, int | None]]:
    """The logit lens of every row of `residuals` [n, hidden]: one output projection over all of them
    (n single-row projections cost ~n times one; this is one matrix product)."""
    model = generator.model
    with torch.inference_mode():
        logits = model.output(residuals.to(model.dtype)).float()
    probs = logits.softmax(-1)
    top = probs.topk(LENS_TOP, dim=-1)
    values, indices = top.values.tolist(), top.indices.tolist()
    out: list[tuple[tuple[Candidate, ...], float | None, int | None]] = []
    for row in range(residuals.shape[0]):
        candidates = tuple(
            Candidate(i, generator.token_text(i), p) for p, i in zip(values[row], indices[row], strict=True)
        )
        if chosen is None:
            out.append((candidates, None, None))
        else:
            out.append((candidates, float(probs[row, chosen]), int((logits[row] > logits[row, chosen]).sum())))
    return out


def inside_step(generator: Generator, sequence: Sequence[int], chosen: int | None = None) -> StepInside:
    """The layer views of the step after `sequence` (that chose `chosen`, when given): one re-read pass."""
    config = generator.model.config
    with observe(generator) as seen, torch.inference_mode():
        generator.step_logits(sequence, prefill=True, fresh=True)
    position = len(sequence) - 1
    assert seen.embedding is not None
    residuals = [seen.embedding, *(seen.after[layer] for layer in range(config.num_layers))]
    readouts = _readouts(generator, torch.stack([r.reshape(-1) for r in residuals]), chosen)
    top, prob, rank = readouts[0]
    lens = [LayerReadout(-1, "embedding", top, prob, rank, float(seen.embedding.norm()), 0.0, 0.0)]
    before = seen.embedding
    for layer in range(config.num_layers):
        after = seen.after[layer]
        if layer in seen.mlp_out:  # a parallel block: both branches read the same input
            mixer_added, mlp_added = float(seen.middle[layer].norm()), float(seen.mlp_out[layer].norm())
        else:
            middle = seen.middle[layer]
            mixer_added, mlp_added = float((middle - before).norm()), float((after - middle).norm())
        top, prob, rank = readouts[layer + 1]
        kind = config.layer_kind(layer)
        lens.append(LayerReadout(layer, kind, top, prob, rank, float(after.norm()), mixer_added, mlp_added))
        before = after
    return StepInside(
        position=position,
        chosen_id=chosen,
        lens=tuple(lens),
        attention=tuple(_pattern(config, layer, *seen.attention[layer], position) for layer in sorted(seen.attention)),
        routes=tuple(_routes(seen.routes, row=0)),
        states=tuple(
            StateChange(layer, config.layer_kind(layer), _state_bytes(generator, layer), *seen.states[layer])
            for layer in sorted(seen.states)
        ),
    )


def _pattern(
    config: Any, layer: int, probs: torch.Tensor, sink: torch.Tensor | None, slots: torch.Tensor | None, position: int
) -> AttentionPattern:
    """Weights per head over positions 0..position; a ring's slots put back at the positions they hold."""
    weights = torch.zeros(probs.shape[0], position + 1)
    if slots is None:
        weights[:, : probs.shape[1]] = probs[:, : position + 1].cpu()
    else:
        held = slots.cpu()
        valid = (held >= 0) & (held <= position)
        weights[:, held[valid]] = probs.cpu()[:, valid]
    group = config.num_heads // config.num_kv_heads
    return AttentionPattern(
        layer=layer,
        window=config.layer_window(layer),
        kv_head_of=tuple(h // group for h in range(config.num_heads)),
        weights=tuple(tuple(row) for row in weights.tolist()),  # tolist: one conversion, not one per weight
        sink=None if sink is None else tuple(sink.float().cpu().tolist()),
    )


def _routes(routes: dict[int, list[tuple[torch.Tensor, torch.Tensor]]], row: int) -> Iterator[Route]:
    for layer in sorted(routes):
        weights, ids = (torch.cat(parts) for parts in zip(*routes[layer], strict=True))
        yield Route(layer, tuple(ids[row].tolist()), tuple(weights[row].float().tolist()))


def _state_bytes(generator: Generator, layer: int) -> int:
    return sum(t.numel() * t.element_size() for t in generator.cache.state(layer))


def prompt_heatmap(generator: Generator, ids: Sequence[int], *, top: int = LENS_TOP) -> tuple[PromptToken, ...]:
    """Every prompt token's probability under the model given the tokens before it: one prefill pass."""
    ids = [int(i) for i in ids]
    tokens = [PromptToken(0, ids[0], generator.token_text(ids[0]), None, None, None)] if ids else []
    if len(ids) < 2:
        return tuple(tokens)
    with torch.inference_mode():
        for first, logits in generator.teacher_force(ids[:-1], 0):
            logprobs = logits.log_softmax(-1)
            following = torch.tensor(ids[first + 1 : first + 1 + logits.shape[0]], device=logits.device)
            chosen = logprobs.gather(1, following[:, None])[:, 0]
            ranks = (logprobs > chosen[:, None]).sum(-1)
            entropies = -(logprobs.exp() * logprobs).nan_to_num().sum(-1) / math.log(2)
            best = logprobs.topk(top, dim=-1)
            for row in range(logits.shape[0]):
                index = first + row + 1
                candidates = tuple(
                    Candidate(int(i), generator.token_text(int(i)), math.exp(float(p)))
                    for p, i in zip(best.values[row], best.indices[row], strict=True)
                )
                tokens.append(
                    PromptToken(
                        index,
                        ids[index],
                        generator.token_text(ids[index]),
                        math.exp(float(chosen[row])),
                        int(ranks[row]),
                        float(entropies[row]),
                        candidates,
                    )
                )
    return tuple(tokens)


def answer_experts(generator: Generator, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> AnswerExperts:
    """The routes of every answer token (teacher-forced: one prefill of the answer) and each layer's load."""
    config = generator.model.config
    if not config.num_experts or not answer_ids:
        return AnswerExperts(())
    ids = [*prompt_ids, *answer_ids]
    rows: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # answer token i is routed at len(prompt) + i
    with observe(generator, all_rows=True) as seen, torch.inference_mode():
        for first, _ in generator.teacher_force(ids, len(prompt_ids)):
            skip = first - seen.start  # rows a recurrent model re-ran before `start`
            for layer, parts in seen.routes.items():
                weights, experts = (torch.cat(p) for p in zip(*parts, strict=True))
                rows.setdefault(layer, []).append((weights[skip:], experts[skip:]))
    count = len(answer_ids)
    tokens = tuple(tuple(_routes(rows, row)) for row in range(count))
    load = {}
    for layer, parts in rows.items():
        chosen = torch.cat([experts for _, experts in parts]).reshape(-1).cpu()
        load[layer] = tuple(int(c) for c in torch.bincount(chosen, minlength=config.num_experts))
    return AnswerExperts(tokens, load)


# --- what quantization changed ----------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizedToken:
    """One answer token under the packed weights it was generated with and under their float reference."""

    index: int
    token_id: int
    text: str
    kl: float  # bits: KL(float32 reference || packed), how far the packed distribution strayed
    prob: float  # of the chosen token, packed
    reference_prob: float  # and under the float reference
    rank: int  # of the chosen token, packed (0: greedy's pick)
    reference_rank: int
    greedy_id: int  # what greedy decoding picks here, packed
    reference_greedy_id: int  # and under the reference: they differ where greedy would have flipped
    reference_greedy_text: str = ""

    @property
    def flipped(self) -> bool:
        return self.greedy_id != self.reference_greedy_id


def quantization_diff(
    packed: Generator, reference: Generator, prompt_ids: Sequence[int], answer_ids: Sequence[int]
) -> tuple[QuantizedToken, ...]:
    """Teacher-force the answer through both models (one prefill of it each) and compare, token by token,
    the distributions each gave the answer's tokens (the answer's first token is predicted by the prompt's
    last position)."""
    if not answer_ids:
        return ()
    ids = [*prompt_ids, *answer_ids]
    start = len(prompt_ids) - 1
    with torch.inference_mode():
        rows = [torch.cat([logits for _, logits in g.teacher_force(ids[:-1], start)]) for g in (packed, reference)]
    ours, theirs = (r.log_softmax(-1) for r in rows)
    kl = (theirs.exp() * (theirs - ours)).sum(-1) / math.log(2)
    chosen = torch.tensor(list(answer_ids))[:, None]
    ranks = [(lp > lp.gather(1, chosen)).sum(-1) for lp in (ours, theirs)]
    greedy = [lp.argmax(-1) for lp in (ours, theirs)]
    return tuple(
        QuantizedToken(
            index=i,
            token_id=int(token),
            text=packed.token_text(int(token)),
            kl=float(kl[i]),
            prob=math.exp(float(ours[i, token])),
            reference_prob=math.exp(float(theirs[i, token])),
            rank=int(ranks[0][i]),
            reference_rank=int(ranks[1][i]),
            greedy_id=int(greedy[0][i]),
            reference_greedy_id=int(greedy[1][i]),
            reference_greedy_text=packed.token_text(int(greedy[1][i])),
        )
        for i, token in enumerate(answer_ids)
    )
