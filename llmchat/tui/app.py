"""The llmchat TUI: a chat on the left, live KV-cache / memory / top-k panels on the right.

Threads: the UI thread owns every widget and the conversation; one worker thread owns the model
(loading it, prefill and decode). The worker hands coalesced batches of engine events over with
`post_message`, so rendering never limits the token rate. Stopping sets a flag the engine checks
between steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Footer

from llmchat.chat.conversation import Conversation, answer_stats, token_record
from llmchat.chat.store import ConversationStore
from llmchat.engine import Finished, LLMChatError, LoadedModel, PrefillDone, SamplingParams
from llmchat.engine.prompt import ChatTokens
from llmchat.tui.widgets.messages import AssistantMessage, ChatView
from llmchat.tui.widgets.panels import CacheState, KVCachePanel, MemoryPanel, TopKPanel
from llmchat.tui.widgets.prompt import PromptInput
from llmchat.tui.widgets.status import StatusBar
from llmchat.tui.worker import Batch, StopFlag, run_generation

TOP_K_SHOWN = 8  # candidates kept per token for the top-k panel and the saved conversation
NARROW = 100  # columns below which the side panels hide themselves

# Steps of the sampling keys.
TEMPERATURE_STEP, TOP_P_STEP = 0.1, 0.05
TOP_K_STEPS = (0, 1, 2, 3, 5, 10, 20, 40, 50, 100, 200)


@dataclass
class ModelLoaded(Message):
    model: LoadedModel


@dataclass
class ModelFailed(Message):
    error: str


@dataclass
class GenerationUpdate(Message):
    batch: Batch


@dataclass
class GenerationFailed(Message):
    error: str


def _step_top_k(current: int, direction: int) -> int:
    steps = list(TOP_K_STEPS)
    if current not in steps:
        steps = sorted({*steps, current})
    index = min(max(steps.index(current) + direction, 0), len(steps) - 1)
    return steps[index]


class LLMChatApp(App[None]):
    """`llmchat`: chat with a local model and watch the inference happen."""

    TITLE = "llmchat"
    CSS_PATH = Path(__file__).with_name("app.tcss")
    BINDINGS = [
        Binding("escape", "stop", "Stop", priority=True),
        Binding("ctrl+n", "new_chat", "New chat", priority=True),
        Binding("f2", "temperature(-1)", "Temp−", priority=True),
        Binding("f3", "temperature(1)", "Temp+", priority=True),
        Binding("f4", "top_p(-1)", "Top-p−", priority=True),
        Binding("f5", "top_p(1)", "Top-p+", priority=True),
        Binding("f6", "top_k(-1)", "Top-k−", priority=True),
        Binding("f7", "top_k(1)", "Top-k+", priority=True),
        Binding("ctrl+t", "toggle_panels", "Panels", priority=True),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        model_path: Path | str | None,
        *,
        store: ConversationStore | None = None,
        conversation: Conversation | None = None,
        sampling: SamplingParams | None = None,
        sampling_overrides: dict[str, Any] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        context_length: int | None = None,
    ) -> None:
        super().__init__()
        self.model_path = Path(model_path) if model_path is not None else None
        self.store = store
        self.conversation = conversation or Conversation()
        self.model: LoadedModel | None = None
        if sampling is None and self.conversation.sampling:  # a resumed chat keeps its settings
            try:
                sampling = SamplingParams(**self.conversation.sampling)
            except (TypeError, ValueError):
                sampling = None
        self.sampling = sampling  # None until the model's defaults are known
        self._sampling_overrides = sampling_overrides or {}  # from the command line, over any defaults
        self.generating = False
        self.stop_flag = StopFlag()
        self._load_options: dict[str, Any] = {"device": device, "dtype": dtype, "context_length": context_length}
        self._answer: AssistantMessage | None = None
        self._answer_id: str | None = None
        self._panels_wanted = True

    # --- layout -----------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            with Vertical(id="chat-column"):
                yield ChatView(id="chat")
                yield PromptInput(id="prompt")
            with Vertical(id="panels"):
                yield KVCachePanel(id="kv-panel")
                yield MemoryPanel(id="memory-panel")
                yield TopKPanel(id="topk-panel")
        yield StatusBar(id="status")
        yield Footer()

    async def on_mount(self) -> None:
        self.query_one(PromptInput).focus()
        self.query_one(KVCachePanel).show(CacheState())
        self.query_one(MemoryPanel).show(None, None)
        self.query_one(TopKPanel).show(None)
        self._status(activity="loading model…" if self.model_path else "no model")
        if self.model_path is not None:
            self.load_model(self.model_path)
        await self._show_conversation()

    async def _show_conversation(self) -> None:
        """Draw the current branch of the conversation (a resumed one, or an empty new one)."""
        chat = self.query_one(ChatView)
        await chat.clear()
        prompt = self.query_one(PromptInput)
        for message in self.conversation.path():
            if message.role == "user":
                await chat.add_user(message.content)
                prompt.prompt_history.append(message.content)
            elif message.role == "assistant":
                view = await chat.add_assistant(self.conversation.model.get("name", "assistant"))
                stats = message.stats or {}
                line = " · ".join(f"{k} {v}" for k, v in stats.items() if k in ("tokens", "decode_tok_s"))
                await view.set_text(message.reasoning or "", message.content, line)

    def on_resize(self) -> None:
        self._apply_panel_visibility()

    def _apply_panel_visibility(self) -> None:
        self.query_one("#panels").display = self._panels_wanted and self.size.width >= NARROW

    def _status(self, **changes: Any) -> None:
        if self.sampling is not None:
            changes.setdefault("sampling", self.sampling)
        self.query_one(StatusBar).change(**changes)

    # --- the model ----------------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="model")
    def load_model(self, path: Path) -> None:
        from llmchat.engine import load

        try:
            model = load(path, **self._load_options)
        except LLMChatError as err:
            self.post_message(ModelFailed(str(err)))
            return
        except Exception as err:  # a model that fails in an unforeseen way must not kill the chat
            self.post_message(ModelFailed(f"{type(err).__name__}: {err}"))
            return
        self.post_message(ModelLoaded(model))

    async def on_model_loaded(self, message: ModelLoaded) -> None:
        model = self.model = message.model
        self._chat_tokens = ChatTokens(model.tokenizer)
        try:
            base = self.sampling or model.default_sampling
            self.sampling = base.replace(**self._sampling_overrides)
        except ValueError as err:
            self.sampling = self.sampling or model.default_sampling
            self.notify(str(err), title="Sampling option ignored", severity="warning")
        quant = model.package.quantization
        precision = str(model.dtype).removeprefix("torch.") + (f" · {quant}" if quant != "none" else "")
        self.conversation.model = {"name": model.package.name, "path": str(model.package.path)}
        self._status(
            model=model.package.name,
            device=model.device.type,
            precision=precision,
            context_capacity=model.context_length,
            activity="",
        )
        self._refresh_cache_panel(0, 0)
        self._refresh_memory_panel()

    async def on_model_failed(self, message: ModelFailed) -> None:
        self._status(activity="no model")
        await self.query_one(ChatView).add_note(f"Could not load the model: {message.error}", error=True)
        self.notify(message.error, title="Model not loaded", severity="error", timeout=10)

    # --- sending and streaming -----------------------------------------------------------------------

    @on(PromptInput.Submitted)
    async def send(self, event: PromptInput.Submitted) -> None:
        if self.generating:
            self.notify("An answer is still streaming — Esc stops it.", severity="warning")
            return
        if self.model is None:
            self.notify("The model is not loaded yet.", severity="warning")
            return
        event.input.remember(event.text)
        chat = self.query_one(ChatView)
        self.conversation.add_user(event.text)
        await chat.add_user(event.text)
        answer = self.conversation.add_assistant()
        self._answer_id = answer.id
        self._answer = await chat.add_assistant(self.model.package.name)
        self._save()
        self._start_generation(self.conversation.chat_messages(before=answer.id))

    def _start_generation(self, messages: list[dict[str, Any]]) -> None:
        self.generating = True
        self.stop_flag.clear()
        self._status(activity="prefill…")
        self.generate(messages)

    @work(thread=True, exclusive=True, group="generate")
    def generate(self, messages: list[dict[str, Any]]) -> None:
        model, sampling = self.model, self.sampling
        assert model is not None and sampling is not None

        def live() -> SamplingParams:
            return self.sampling or sampling  # read each step: the keys act on the next token

        try:
            prompt = model.template.render(messages, add_generation_prompt=True)
            ids = self._chat_tokens.encode(prompt)
            events = model.generate(
                ids,
                sampling=sampling,
                live_sampling=live,
                cancel=self.stop_flag,
                top_k=TOP_K_SHOWN,
            )
            done = run_generation(events, lambda batch: self.post_message(GenerationUpdate(batch)))
            if done is not None:
                self._chat_tokens.generated(done.text, done.token_ids)
        except LLMChatError as err:
            self.post_message(GenerationFailed(str(err)))
        except Exception as err:  # keep the app alive; the message says what broke
            self.post_message(GenerationFailed(f"{type(err).__name__}: {err}"))

    async def on_generation_update(self, message: GenerationUpdate) -> None:
        batch, answer = message.batch, self._answer
        if answer is None or self._answer_id is None:
            return
        if isinstance(batch.prefill, PrefillDone):
            done = batch.prefill
            self._refresh_cache_panel(done.cache_tokens, done.cache_bytes, done.reused_tokens, done.prefilled_tokens)
        elif batch.prefill is not None:
            progress = batch.prefill
            self._status(activity=f"prefill {progress.done_tokens}/{progress.total_tokens}")
            self._refresh_cache_panel(progress.cache_tokens, progress.cache_bytes)
        if batch.tokens or batch.reasoning or batch.content:
            await answer.append(batch.reasoning, batch.content, batch.tokens)
            self.conversation.append(self._answer_id, content=batch.content, reasoning=batch.reasoning)
        last = batch.last_token
        if last is not None:
            self.query_one(TopKPanel).show(last, title=f"token {last.index + 1}")
            self._refresh_cache_panel(last.cache_tokens, last.cache_bytes)
            self._status(activity="generating…")
        if batch.finished is not None:
            await self._finish(batch.finished)

    async def _finish(self, done: Finished) -> None:
        answer, answer_id = self._answer, self._answer_id
        assert answer is not None and answer_id is not None
        await answer.finish(done)
        self.conversation.update(
            answer_id,
            stats=answer_stats(done),
            tokens=[token_record(t) for t in answer.tokens],
        )
        self.generating = False
        self._refresh_cache_panel(done.cache_tokens, done.cache_bytes, done.reused_tokens, done.prefilled_tokens)
        self._refresh_memory_panel()
        activity = "stopped" if done.reason == "cancelled" else ""
        self._status(tokens_per_second=done.decode_tokens_per_second, activity=activity)
        self._save()

    async def on_generation_failed(self, message: GenerationFailed) -> None:
        self.generating = False
        if self._answer is not None:
            self._answer.fail(message.error)
        self._status(activity="error")
        self.notify(message.error, title="Generation failed", severity="error", timeout=10)
        self._save()

    # --- panels --------------------------------------------------------------------------------------

    def _refresh_cache_panel(
        self, tokens: int, used: int, reused: int | None = None, prefilled: int | None = None
    ) -> None:
        if self.model is None:
            return
        panel = self.query_one(KVCachePanel)
        cache = self.model.cache
        previous = panel.state
        panel.show(
            CacheState(
                tokens=tokens,
                capacity=cache.capacity,
                bytes_used=used,
                bytes_capacity=cache.nbytes,
                reused=previous.reused if reused is None else reused,
                prefilled=previous.prefilled if prefilled is None else prefilled,
            )
        )
        self._status(context_tokens=tokens)

    def _refresh_memory_panel(self) -> None:
        if self.model is not None:
            self.query_one(MemoryPanel).show(self.model.memory_estimate(), self.model.memory_usage())

    # --- conversations -------------------------------------------------------------------------------

    def _save(self) -> None:
        if self.store is None or not self.conversation.messages:
            return
        if self.sampling is not None:
            self.conversation.sampling = _sampling_dict(self.sampling)
        try:
            self.store.save(self.conversation)
        except LLMChatError as err:
            self.notify(str(err), title="Conversation not saved", severity="error", timeout=10)

    # --- actions -------------------------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.generating:
            self.stop_flag.set()

    async def action_new_chat(self) -> None:
        if self.generating:
            self.notify("An answer is still streaming — Esc stops it first.", severity="warning")
            return
        self.conversation = Conversation(model=dict(self.conversation.model))
        await self.query_one(ChatView).clear()
        self.query_one(TopKPanel).show(None)

    def _set_sampling(self, **changes: Any) -> None:
        if self.sampling is None:
            return
        try:
            self.sampling = self.sampling.replace(**changes)
        except ValueError as err:
            self.notify(str(err), severity="warning")
            return
        self._status()

    def action_temperature(self, direction: int) -> None:
        if self.sampling is not None:
            value = round(self.sampling.temperature + direction * TEMPERATURE_STEP, 2)
            self._set_sampling(temperature=min(max(value, 0.0), 2.0))

    def action_top_p(self, direction: int) -> None:
        if self.sampling is not None:
            value = round(self.sampling.top_p + direction * TOP_P_STEP, 2)
            self._set_sampling(top_p=min(max(value, TOP_P_STEP), 1.0))

    def action_top_k(self, direction: int) -> None:
        if self.sampling is not None:
            self._set_sampling(top_k=_step_top_k(self.sampling.top_k, direction))

    def action_toggle_panels(self) -> None:
        self._panels_wanted = not self._panels_wanted
        self._apply_panel_visibility()


def _sampling_dict(params: SamplingParams) -> dict[str, Any]:
    return {
        "temperature": params.temperature,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "min_p": params.min_p,
        "repetition_penalty": params.repetition_penalty,
    }


def run_app(model_path: Path | str | None, **options: Any) -> None:
    """Open the chat on a model (the CLI's entry point into the TUI)."""
    store = options.pop("store", None) or ConversationStore.default()
    LLMChatApp(model_path, store=store, **options).run()
