"""The chat TUI driven with Textual's Pilot, on a tiny random model through the real engine."""

from __future__ import annotations

import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

import llmchat
from llmchat.chat.store import ConversationStore
from llmchat.engine import Finished, SamplingParams, TokenEvent
from llmchat.tui.app import LLMChatApp
from llmchat.tui.widgets.messages import AssistantMessage
from llmchat.tui.widgets.panels import KVCachePanel, TopKPanel
from llmchat.tui.widgets.prompt import PromptInput
from llmchat.tui.widgets.status import StatusBar
from llmchat.tui.worker import Batch, Coalescer, FrameBudget, run_generation

GREEDY = SamplingParams(temperature=0)
SIZE = (140, 40)
CONTEXT = 512


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import build_tiny_model

    return build_tiny_model("llama", tmp_path_factory.mktemp("tui") / "llama")


def _app(folder: Path, tmp_path: Path, **options: object) -> LLMChatApp:
    store = ConversationStore(tmp_path / "conversations")
    return LLMChatApp(folder, store=store, device="cpu", dtype="float32", context_length=CONTEXT, **options)  # type: ignore[arg-type]


async def _until(pilot: object, condition: Callable[[], bool], what: str, seconds: float = 30.0) -> None:
    pause: Callable[[float], Awaitable[None]] = pilot.pause  # type: ignore[attr-defined]
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await pause(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def _send(pilot: object, app: LLMChatApp, text: str) -> AssistantMessage:
    await _until(pilot, lambda: app.model is not None, "the model to load")
    prompt = app.query_one(PromptInput)
    prompt.text = text
    await pilot.press("enter")  # type: ignore[attr-defined]
    await _until(pilot, lambda: not app.generating and app.query(AssistantMessage), "the answer")
    await _until(pilot, lambda: app.query(AssistantMessage).last().finished is not None, "the stats line")
    return app.query(AssistantMessage).last()


def _engine_answer(
    folder: Path, messages: list[dict[str, str]], sampling: SamplingParams, max_new_tokens: int | None = None
) -> str:
    model = llmchat.load(folder, device="cpu", dtype="float32", context_length=CONTEXT)
    ids = model.tokenizer.encode(model.template.render(messages, add_generation_prompt=True))
    *_, done = model.generate(ids, sampling=sampling, max_new_tokens=max_new_tokens)
    assert isinstance(done, Finished)
    return done.text


async def test_send_streams_the_engines_answer_and_panels_follow_the_cache(folder: Path, tmp_path: Path) -> None:
    app = _app(folder, tmp_path, sampling=GREEDY)
    async with app.run_test(size=SIZE) as pilot:
        answer = await _send(pilot, app, "hello there")
        expected = _engine_answer(folder, [{"role": "user", "content": "hello there"}], GREEDY)
        assert answer.content_text == expected
        assert answer.finished is not None and answer.finished.generated_tokens == len(answer.tokens)
        # The KV panel shows exactly what the engine's cache holds.
        assert app.model is not None
        cache, state = app.model.cache, app.query_one(KVCachePanel).state
        assert (state.tokens, state.capacity) == (cache.length, cache.capacity)
        assert (state.bytes_used, state.bytes_capacity) == (cache.used_bytes, cache.nbytes)
        assert state.prefilled == answer.finished.prefilled_tokens and state.reused == 0
        # The top-k panel shows the last token's candidates.
        panel = app.query_one(TopKPanel)
        assert panel.event is answer.tokens[-1]
        # A second turn prefills only what is new: the first turn is reused from the cache.
        second = await _send(pilot, app, "and again")
        assert second.finished is not None
        assert app.query_one(KVCachePanel).state.reused == second.finished.reused_tokens > 0
        assert second.finished.prefilled_tokens < second.finished.prompt_tokens // 2


async def test_a_hybrid_model_chats_and_the_kv_panel_shows_its_fixed_state(tmp_path: Path) -> None:
    """Qwen3.5 (DeltaNet layers between attention layers): the answer is the engine's, the panel adds the
    recurrent layers' fixed state to the growing KV bytes, and the second turn reuses the first."""
    from tests.tiny_models import build_tiny_model

    hybrid = build_tiny_model("qwen3_5", tmp_path / "qwen3_5")
    app = _app(hybrid, tmp_path, sampling=GREEDY, max_new_tokens=24)  # random weights rarely say EOS
    async with app.run_test(size=SIZE) as pilot:
        answer = await _send(pilot, app, "hello there")
        expected = _engine_answer(hybrid, [{"role": "user", "content": "hello there"}], GREEDY, max_new_tokens=24)
        assert answer.content_text == expected
        assert app.model is not None
        cache, panel = app.model.cache, app.query_one(KVCachePanel)
        assert panel.state.state_bytes == cache.state_bytes + cache.snapshot_bytes > 0
        assert panel.state.bytes_used == cache.used_bytes
        assert "fixed state" in str(panel.render())
        second = await _send(pilot, app, "and again")
        assert second.finished is not None and second.finished.reused_tokens > 0
        assert panel.state.reused == second.finished.reused_tokens


class _PausingApp(LLMChatApp):
    """Blocks the worker when it asks for the sampling policy of token `PAUSE_AT`, so a test can
    press Esc mid-answer however fast the tiny model is."""

    PAUSE_AT = 5

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.paused, self.release = threading.Event(), threading.Event()
        self._worker_reads = 0
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    @property  # type: ignore[override]
    def sampling(self) -> SamplingParams | None:
        if threading.current_thread() is not threading.main_thread():
            self._worker_reads += 1
            if self._worker_reads == self.PAUSE_AT:
                self.paused.set()
                self.release.wait(30)
        return self._sampling

    @sampling.setter
    def sampling(self, value: SamplingParams | None) -> None:
        self._sampling = value


async def test_escape_stops_and_keeps_the_partial_answer(folder: Path, tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "conversations")
    app = _PausingApp(folder, store=store, device="cpu", dtype="float32", context_length=CONTEXT, sampling=GREEDY)
    async with app.run_test(size=SIZE) as pilot:
        await _until(pilot, lambda: app.model is not None, "the model to load")
        app.query_one(PromptInput).text = "hello there"
        await pilot.press("enter")
        await _until(pilot, app.paused.is_set, "the worker to reach the pause")
        app.query_one(PromptInput).text = "impatient"
        await pilot.press("enter")  # sending while an answer streams is refused
        assert len(app.query(AssistantMessage)) == 1
        await pilot.press("escape")
        app.release.set()
        await _until(pilot, lambda: not app.generating, "the stop")
        answer = app.query_one(AssistantMessage)
        await _until(pilot, lambda: answer.finished is not None, "the stats line")
        assert answer.finished is not None and answer.finished.reason == "cancelled"
        # The worker's first read is the request's starting policy, then one per token: it paused
        # choosing token PAUSE_AT - 1, and the stop took effect right after that token.
        assert answer.finished.generated_tokens == len(answer.tokens) == _PausingApp.PAUSE_AT - 1
        assert answer.content_text and answer.content_text == answer.finished.content
        assert answer.has_class("stopped")
        saved = app.conversation.path()[-1]
        assert saved.content == answer.content_text
        assert saved.stats is not None and saved.stats["finish_reason"] == "cancelled"
        # After a stop a new message works.
        again = await _send(pilot, app, "go on")
        assert again is not answer


# Each key from the same start: (key, knob, value after the press, what the status bar shows).
SAMPLING_KEYS = [
    ("f3", "temperature", 0.8, "temp 0.80"),
    ("f2", "temperature", 0.6, "temp 0.60"),
    ("f5", "top_p", 1.0, "top-p 1.00"),
    ("f4", "top_p", 0.9, "top-p 0.90"),
    ("f7", "top_k", 50, "top-k 50"),
    ("f6", "top_k", 20, "top-k 20"),
]


async def test_sampling_keys_change_the_status_bar(folder: Path, tmp_path: Path) -> None:
    start = SamplingParams(temperature=0.7, top_p=0.95, top_k=40)
    app = _app(folder, tmp_path, sampling=start)
    async with app.run_test(size=SIZE) as pilot:
        await _until(pilot, lambda: app.model is not None, "the model to load")
        assert app.query_one(PromptInput).has_focus  # the keys work while typing
        for key, knob, expected, shown in SAMPLING_KEYS:
            app.sampling = start
            await pilot.press(key)
            assert app.sampling is not None
            assert getattr(app.sampling, knob) == pytest.approx(expected), key
            assert shown in app.query_one(StatusBar).line(), key


async def test_sampling_keys_change_the_next_generation(folder: Path, tmp_path: Path) -> None:
    app = _app(folder, tmp_path, sampling=SamplingParams(temperature=1.0, top_k=2, seed=1))
    async with app.run_test(size=SIZE) as pilot:
        await _until(pilot, lambda: app.model is not None, "the model to load")
        await pilot.press("f6")  # top-k 2 → 1: the policy keeps only the best token
        assert app.sampling is not None and app.sampling.top_k == 1
        answer = await _send(pilot, app, "hello")
        assert answer.tokens
        for event in answer.tokens:
            assert isinstance(event, TokenEvent)
            assert event.rank == 0 and event.policy_prob == 1.0
            assert [t.policy_prob for t in event.top[1:]] == [0.0] * (len(event.top) - 1)


async def test_autosave_writes_a_file_that_resume_reopens(folder: Path, tmp_path: Path) -> None:
    app = _app(folder, tmp_path, sampling=GREEDY)
    async with app.run_test(size=SIZE) as pilot:
        answer = await _send(pilot, app, "remember me")
        conversation_id = app.conversation.id
    store = ConversationStore(tmp_path / "conversations")
    data = json.loads(store.path_for(conversation_id).read_text(encoding="utf-8"))
    assert data["format"] == "llmchat.conversation" and data["version"] == 1
    roles = [m["role"] for m in data["messages"]]
    assert roles == ["user", "assistant"]
    assert data["messages"][1]["content"] == answer.content_text
    assert len(data["messages"][1]["tokens"]) == len(answer.steps)  # the answer's tokens, and the end step if any
    assert data["sampling"]["temperature"] == 0.0

    resumed = store.load(conversation_id)
    app2 = _app(folder, tmp_path, conversation=resumed)
    async with app2.run_test(size=SIZE) as pilot:
        await _until(pilot, lambda: app2.model is not None, "the model to load")
        shown = app2.query(AssistantMessage)
        assert [m.content_text for m in shown] == [answer.content_text]
        assert app2.sampling == GREEDY.replace(seed=None)  # the saved settings came back


async def test_a_model_that_fails_to_load_leaves_the_app_usable(tmp_path: Path) -> None:
    app = LLMChatApp(tmp_path / "missing", store=ConversationStore(tmp_path / "c"))
    async with app.run_test(size=SIZE) as pilot:
        await _until(pilot, lambda: "no model" in app.query_one(StatusBar).line(), "the failure")
        assert app.model is None
        app.query_one(PromptInput).text = "hi"
        await pilot.press("enter")
        assert not app.query(AssistantMessage)  # refused politely, nothing crashed
        assert app.is_running


def test_coalescer_batches_by_time_and_flushes_phase_changes(folder: Path) -> None:
    model = llmchat.load(folder, device="cpu", dtype="float32", context_length=CONTEXT)
    ids = model.tokenizer.encode("a b c d e f")
    events = list(model.generate(ids, sampling=GREEDY, max_new_tokens=30, stop_on_eos=False))
    now = [0.0]
    coalescer = Coalescer(interval=1.0, clock=lambda: now[0])
    batches: list[Batch] = []
    for event in events:
        batch = coalescer.add(event)
        if batch is not None:
            batches.append(batch)
    rest = coalescer.flush()
    batches += [rest] if rest else []
    # The clock never moves: only the first event and the phase changes (PrefillDone, Finished) flush.
    assert len(batches) <= 3
    assert sum(len(b.tokens) for b in batches) == 30
    done = events[-1]
    assert isinstance(done, Finished)
    assert "".join(b.content for b in batches) == done.content
    assert batches[-1].finished is done

    posted: list[Batch] = []
    finished = run_generation(iter(events), posted.append, interval=0.0)
    assert finished is done and sum(len(b.tokens) for b in posted) == 30

    # A callable interval is read at every event: the budget can change it mid-answer.
    interval = [0.0]
    coalescer = Coalescer(interval=lambda: interval[0], clock=lambda: now[0])
    sizes = []
    for i, event in enumerate(events):
        interval[0] = 0.0 if i < 10 else 5.0
        batch = coalescer.add(event)
        if batch is not None:
            sizes.append(len(batch.tokens))
    # Ten events flush one by one at interval 0; at 5 s the frozen clock holds the rest for Finished.
    assert len(sizes) == 11 and sum(sizes) == 30


def test_frame_budget_slows_the_panels_first_and_the_text_last() -> None:
    """Above its CPU share the panels slow down to their cap, then the text frames to theirs; well
    below it the text comes back to its fastest rate first, then the panels."""
    wall, cpu = [0.0], [0.0]
    budget = FrameBudget(
        share=0.05, fastest=0.1, slowest=0.5, panel_fastest=0.25, panel_slowest=1.0,
        clock=lambda: wall[0], cpu=lambda: cpu[0],
    )  # fmt: skip

    def frame(seconds: float, busy: float) -> float:
        wall[0] += seconds
        cpu[0] += seconds * busy
        return budget.observe()

    assert budget.observe() == 0.0 and budget.interval == 0.1  # first call only sets the baseline
    assert frame(1.0, 0.20) == pytest.approx(0.20)
    assert (budget.interval, budget.panel_interval) == (0.1, pytest.approx(0.3125))  # panels give way first
    for _ in range(7):  # 0.3125 x 1.25^5 = 0.95: the sixth reaches the cap, the seventh slows the text
        frame(1.0, 0.20)
    assert budget.panel_interval == 1.0 and budget.interval == pytest.approx(0.125)  # then the text
    for _ in range(20):
        frame(1.0, 0.20)
    assert budget.interval == 0.5  # clamped at the slowest rate
    frame(1.0, 0.04)  # under the share but not under half of it: hold
    assert (budget.interval, budget.panel_interval) == (0.5, 1.0)
    frame(1.0, 0.01)
    assert budget.interval == pytest.approx(0.4) and budget.panel_interval == 1.0  # the text comes back first
    for _ in range(20):
        frame(1.0, 0.0)
    assert (budget.interval, budget.panel_interval) == (0.1, 0.25)  # never faster than the fastest rates
    for _ in range(3):
        frame(1.0, 0.5)
    budget.restart()
    assert (budget.interval, budget.panel_interval) == (0.1, 0.25) and budget.observe() == 0.0


def test_coalescer_flushes_with_the_token_nearest_the_interval() -> None:
    """Tokens every 33 ms and a 0.1 s interval: frames of 3 tokens (10/s), not of 4 (7.5/s)."""
    now = [0.0]
    coalescer = Coalescer(interval=0.1, clock=lambda: now[0])
    sizes = []
    for i in range(61):
        now[0] = i / 30
        batch = coalescer.add(_token(i))
        if batch is not None:
            sizes.append(len(batch.tokens))
    assert sizes[0] == 1 and set(sizes[1:]) == {3}


def _token(index: int) -> TokenEvent:
    return TokenEvent(token_id=1, text="a", index=index, logit=0.0, prob=1.0, policy_prob=1.0, rank=0, top=(),
                      seconds=1 / 30, cache_tokens=index, cache_bytes=0, content="a")  # fmt: skip


async def test_the_command_palette_reaches_every_action(tmp_path: Path) -> None:
    """Ctrl+P lists each action with its key, and running one from there acts like the key."""
    from llmchat.settings import ACTION_KEYS

    app = LLMChatApp(None, store=ConversationStore(tmp_path / "c"), sampling=SamplingParams(temperature=0.5))
    async with app.run_test(size=SIZE) as pilot:
        commands = {c.title: c for c in app.get_system_commands(app.screen)}
        for action, (key, _) in ACTION_KEYS.items():
            if action != "quit":
                assert any(title.endswith(f"({key})") for title in commands), action
        await commands["Temperature up (f3)"].callback()
        await pilot.pause()
        assert app.sampling is not None and app.sampling.temperature == pytest.approx(0.6)
        assert "temp 0.60" in app.query_one(StatusBar).line()
