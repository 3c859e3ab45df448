"""The inference inspector, driven with Pilot on a tiny random llama through the real engine:
the token heatmap and its cursor, branching at a token, the policy view (and its what-if), the
prompt view and the timeline; and a saved chat inspected with no model loaded.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from rich.cells import cell_len
from textual.geometry import Region
from textual.pilot import Pilot
from textual.widget import Widget

from llmchat.chat.conversation import Conversation, token_record
from llmchat.engine import SamplingParams, load
from llmchat.engine.events import TokenEvent, TopToken
from llmchat.engine.sampling import Sampler
from llmchat.tui.app import LLMChatApp
from llmchat.tui.screens.branch import BranchScreen
from llmchat.tui.screens.inspector import InspectorScreen
from llmchat.tui.widgets.format import printable
from llmchat.tui.widgets.messages import AssistantMessage
from llmchat.tui.widgets.panels import KVCachePanel, TopKPanel
from llmchat.tui.widgets.prompt import PromptInput
from llmchat.tui.widgets.tokens import HEAT, TokenView, heat
from tests.test_tui_actions import CHIPS_LINE, SIZE, _app, _drawn, _send, _store, _until

SAMPLED = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("inspector") / "llama")


async def _inspector(pilot: Pilot[None], app: LLMChatApp, key: str) -> InspectorScreen:
    """Press an inspector key; the inspector screen once it is on top."""
    await pilot.press(key)
    await _until(pilot, lambda: isinstance(app.screen, InspectorScreen), "the inspector")
    screen = app.screen
    assert isinstance(screen, InspectorScreen)
    return screen


def _chip_backgrounds(view: Widget, line: int) -> list[tuple[str, str]]:
    """(text, background colour) of each run of cells drawn on one line of a widget."""
    width = view.outer_size.width
    strip = view.render_lines(Region(0, line, width, 1))[0]
    runs: list[tuple[str, str]] = []
    for segment in strip:
        colour = segment.style.bgcolor.name if segment.style and segment.style.bgcolor else ""
        if runs and runs[-1][1] == colour:
            runs[-1] = (runs[-1][0] + segment.text, colour)
        else:
            runs.append((segment.text, colour))
    return runs


def _token(i: int, text: str, prob: float) -> TokenEvent:
    top = (TopToken(100 + i, text, 5.0, prob, prob), TopToken(900, " else", 4.0, (1 - prob) / 2, 0.0))
    return TokenEvent(
        token_id=100 + i, text=text, index=i, logit=5.0, prob=prob, policy_prob=prob, rank=0, top=top,
        seconds=0.03 + 0.001 * i, cache_tokens=0, cache_bytes=0, entropy=1.0 + i / 10, policy_entropy=0.5,
    )  # fmt: skip


PROBS = [0.97, 0.75, 0.45, 0.2, 0.04, 0.93]
WORDS = ["The", " sky", " looks", " rather", " mauve", "."]


def _saved_chat() -> Conversation:
    conversation = Conversation(model={"name": "tiny"})
    conversation.add_user("What colour is the sky?")
    records = [token_record(_token(i, w, p)) for i, (w, p) in enumerate(zip(WORDS, PROBS, strict=True))]
    records[4]["forced"] = True
    stats = {"tokens": 6, "prompt_tokens": 20, "reused_tokens": 4, "prefill_chunks": [[16, 0.05]]}
    conversation.add_assistant("".join(WORDS), tokens=records, stats=stats)
    return conversation


# --- the heatmap -------------------------------------------------------------------------------


async def test_heatmap_colours_follow_the_probabilities_of_a_saved_chat(tmp_path: Path) -> None:
    """Alt+T turns the answer into chips whose background is the probability's colour, the same
    scale the legend shows; a less likely token is never drawn greener than a likelier one. No
    model is loaded: the saved token records are enough."""
    app = LLMChatApp(None, store=_store(tmp_path), conversation=_saved_chat())
    async with app.run_test(size=SIZE) as pilot:
        answer = app.query_one(AssistantMessage)
        await pilot.press("alt+t")
        await _until(pilot, lambda: answer.query(TokenView), "the token view")
        view = answer.query_one(TokenView)
        assert view.mode == "heatmap" and not answer.query_one(".content").display
        runs = [run for run in _chip_backgrounds(view, CHIPS_LINE) if run[0].strip()]
        # the cursor chip (the last token) is drawn reversed: its colour is the foreground then
        drawn = {text: colour for text, colour in runs}
        order = [colour for _, colour, _, _ in HEAT]
        for word, prob in zip(WORDS[:-1], PROBS[:-1], strict=True):
            colour = drawn[printable(word)]
            assert colour == heat(prob)[0], (word, prob, colour)
        buckets = [order.index(heat(p)[0]) for p in PROBS[:-1]]
        assert buckets == sorted(buckets) and len(set(buckets)) == 5  # all five colours, likeliest first
        legend = _drawn(view)[0]
        assert all(label in legend for *_, label in HEAT)

        # the forced token (picked at a branch) is underlined; Alt+T again shows ids, then the text
        mauve = _chip_backgrounds(view, CHIPS_LINE)
        assert any(r[0] == " mauve" for r in mauve)
        await pilot.press("alt+t")
        await _until(pilot, lambda: view.mode == "ids", "ids")
        line = _drawn(view)[CHIPS_LINE]
        assert "₁₀₀" in line and "₁₀₁" in line  # token ids as subscripts
        await pilot.press("alt+t")
        await _until(pilot, lambda: not answer.query(TokenView), "the text again")
        assert answer.query_one(".content").display


async def test_the_cursor_moves_the_top_k_panel_and_shows_the_entropy(folder: Path, tmp_path: Path) -> None:
    """On a live answer: each chip's colour is its token's probability colour, F8 moves the cursor
    and the top-k panel follows it with that step's entropy."""
    app = _app(folder, tmp_path, sampling=SAMPLED)
    async with app.run_test(size=SIZE) as pilot:
        answer = await _send(pilot, app, "hello there")
        tokens = answer.tokens
        await pilot.press("alt+t")
        await _until(pilot, lambda: answer.query(TokenView), "the token view")
        view = answer.query_one(TokenView)
        runs = _chip_backgrounds(view, CHIPS_LINE)
        x = 0
        for token in tokens[:4]:  # the first chips, in order, before any line break
            shown = printable(token.text) or "∅"
            covering = [c for t, c in _runs_at(runs, x, cell_len(shown))]
            assert set(covering) == {heat(token.prob)[0]}, (token.text, token.prob, covering)
            x += cell_len(shown)
        panel = app.query_one(TopKPanel)
        await pilot.press("f8")
        await _until(pilot, lambda: panel.event is tokens[-2], "the cursor one token back")
        text = "\n".join(_drawn(panel))
        assert f"entropy {tokens[-2].entropy:.2f} bits" in text
        assert tokens[-2].entropy > 0 and tokens[-2].policy_entropy <= tokens[-2].entropy + 1e-6


def _runs_at(runs: list[tuple[str, str]], start: int, width: int) -> list[tuple[str, str]]:
    """The runs covering cells [start, start + width)."""
    out, x = [], 0
    for text, colour in runs:
        w = cell_len(text)
        if x < start + width and x + w > start:
            out.append((text, colour))
        x += w
    return out


# --- branching ---------------------------------------------------------------------------------


async def test_branching_at_a_token_keeps_the_prefix_and_reuses_the_cache(folder: Path, tmp_path: Path) -> None:
    """Ctrl+B at token i, pick an alternative: the new answer keeps tokens < i, has the pick at i,
    and the engine prefilled one token (the pick) over the cached prompt and prefix; the old answer
    stays as a sibling branch that Alt+← brings back."""
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        old = await _send(pilot, app, "hello there")
        old_id, old_ids = old.message_id, [t.token_id for t in old.tokens]
        assert old_id is not None and len(old_ids) >= 8
        for _ in range(len(old_ids) - 4):  # the first F8 selects the last token; each next one steps back
            await pilot.press("f8")
        i = 4
        await _until(pilot, lambda: app.query_one(TopKPanel).event is old.tokens[i], "the cursor at token 4")
        await pilot.press("ctrl+b")
        await _until(pilot, lambda: isinstance(app.screen, BranchScreen), "the branch dialog")
        picked = next(t.token_id for t in old.tokens[i].top if t.token_id != old_ids[i])  # highlighted first
        await pilot.press("enter")
        await _until(pilot, lambda: app.conversation.current != old_id and not app.generating, "the branch")
        await _until(pilot, lambda: app.query(AssistantMessage).last().finished is not None, "the new answer")

        new = app.query(AssistantMessage).last()
        new_ids = [t.token_id for t in new.tokens]
        assert new_ids[:i] == old_ids[:i] and new_ids[i] == picked and len(new_ids) > i + 1
        prompt_len = len(app.session.prompt_ids(new.message_id or ""))
        cache = app.query_one(KVCachePanel).state
        assert (cache.reused, cache.prefilled) == (prompt_len + i, 1)  # no recompute: one token prefilled
        done = new.finished
        assert done is not None and done.prefix_tokens == i + 1 and done.prefilled_tokens == 1

        saved = app.conversation.get(new.message_id or "")
        assert saved.tokens is not None and saved.tokens[i].get("forced") is True
        assert [r["id"] for r in saved.tokens if not r.get("end")] == new_ids
        if done.reason == "eos":  # the step that chose to stop is kept too, marked, after the answer's tokens
            assert saved.tokens[-1]["end"] is True and new.end is not None
            assert saved.tokens[-1]["id"] == new.end.token_id and new.steps[-1] is new.end
        assert app.conversation.sibling_position(saved.id) == (1, 2)
        assert saved.content == new.content_text and saved.content.strip()

        await pilot.press("alt+left")  # the old continuation is kept
        await _until(pilot, lambda: app.conversation.current == old_id, "the old branch")
        assert [t.token_id for t in app.query(AssistantMessage).last().tokens] == old_ids

        # its steps left the cache when the branch was generated: the policy view prefills them back
        last = app.query(AssistantMessage).last().tokens[-1]
        screen = await _inspector(pilot, app, "alt+p")
        await _until(pilot, lambda: screen.policy is not None, "the policy view of the old branch")
        assert screen.policy is not None and screen.policy.chosen_id == last.token_id
        assert screen.policy.prob(last.token_id, "raw") == pytest.approx(last.prob, abs=1e-4)


# --- the policy view ---------------------------------------------------------------------------


async def test_the_policy_view_is_the_samplers_own_and_answers_what_if(folder: Path, tmp_path: Path) -> None:
    """Alt+P on a step: the final stage's probability of the chosen token is the one the sampler drew
    it with, the raw stage is the top-k panel's; F3 (temperature up) recomputes the policy for the same
    step without running the model, and the numbers equal a Sampler built with the new settings."""
    app = _app(folder, tmp_path, sampling=SAMPLED)
    async with app.run_test(size=SIZE) as pilot:
        answer = await _send(pilot, app, "hello there")
        await pilot.press("f8", "f8", "f8")
        index = len(answer.tokens) - 3
        token = answer.tokens[index]
        await _until(pilot, lambda: app.query_one(TopKPanel).event is token, "the cursor")
        screen = await _inspector(pilot, app, "alt+p")
        await _until(pilot, lambda: screen.policy is not None, "the policy view")
        view = screen.policy
        assert view is not None and view.chosen_id == token.token_id
        assert [s.name for s in view.stages] == [
            "raw", "repetition_penalty", "temperature", "top_k", "top_p", "min_p", "policy",
        ]  # fmt: skip
        assert view.prob(token.token_id) == pytest.approx(token.policy_prob, abs=1e-6)
        assert view.prob(token.token_id, "raw") == pytest.approx(token.prob, abs=1e-6)
        for top in token.top:
            assert view.prob(top.token_id, "raw") == pytest.approx(top.prob, abs=1e-6)
            assert view.prob(top.token_id) == pytest.approx(top.policy_prob, abs=1e-6)
        top_k = next(s for s in view.stages if s.name == "top_k")
        assert top_k.kept == 20 and top_k.removed == app.model.config.vocab_size - 20  # type: ignore[union-attr]
        assert view.stages[0].entropy == pytest.approx(token.entropy, abs=1e-4)

        model = app.model
        assert model is not None
        forwards = _count_forwards(model.model)
        await pilot.press("f3")
        await _until(pilot, lambda: screen.policy is not None and screen.policy.params.temperature == 0.9, "what if")
        assert forwards() == 0  # only the policy ran again
        what_if = screen.policy
        assert what_if is not None

        sequence = app.session.prompt_ids(answer.message_id or "") + [t.token_id for t in answer.tokens[:index]]
        logits = model.logits(sequence)[-1]  # an independent full forward pass
        sampler = Sampler(SAMPLED.replace(temperature=0.9), logits.shape[-1])
        sampler.observe(sequence)
        expected = sampler.policy_probs(sampler.policy_logits(logits))
        for candidate in what_if.candidates:
            assert candidate.probs[-1] == pytest.approx(float(expected[candidate.token_id]), abs=1e-4)
        assert sum(c.probs[-1] for c in what_if.candidates) + what_if.stages[-1].other == pytest.approx(1.0, abs=1e-5)


def _count_forwards(module: torch.nn.Module):
    """Count calls of a module's forward from now on (a hook: the real forward still runs)."""
    calls = [0]
    handle = module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    def count() -> int:
        handle.remove()
        return calls[0]

    return count


# --- the prompt view and the timeline ----------------------------------------------------------


async def test_the_prompt_views_counts_are_the_engines(folder: Path, tmp_path: Path) -> None:
    """Alt+V with a draft in the input: the rendered next request (special tokens included), its
    tokens, and how many the cache holds; sending the draft then reuses and prefills exactly that."""
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await _send(pilot, app, "hello there")
        app.query_one(PromptInput).text = "and again"
        screen = await _inspector(pilot, app, "alt+v")
        await _until(pilot, lambda: screen.prompt is not None, "the prompt view")
        view = screen.prompt
        assert view is not None
        model = app.model
        assert model is not None
        expected = model.template.render(
            [*app.conversation.chat_messages(), {"role": "user", "content": "and again"}], add_generation_prompt=True
        )
        assert view.text == expected and "and again" in view.text
        assert model.tokenizer.decode(list(view.token_ids)) == model.tokenizer.decode(model.tokenizer.encode(expected))
        assert 0 < view.reused < len(view.token_ids)
        counts = "\n".join(_drawn(screen.query_one("#prompt-counts")))
        assert f"{view.reused:,} already in the KV cache" in counts and f"{view.to_prefill:,} to prefill" in counts

        await pilot.press("escape")
        await _until(pilot, lambda: not isinstance(app.screen, InspectorScreen), "the chat")
        await pilot.press("enter")
        await _until(pilot, lambda: len(app.query(AssistantMessage)) == 2 and not app.generating, "the answer")
        await _until(pilot, lambda: app.query(AssistantMessage).last().finished is not None, "its stats")
        done = app.query(AssistantMessage).last().finished
        assert done is not None
        assert (done.reused_tokens, done.prefilled_tokens) == (view.reused, view.to_prefill)


async def test_the_timeline_shows_the_last_requests_prefill_and_decode(folder: Path, tmp_path: Path) -> None:
    """Alt+L: the request's prefill chunks and every decode step's time, as the engine reported them."""
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        answer = await _send(pilot, app, "hello there, how are you today?")
        done = answer.finished
        assert done is not None
        screen = await _inspector(pilot, app, "alt+l")
        await _until(pilot, lambda: screen.timeline is not None, "the timeline")
        timeline = screen.timeline
        assert timeline is not None
        assert timeline.prefill_tokens == done.prefilled_tokens and timeline.prompt_tokens == done.prompt_tokens
        assert len(timeline.decode_seconds) == done.generated_tokens - 1
        assert sum(timeline.decode_seconds) == pytest.approx(done.decode_seconds, rel=0.2, abs=0.05)
        drawn = "\n".join(_drawn(screen.query_one("#timeline-prefill")))
        assert f"{done.prefilled_tokens:,} prefilled" in drawn
        from textual.widgets import Sparkline

        assert len(screen.query_one(Sparkline).data or []) == done.generated_tokens - 1
        await pilot.press("alt+p")  # tabs switch with their keys
        await _until(pilot, lambda: screen.active_tab == "policy", "the policy tab")


async def test_a_saved_chat_shows_its_inspector_without_a_model(tmp_path: Path) -> None:
    """No model loaded: the policy tab shows the saved top-k of the step under the cursor, the
    timeline comes from the saved timings, the prompt tab says it needs the model."""
    app = LLMChatApp(None, store=_store(tmp_path), conversation=_saved_chat())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f8", "f8")
        await _until(pilot, lambda: app.query_one(TopKPanel).event is not None, "the cursor")
        assert app.query_one(TopKPanel).event.token_id == 104  # type: ignore[union-attr]
        screen = await _inspector(pilot, app, "alt+p")
        await pilot.pause()
        body = "\n".join(_drawn(screen.query_one("#policy-body")))
        assert "No model loaded" in body and "mauve" in body and "4.0%" in body
        await pilot.press("alt+l")
        await _until(pilot, lambda: screen.timeline is not None, "the timeline")
        assert screen.timeline is not None and screen.timeline.prefill_chunks == ((16, 0.05),)
        # the saved answer was branched at " mauve" (token 5, forced): tokens 1–5 are inherited, and
        # its own request's timings are those of the tokens after them
        assert screen.timeline.inherited == 5 and screen.timeline.decode_seconds == ()
        assert screen.timeline.first_token_seconds == pytest.approx(0.035)
        assert "token 5 picked are inherited" in "\n".join(_drawn(screen.query_one("#timeline-prefill")))
        await pilot.press("alt+v")
        await _until(pilot, lambda: screen.active_tab == "prompt", "the prompt tab")
        await pilot.pause()
        assert "No model loaded" in "\n".join(_drawn(screen.query_one("#prompt-counts")))


def test_engine_entropy_is_the_distributions(folder: Path) -> None:
    """TokenEvent.entropy is the Shannon entropy (bits) of the raw next-token distribution."""
    model = load(folder, device="cpu", dtype="float32")
    ids = model.tokenizer.encode("hello there")
    events = model.generate(ids, sampling=SamplingParams(temperature=0), max_new_tokens=1)
    event = next(e for e in events if isinstance(e, TokenEvent))
    probs = model.logits(ids)[-1].softmax(-1)
    expected = -sum(p * math.log2(p) for p in probs.tolist() if p > 0)
    assert event.entropy == pytest.approx(expected, abs=1e-3)
    assert event.policy_entropy == 0.0  # greedy draws from a one-hot


async def test_the_step_that_ended_the_answer_is_inspectable_and_a_branch_point(folder: Path, tmp_path: Path) -> None:
    """An answer that ended on end-of-sequence keeps that step: the heatmap shows it as ∎, the cursor
    starts there and the top-k panel shows it; branching there picks another token instead of the
    end, and the answer goes on from the cache (one token prefilled)."""
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        first = await _send(pilot, app, "hello there")
        model = app.model
        assert model is not None
        stop = first.tokens[3].token_id
        model.generator.eos_token_ids = frozenset({stop})  # greedy reaches it at step 3 now
        parent = app.conversation.get(first.message_id or "").parent
        await pilot.press("ctrl+r")
        await _until(
            pilot, lambda: len(app.conversation.children(parent)) == 2 and not app.generating, "the regenerated answer"
        )
        await _until(pilot, lambda: app.query(AssistantMessage).last().finished is not None, "its stats")
        ended = app.query(AssistantMessage).last()
        assert ended.finished is not None and ended.finished.reason == "eos"
        assert ended.end is not None and ended.end.token_id == stop and len(ended.tokens) == 3

        await pilot.press("f8")
        panel = app.query_one(TopKPanel)
        await _until(pilot, lambda: panel.event is ended.end, "the end step under the cursor")
        assert panel.border_subtitle == "end of answer"
        assert "∎" in "\n".join(_drawn(ended.query_one(TokenView)))

        await pilot.press("ctrl+b")
        await _until(pilot, lambda: isinstance(app.screen, BranchScreen), "the branch dialog")
        picked = next(t.token_id for t in ended.end.top if t.token_id != stop)
        await pilot.press("enter")
        await _until(
            pilot, lambda: app.query(AssistantMessage).last() is not ended and not app.generating, "the branch"
        )
        await _until(pilot, lambda: app.query(AssistantMessage).last().finished is not None, "the branch's stats")
        branch = app.query(AssistantMessage).last()
        ids = [t.token_id for t in branch.tokens]
        assert ids[:3] == [t.token_id for t in ended.tokens] and ids[3] == picked
        assert branch.finished is not None and branch.finished.prefilled_tokens == 1


async def test_the_policy_view_follows_a_streaming_answer_without_running_the_model(
    folder: Path, tmp_path: Path
) -> None:
    """Alt+P while the model answers: the view shows the newest step's sampler chain as it goes,
    computed from the logits the step sampled from (its numbers are the step's own), and the model
    runs no extra forward pass for it. (Each forward is slowed by 30 ms so the answer takes a while.)"""
    import time

    app = _app(folder, tmp_path, sampling=SAMPLED, max_new_tokens=80)
    async with app.run_test(size=SIZE) as pilot:
        await _until(pilot, lambda: app.model is not None, "the model")
        model = app.model
        assert model is not None
        forwards = [0]

        def slow(*_: object) -> None:
            forwards[0] += 1
            time.sleep(0.03)

        handle = model.model.register_forward_pre_hook(slow)
        app.query_one(PromptInput).text = "hello there"
        app.simulate_key("enter")  # posted as the terminal would: Pilot.press waits for an idle CPU
        await _until(pilot, lambda: app.generating and len(app.query(AssistantMessage).last().tokens) >= 2, "tokens")
        app.simulate_key("alt+p")
        await _until(pilot, lambda: isinstance(app.screen, InspectorScreen), "the inspector")
        screen = app.screen
        assert isinstance(screen, InspectorScreen)
        seen = []
        for _ in range(400):
            if screen.policy is not None and app.generating:
                seen.append(screen.policy)
            if not app.generating:
                break
            await pilot.pause(0.02)
        await _until(pilot, lambda: app.query(AssistantMessage).last().finished is not None, "the answer")
        handle.remove()
        assert seen, "no live view while the answer streamed"
        answer = app.query(AssistantMessage).last()
        for view in {id(v): v for v in seen}.values():
            assert view.chosen_id is not None
            matches = [
                t
                for t in answer.tokens
                if t.token_id == view.chosen_id
                and abs(t.policy_prob - view.prob(t.token_id)) < 1e-6
                and abs(t.prob - view.prob(t.token_id, "raw")) < 1e-6
            ]
            assert matches, "a live view that is no step's own"
        done = answer.finished
        assert done is not None
        decode_forwards = done.generated_tokens - (0 if done.reason == "eos" else 1)
        assert forwards[0] == len(done.prefill_chunks) + decode_forwards  # the live views ran no model


# --- the timeline of a branch (issue 13, item 6) -------------------------------------------------


async def test_the_timeline_of_a_branch_covers_only_its_own_request(folder: Path, tmp_path: Path) -> None:
    """Branch at token i: the timeline's numbers are the branch's request (its TTFT, its decode
    steps), and the i kept tokens and the pick are marked inherited, not shown as decode steps."""
    app = _app(folder, tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        old = await _send(pilot, app, "hello there")
        assert len(old.tokens) >= 8
        for _ in range(len(old.tokens) - 4):  # the cursor to token 4 (0-based)
            await pilot.press("f8")
        i = 4
        await _until(pilot, lambda: app.query_one(TopKPanel).event is old.tokens[i], "the cursor at token 4")
        await pilot.press("ctrl+b")
        await _until(pilot, lambda: isinstance(app.screen, BranchScreen), "the branch dialog")
        await pilot.press("enter")
        await _until(pilot, lambda: app.conversation.current != old.message_id and not app.generating, "the branch")
        await _until(pilot, lambda: app.query(AssistantMessage).last().finished is not None, "the new answer")
        branch = app.query(AssistantMessage).last()
        done = branch.finished
        assert done is not None and done.prefix_tokens == i + 1 and done.generated_tokens >= 2

        await pilot.press("escape")  # close the token view: the timeline then shows the last answer
        screen = await _inspector(pilot, app, "alt+l")
        await _until(pilot, lambda: screen.timeline is not None, "the timeline")
        timeline = screen.timeline
        assert timeline is not None
        assert timeline.inherited == done.prefix_tokens
        own = branch.steps[done.prefix_tokens :]  # this request's steps (the end-of-answer step included)
        assert len(own) == done.generated_tokens + (1 if branch.end is not None else 0)
        assert timeline.decode_seconds == tuple(t.seconds for t in own[1:])
        assert timeline.first_token_seconds == own[0].seconds
        assert timeline.first_token_seconds <= done.ttft_seconds + 1e-3  # the request's own first token
        assert timeline.prefill_tokens == done.prefilled_tokens == 1
        from textual.widgets import Sparkline

        assert len(screen.query_one(Sparkline).data or []) == len(own) - 1
        drawn = "\n".join(_drawn(screen.query_one("#timeline-prefill")))
        assert f"tokens 1–{i} kept from the earlier answer and token {i + 1} picked are inherited" in drawn
        decode = "\n".join(_drawn(screen.query_one("#timeline-decode")))
        assert f"{len(own) - 1:,} steps" in decode


# --- the policy view's what-if (issue 13, item 13) -----------------------------------------------


async def test_the_what_if_stays_a_what_if_until_applied(folder: Path, tmp_path: Path) -> None:
    """Over the policy view F2–F7 change a what-if copy: the chat's settings (status bar, next
    answer) stay; A applies the what-if; leaving the inspector drops an unapplied one; on another
    tab F3 brings the policy view up with the what-if. Outside the inspector F3 acts on the chat."""
    from llmchat.tui.widgets.status import StatusBar

    app = _app(folder, tmp_path, sampling=SAMPLED)
    async with app.run_test(size=SIZE) as pilot:
        await _send(pilot, app, "hello there")
        status = app.query_one(StatusBar)
        screen = await _inspector(pilot, app, "alt+p")
        await _until(pilot, lambda: screen.policy is not None, "the policy view")
        assert "the chat's settings" in "\n".join(_drawn(screen.query_one("#policy-body")))

        await pilot.press("f3", "f3")
        await _until(pilot, lambda: screen.policy is not None and screen.policy.params.temperature == 1.0, "what-if")
        assert app.sampling == SAMPLED  # the chat's settings did not move
        assert screen.what_if == SAMPLED.replace(temperature=1.0)
        assert status.state.sampling == SAMPLED
        body = "\n".join(_drawn(screen.query_one("#policy-body")))
        assert "what if (not applied): temperature 1" in body and "the chat's settings:    temperature 0.8" in body

        await pilot.press("a")  # apply
        await _until(pilot, lambda: app.sampling == SAMPLED.replace(temperature=1.0), "the what-if applied")
        assert screen.what_if is None and status.state.sampling == app.sampling
        await _until(pilot, lambda: "the chat's settings: temperature 1" in "\n".join(
            _drawn(screen.query_one("#policy-body"))), "the view showing the chat's settings")  # fmt: skip

        await pilot.press("f5" if SAMPLED.top_p < 1 else "f4")  # another what-if, then leave without applying
        await _until(pilot, lambda: screen.what_if is not None, "a second what-if")
        await pilot.press("escape")
        await _until(pilot, lambda: not isinstance(app.screen, InspectorScreen), "the chat")
        assert app.sampling == SAMPLED.replace(temperature=1.0)

        screen = await _inspector(pilot, app, "alt+l")  # F3 on the timeline tab: the policy tab, a what-if
        await pilot.press("f2")
        await _until(pilot, lambda: screen.active_tab == "policy", "the policy tab")
        await _until(pilot, lambda: screen.policy is not None and screen.policy.params.temperature == 0.9, "what-if")
        assert app.sampling.temperature == 1.0
        await pilot.press("escape")
        await _until(pilot, lambda: not isinstance(app.screen, InspectorScreen), "the chat")

        await pilot.press("f2")  # over the chat: the chat's own settings
        await _until(pilot, lambda: app.sampling is not None and app.sampling.temperature == 0.9, "the chat's change")
        assert status.state.sampling.temperature == 0.9
