"""Token ids of a growing chat that stay identical from turn to turn, so the KV cache is reused.

Re-tokenizing the whole rendered chat each turn can split an earlier answer differently from the
ids the model actually generated (tokenization is not unique), and then the cache's common prefix
ends at the previous prompt. `ChatTokens` keeps the text and ids of what the cache saw; when the
new rendering starts with that text, only the new tail is tokenized and appended to the old ids.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmchat.engine.tokenizer import Tokenizer


class ChatTokens:
    """Text ↔ ids of the conversation so far, as the model saw and wrote it."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._text = ""
        self._ids: list[int] = []

    def encode(self, rendered: str) -> list[int]:
        """Ids for a rendered prompt, reusing the known ids when the prompt extends the known text."""
        ids = self.peek(rendered)
        self._text, self._ids = rendered, list(ids)
        return ids

    def peek(self, rendered: str) -> list[int]:
        """The ids `encode` would give, without remembering them (the inspector's prompt view)."""
        if self._text and rendered.startswith(self._text):
            return self._ids + self.tokenizer.encode(rendered[len(self._text) :])
        return self.tokenizer.encode(rendered)

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
