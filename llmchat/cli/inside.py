"""`llmchat inspect --layers STEP / --prompt-heatmap / --experts`: the layer views of one answer.

Computed after the answer, on demand (engine/inside.py), as JSON lines (`--json`) or short tables.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from llmchat.cli.common import print_json, shown
from llmchat.engine.errors import LLMChatError

ATTENDED_SHOWN = 3  # positions per layer in the text table (heads averaged)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        metavar="STEP",
        help="after the answer, what happened inside the layers at answer step STEP (negative: from the end): "
        "the logit lens, residual norms, attention, experts and recurrent state",
    )
    p.add_argument(
        "--prompt-heatmap",
        action="store_true",
        help="after the answer, how likely the model found every prompt token (one more prefill)",
    )
    p.add_argument(
        "--quantization",
        action="store_true",
        help="after the answer, what packing the weights changed: the answer teacher-forced through the float32 "
        "reference of the same file too (loaded now), per token KL divergence, ranks, and where greedy flips",
    )
    p.add_argument(
        "--experts",
        action="store_true",
        help="after the answer, the experts every answer token was routed to and each layer's load (MoE models)",
    )


def wanted(args: argparse.Namespace) -> bool:
    return args.layers is not None or args.prompt_heatmap or args.experts or args.quantization


def report(session: Any, prompt_ids: list[int], answer_ids: list[int], args: argparse.Namespace) -> None:
    """Print the views asked for; a session that cannot compute them says so (LLMChatError: exit 2)."""
    if not session.capabilities.layer_views:
        raise LLMChatError("the layer views need llmchat's own engine (this model runs elsewhere)")
    if args.layers is not None:
        index = args.layers if args.layers >= 0 else len(answer_ids) + 1 + args.layers
        try:
            step = session.inside_step(prompt_ids, answer_ids, index)
        except ValueError as err:
            raise LLMChatError(str(err)) from None
        texts = [session.token_text(i) for i in prompt_ids + answer_ids[:index]]
        if args.json:
            print_json({"event": "layers", "step": index, **dataclasses.asdict(step)})
        else:
            _print_step(step, index, texts, session.token_text)
    if args.prompt_heatmap:
        tokens = session.prompt_heatmap(prompt_ids)
        if args.json:
            print_json({"event": "prompt_heatmap", "tokens": [dataclasses.asdict(t) for t in tokens]})
        else:
            _print_heatmap(tokens)
    if args.quantization:
        try:
            tokens = session.quantization_diff(prompt_ids, answer_ids)
        except ValueError as err:
            raise LLMChatError(str(err)) from None
        if args.json:
            print_json({"event": "quantization", "tokens": [dataclasses.asdict(t) for t in tokens]})
        else:
            _print_quantization(tokens, session.token_text)
    if args.experts:
        experts = session.answer_experts(prompt_ids, answer_ids)
        if args.json:
            print_json({"event": "experts", **dataclasses.asdict(experts)})
        else:
            _print_experts(experts)


def _print_step(step: Any, index: int, texts: list[str], token_text: Any) -> None:
    chosen = "the end of the answer" if step.chosen_id is None else f"{shown(token_text(step.chosen_id))}"
    print(f"\ninside step {index} (position {step.position}, chose {chosen}):")
    print("  layer  kind              residual  +mixer  +mlp   lens top-1            chosen")
    for r in step.lens:
        top = r.top[0]
        pick = "" if r.chosen_prob is None else f"{r.chosen_prob:.1%} (rank {r.chosen_rank})"
        print(
            f"  {r.layer:5d}  {r.kind:16s}  {r.residual_norm:8.2f}  {r.mixer_added:6.2f}  {r.mlp_added:5.2f}  "
            f"{shown(top.text):12s} {top.prob:6.1%}  {pick}"
        )
    for a in step.attention:
        heads = len(a.weights)
        mean = [sum(col) / heads for col in zip(*a.weights, strict=True)]
        best = sorted(range(len(mean)), key=lambda p: -mean[p])[:ATTENDED_SHOWN]
        window = f" (window {a.window})" if a.window else ""
        sink = f", sinks {sum(a.sink) / heads:.1%}" if a.sink else ""
        shown_positions = " · ".join(f"{p}:{shown(texts[p])} {mean[p]:.1%}" for p in best)
        print(f"  attention layer {a.layer}{window}: {shown_positions}{sink}")
    for route in step.routes:
        pairs = ", ".join(f"{e} {w:.2f}" for e, w in zip(route.experts, route.weights, strict=True))
        print(f"  experts layer {route.layer}: {pairs}")
    for s in step.states:
        print(
            f"  {s.kind} layer {s.layer}: state {s.state_bytes:,} bytes, norm {s.state_norm:.2f}, "
            f"changed {s.update_norm:.3f}"
        )


def _print_heatmap(tokens: Any) -> None:
    print("\nprompt tokens, each given the ones before it:")
    for t in tokens:
        if t.prob is None:
            print(f"  {t.index:4d}  {shown(t.text)}  (first: nothing predicts it)")
        else:
            print(f"  {t.index:4d}  {shown(t.text)}  p {t.prob:.1%}  rank {t.rank}  H {t.entropy:.2f} bits")


def _print_experts(experts: Any) -> None:
    if not experts.tokens:
        print("\nno experts: this is a dense model")
        return
    print("\nexpert load over the answer (tokens per expert):")
    for layer, counts in sorted(experts.load.items()):
        busiest = sorted(range(len(counts)), key=lambda e: -counts[e])[:4]
        print(f"  layer {layer}: " + ", ".join(f"expert {e} ×{counts[e]}" for e in busiest if counts[e]))


def _print_quantization(tokens: Any, token_text: Any) -> None:
    print("\nthe answer under its packed weights and under the float32 reference of the same file:")
    for t in tokens:
        flip = f"  greedy would pick {shown(token_text(t.reference_greedy_id))} instead" if t.flipped else ""
        print(
            f"  {t.index:4d}  {shown(t.text)}  KL {t.kl:.4f} bits  p {t.prob:.1%} (reference {t.reference_prob:.1%})  "
            f"rank {t.rank} ({t.reference_rank}){flip}"
        )
