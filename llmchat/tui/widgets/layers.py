"""Text of the inspector's layer views: the logit lens, attention over the token chips, experts,
recurrent state, the prompt's surprise heatmap, and what quantization changed.

Pure functions from engine/inside.py's plain views to Rich text (cheap for the UI thread, easy to test).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from rich.style import Style
from rich.text import Text

from llmchat.engine.inside import AnswerExperts, AttentionPattern, PromptToken, QuantizedToken, StepInside
from llmchat.tui.widgets.format import bar, visible_token

LENS_WIDTH = 14  # cells per lens candidate
BAR = 8


def _heat(weight: float, colour: str) -> Style:
    """A chip's background for a weight in [0, 1]: none at 0, the full colour at 1 (steps of 10%)."""
    if weight < 0.02:
        return Style(dim=True)
    level = min(1.0, round(weight * 10) / 10)
    return Style(bgcolor=_blend(colour, level), color="black" if level > 0.5 else None, bold=level > 0.5)


def _blend(colour: str, level: float) -> str:
    """`colour` (#rrggbb) mixed with black: a background that brightens with the weight."""
    colour = colour if colour.startswith("#") and len(colour) == 7 else "#00aaff"
    r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"#{int(r * level):02x}{int(g * level):02x}{int(b * level):02x}"


def lens_text(step: StepInside, accent: str = "cyan") -> Text:
    """Layer by layer: the residual's norm, what the mixer and the MLP added, and the lens' top
    candidates; the token the answer chose is marked wherever it appears, with its probability."""
    out = Text()
    out.append("Logit lens: the final norm and output projection applied after each layer\n", style="bold")
    out.append(
        "what the model would say if it stopped there; the chosen token in colour, its probability on the right\n\n",
        style="dim",
    )
    out.append(f"{'layer':>5} {'kind':<10}{'‖x‖':>8}{'+mixer':>8}{'+mlp':>8}  top candidates\n", style="bold")
    for r in step.lens:
        label = "emb" if r.layer < 0 else str(r.layer)
        kind = {"embedding": "", "attention": "attn", "linear_attention": "deltanet"}.get(r.kind, r.kind)
        out.append(f"{label:>5} {kind:<10}{r.residual_norm:>8.1f}{r.mixer_added:>8.1f}{r.mlp_added:>8.1f}  ")
        for candidate in r.top[:4]:
            style = f"bold {accent}" if candidate.token_id == step.chosen_id else ""
            cell = f"{visible_token(candidate.text)} {candidate.prob:.0%}"
            out.append(f"{cell[: LENS_WIDTH - 1]:<{LENS_WIDTH}}", style=style)
        if r.chosen_prob is not None:
            out.append(f" {bar(r.chosen_prob, BAR)} {r.chosen_prob:6.1%} #{(r.chosen_rank or 0) + 1}", style=accent)
        out.append("\n")
    return out


def attention_text(pattern: AttentionPattern, texts: Sequence[str], head: int | None, colour: str = "#00aaff") -> Text:
    """The step's query over every earlier token chip, each chip as bright as the weight it got; one
    head, or (None) the heads averaged. Positions outside a sliding window are dim."""
    heads = len(pattern.weights)
    if head is None:
        weights = [sum(column) / heads for column in zip(*pattern.weights, strict=True)]
        which = f"all {heads} heads averaged"
    else:
        weights = list(pattern.weights[head])
        which = f"head {head + 1} of {heads} (KV head {pattern.kv_head_of[head] + 1})"
    out = Text()
    out.append(f"Attention, layer {pattern.layer} · {which}", style="bold")
    if pattern.window is not None:
        out.append(f" · sliding window {pattern.window}", style="bold")
    if pattern.sink is not None:
        sink = sum(pattern.sink) / heads if head is None else pattern.sink[head]
        out.append(f" · sink {sink:.1%}", style="bold")
    out.append("\n[ ] layer · { } head (or all) · the brighter a token, the more this step's query read it\n\n")
    out.append_text(chips(texts, weights, colour))
    best = sorted(range(len(weights)), key=lambda p: -weights[p])[:5]
    out.append("\n\nmost attended: ", style="bold")
    out.append(" · ".join(f"{visible_token(texts[p])} (position {p}) {weights[p]:.1%}" for p in best))
    return out


def chips(texts: Sequence[str], weights: Sequence[float], colour: str, cursor: int | None = None) -> Text:
    out = Text()
    for i, (text, weight) in enumerate(zip(texts, weights, strict=True)):
        heat = _heat(weight, colour)
        out.append(visible_token(text), heat + Style(reverse=True, underline=True) if i == cursor else heat)
        out.append(" ")
        if "\n" in text:
            out.append("\n")
    return out


def inside_extras(step: StepInside, experts: AnswerExperts | None) -> Text:
    """The routes of the step's token, the answer's expert load, and the recurrent layers' state."""
    out = Text()
    if step.routes:
        out.append("\nExperts this token was routed to (weight of each output)\n", style="bold")
        for route in step.routes:
            pairs = "  ".join(f"#{e} {w:.2f}" for e, w in zip(route.experts, route.weights, strict=True))
            out.append(f"  layer {route.layer:>3}: {pairs}\n")
    if experts is not None and experts.load:
        out.append("\nExpert load over the answer (tokens each expert took)\n", style="bold")
        for layer, counts in sorted(experts.load.items()):
            total = sum(counts) or 1
            busiest = sorted(range(len(counts)), key=lambda e: -counts[e])[:6]
            out.append(f"  layer {layer:>3}: ")
            out.append("  ".join(f"#{e} {counts[e] / total:.0%}" for e in busiest if counts[e]) + "\n")
    if step.states:
        out.append("\nRecurrent layers: a fixed-size state instead of a growing KV cache\n", style="bold")
        for s in step.states:
            share = s.update_norm / s.state_norm if s.state_norm else 0.0
            out.append(
                f"  layer {s.layer:>3} {s.kind:<17}{s.state_bytes / 1024:>9,.1f} KiB  norm {s.state_norm:8.2f}  "
                f"this step changed it by {s.update_norm:.3f} ({share:.1%})\n"
            )
    return out


def surprise(token: PromptToken) -> float:
    """Bits of surprise, -log2 p (0 for the first token, which nothing predicts)."""
    return 0.0 if token.prob is None else -math.log2(max(token.prob, 1e-30))


def heatmap_text(tokens: Sequence[PromptToken], colour: str = "#ff8800", cursor: int | None = None) -> Text:
    """The prompt's tokens, each as bright as it was surprising to the model; the token under the
    cursor (`,` and `.` move it) with what the model expected there; then the most surprising."""
    out = Text()
    out.append("How surprising each prompt token was to the model, given the ones before it\n", style="bold")
    out.append("brighter = less expected (−log₂ p, bright from 12 bits); the first token has nothing before it\n")
    out.append(", and . move the cursor (reversed) over the prompt's tokens\n\n", style="dim")
    scale = [min(1.0, surprise(t) / 12.0) for t in tokens]
    out.append_text(chips([t.text for t in tokens], scale, colour, cursor))
    if cursor is not None and 0 <= cursor < len(tokens):
        out.append_text(prompt_token_text(tokens[cursor], len(tokens)))
    ranked = sorted((t for t in tokens if t.prob is not None), key=lambda t: -surprise(t))[:10]
    if ranked:
        out.append("\n\nMost surprising\n", style="bold")
        for t in ranked:
            alternatives = " · ".join(f"{visible_token(c.text)} {c.prob:.0%}" for c in t.top[:3])
            out.append(f"  {t.index:>5} {visible_token(t.text):<16} p {t.prob:8.3%}  rank {t.rank:>6}  ")
            out.append(f"expected: {alternatives}\n", style="dim")
    return out


def prompt_token_text(token: PromptToken, count: int) -> Text:
    """One prompt token under the cursor: its probability and rank, and the candidates the model
    expected at its place (the answer's top-k panel, for the prompt)."""
    out = Text()
    out.append(f"\n\nposition {token.index} of {count}: ", style="bold")  # as the list below numbers them
    out.append(visible_token(token.text), style="reverse")
    if token.prob is None:
        out.append("  the first token: nothing before it predicts it\n", style="dim")
        return out
    out.append(f"  p {token.prob:.3%} · rank {token.rank} · {surprise(token):.1f} bits")
    if token.entropy is not None:
        out.append(f" · entropy {token.entropy:.2f} bits", style="dim")
    out.append("\nexpected here:\n", style="dim")
    for candidate in token.top:
        mark = "▶ " if candidate.token_id == token.token_id else "  "
        out.append(f"{mark}{visible_token(candidate.text):<16} {candidate.prob:8.3%}  {bar(candidate.prob, 12)}\n")
    return out


def quantization_text(tokens: Sequence[QuantizedToken], accent: str = "cyan", flip: str = "red") -> Text:
    """Per answer token: KL(float || packed), the chosen token's probability and rank under each, flips."""
    out = Text()
    out.append("What packing the weights changed: the answer under its packed weights and under the\n", style="bold")
    out.append("float32 reference of the same file (both teacher-forced on the same tokens)\n\n", style="bold")
    out.append(f"{'token':<16}{'KL bits':>9}{'packed p':>10}{'float p':>9}{'ranks':>9}\n", style="bold")
    for t in tokens:
        out.append(f"{visible_token(t.text)[:15]:<16}{t.kl:>9.4f}{t.prob:>10.1%}{t.reference_prob:>9.1%}")
        out.append(f"{t.rank + 1:>5} {t.reference_rank + 1:<3}")
        if t.flipped:
            out.append(f" greedy flips: float would pick {visible_token(t.reference_greedy_text)}", style=flip)
        out.append("\n")
    if tokens:
        mean = sum(t.kl for t in tokens) / len(tokens)
        flips = sum(t.flipped for t in tokens)
        out.append(f"\nmean KL {mean:.4f} bits · greedy would flip at {flips} of {len(tokens)} tokens\n", style=accent)
    return out
