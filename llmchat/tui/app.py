"""The llmchat TUI: a chat on the left, live KV-cache / memory / top-k panels on the right.

Threads: the UI thread owns every widget and the conversation; one worker thread owns the model
(loading it, prefill and decode). The worker hands coalesced batches of engine events over with
`post_message`, so rendering never limits the token rate. Stopping sets a flag the engine checks
between steps. The token cursor and the inspector live in inspecting.py.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from textual import events, on, work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.command import CommandPalette
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer

from llmchat.actions import ACTIONS as ACTION_TABLE
from llmchat.chat.conversation import INTERRUPTED, Conversation, answer_stats, interrupted_stats, token_record
from llmchat.chat.conversation import Message as ChatMessage
from llmchat.chat.journal import AnswerJournal
from llmchat.chat.schema import TokenRecord
from llmchat.chat.store import ConversationStore
from llmchat.engine import Finished, LLMChatError, LoadedModel, PrefillDone, SamplingParams, TokenEvent
from llmchat.engine.generate import DEFAULT_PREFILL_CHUNK
from llmchat.engine.knobs import KNOB, TOP_K_STEPS
from llmchat.engine.prompt import CHAT, COMPLETION, PromptMode
from llmchat.engine.tool_calls import split_tool_calls
from llmchat.paths import cache_dir
from llmchat.session import LocalSession, ServerSpec, Session, server_host
from llmchat.settings import ACTION_KEYS, Settings, SettingsError, key_map, update_settings
from llmchat.tui.inspecting import InspectingApp
from llmchat.tui.model_thread import ModelThread, on_model_thread
from llmchat.tui.screens import PANELS_HELP, ConversationsScreen, HelpScreen, ModelsScreen, SystemPromptScreen
from llmchat.tui.screens.branch import BranchScreen
from llmchat.tui.screens.inspector import InspectorScreen
from llmchat.tui.screens.problems import PROBLEMS_COMMAND, Problem, ProblemsScreen, startup_toast, toast_line_width
from llmchat.tui.themes import ThemeChoices, apply_theme, register_themes, theme_cycle
from llmchat.tui.widgets.messages import AssistantMessage, ChatView, saved_stats_line
from llmchat.tui.widgets.panels import CacheState, KVCachePanel, MemoryPanel, TopKPanel
from llmchat.tui.widgets.prompt import PromptInput
from llmchat.tui.widgets.status import StatusBar
from llmchat.tui.widgets.tokens import end_event, forced_indices, token_events
from llmchat.tui.widgets.welcome import Welcome, key_label
from llmchat.tui.worker import Batch, CollectorPause, DecodeRate, FrameBudget, StopFlag, run_generation

TOP_K_SHOWN = 8  # candidates kept per token for the top-k panel and the saved conversation
NARROW = 100  # columns below which the side panels hide themselves
PANEL_INTERVAL = 0.25  # seconds between panel repaints while tokens stream
PAINT_GAP = 0.02  # seconds: more than one of Textual's screen updates (60/s), so a paint of its own
GIL_SWITCH_INTERVAL = 0.0001  # seconds; see on_mount

# Steps of the sampling keys (engine/knobs.py).
TEMPERATURE_STEP, TOP_P_STEP = KNOB["temperature"].step, KNOB["top_p"].step


@dataclass
class ModelLoaded(Message):
    model: LoadedModel


@dataclass
class SessionReady(Message):
    """A session that needs no loading here: a model on a server, connected."""

    session: Session


@dataclass
class ModelProgress(Message):
    done: int
    total: int


@dataclass
class ModelFailed(Message):
    error: str


@dataclass
class GenerationUpdate(Message):
    batch: Batch


@dataclass
class GenerationFailed(Message):
    error: str


# The actions' table (llmchat/actions.py), as the app uses it: the Textual action each id runs
# (the ids are what settings.toml rebinds), which are in the footer, and their palette lines.
ACTIONS = {action.id: action.runs for action in ACTION_TABLE}
IN_FOOTER = {action.id for action in ACTION_TABLE if action.in_footer}
# The chat's actions step aside while a dialog (conversations, help…) is open; quit never does.
_CHAT_ACTIONS = {ACTIONS[a].split("(")[0] for a in ACTION_KEYS if a != "quit"} | {"select_token"}
# Over the inspector (a screen, not a dialog) the keys that steer what it shows keep working.
_INSPECTOR_ACTIONS = {action.runs.split("(")[0] for action in ACTION_TABLE if action.over_inspector}
COMMAND_TITLES = {action.id: action.title for action in ACTION_TABLE}
COMMAND_HELP = {action.id: action.help for action in ACTION_TABLE if action.help}
INPUT_KEYS = [
    ("enter", "Send the message"),
    ("shift+enter / ^j", "New line in the message"),
    ("↑ / ↓", "Earlier prompts (input empty)"),
    ("^p", "Command palette: every action"),
    ("click a token", "Its alternatives in the top-k panel"),
    ("click `tokens ▸`", "An answer's token heatmap"),
]
# Textual's palette entries that ours replace: its "Keys" (a help panel) beside our F1 screen, and
# its theme list, which offers its built-in themes too (ours: "Theme: choose one").
REPLACED_SYSTEM_COMMANDS = {"Keys", "Theme"}


def _step_top_k(current: int, direction: int) -> int:
    steps = list(TOP_K_STEPS)
    if current not in steps:
        steps = sorted({*steps, current})
    index = min(max(steps.index(current) + direction, 0), len(steps) - 1)
    return steps[index]


class LLMChatApp(InspectingApp):
    """`llmchat`: chat with a local model and watch the inference happen."""

    TITLE = "llmchat"
    CSS_PATH = Path(__file__).with_name("app.tcss")
    BINDINGS = [
        Binding(key, ACTIONS[action], label, id=action, priority=True, show=action in IN_FOOTER)
        for action, (key, label) in ACTION_KEYS.items()
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
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        packed: bool | None = None,
        threads: int | None = None,
        max_new_tokens: int | None = None,
        completion: bool = False,
        settings: Settings | None = None,
        settings_problems: list[str] | None = None,
        server: ServerSpec | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings or Settings()
        # What start-up found wrong: one toast sums them up, Ctrl+P "Start-up problems" lists them.
        self.startup_problems = [Problem("Settings", text) for text in settings_problems or []]
        self.startup_checked = False  # the conversations folder has been checked and start-up reported
        self.startup_problems += [Problem("Themes", text) for text in register_themes(self)]
        problem = apply_theme(self, self.settings.theme)
        if problem:
            self.startup_problems.append(Problem("Themes", problem))
        if self.settings.keys:  # only the user's changes: the rest keep their order in the footer
            self.set_keymap(self.settings.keys)
        self.model_path = Path(model_path) if model_path is not None else None
        self.store = store
        self.conversation = conversation or Conversation()
        self.session: Session | None = None  # the loaded model (or a server's), behind the session calls
        self.server = server  # the chat's model is on this server (model_path is then None)
        if sampling is None and self.conversation.sampling:  # a resumed chat keeps its settings
            try:
                sampling = SamplingParams(**self.conversation.sampling)
            except (TypeError, ValueError):
                sampling = None
        self.sampling = sampling  # None until the model's defaults are known
        # settings.toml's sampling, then the command line's, over the model's defaults
        self._sampling_overrides = {**self.settings.sampling, **(sampling_overrides or {})}
        self._collector = CollectorPause()  # no garbage-collector stalls while an answer streams
        self.model_thread = ModelThread()  # where torch runs (model_thread.py)
        self.generating = False
        self.stop_flag = StopFlag()
        self._load_options: dict[str, Any] = {
            "device": device,
            "dtype": dtype,
            "context_length": context_length,
            "prefill_chunk": prefill_chunk,
            "packed": packed,  # False: a GGUF's quantized weights dequantized (--dequantize)
            "cache_dir": cache_dir() / "packed",  # packed GGUF models load from here the second time
        }
        self._threads = threads  # torch's CPU threads, set on the model's own thread (see load_model)
        # The prompt mode of a new (empty) conversation: --raw, or the user's last switch (Alt+M).
        self._default_mode: PromptMode = COMPLETION if completion else CHAT
        self._answer: AssistantMessage | None = None
        self._answer_id: str | None = None
        self._panels_wanted = self.settings.panels
        self._editing: str | None = None  # id of the user message being edited (Ctrl+E)
        self._panels_shown_at = 0.0
        self.frames = FrameBudget(panel_fastest=PANEL_INTERVAL)  # how often text and panels repaint
        self._decode_rate = DecodeRate()  # of the answer streaming now, for the status bar
        self._live_answer: AssistantMessage | None = None
        self.max_new_tokens = max_new_tokens  # None: the model's generation config decides
        self._branch_prefix: list[TokenEvent] = []  # kept tokens (+ the picked one) of a branch being answered
        # The streaming answer's token records, made as its tokens arrive (saved with it at the end),
        # and its journal: each frame is appended there, so a crash mid-answer loses nothing shown.
        self._records: list[TokenRecord] = []
        self._journal: AnswerJournal | None = None
        self.crash: BaseException | None = None  # an unexpected error that ended the app (see run_app)
        self.crash_log: Path | None = None
        self._regenerate_after_stop = False  # Ctrl+R mid-answer: stop it, then answer the prompt again

    # --- layout -----------------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        # The prompt and the status bar sit in containers of their own: Textual repaints every widget
        # whose container overlaps a change, so in the chat's column or on the bare screen they
        # would be drawn again with every frame of a streaming answer (see app.tcss).
        with Horizontal(id="main"):
            with Vertical(id="chat-column"):
                yield ChatView(id="chat")
                with Vertical(id="prompt-row"):
                    yield PromptInput(id="prompt")
            with Vertical(id="panels"):
                yield KVCachePanel(id="kv-panel")
                yield MemoryPanel(id="memory-panel")
                yield TopKPanel(id="topk-panel")
        with Vertical(id="status-row"):
            yield StatusBar(id="status")
        yield Footer()

    async def on_mount(self) -> None:
        # The decode loop needs the GIL back after every kernel; while the UI thread runs Python
        # (a repaint), the default 5 ms switch interval would stall it once per kernel. Measured
        # (benchmarks/tui_speed.py, 2 cores): 1 ms held decode at 0.55-0.78 of the bare engine
        # at 7 frames/s, 0.1 ms at 0.84-1.02 at 5.5 frames/s (a 5% frame budget).
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self.query_one(PromptInput).focus()
        self.query_one(KVCachePanel).show(CacheState())
        self.query_one(MemoryPanel).show(None, None)
        self.query_one(TopKPanel).show(None)
        self._apply_panel_visibility()
        if self.server is not None:
            self._status(activity=f"connecting to {self.server.url}…")
            self.connect_server(self.server)
        else:
            self._status(activity="loading model…" if self.model_path else "no model")
        if self.model_path is not None and self.server is None:
            self.load_model(self.model_path)
        await self._show_conversation()
        self._check_conversations()

    @work(thread=True, group="startup")
    def _check_conversations(self) -> None:
        """Find the unreadable conversation files, then report what start-up found (one toast).

        A thread: it reads every file the store has not read yet (0.6 s for 29 MB of conversations on
        2 cores, which held the first frame back); the store keeps what it read, so Ctrl+O opens at once."""
        problems: list[Problem] = []
        if self.store is not None:
            try:
                unreadable = self.store.list().unreadable
            except (LLMChatError, OSError) as err:
                problems = [Problem("Conversations", str(err))]
            else:
                problems = [
                    Problem("Conversations", f"{u.path}: {u.reason}; left untouched (Ctrl+O lists it)")
                    for u in unreadable
                ]
        self.call_from_thread(self._conversations_checked, problems)

    def _conversations_checked(self, problems: list[Problem]) -> None:
        self.startup_problems += problems
        self._report_startup_problems()
        self.startup_checked = True

    def _report_startup_problems(self) -> None:
        """One toast for everything start-up found: a toast per problem stacked past the top of
        the screen and hid the first ones."""
        if self.startup_problems:
            title, message = startup_toast(self.startup_problems, toast_line_width(self.size.width))
            self.notify(message, title=title, severity="warning", timeout=20, markup=False)

    def action_startup_problems(self) -> None:
        self.push_screen(ProblemsScreen(self.startup_problems))

    async def _show_welcome(self) -> None:
        """An empty chat on a loaded model opens on the model, its kind and the keys to start with;
        the first message clears it away (it is never part of the conversation)."""
        chat = self.query_one(ChatView)
        await chat.query(Welcome).remove()
        session = self.session
        if session is None or self.conversation.path():
            return
        keys = key_map(self.settings)

        def key(action: str) -> str:
            return key_label(keys[action].split(",")[0])

        rows = [
            ("Enter", "send (Shift+Enter: a new line)"),
            (key("token_view"), "an answer's tokens, coloured by how sure the model was"),
            (key("help"), "every key"),
            (key_label(self.COMMAND_PALETTE_BINDING), "every action, by name"),
        ]
        info = session.info
        server = "" if not self._remote else server_host(session.capabilities.where)
        await chat.mount(Welcome(info.name, info.kind, info.context_length, rows, list(info.labels), server))

    async def _show_conversation(self) -> None:
        """Draw the current branch of the conversation (a resumed one, a switched branch, a new one)."""
        chat = self.query_one(ChatView)
        await chat.clear()
        self._token_answer = self._selected_token = None
        self.query_one(TopKPanel).show(None)
        prompt = self.query_one(PromptInput)
        conversation = self.conversation
        name = conversation.model.get("name", "assistant")
        for message in conversation.path():
            branch = conversation.sibling_position(message.id)
            if message.role == "user":
                await chat.add_user(message.content, message.id, branch)
                if message.content not in prompt.prompt_history:
                    prompt.prompt_history.append(message.content)
            elif message.role == "assistant":
                view = await chat.add_assistant(name, message.id, branch)
                view.tokens = token_events(message.tokens)
                view.forced = forced_indices(message.tokens)
                view.end = end_event(message.tokens, len(view.tokens))
                line = saved_stats_line(message.stats or {})
                await view.set_text(message.reasoning or "", message.content, line)
                if (message.stats or {}).get("finish_reason") in ("cancelled", "error", INTERRUPTED):
                    view.add_class("stopped")  # as when it stopped live: the answer is not whole
                if message.tool_calls:
                    await view.show_tool_calls(message.tool_calls)
        await self._show_welcome()
        chat.scroll_end(animate=False)

    def _handle_exception(self, error: Exception) -> None:
        """Textual's hook for an exception nothing caught (the app then exits, return code 1): keep it
        for run_app, which turns it into one line and a non-zero exit status, with the traceback in
        a log file. (Textual has no public hook; a test drives a crash through `llmchat` itself.)"""
        if self.crash is None:
            self.crash, self.crash_log = error, write_crash_log(error)
        super()._handle_exception(error)

    def _fatal_error(self) -> None:
        """Exit without Textual's traceback on the terminal: it prints every frame's local variables
        (the user's messages among them) over a screen or more. The log has the traceback."""
        self.bell()
        self._close_messages_no_wait()

    def on_unmount(self) -> None:
        self._save_interrupted()
        self._collector.resume()
        self.model_thread.close()
        sys.setswitchinterval(self._switch_interval)

    @property
    def generating(self) -> bool:
        """Whether an answer is streaming (the garbage collector waits meanwhile: CollectorPause)."""
        return self._generating

    @generating.setter
    def generating(self, value: bool) -> None:
        self._generating = value
        if value:
            self._collector.pause()
        else:
            self._collector.resume()

    def on_resize(self, event: events.Resize) -> None:
        self._apply_panel_visibility(event.size.width)

    def _apply_panel_visibility(self, width: int | None = None) -> None:
        """Panels shown when wanted and there is room. On a resize, the width is the event's: while
        the event is handled, `self.size` can still be the previous size."""
        width = self.size.width if width is None else width
        panels = self.screen_stack[0].query_one("#panels")  # the chat screen, under any dialog
        panels.display = self._panels_wanted and width >= NARROW

    def _status(self, **changes: Any) -> None:
        if self.sampling is not None:
            changes.setdefault("sampling", self.sampling)
        self.query_one(StatusBar).change(**changes)

    # --- the model ----------------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="model")
    @on_model_thread
    def load_model(self, path: Path) -> None:
        from llmchat.engine import load

        if self._threads:  # a torch call, so never on the UI thread (see the module docstring)
            import torch

            torch.set_num_threads(self._threads)

        shown = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - shown[0] >= PANEL_INTERVAL or done == total:
                shown[0] = now
                self.post_message(ModelProgress(done, total))

        try:
            model = load(path, progress=progress, **self._load_options)
        except LLMChatError as err:
            self.post_message(ModelFailed(str(err)))
            return
        except Exception as err:  # a model that fails in an unforeseen way must not kill the chat
            self.post_message(ModelFailed(f"{type(err).__name__}: {err}"))
            return
        self.post_message(ModelLoaded(model))

    @work(thread=True, exclusive=True, group="model")
    def connect_server(self, spec: ServerSpec) -> None:
        """Reach the server and its model (off the UI thread: a slow server must not freeze the chat)."""
        from llmchat.session.remote import RemoteSession

        try:
            session = RemoteSession(spec, top_k=TOP_K_SHOWN)
        except LLMChatError as err:
            self.post_message(ModelFailed(str(err)))
            return
        except Exception as err:  # a server that answers in an unforeseen way must not kill the chat
            self.post_message(ModelFailed(f"{type(err).__name__}: {err}"))
            return
        self.post_message(SessionReady(session))

    async def on_model_loaded(self, message: ModelLoaded) -> None:
        await self._session_ready(LocalSession(message.model, top_k=TOP_K_SHOWN))

    async def on_session_ready(self, message: SessionReady) -> None:
        await self._session_ready(message.session)

    async def _session_ready(self, session: Session) -> None:
        if self.session is not None and self.session is not session:
            self.session.close()
        self.session = session
        info = session.info
        try:
            base = self.sampling or info.default_sampling
            self.sampling = base.replace(**self._sampling_overrides)
        except ValueError as err:
            self.sampling = self.sampling or info.default_sampling
            self.notify(str(err), title="Sampling option ignored", severity="warning", markup=False)
        if not self._remote:
            self.conversation.model = {"name": info.name, "path": info.path}
        else:  # the server and its model name: never the API key, at most the name of its variable
            self.conversation.model = {"name": info.name, "server": info.path}
            if self.server is not None and self.server.api_key_env:
                self.conversation.model["api_key_env"] = self.server.api_key_env
            if self.server is not None and self.server.protocol != "openai":
                self.conversation.model["protocol"] = self.server.protocol  # Ollama's own API
        self.query_one(TopKPanel).describe(session.capabilities.probabilities if self._remote else "")
        self._status(
            model=info.name,
            device=info.device,
            precision=info.precision,
            context_capacity=info.context_length,
            activity="",
        )
        self._refresh_cache_panel(0, 0, 0, 0)  # a fresh cache: no last turn (the old model's was not this one's)
        self._show_server_cache()
        self._refresh_memory_panel()
        self._fit_mode(announce=True)
        await self._show_welcome()

    def on_model_progress(self, message: ModelProgress) -> None:
        share = message.done / message.total if message.total else 1.0
        self._status(activity=f"loading model… {share:.0%}", hint=f"{message.done}/{message.total} tensors")

    async def on_model_failed(self, message: ModelFailed) -> None:
        self._status(activity="no model")
        await self.query_one(ChatView).add_note(f"Could not load the model: {message.error}", error=True)
        self.notify(message.error, title="Model not loaded", severity="error", timeout=10, markup=False)

    # --- sending and streaming -----------------------------------------------------------------------

    @on(PromptInput.Submitted)
    async def send(self, event: PromptInput.Submitted) -> None:
        if self.generating:
            self.notify("An answer is still streaming — Esc stops it.", severity="warning")
            return
        if self.session is None:
            self.notify("The model is not loaded yet.", severity="warning")
            return
        event.input.remember(event.text)
        if self._editing is not None:  # the edited prompt goes in as a new branch beside the old one
            self.conversation.edit_user(self._editing, event.text)
            self._editing = None
        else:
            self.conversation.add_user(event.text)
        await self._answer_current()

    async def _answer_current(self, answer: ChatMessage | None = None) -> None:
        """Add an empty answer after the current message (or take `answer`), draw the branch, and generate into it."""
        assert self.session is not None
        answer = answer or self.conversation.add_assistant()
        await self._show_conversation()
        self._answer_id = answer.id
        self._answer = self.query(AssistantMessage).last()
        self._save()
        self._start_generation(self.conversation.chat_messages(before=answer.id))

    def _start_generation(self, messages: list[dict[str, Any]], answer_prefix: list[TokenEvent] | None = None) -> None:
        self.generating = True
        self.frames.restart()
        self._selected_token = None
        self._branch_prefix = list(answer_prefix or [])
        self.stop_flag.clear()
        self._decode_rate = DecodeRate()
        self._live_answer = self._answer  # the answer the live panel updates are for
        self._status(activity="prefill…", tokens_per_second=None)  # not the previous answer's
        assert self._answer_id is not None
        self._start_journal(self._answer_id)
        prefix = [t.token_id for t in self._branch_prefix]
        self.generate(messages, self._answer_id, prefix, self._prompt_mode())

    @work(thread=True, exclusive=True, group="generate")
    @on_model_thread
    def generate(
        self, messages: list[dict[str, Any]], answer_id: str, answer_prefix: list[int], mode: PromptMode = CHAT
    ) -> None:
        session, sampling = self.session, self.sampling
        assert session is not None and sampling is not None

        def live() -> SamplingParams:
            return self.sampling or sampling  # read each step: the keys act on the next token

        try:
            events = session.answer(
                messages,
                answer_id=answer_id,
                mode=mode,
                sampling=sampling,
                live_sampling=live,
                cancel=self.stop_flag,
                max_new_tokens=self.max_new_tokens,
                answer_prefix=answer_prefix,
            )
            answer_ids = list(answer_prefix)

            def post(batch: Batch) -> None:
                self.post_message(GenerationUpdate(batch))
                answer_ids.extend(t.token_id for t in batch.tokens)
                last = batch.last_token
                if self.live_policy and last is not None and batch.finished is None:
                    self.live_policy_view(answer_id, last, answer_ids[:-1], self.policy_params() or live())

            run_generation(events, post, interval=lambda: self.frames.interval)
        except LLMChatError as err:
            self.post_message(GenerationFailed(str(err)))
        except Exception as err:  # keep the app alive; the message says what broke
            self.post_message(GenerationFailed(f"{type(err).__name__}: {err}"))

    async def on_generation_update(self, message: GenerationUpdate) -> None:
        batch, answer = message.batch, self._answer
        if answer is None or self._answer_id is None:
            return
        self.frames.observe()
        if isinstance(batch.prefill, PrefillDone):
            done = batch.prefill
            self._refresh_cache_panel(done.cache_tokens, done.cache_bytes, done.reused_tokens, done.prefilled_tokens)
        elif batch.prefill is not None:
            progress = batch.prefill
            self._status(activity=f"prefill {progress.done_tokens}/{progress.total_tokens}")
            self._refresh_cache_panel(progress.cache_tokens, progress.cache_bytes)
        tokens = (self._branch_prefix + batch.tokens) if batch.prefix is not None else batch.tokens
        if tokens or batch.reasoning or batch.content:
            await answer.append(batch.reasoning, batch.content, tokens)
            self.conversation.append(self._answer_id, content=batch.content, reasoning=batch.reasoning)
            self._journal_frame(batch.content, batch.reasoning, tokens, answer.forced)
            if answer.token_mode != "text":  # its token view is open: it grows with the answer
                await answer.show_tokens(self._selected_token if self._token_answer is answer else None)
        last = batch.last_token
        self._decode_rate.add(batch.tokens)
        # The panels follow the tokens at a few frames a second: every repaint takes the GIL from
        # the decode loop, and the text already moves at the coalescer's rate.
        now = time.monotonic()
        panel_interval = self.frames.panel_interval
        if batch.finished is not None:
            self._live_answer = None  # panel updates still on their timers are now stale
            # The final batch may carry no token (the end came alone), and the live panel timer
            # that was due is now stale: the panel shows the answer's last token either way.
            final = last if last is not None else (answer.tokens[-1] if answer.tokens else None)
            if final is not None and self._selected_token is None:
                self.query_one(TopKPanel).show(final, title=f"token {final.index + 1}")
            await self._finish(batch.finished)
        elif last is not None and now - self._panels_shown_at >= panel_interval:
            self._panels_shown_at = now
            # In paints of their own, after this frame's: painted together, the answer's new line, the
            # panels on the right and the status bar at the bottom span the whole screen, and Textual
            # repaints every widget in the box around what changed.
            self.set_timer(PAINT_GAP, partial(self._show_live_panels, answer, last))

    def _show_live_panels(self, answer: AssistantMessage, last: TokenEvent) -> None:
        """The top-k and KV panels at the latest token, then (in the next paint) the status bar."""
        if answer is not self._live_answer:
            return  # the answer ended meanwhile: its final numbers are shown
        if self._selected_token is None:
            self.query_one(TopKPanel).show(last, title=f"token {last.index + 1}")
        self._refresh_cache_panel(last.cache_tokens, last.cache_bytes, status=False)
        self.set_timer(PAINT_GAP, partial(self._show_live_status, answer, last.cache_tokens))

    def _show_live_status(self, answer: AssistantMessage, context_tokens: int) -> None:
        if answer is self._live_answer:
            rate = self._decode_rate.per_second
            self._status(context_tokens=context_tokens, tokens_per_second=rate, activity="generating…")

    async def _finish(self, done: Finished) -> None:
        answer, answer_id = self._answer, self._answer_id
        assert answer is not None and answer_id is not None
        await answer.finish(done)
        self.conversation.update(
            answer_id,
            stats=answer_stats(done),
            tokens=self._records + ([token_record(done.end_step, end=True)] if done.end_step is not None else []),
        )
        content, calls = split_tool_calls(self.conversation.get(answer_id).content)
        if calls:  # the call moves out of the text into its own JSON block (and the saved message)
            self.conversation.update(answer_id, content=content, tool_calls=calls)
            await answer.set_content(content)
            await answer.show_tool_calls(calls)
        self.generating = False
        self._refresh_cache_panel(done.cache_tokens, done.cache_bytes, done.reused_tokens, done.prefilled_tokens)
        self._show_server_cache(done)
        self._refresh_memory_panel()
        activity = {"cancelled": "stopped", "error": "server error"}.get(done.reason, "")
        if done.reason == "error":  # the text so far is kept (and saved) like a stopped answer's
            self.notify(done.error, title="The server failed mid-answer", severity="error", timeout=10, markup=False)
        self._status(tokens_per_second=done.decode_tokens_per_second, activity=activity)
        self._save()
        self.refresh_inspector()
        if self._regenerate_after_stop:  # the answer Ctrl+R stopped is saved: now the new one
            self._regenerate_after_stop = False
            self.call_later(self.action_regenerate)

    async def on_generation_failed(self, message: GenerationFailed) -> None:
        self.generating = False
        self._live_answer = None
        self._regenerate_after_stop = False
        if self._answer is not None:
            self._answer.fail(message.error)
        self._status(activity="error")
        self.notify(message.error, title="Generation failed", severity="error", timeout=10, markup=False)
        self._save()

    # --- panels --------------------------------------------------------------------------------------

    def _refresh_cache_panel(
        self, tokens: int, used: int, reused: int | None = None, prefilled: int | None = None, *, status: bool = True
    ) -> None:
        if self.session is None:
            return
        if self._remote:
            return  # a server's cache: what it reported at the answer's end (_show_server_cache)
        panel = self.query_one(KVCachePanel)
        stats = self.session.cache_stats()
        previous = panel.state
        panel.show(
            CacheState(
                tokens=tokens,
                capacity=stats.capacity,
                bytes_used=used,
                bytes_capacity=stats.capacity_bytes,
                reused=previous.reused if reused is None else reused,
                prefilled=previous.prefilled if prefilled is None else prefilled,
                state_bytes=stats.state_bytes,
            )
        )
        if status:
            self._status(context_tokens=tokens)

    def _show_server_cache(self, done: Finished | None = None) -> None:
        """A server's KV cache as its last answer reported it (prompt tokens, the part it reused), and
        what its /metrics page said after it (the whole cache's use); nothing it did not say."""
        if self.session is None or not self._remote:
            return
        reported = done if done is not None and done.prompt_tokens > 0 else None
        tokens = reported.prompt_tokens + reported.generated_tokens if reported else 0
        self.query_one(KVCachePanel).show(
            CacheState(
                tokens=tokens,
                capacity=self.session.info.context_length,
                reused=reported.reused_tokens if reported else 0,
                prefilled=reported.prefilled_tokens if reported else 0,
                server=server_host(self.session.capabilities.where),
                server_cache=self.session.cache_stats().server,
            )
        )
        self._status(context_tokens=tokens)

    def _refresh_memory_panel(self) -> None:
        if self.session is None:
            return
        if not self.session.capabilities.memory:
            self.query_one(MemoryPanel).show_server(server_host(self.session.capabilities.where))
            return
        self.query_one(MemoryPanel).show(*self.session.memory())

    @property
    def _remote(self) -> bool:
        """The chat's model runs on a server: the panels show what it reported, and only that."""
        return self.session is not None and self.session.capabilities.where != "this process"

    # --- conversations -------------------------------------------------------------------------------

    def _save(self) -> None:
        if self.store is None or not self.conversation.messages:
            return
        if self.sampling is not None:
            self.conversation.sampling = _sampling_dict(self.sampling)
        try:
            self.store.save(self.conversation)
        except LLMChatError as err:
            self.notify(str(err), title="Conversation not saved", severity="error", timeout=10, markup=False)
            return
        journal = self._journal
        if journal is None:
            return
        try:  # the file holds the streaming answer so far: the journal starts over, or goes
            if self.generating:
                journal.rebase(self.conversation.get(journal.message_id))
                return
            journal.discard()
        except OSError as err:
            self.notify(f"The answer's journal: {err}", severity="warning", timeout=10, markup=False)
        self._journal = None

    # --- the streaming answer's journal (chat.journal) ------------------------------------------------

    def _start_journal(self, answer_id: str) -> None:
        # The answer's records grow in place (a save mid-answer writes them with the text so far).
        self._records = []
        self.conversation.get(answer_id).tokens = self._records
        if self._journal is not None:
            self._journal.discard()
            self._journal = None
        if self.store is None:
            return
        try:
            self._journal = self.store.start_journal(self.conversation, answer_id)
        except LLMChatError as err:  # the answer still streams; only a crash would lose it
            self.notify(str(err), title="Answer not journaled", severity="warning", timeout=10, markup=False)

    def _journal_frame(self, content: str, reasoning: str, tokens: list[TokenEvent], forced: set[int]) -> None:
        """This frame's records (kept for the final save) and one journal line: a write, no rewrite."""
        start = len(self._records)
        records = [token_record(t, forced=start + i in forced) for i, t in enumerate(tokens)]
        self._records.extend(records)
        if self._journal is None:
            return
        try:
            self._journal.add(content, reasoning, records)
        except OSError as err:  # a full disk: say so once, and go on without it
            self._journal = None
            self.notify(f"The answer is no longer journaled: {err}", severity="warning", timeout=10, markup=False)

    def _save_interrupted(self) -> None:
        """The app closes while an answer streams: save what came, marked interrupted."""
        if not self.generating or self._answer_id is None:
            return
        self.stop_flag.set()
        self.generating = False
        self.conversation.update(self._answer_id, stats=interrupted_stats(self._records), tokens=list(self._records))
        self._save()

    # --- actions -------------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """While a dialog is open its own keys win: the chat's actions (but quit) step aside. Over the
        inspector, the keys that steer what it shows still work."""
        if isinstance(self.screen, InspectorScreen):
            return action not in _CHAT_ACTIONS or action in _INSPECTOR_ACTIONS
        return not (isinstance(self.screen, ModalScreen) and action in _CHAT_ACTIONS)

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        """Every action in the command palette (Ctrl+P), with its key."""
        for command in super().get_system_commands(screen):
            if command.title not in REPLACED_SYSTEM_COMMANDS:
                yield command
        keys = key_map(self.settings)
        for action, (_, label) in ACTION_KEYS.items():
            if action == "quit":
                continue  # Textual lists quit already
            title = f"{COMMAND_TITLES.get(action, label)} ({keys[action]})"
            yield SystemCommand(title, COMMAND_HELP.get(action, label), self._palette_callback(ACTIONS[action]))
        yield SystemCommand(
            "Theme: choose one", "llmchat's themes and your own; the choice is saved", self.action_choose_theme
        )
        if self.startup_problems:
            count = len(self.startup_problems)
            yield SystemCommand(
                f"{PROBLEMS_COMMAND} ({count})", "What start-up found wrong, in full", self.action_startup_problems
            )

    def _palette_callback(self, action: str) -> Any:
        async def run() -> None:
            await self.run_action(action)

        return run

    def _busy(self, what: str) -> bool:
        """True (and say so) when an answer is streaming: the conversation must not change under it."""
        if self.generating:
            self.notify(f"An answer is still streaming — Esc stops it before you {what}.", severity="warning")
        return self.generating

    def action_stop(self) -> None:
        if isinstance(self.screen, InspectorScreen):  # Esc there goes back to the chat (the answer goes on)
            self.pop_screen()
        elif self.generating:
            self.stop_flag.set()
            self._regenerate_after_stop = False  # Esc after Ctrl+R: just stop
        elif self._editing is not None:
            self._cancel_edit()
        elif self._token_answer is not None:
            self.call_later(self._close_token_view)

    def _cancel_edit(self) -> None:
        if self._editing is not None:
            self._editing = None
            self.query_one(PromptInput).text = ""
            self._status(activity="")

    async def action_new_chat(self) -> None:
        if self._busy("start a new chat"):
            return
        self.conversation = Conversation(model=dict(self.conversation.model))
        self._fit_mode()
        self._forget_prompts()  # they belong to the old chat's answers
        self._editing = None
        self._token_answer = self._selected_token = None  # its answer goes with the old chat
        await self.query_one(ChatView).clear()
        self.query_one(TopKPanel).show(None)
        self._forget_last_turn()
        await self._show_welcome()

    async def action_regenerate(self) -> None:
        """A new answer to the last prompt, kept beside the old one (switch with the branch keys).
        Mid-answer it stops the answer (kept, marked stopped, as a branch) and then regenerates."""
        if self.generating:
            if not self._regenerate_after_stop:
                self._regenerate_after_stop = True
                self.stop_flag.set()
                self.notify("Stopping this answer to regenerate it; the stopped one stays as a branch.")
            return
        if self.session is None:
            self.notify("The model is not loaded yet.", severity="warning")
            return
        path = self.conversation.path()
        if not path:
            self.notify("Nothing to regenerate yet.", severity="warning")
            return
        try:  # answer its prompt again: a sibling of the last answer (an empty, unfinished one is reused)
            answer = self.conversation.regenerate()
        except LLMChatError as err:
            self.notify(str(err), severity="warning", markup=False)
            return
        await self._answer_current(answer)

    def action_edit_last(self) -> None:
        """Put the last prompt back in the input; Enter sends it as a new branch, Esc cancels."""
        if self._busy("edit"):
            return
        users = [m for m in self.conversation.path() if m.role == "user"]
        if not users:
            self.notify("No message to edit yet.", severity="warning")
            return
        self._editing = users[-1].id
        prompt = self.query_one(PromptInput)
        prompt.text = users[-1].content
        prompt.focus()
        self._status(activity="editing", hint="Enter resends as a new branch, Esc cancels")

    async def action_branch(self, step: int) -> None:
        """Show the previous/next branch at the newest message that has alternatives."""
        if self._busy("switch branches"):
            return
        branched = [m for m in self.conversation.path() if self.conversation.sibling_position(m.id)[1] > 1]
        if not branched:
            self.notify("This conversation has no other branch (Ctrl+R regenerates, Ctrl+E edits).")
            return
        self._cancel_edit()
        self.conversation.switch_branch(branched[-1].id, step)
        await self._show_conversation()
        self._save()

    # --- branching at a token ----------------------------------------------------------------------

    def action_branch_here(self) -> None:
        """Pick another token at the cursor; the answer is cut there and continues from the pick."""
        if self._busy("branch"):
            return
        answer, index = self._token_answer, self._selected_token
        if answer is None or index is None or answer.message_id is None:
            self.notify("Put the token cursor on a token first (F8/F9, or click `tokens ▸` under an answer).")
            return
        if self.session is None:
            self.notify("The model is not loaded yet.", severity="warning")
            return
        if not self.session.capabilities.branch_at_token:
            self.notify(
                "Branching at a token is not available: llmchat cannot render this server's prompt as text "
                "(start the chat with --tokenizer PATH, or use a server with /apply-template). Ctrl+R "
                "regenerates, Ctrl+E edits the prompt.",
                severity="warning",
                markup=False,
            )
            return
        if isinstance(self.screen, InspectorScreen):
            self.pop_screen()
        token = answer.steps[index]
        self.push_screen(BranchScreen(token, index), partial(self._branch_chosen, answer.message_id, index))

    async def _branch_chosen(self, message_id: str, index: int, token_id: int | None) -> None:
        if token_id is None or self._busy("branch") or self.session is None:
            return
        if not self.session.capabilities.branch_at_token:
            return
        view = next((a for a in self.query(AssistantMessage) if a.message_id == message_id), None)
        if view is None or index >= len(view.steps):
            return
        step = view.steps[index]
        rank, top = next((r, t) for r, t in enumerate(step.top) if t.token_id == token_id)
        picked = TokenEvent(
            token_id=token_id, text=top.text, index=index, logit=top.logit, prob=top.prob,
            policy_prob=top.policy_prob, rank=rank, top=step.top, seconds=0.0, cache_tokens=0, cache_bytes=0,
            entropy=step.entropy, policy_entropy=step.policy_entropy,
        )  # fmt: skip
        prefix = view.steps[:index] + [picked]
        forced = {i for i in view.forced if i < index} | {index}
        old = self.conversation.get(message_id)
        self.conversation.current = old.parent  # the new answer is a sibling of the old one
        answer = self.conversation.add_assistant()
        await self._show_conversation()
        self._answer_id = answer.id
        self._answer = self.query(AssistantMessage).last()
        self._answer.forced = forced
        self._save()
        self._start_generation(self.conversation.chat_messages(before=answer.id), answer_prefix=prefix)

    def action_conversations(self) -> None:
        if self.store is None:
            self.notify("Conversations are not saved in this session.", severity="warning")
            return
        self.push_screen(ConversationsScreen(self.store, current_id=self.conversation.id), self._open_conversation)

    async def _open_conversation(self, conversation_id: str | None) -> None:
        if conversation_id is None or conversation_id == self.conversation.id or self.store is None:
            return
        if self._busy("open another conversation"):
            return
        try:
            conversation = self.store.load(conversation_id)
        except LLMChatError as err:
            self.notify(str(err), title="Cannot open", severity="error", timeout=10, markup=False)
            return
        self.conversation = conversation
        self._forget_prompts()
        self._cancel_edit()
        if conversation.sampling:  # opening restores the conversation's sampling…
            with contextlib.suppress(TypeError, ValueError):
                self.sampling = SamplingParams(**conversation.sampling)
        await self._show_conversation()
        self._forget_last_turn()
        self._fit_mode(announce=True)
        saved = conversation.model.get("path")  # …and its model, when it was another one
        if saved and self.model_path is not None and Path(saved) != self.model_path and Path(saved).exists():
            self._switch_model(Path(saved))
        server = saved_server(conversation)  # a chat held with a server, opened in a chat on a server
        if server is not None and self.server is not None and not self._is_current_server(server):
            self._switch_server(server)

    def on_conversations_screen_renamed(self, message: ConversationsScreen.Renamed) -> None:
        if message.conversation_id == self.conversation.id:
            self.conversation.title = message.title

    def action_models(self) -> None:
        from llmchat.models import list_models

        try:
            entries = list_models()
        except LLMChatError as err:
            self.notify(str(err), title="Models", severity="error", markup=False)
            entries = []
        current = self.model_path if self.server is None else self.server.url
        self.push_screen(ModelsScreen(entries, current=current), self._chosen_model)

    def _chosen_model(self, choice: Path | ServerSpec | None) -> None:
        if choice is None:
            return
        if isinstance(choice, ServerSpec):
            same = self._is_current_server(choice)
        else:
            same = choice == self.model_path and self.server is None
        if same or self._busy("change the model"):  # busy is asked only for a change: no warning for a no-op
            return
        if isinstance(choice, ServerSpec):
            self._switch_server(choice)
        else:
            self._switch_model(choice)

    def _is_current_server(self, spec: ServerSpec) -> bool:
        """`spec` names the server and model the chat is connected to now (None: the server's only one)."""
        if self.server is None or spec.url.rstrip("/") != self.server.url.rstrip("/"):
            return False
        current = self.session.info.name if self.session is not None else self.server.model
        return spec.model is None or spec.model == current

    def _switch_server(self, spec: ServerSpec) -> None:
        """Chat with a model on a server from now on (the session before it is closed)."""
        if self.session is not None:
            self.session.close()
        self.model_path, self.session, self.server = None, None, spec
        self.query_one(KVCachePanel).show(CacheState())
        self.query_one(MemoryPanel).show(None, None)
        self._status(
            activity=f"connecting to {spec.url}…",
            model=spec.model or server_host(spec.url),
            device="",
            precision="",
            tokens_per_second=None,
            context_tokens=0,
        )
        self.connect_server(spec)

    def _switch_model(self, path: Path) -> None:
        if self.session is not None:
            self.session.close()
        self.model_path, self.session, self.server = path, None, None
        # Nothing the last model measured is true of the next one.
        self.query_one(KVCachePanel).show(CacheState())
        self.query_one(MemoryPanel).show(None, None)
        self._status(activity="loading model…", model=path.name, tokens_per_second=None, context_tokens=0)
        self.load_model(path)

    @property
    def model(self) -> LoadedModel | None:
        """The engine behind a local session (for tests and tools; the app itself goes through the session)."""
        return self.session.model if isinstance(self.session, LocalSession) else None

    def _forget_prompts(self) -> None:
        if self.session is not None:
            self.session.forget_prompts()

    def _forget_last_turn(self) -> None:
        """Another conversation is shown (a new or an opened one): the KV panel's last turn and the
        status bar's tok/s were the previous chat's. The engine's cache still holds that chat's
        tokens until the next request, which keeps only the start they share with its prompt."""
        if self._remote:
            self._show_server_cache()
            self._status(tokens_per_second=None)
            return
        panel = self.query_one(KVCachePanel)
        old = panel.state
        left_over = old.tokens or old.left_over
        panel.show(CacheState(capacity=old.capacity, bytes_capacity=old.bytes_capacity, left_over=left_over))
        self._status(context_tokens=0, tokens_per_second=None)

    # --- the prompt mode: chat (the template) or completion (one plain text) ------------------------

    def _fit_mode(self, *, announce: bool = False) -> None:
        """Give the conversation the mode it can have: an empty one takes the session's default,
        a saved one keeps its own; a model without a chat template can only continue text."""
        conversation, session = self.conversation, self.session
        mode = self._prompt_mode() if conversation.messages else self._default_mode
        if mode == CHAT and session is not None and not session.info.chat:
            mode = COMPLETION
            if announce:
                self.notify(
                    f"{session.info.name} has no chat template (a base model): completion mode — your messages "
                    "and its continuations are one text it continues. Start a message with a space or a new "
                    "line to separate it.",
                    title="Completion mode",
                    timeout=10,
                    markup=False,
                )
        conversation.mode = mode
        self._status(mode=mode)

    def action_completion_mode(self) -> None:
        """Switch this conversation between chat (the template) and completion (plain text)."""
        if self._busy("switch modes"):
            return
        session = self.session
        if self._prompt_mode() == COMPLETION and session is not None and not session.info.chat:
            self.notify(f"{session.info.name} has no chat template: it can only continue text.", severity="warning")
            return
        mode: PromptMode = CHAT if self._prompt_mode() == COMPLETION else COMPLETION
        self.conversation.mode = self._default_mode = mode
        self._status(mode=mode)
        if mode == COMPLETION:
            self.notify("Completion mode: the transcript is one plain text the model continues (no chat template).")
        else:
            self.notify("Chat mode: the messages go through the model's chat template.")
        self._save()
        self.refresh_inspector()

    def action_system_prompt(self) -> None:
        screen = SystemPromptScreen(self.conversation.system, template_default=self._template_default_system())
        self.push_screen(screen, self._set_system_prompt)

    def _template_default_system(self) -> str | None:
        """The system prompt the model's chat template writes when there is none (SmolLM2, Qwen2.5…):
        what an empty one means. None without a model, in completion mode, or for a template that adds none."""
        if self.session is None or self._prompt_mode() != CHAT:
            return None
        return self.session.default_system_prompt()

    def _set_system_prompt(self, text: str | None) -> None:
        if text is None or text == self.conversation.system:
            return
        self.conversation.set_system(text)  # remembered where: the transcript shows it there
        self.notify("System prompt set: it applies from the next message." if text else "System prompt removed.")
        self._save()

    def action_next_theme(self) -> None:
        """Cycle through llmchat's themes and the user's (not Textual's built-ins); the choice is saved."""
        names = theme_cycle(self)
        current = names.index(self.theme) if self.theme in names else -1
        self.action_use_theme(names[(current + 1) % len(names)])

    def action_use_theme(self, name: str) -> None:
        """Switch to theme `name` (F10, or the palette's theme list) and save it in settings.toml."""
        self.theme = name
        self._persist(theme=name)
        self.notify(f"Theme: {name}", timeout=2)

    def action_choose_theme(self) -> None:
        self.push_screen(CommandPalette(providers=[ThemeChoices], placeholder="Search for themes…"))

    def action_help(self) -> None:
        notes = PANELS_HELP
        if count := len(self.startup_problems):
            found = "1 problem" if count == 1 else f"{count} problems"
            notes += f"\n\n{found} at start-up: Ctrl+P → “{PROBLEMS_COMMAND}” shows them."
        self.push_screen(HelpScreen(self.help_rows(), notes=notes))

    def help_rows(self) -> list[tuple[str, str]]:
        """Every chat action with the key it has now (rebound ones included), then the input's keys."""
        keys = key_map(self.settings)
        rows = [
            (" / ".join(self.get_key_display(Binding(k, "")) for k in keys[action].split(",")),
             COMMAND_TITLES.get(action, label))
            for action, (_, label) in ACTION_KEYS.items()
        ]  # fmt: skip
        return rows + INPUT_KEYS

    def _persist(self, **changes: Any) -> None:
        try:
            self.settings = update_settings(**changes)
        except SettingsError as err:
            self.notify(str(err), title="Settings not saved", severity="warning", timeout=10, markup=False)

    def _set_sampling(self, **changes: Any) -> None:
        """Step the chat's sampling settings, or over the inspector its what-if (see inspecting.py)."""
        current = self.tuned_sampling()
        if current is None:
            return
        try:
            params = current.replace(**changes)
        except ValueError as err:
            self.notify(str(err), severity="warning", markup=False)
            return
        if self.try_sampling(params):  # a what-if: the chat keeps its settings until it is applied
            return
        self.sampling = params
        self._status()

    def action_temperature(self, direction: int) -> None:
        if (current := self.tuned_sampling()) is not None:
            value = round(current.temperature + direction * TEMPERATURE_STEP, 2)
            self._set_sampling(temperature=min(max(value, 0.0), 2.0))

    def action_top_p(self, direction: int) -> None:
        if (current := self.tuned_sampling()) is not None:
            value = round(current.top_p + direction * TOP_P_STEP, 2)
            self._set_sampling(top_p=min(max(value, TOP_P_STEP), 1.0))

    def action_top_k(self, direction: int) -> None:
        if (current := self.tuned_sampling()) is not None:
            self._set_sampling(top_k=_step_top_k(current.top_k, direction))

    def action_toggle_panels(self) -> None:
        self._panels_wanted = not self._panels_wanted
        self._apply_panel_visibility()
        self._persist(panels=self._panels_wanted)


def saved_server(conversation: Conversation) -> ServerSpec | None:
    """The server a saved conversation was held with (None: a local model's), to connect to again."""
    model = conversation.model
    url = model.get("server")
    if not isinstance(url, str) or not url:
        return None
    name, key_env = model.get("name"), model.get("api_key_env")
    protocol = "ollama" if model.get("protocol") == "ollama" else "openai"
    return ServerSpec(
        url=url,
        model=name if isinstance(name, str) and name else None,
        api_key_env=key_env or None,
        protocol=protocol,
    )


def _sampling_dict(params: SamplingParams) -> dict[str, Any]:
    return {name: getattr(params, name) for name in KNOB}


class ChatCrashed(LLMChatError):
    """The chat ended on an unexpected error (a bug in llmchat): `llmchat` says so in one line and exits 1."""

    exit_status = 1


def write_crash_log(error: BaseException) -> Path | None:
    """The traceback of a crash in `crash.log` in the cache folder, for a bug report (None if it cannot be written)."""
    import platform
    import traceback

    from llmchat import __version__

    try:
        path = cache_dir() / "crash.log"
        header = f"llmchat {__version__}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        path.write_text(header + "".join(traceback.format_exception(error)), encoding="utf-8")
    except (OSError, LLMChatError):
        return None
    return path


def run_app(model_path: Path | str | None, **options: Any) -> None:
    """Open the chat on a model (the CLI's entry point into the TUI); ChatCrashed when it crashed."""
    from llmchat.settings import load_settings

    store = options.pop("store", None) or ConversationStore.default()
    if "settings" not in options:
        options["settings"], options["settings_problems"] = load_settings()
    app = LLMChatApp(model_path, store=store, **options)
    app.run()
    if app.crash is not None:
        reason = " ".join(f"{type(app.crash).__name__}: {app.crash}".split())  # one line, however it was raised
        log = f" (the traceback is in {app.crash_log})" if app.crash_log else ""
        raise ChatCrashed(f"the chat stopped on an unexpected error: {reason}{log}")
    if app.return_code:
        raise ChatCrashed(f"the chat ended with status {app.return_code}")
