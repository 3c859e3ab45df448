"""Keeping a reasoning model's thinking apart from its answer, as the text streams.

Reasoning models wrap their chain of thought in markers (`<think>` … `</think>`). Some chat
templates open the block themselves at the end of the prompt, so the answer starts inside it. The
splitter routes each streamed piece to `reasoning` or `content`, drops the markers, and holds back
a piece that may be the start of a marker split across tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_MARKERS = ("<think>", "</think>")


@dataclass
class Split:
    reasoning: str = ""
    content: str = ""


class ReasoningSplitter:
    """Routes streamed text into reasoning and content."""

    def __init__(self, markers: tuple[str, str] = THINK_MARKERS, *, inside: bool = False) -> None:
        self.open, self.close = markers
        self.inside = inside
        self._pending = ""

    def feed(self, text: str) -> Split:
        """Split a new piece of text; a possible partial marker at its end waits for the next piece."""
        out = Split()
        buffer = self._pending + text
        self._pending = ""
        while buffer:
            marker = self.close if self.inside else self.open
            at = buffer.find(marker)
            if at != -1:
                self._route(out, buffer[:at])
                buffer = buffer[at + len(marker) :]
                self.inside = not self.inside
                continue
            keep = _partial_suffix(buffer, marker)
            self._route(out, buffer[: len(buffer) - keep])
            self._pending = buffer[len(buffer) - keep :]
            break
        return out

    def flush(self) -> Split:
        """Whatever was held back, at the end of the stream."""
        out = Split()
        self._route(out, self._pending)
        self._pending = ""
        return out

    def _route(self, out: Split, text: str) -> None:
        if self.inside:
            out.reasoning += text
        else:
            out.content += text


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def prompt_opens_reasoning(prompt_text: str, markers: tuple[str, str] = THINK_MARKERS) -> bool:
    """Whether the rendered prompt leaves a reasoning block open for the answer (e.g. ends with '<think>\\n')."""
    opened, closed = prompt_text.rfind(markers[0]), prompt_text.rfind(markers[1])
    return opened != -1 and opened > closed and not prompt_text[opened + len(markers[0]) :].strip()
