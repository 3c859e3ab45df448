"""The inspector's half of the app: the token cursor and heatmap, and the inspector screen's views
(the policy of a step, the prompt as the model sees it, the timeline). A session that cannot re-read a
step's logits (a server) gets a partial policy view, over the candidates it returned with the step.

`LLMChatApp` builds on `InspectingApp`; what changes the conversation (generation, branching at a
token, regenerate) stays in app.py. Views here only read the chat and ask the session. Views that
need the model's tensors are computed by the session on worker threads, under the lock the answer's
worker holds while it generates, so the UI thread never touches torch and never races the KV cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from rich.text import Text
from textual import work
from textual.app import App
from textual.message import Message

from llmchat.chat.conversation import Conversation
from llmchat.engine import LLMChatError, SamplingParams, TokenEvent, TopToken
from llmchat.engine.inspector import PolicyView, PromptView
from llmchat.engine.prompt import CHAT, COMPLETION, PromptMode
from llmchat.session import Session
from llmchat.tui.model_thread import on_model_thread
from llmchat.tui.screens.inspector import InspectorScreen, StepContext
from llmchat.tui.widgets.inspector import Timeline, inherited_tokens, saved_policy_text, step_title
from llmchat.tui.widgets.messages import AssistantMessage
from llmchat.tui.widgets.panels import TopKPanel
from llmchat.tui.widgets.prompt import PromptInput
from llmchat.tui.widgets.tokens import MODES


@dataclass
class PolicyReady(Message):
    """The policy view of a step, computed on a worker thread (None: the step's logits are gone).

    `request` LIVE: the answer's own worker computed it for the step it just sampled.
    """

    request: int
    view: PolicyView | None
    note: str = ""


LIVE = -1  # PolicyReady.request of a view the generating worker made as it went


@dataclass
class PromptReady(Message):
    """The prompt view of the next request, computed on a worker thread (None: a template error)."""

    request: int
    view: PromptView | None
    note: str = ""


class InspectingApp(App[None]):
    """Token cursor, heatmap and the inspector, over the chat in app.py."""

    # Provided by the chat app (app.py).
    session: Session | None
    sampling: SamplingParams | None
    conversation: Conversation
    generating: bool
    _answer: AssistantMessage | None
    _answer_id: str | None
    _status: Callable[..., None]  # the status bar's update

    def __init__(self) -> None:
        super().__init__()
        self._token_answer: AssistantMessage | None = None  # the answer whose token view is open
        self._selected_token: int | None = None  # the token under the cursor
        self._inspector_request = 0  # results of older inspector requests are dropped
        # While an answer streams and the policy tab shows its newest step, the answer's worker
        # computes that view at each UI frame (it holds the model; the step's logits are at hand).
        self.live_policy = False

    def _prompt_mode(self) -> PromptMode:
        """How the model sees this conversation: chat (its template) or completion (plain text)."""
        return COMPLETION if self.conversation.mode == COMPLETION else CHAT

    # --- the token cursor ---------------------------------------------------------------------------

    async def action_token(self, step: int) -> None:
        """Move the token cursor through an answer; the top-k panel shows that step."""
        answer = self._token_answer
        if answer is None:
            answer = self._last_answer("No answer with tokens to inspect yet.")
            if answer is None:
                return
            index = len(answer.steps) - 1
        else:
            current = self._selected_token if self._selected_token is not None else len(answer.steps) - 1
            index = min(max(current + step, 0), len(answer.steps) - 1)
        await self._select(answer, index)

    def _last_answer(self, otherwise: str = "") -> AssistantMessage | None:
        """The newest answer that has tokens (else None, saying `otherwise` when given)."""
        answers = [a for a in self.query(AssistantMessage) if a.steps]
        if not answers and otherwise:
            self.notify(otherwise)
        return answers[-1] if answers else None

    async def action_select_token(self, message_id: str, index: int) -> None:
        """A chip (or an answer's `tokens` link) was clicked."""
        for answer in self.query(AssistantMessage):
            if answer.message_id == message_id and answer.steps:
                await self._select(answer, min(max(index, 0), len(answer.steps) - 1))
                return

    async def _select(self, answer: AssistantMessage, index: int, mode: str | None = None) -> None:
        if self._token_answer is not None and self._token_answer is not answer:
            await self._token_answer.hide_tokens()
        self._token_answer, self._selected_token = answer, index
        await answer.show_tokens(index, mode)
        token = answer.steps[index]
        title = "end of answer" if index == len(answer.tokens) else f"token {index + 1}/{len(answer.tokens)}"
        self.query_one(TopKPanel).show(token, title=title)
        self.refresh_inspector()

    async def _close_token_view(self) -> None:
        if self._token_answer is not None:
            await self._token_answer.hide_tokens()
        self._token_answer = self._selected_token = None

    async def action_token_view(self) -> None:
        """Cycle the answer under the cursor (else the last one) through text → heatmap → heatmap with ids."""
        answer = self._token_answer or self._last_answer("No answer with tokens to show yet.")
        if answer is None:
            return
        mode = MODES[(MODES.index(answer.token_mode) + 1) % len(MODES)]
        if mode == "text":
            await self._close_token_view()
            return
        index = self._selected_token if answer is self._token_answer and self._selected_token is not None else None
        await self._select(answer, len(answer.steps) - 1 if index is None else index, mode)

    # --- the inspector -----------------------------------------------------------------------------

    def action_inspect(self, tab: str) -> None:
        """Open the inspector on a tab (or switch tabs when it is open); a tab that becomes active
        refreshes itself (InspectorScreen's TabActivated), the one already shown is refreshed here."""
        screen = self.screen
        if not isinstance(screen, InspectorScreen):
            self.push_screen(InspectorScreen(tab))
        elif screen.active_tab != tab:
            screen.show_tab(tab)
        else:
            self.refresh_inspector()

    def _inspected_step(self) -> tuple[AssistantMessage, int] | None:
        """The token under the cursor, else the last token of the last answer."""
        if self._token_answer is not None and self._selected_token is not None:
            return self._token_answer, self._selected_token
        answer = self._last_answer()
        return (answer, len(answer.steps) - 1) if answer is not None else None

    def refresh_inspector(self) -> None:
        """Bring the open inspector tab up to date (the heavy part runs on a worker thread)."""
        screen = self.screen
        if not isinstance(screen, InspectorScreen) or not screen.is_mounted:
            return
        self._inspector_request += 1
        self.live_policy = False
        tab = screen.active_tab
        if tab == "policy":
            self._refresh_policy(screen)
        elif tab == "prompt":
            self._refresh_prompt(screen)
        elif tab == "timeline":
            self._refresh_timeline(screen)
        else:  # the layer views: the screen computes them
            screen.refresh_view(tab, self._step_context())

    def _step_context(self) -> StepContext | None:
        """What the layer views need of the step under the cursor (else the last answer's last)."""
        step = self._inspected_step()
        if step is None:
            return None
        answer, index = step
        session = self.session
        prompt_ids = session.prompt_ids(answer.message_id) if session is not None else None
        messages = None if prompt_ids is not None else self.conversation.chat_messages(before=answer.message_id)
        return StepContext(
            session=session,
            title=step_title(answer.steps[index], index, len(answer.steps)),
            answer_ids=[t.token_id for t in answer.tokens],
            index=index,
            prompt_ids=prompt_ids,
            messages=messages,
            mode=self._prompt_mode(),
            generating=self.generating,
        )

    # --- the policy view's what-if: other sampling settings, tried without touching the chat's ---------

    def tuned_sampling(self) -> SamplingParams | None:
        """The settings F2–F7 step from: over the inspector its what-if (else the chat's settings)."""
        return self.policy_params()

    def policy_params(self) -> SamplingParams | None:
        """What the policy view shows: the inspector's what-if when there is one, else the chat's
        settings. (Also read by the answer's worker for the live view: a plain attribute read.)"""
        screen = self.screen
        what_if = screen.what_if if isinstance(screen, InspectorScreen) else None
        return what_if or self.sampling

    def try_sampling(self, params: SamplingParams) -> bool:
        """Over the inspector, settings from F2–F7 become its what-if (shown on the policy tab, which
        comes up); True then. Elsewhere False: they are the chat's to take."""
        screen = self.screen
        if not isinstance(screen, InspectorScreen):
            return False
        screen.what_if = None if params == self.sampling else params
        if screen.active_tab != "policy":
            screen.show_tab("policy")  # it refreshes when it becomes active
        else:
            self.refresh_inspector()
        return True

    def on_inspector_screen_apply_sampling(self, message: InspectorScreen.ApplySampling) -> None:
        """The inspector's apply key: the what-if becomes the chat's settings."""
        screen = self.screen
        if not isinstance(screen, InspectorScreen):
            return
        if screen.what_if is None:
            self.notify("Nothing to apply: F2–F7 try other settings here first.")
            return
        self.sampling, screen.what_if = screen.what_if, None
        self._status()
        self.notify("Applied to the chat: the next token is sampled with these settings.", timeout=3)
        self.refresh_inspector()

    def _refresh_policy(self, screen: InspectorScreen) -> None:
        partial = self.session is not None and not self.session.capabilities.reread_steps
        if partial and not (self.generating and self._token_answer is None):
            self._refresh_partial_policy(screen)
            return
        if self.generating and self._token_answer is None:  # no cursor: follow the newest step live
            self.live_policy = True
            waiting = Text("waiting for the next token…", style="dim")
            screen.show_policy(Text("The newest step", style="bold"), waiting)
            return
        step = self._inspected_step()
        if step is None:
            screen.show_policy(Text("No answer yet: ask something first."), Text())
            return
        answer, index = step
        token = answer.steps[index]
        title = step_title(token, index, len(answer.steps))
        params = self.policy_params()
        if self.session is None or params is None:
            note = "No model loaded: this step's saved top-k (load the model for every stage)."
            screen.show_policy(title, saved_policy_text(token, note))
            return
        if self.generating:
            note = "The model is answering: this step's sampler chain shows when it is done."
            screen.show_policy(title, saved_policy_text(token, note))
            return
        screen.show_policy(title, Text("computing…", style="dim"))
        prompt_ids = self.session.prompt_ids(answer.message_id)
        messages = None if prompt_ids is not None else self.conversation.chat_messages(before=answer.message_id)
        self._compute_policy(
            self._inspector_request,
            prompt_ids,
            messages,
            [t.token_id for t in answer.steps[:index]],
            params,
            token.token_id,
            self._prompt_mode(),
        )

    @work(thread=True, exclusive=True, group="inspect")
    @on_model_thread
    def _compute_policy(
        self,
        request: int,
        prompt_ids: list[int] | None,
        messages: list[dict[str, Any]] | None,
        answer_ids: list[int],
        params: SamplingParams,
        chosen: int,
        mode: PromptMode,
    ) -> None:
        session = self.session
        if session is None:
            return
        try:
            view = session.policy_view(prompt_ids, messages, answer_ids, params, chosen, mode)
        except (ValueError, LLMChatError) as err:
            self.post_message(PolicyReady(request, None, f"This step's logits are not at hand ({err})."))
            return
        self.post_message(PolicyReady(request, view))

    def _refresh_partial_policy(self, screen: InspectorScreen) -> None:
        """A server's step: its logits cannot be read again, so the sampler chain runs over the top N
        candidates the server returned with it (a partial view, and it says so)."""
        step = self._inspected_step()
        if step is None:
            screen.show_policy(Text("No answer yet: ask something first."), Text())
            return
        answer, index = step
        token = answer.steps[index]
        params = self.policy_params()
        if params is None or not token.top:
            note = "The server returned no candidates for this step: there is no policy to show."
            screen.show_policy(step_title(token, index, len(answer.steps)), Text(note, style="dim"))
            return
        before = [t.token_id for t in answer.steps[:index]]
        self._compute_partial_policy(self._inspector_request, token, params, before)

    @work(thread=True, exclusive=True, group="inspect")
    @on_model_thread
    def _compute_partial_policy(
        self, request: int, token: TokenEvent, params: SamplingParams, before: list[int]
    ) -> None:
        try:
            view = partial_policy_view(token, params, before)
        except (ValueError, RuntimeError, LLMChatError) as err:  # odd numbers from a server: a note, no crash
            self.post_message(PolicyReady(request, None, f"No policy view for this step ({err})."))
            return
        self.post_message(PolicyReady(request, view, partial_note(token)))

    def live_policy_view(self, answer_id: str, token: TokenEvent, before: list[int], params: SamplingParams) -> None:
        """On the answer's worker, at a UI frame: the view of the step it just sampled. llmchat's
        engine: from the generator's latest logits (no forward pass runs); a server: over the top N it
        returned with the step (partial, as for a finished answer). Called only while `live_policy`."""
        session = self.session
        if session is None:
            return
        if not session.capabilities.reread_steps:
            try:
                view = partial_policy_view(token, params, before)
            except (ValueError, RuntimeError, LLMChatError):  # odd numbers from a server: no live view
                return
            self.post_message(PolicyReady(LIVE, view, partial_note(token)))
            return
        sequence = (session.prompt_ids(answer_id) or []) + before
        self.post_message(PolicyReady(LIVE, session.live_policy_view(sequence, token.token_id, params)))

    def on_policy_ready(self, message: PolicyReady) -> None:
        screen = self.screen
        step = self._inspected_step()
        live = message.request == LIVE and self.live_policy
        if (message.request != self._inspector_request and not live) or not isinstance(screen, InspectorScreen):
            return
        if step is None or not screen.query("#policy-step"):  # live views come 10 a second: one may
            return  # arrive while the screen is composed or closed, with nothing to draw into
        answer, index = step
        title = step_title(answer.steps[index], index, len(answer.steps))
        if message.view is None:
            screen.show_policy(title, saved_policy_text(answer.steps[index], message.note + " The saved top-k:"))
            return
        screen.show_policy(title, message.view, message.note)

    def _next_request_messages(self) -> tuple[list[dict[str, Any]], str]:
        """The messages the next request would send: the branch so far plus the draft in the input."""
        messages = self.conversation.chat_messages()
        draft = self.query_one(PromptInput).text  # as Enter sends it: a completion's leading space counts
        if draft.strip():
            return [*messages, {"role": "user", "content": draft}], "with the draft in the input as the next message"
        return messages, "the conversation so far (type a message to see it in the next request)"

    def _refresh_prompt(self, screen: InspectorScreen) -> None:
        if self.session is None:
            screen.show_prompt(None, note="No model loaded: the prompt view needs its chat template and tokenizer.")
            return
        if not self.session.capabilities.prompt_tokens:
            note = (
                "The prompt view is not available: the server does not return the prompt's tokens. Start the "
                "chat with --tokenizer PATH (a local copy of the server's model) to see the prompt as its "
                "template and tokenizer render it."
            )
            screen.show_prompt(None, note=note)
            return
        if self.generating:
            screen.show_prompt(None, note="Streaming: the next request shows when the answer is done.")
            return
        messages, note = self._next_request_messages()
        self._compute_prompt(self._inspector_request, messages, note, self._prompt_mode())

    @work(thread=True, exclusive=True, group="inspect")
    def _compute_prompt(self, request: int, messages: list[dict[str, Any]], note: str, mode: PromptMode) -> None:
        session = self.session
        if session is None:
            return
        try:
            view = session.prompt_view(messages, mode)
        except LLMChatError as err:
            self.post_message(PromptReady(request, None, str(err)))
            return
        self.post_message(PromptReady(request, view, note))

    def on_prompt_ready(self, message: PromptReady) -> None:
        screen = self.screen
        if message.request != self._inspector_request or not isinstance(screen, InspectorScreen):
            return
        screen.show_prompt(message.view, message.note)

    def _refresh_timeline(self, screen: InspectorScreen) -> None:
        step = self._inspected_step()
        if step is None:
            screen.show_timeline(None, "No answer yet: the timeline shows the last request's prefill and decode.")
            return
        answer = step[0]
        stats = dict(self.conversation.get(answer.message_id).stats or {}) if answer.message_id else {}
        timeline = Timeline.of_answer(answer.steps, stats, inherited_tokens(answer.forced))
        note = "" if timeline is not None else "This answer kept no timings (saved by an older version)."
        screen.show_timeline(timeline, note)


def partial_note(token: TokenEvent) -> str:
    """What a partial policy view is (the note above it)."""
    count = len(token.top)
    shown = sum(t.prob for t in token.top)
    return (
        f"partial (top {count} from the server): the server cannot re-read a step's logits, so the sampler "
        f"chain runs over the {count} candidates it returned, renormalized over them (they held {shown:.1%} "
        "of the probability). Counts are of those candidates; the repetition penalty sees only the "
        "answer's tokens among them."
    )


def partial_policy_view(token: TokenEvent, params: SamplingParams, before: Sequence[int] = ()) -> PolicyView:
    """The sampler chain of a step seen only through the candidates a server returned with it
    (`token.top`, its log-probabilities standing for the logits): the same stage functions as the
    full view, over those N as if they were the whole vocabulary. `before`: the answer's tokens before
    the step, the repetition penalty's context (only those among the candidates count). A worker-thread
    call: it runs torch."""
    import torch

    from llmchat.engine.inspector import policy_view

    candidates = list(token.top)
    if all(t.token_id != token.token_id for t in candidates):  # sampled from outside the top N
        candidates.append(TopToken(token.token_id, token.text, token.logit, token.prob, token.policy_prob))
    position = {t.token_id: i for i, t in enumerate(candidates)}
    logits = torch.tensor([t.logit for t in candidates], dtype=torch.float32)
    view = policy_view(
        logits,
        params,
        lambda i: candidates[i].text,
        context_ids=[position[i] for i in before if i in position],
        top=len(candidates),
        chosen_id=position[token.token_id],
    )
    shown = tuple(replace(c, token_id=candidates[c.token_id].token_id) for c in view.candidates)
    return replace(view, candidates=shown, chosen_id=token.token_id)
