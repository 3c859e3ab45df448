"""The next request of a conversation: its text (chat template, or plain completion) and token ids
that stay identical from turn to turn, so the KV cache is reused.

Two modes. "chat": the messages go through the model's chat template. "completion" (a base model,
which has no template, or on request): the transcript is one plain text, the messages' contents
joined as they are, and the answer continues it; the tokenizer adds its BOS as for any raw text.

Re-tokenizing the whole rendered chat each turn can split an earlier answer differently from the
ids the model actually generated (tokenization is not unique), and then the cache's common prefix
ends at the previous prompt. `ChatTokens` keeps the text and ids of what the cache saw; when the
new rendering starts with that text, only the new tail is tokenized and appended to the old ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from llmchat.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llmchat.engine.runtime import LoadedModel

PromptMode = Literal["chat", "completion"]
CHAT: PromptMode = "chat"
COMPLETION: PromptMode = "completion"
PROMPT_MODES: tuple[PromptMode, ...] = (CHAT, COMPLETION)


def completion_text(messages: Sequence[Mapping[str, Any]]) -> str:
    """A conversation as one text to continue: a system prompt first, on a line of its own, then
    every other message's content exactly as written (user text and the model's continuations)."""
    parts = []
    for message in messages:
        content = str(message.get("content") or "")
        if message.get("role") == "system":
            parts.append(content if not content or content.endswith("\n") else content + "\n")
        else:
            parts.append(content)
    return "".join(parts)


def request_text(model: LoadedModel, messages: Sequence[Mapping[str, Any]], mode: PromptMode) -> str:
    """The text of the request that answers `messages`: the chat template's rendering with the
    generation prompt, or in completion mode the plain transcript (TemplateError in chat mode for a
    model without a template)."""
    if mode == COMPLETION:
        return completion_text(messages)
    return model.template.render(list(messages), add_generation_prompt=True)


class ChatTokens:
    """Text ↔ ids of the conversation so far, as the model saw and wrote it."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._text = ""
        self._ids: list[int] = []
        self._mode: PromptMode = CHAT

    def encode(self, rendered: str, mode: PromptMode = CHAT) -> list[int]:
        """Ids for a rendered prompt, reusing the known ids when the prompt extends the known text
        (of the same mode: a completion prompt starts with the tokenizer's BOS, a rendered chat
        carries its own)."""
        ids = self.peek(rendered, mode)
        self._text, self._ids, self._mode = rendered, list(ids), mode
        return ids

    def peek(self, rendered: str, mode: PromptMode = CHAT) -> list[int]:
        """The ids `encode` would give, without remembering them (the inspector's prompt view)."""
        if self._text and mode == self._mode and rendered.startswith(self._text):
            return self._ids + self.tokenizer.encode(rendered[len(self._text) :])
        return self.tokenizer.encode(rendered, add_special_tokens=mode == COMPLETION)

    def generated(self, text: str, ids: Sequence[int]) -> None:
        """Record the answer the model wrote after the last prompt (text and ids as generated).

        When the text is not exactly those ids (an answer cut before a stop string), nothing is
        kept: the next prompt is tokenized whole rather than built on ids the text does not show.
        """
        if self.tokenizer.decode(list(ids)) != text:
            self.reset()
            return
        self._text += text
        self._ids.extend(int(i) for i in ids)

    def reset(self) -> None:
        self._text, self._ids = "", []
