"""Text of the inspector's views: the sampler chain, the prompt as the model sees it, the timeline.

Pure functions from plain data (engine.inspector's views, token events, saved stats) to Rich
text, so they are easy to test and cost the UI thread only string work.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.style import Style
from rich.text import Text

from llmchat.engine.events import TokenEvent
from llmchat.engine.inspector import STAGE_TITLES, PolicyView, PromptView
from llmchat.engine.knobs import KNOBS
from llmchat.engine.sampling import SamplingParams
from llmchat.tui.widgets.format import bar, subscript, visible_token

_SHORT = {"raw": "raw"} | {knob.name: knob.short for knob in KNOBS} | {"policy": "sampled"}
BAR = 4
TOKEN_WIDTH = 12


def settings_line(params: SamplingParams) -> str:
    if params.greedy:
        return f"greedy (temperature 0) · repetition penalty {params.repetition_penalty:g}"
    return (
        f"temperature {params.temperature:g} · top-k {params.top_k or 'off'} · top-p {params.top_p:g} · "
        f"min-p {params.min_p:g} · repetition penalty {params.repetition_penalty:g}"
    )


def step_title(token: TokenEvent, index: int, total: int) -> Text:
    text = Text()
    text.append(f"Step {index + 1} of {total}", style="bold")
    text.append(f" · token {visible_token(token.text)} (id {token.token_id}) · raw p {token.prob:.1%}")
    policy = "n/a" if math.isnan(token.policy_prob) else f"{token.policy_prob:.1%}"  # a server may not say
    text.append(f" · policy p {policy} · rank {token.rank + 1}")
    text.append(f" · entropy {token.entropy:.2f} bits")
    return text


def policy_text(view: PolicyView, accent: str = "cyan", cut: str = "red", chat: SamplingParams | None = None) -> Text:
    """The chain as two tables: each stage's effect, then each candidate's probability per stage.

    `chat`: the chat's own settings; when the view was computed with others, it is a what-if and
    says so, with both.
    """
    out = Text()
    if chat is not None and view.params != chat:
        out.append("what if (not applied): ", style=f"bold {accent}")
        out.append(settings_line(view.params))
        out.append("\nthe chat's settings:    ", style="dim")
        out.append(settings_line(chat), style="dim")
        out.append("\nA applies the what-if to the chat · F2–F7 change it · Esc drops it\n\n", style="dim")
    else:
        out.append("the chat's settings: ", style="dim")
        out.append(settings_line(view.params))
        out.append(
            "\nF2–F7 try other settings here (a what-if: only the policy is recomputed, never the model; "
            "the chat keeps its own until you apply)\n\n",
            style="dim",
        )
    out.append(f"{'stage':<22}{'setting':>18}{'kept':>9}{'cut':>9}{'entropy':>13}\n", style="bold")
    for stage in view.stages:
        style = "" if stage.active else "dim"
        out.append(f"{STAGE_TITLES[stage.name]:<22}{stage.setting:>18}{stage.kept:>9,}", style=style)
        out.append(f"{stage.removed:>9,}" if stage.removed else f"{'–':>9}", style=style)
        out.append(f"{stage.entropy:>8.2f} bits", style=style)
        if stage.removed_shown:
            out.append("  cut: " + " ".join(visible_token(t) for t in stage.removed_shown[:6]), style=cut)
        out.append("\n")
    out.append("\n")
    out.append(f"{'token':<{TOKEN_WIDTH}}{'logit':>8} ", style="bold")
    for stage in view.stages:
        out.append(f" {_SHORT[stage.name]:>{6 + BAR}}", style="bold")
    out.append("\n")
    for candidate in view.candidates:
        chosen = candidate.token_id == view.chosen_id
        out.append("▶" if chosen else " ", style=f"bold {accent}")
        name = visible_token(candidate.text)[: TOKEN_WIDTH - 1]
        out.append(f"{name:<{TOKEN_WIDTH - 1}}", style="bold" if chosen else "")
        out.append(f"{candidate.logit:>8.2f} ")
        for prob in candidate.probs:
            if prob > 0:
                out.append(f" {prob:>6.1%}")
                out.append(bar(prob, BAR), style=accent)
            else:
                out.append(f" {'cut':>6}{'':<{BAR}}", style=cut)
        out.append("\n")
    out.append(f" {'(all others)':<{TOKEN_WIDTH - 1}}{'':>8} ", style="dim")
    for stage in view.stages:
        out.append(f" {stage.other:>6.1%}{'':<{BAR}}", style="dim")
    return out


def saved_policy_text(token: TokenEvent, note: str) -> Text:
    """Without the step's logits (no model, or the step left the cache): what the answer saved."""
    out = Text(note + "\n\n", style="dim")
    out.append(f"{'token':<{TOKEN_WIDTH}}{'logit':>8}  {'raw':>{6 + BAR}}  {'sampled':>{6 + BAR}}\n", style="bold")
    for top in token.top:
        chosen = top.token_id == token.token_id
        out.append("▶" if chosen else " ", style="bold")
        out.append(f"{visible_token(top.text)[: TOKEN_WIDTH - 1]:<{TOKEN_WIDTH - 1}}{top.logit:>8.2f}  ")
        out.append(f"{top.prob:>6.1%}{bar(top.prob, BAR)}  ")
        if math.isnan(top.policy_prob):
            out.append(f"{'n/a':>6}")
        else:
            out.append(f"{top.policy_prob:>6.1%}{bar(top.policy_prob, BAR)}" if top.policy_prob > 0 else f"{'cut':>6}")
        out.append("\n")
    return out


def prompt_counts(view: PromptView) -> str:
    return (
        f"{len(view.token_ids):,} tokens · {view.reused:,} already in the KV cache (reused) · "
        f"{view.to_prefill:,} to prefill"
    )


def prompt_chips(view: PromptView, reused_style: str, new_style: str) -> Text:
    """Every token of the request with its id; cached ones in one style, to-be-prefilled in another."""
    out = Text()
    for i, (token_id, text) in enumerate(zip(view.token_ids, view.token_texts, strict=True)):
        style = Style.parse(reused_style if i < view.reused else new_style)
        out.append(visible_token(text), style)
        out.append(subscript(token_id), style + Style(dim=True))
        out.append(" ")
        if "\n" in text:
            out.append("\n")
    return out


def inherited_tokens(forced: Iterable[int]) -> int:
    """How many leading tokens of an answer its own request did not generate.

    A branch at token i keeps tokens 0..i-1 of the earlier answer and puts the picked token at i
    (marked forced, as are earlier branches' picks it keeps); its request generates from i + 1 on.
    The latest branch point is the highest forced index: a kept pick always lies before it.
    """
    return max(forced, default=-1) + 1


@dataclass(frozen=True)
class Timeline:
    """One request's time: prefill chunks, then the decode steps it ran.

    A branched answer starts with `inherited` tokens its request did not generate (kept from the
    earlier answer, then the pick): their timings belong to that earlier request, so they are
    left out and counted apart.
    """

    prompt_tokens: int  # what the request sent: the prompt, and a branch's kept tokens
    reused_tokens: int
    prefill_chunks: tuple[tuple[int, float], ...]  # (tokens, seconds)
    decode_seconds: tuple[float, ...]  # per decode step of this request (the tokens after its first)
    first_token_seconds: float | None  # request start to its first token (None: it generated none)
    inherited: int = 0  # leading tokens of the answer that came from the earlier answer (a branch)

    @classmethod
    def of_answer(cls, tokens: Sequence[TokenEvent], stats: dict[str, Any], inherited: int = 0) -> Timeline | None:
        """From an answer's steps and its (saved or live) stats; `inherited`: its leading tokens that
        another request generated (see `inherited_tokens`). None when no timings were kept."""
        chunks = tuple((int(t), float(s)) for t, s in stats.get("prefill_chunks", []) or [])
        own = tokens[inherited:]
        if not tokens or (not chunks and all(t.seconds == 0 for t in own)):
            return None
        return cls(
            prompt_tokens=int(stats.get("prompt_tokens", 0)),
            reused_tokens=int(stats.get("reused_tokens", 0)),
            prefill_chunks=chunks,
            decode_seconds=tuple(t.seconds for t in own[1:]),
            first_token_seconds=own[0].seconds if own else None,
            inherited=min(inherited, len(tokens)),
        )

    @property
    def prefill_tokens(self) -> int:
        return sum(t for t, _ in self.prefill_chunks)

    @property
    def prefill_seconds(self) -> float:
        return sum(s for _, s in self.prefill_chunks)


def _rate(tokens: float, seconds: float) -> str:
    return f"{tokens / seconds:,.0f} tok/s" if seconds > 0 else "–"


def _prefill_line(timeline: Timeline, n: int) -> str:
    return (
        f"  prompt {timeline.prompt_tokens:,} tokens: {timeline.reused_tokens:,} reused from the KV cache, "
        f"{timeline.prefill_tokens:,} prefilled in {n} chunk{'s' if n != 1 else ''} · "
        f"{timeline.prefill_seconds * 1000:,.0f} ms · {_rate(timeline.prefill_tokens, timeline.prefill_seconds)}\n"
    )


def timeline_prefill(timeline: Timeline, accent: str = "cyan") -> Text:
    out = Text()
    n = len(timeline.prefill_chunks)
    out.append("Prefill", style="bold")
    if not timeline.prompt_tokens and not n:  # a server's answer: its prefill ran there, unreported
        out.append("  on the server: the prompt's tokens and prefill timings were not reported\n")
    else:
        out.append(_prefill_line(timeline, n))
    longest = max((s for _, s in timeline.prefill_chunks), default=0.0)
    for i, (tokens, seconds) in enumerate(timeline.prefill_chunks):
        out.append(f"  chunk {i + 1:<3}{tokens:>6,} tok {seconds * 1000:>8,.0f} ms {_rate(tokens, seconds):>12}  ")
        out.append(bar(seconds / longest if longest else 0, 30), style=accent)
        out.append("\n")
    if timeline.inherited:
        n = timeline.inherited
        kept = (
            f"tokens 1–{n - 1:,} kept from the earlier answer and "
            if n > 2
            else ("token 1 kept from the earlier answer and " if n == 2 else "")
        )
        out.append(
            f"  branch: {kept}token {n:,} picked are inherited, not generated by this request "
            "(their timings are left out)\n",
            style="italic",
        )
    if timeline.first_token_seconds is None:
        out.append("  no token generated by this request", style="dim")
    else:
        out.append(f"  first token after {timeline.first_token_seconds * 1000:,.0f} ms (TTFT)", style="dim")
    return out


def timeline_decode(timeline: Timeline) -> Text:
    out = Text()
    steps = timeline.decode_seconds
    out.append("Decode", style="bold")
    if not steps:
        out.append("  no decode step (this request generated at most one token)")
        return out
    total = sum(steps)
    ms = [s * 1000 for s in steps]
    out.append(
        f"  {len(steps):,} steps · {total:,.2f} s · {_rate(len(steps), total)} · "
        f"{total / len(steps) * 1000:.1f} ms/token (min {min(ms):.1f}, max {max(ms):.1f}) · "
        "one bar per token, height = ms"
    )
    return out


def timeline_trend(timeline: Timeline) -> str:
    """How decode slowed (or not) from the first steps to the last, as the cache grew."""
    steps = timeline.decode_seconds
    window = max(1, min(16, len(steps) // 4))
    if len(steps) < 2 * window or len(steps) < 4:
        return ""
    first = sum(steps[:window]) / window * 1000
    last = sum(steps[-window:]) / window * 1000
    start = timeline.prompt_tokens + 1
    return (
        f"first {window} steps {first:.1f} ms/token → last {window} steps {last:.1f} ms/token "
        f"({(last / first - 1) * 100:+.0f}%) while the KV cache grew from {start:,} to {start + len(steps):,} tokens"
    )
