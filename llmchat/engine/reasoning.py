"""Keeping a reasoning model's thinking apart from its answer, as the text streams.

Reasoning models wrap their chain of thought in markers (`<think>` … `</think>`). Some chat
templates open the block themselves at the end of the prompt, so the answer starts inside it. The
splitter routes each streamed piece to `reasoning` or `content`, drops the markers, and holds back
a piece that may be the start of a marker split across tokens.

Harmony models (gpt-oss) write channels instead: `<|channel|>analysis<|message|>` … `<|end|>` is
reasoning, `<|channel|>final<|message|>` … the answer (HarmonySplitter).
"""

from __future__ import annotations

import json
import re
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


# What names a harmony model's reasoning (gpt-oss): the analysis channel's body, up to <|end|>.
# Generator takes these markers to mean HarmonySplitter rather than ReasoningSplitter.
HARMONY_MARKERS = ("<|channel|>analysis<|message|>", "<|end|>")
_MESSAGE = "<|message|>"
_BODY_ENDS = ("<|end|>", "<|return|>", "<|call|>")
_CHANNEL = re.compile(r"<\|channel\|>\s*([^\s<]+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_LONGEST_HEADER = 256  # characters before a <|message|>: more, and the answer is taken as plain text


class HarmonySplitter:
    """Routes a harmony answer (gpt-oss) into reasoning and content, as the text streams.

    A harmony answer is a run of messages, each a header and a body:
    `[<|start|>assistant][ to=RECIPIENT]<|channel|>NAME[ to=RECIPIENT][ <|constrain|>json]<|message|>BODY`,
    the body ending with `<|end|>`, or `<|return|>` (the answer is done) or `<|call|>` (a tool call). The
    chat prompt ends with `<|start|>assistant`, so the stream starts inside the first header. Bodies of
    the analysis channel are reasoning, the others (final, commentary preambles) content; a body sent
    to a function (`to=functions.NAME`) becomes a Hermes-style `<tool_call>{"name": …, "arguments": …}
    </tool_call>` in the content, which tool_calls.split_tool_calls takes apart. Headers and harmony's
    special tokens are dropped. Text that reaches no <|message|> within _LONGEST_HEADER characters
    (not a harmony answer at all) is content, as is a shorter one at the end.
    """

    def __init__(self) -> None:
        self._in_body = False
        self._header = ""  # the current header, held until its <|message|>
        self._pending = ""  # a body's end that may be the start of an end marker
        self._channel = ""
        self._tool: str | None = None  # the function the current body calls
        self._bodies = 0
        self._plain = False  # the text turned out not to be harmony: it passes through as content

    def feed(self, text: str) -> Split:
        """Split a new piece of text; headers and possible partial end markers wait for more."""
        out = Split()
        buffer = self._pending + text
        self._pending = ""
        while buffer:
            if self._plain:
                out.content += buffer
                break
            if not self._in_body:
                header, self._header = self._header + buffer, ""
                at = header.find(_MESSAGE)
                if at == -1:
                    self._header = header
                    if not self._bodies and len(header) > _LONGEST_HEADER:  # not a harmony answer
                        self._plain, self._header = True, ""
                        out.content += header
                    break
                self._open(out, header[:at])
                buffer = header[at + len(_MESSAGE) :]
                continue
            found = [(at, end) for end in _BODY_ENDS if (at := buffer.find(end)) != -1]
            if not found:
                keep = max(_partial_suffix(buffer, end) for end in _BODY_ENDS)
                self._route(out, buffer[: len(buffer) - keep])
                self._pending = buffer[len(buffer) - keep :]
                break
            at, end = min(found)
            self._route(out, buffer[:at])
            self._close(out)
            buffer = buffer[at + len(end) :]
        return out

    def flush(self) -> Split:
        """Whatever was held back, at the end of the stream (a tool call's block is closed)."""
        out = Split()
        if self._in_body:
            self._route(out, self._pending)
            self._close(out)
        elif not self._bodies:  # no harmony message at all: the text is the answer
            out.content += self._header
        self._pending = self._header = ""
        return out

    def _open(self, out: Split, header: str) -> None:
        channel, recipient = _CHANNEL.search(header), _RECIPIENT.search(header)
        self._channel = channel.group(1) if channel else ""
        target = recipient.group(1) if recipient else ""
        self._tool = target.removeprefix("functions.") if target.startswith("functions.") else None
        self._in_body, self._header = True, ""
        self._bodies += 1
        if self._tool is not None:
            out.content += '<tool_call>{"name": ' + json.dumps(self._tool) + ', "arguments": '

    def _close(self, out: Split) -> None:
        if self._tool is not None:
            out.content += "}</tool_call>"
        self._in_body, self._tool = False, None

    def _route(self, out: Split, text: str) -> None:
        if self._channel == "analysis" and self._tool is None:
            out.reasoning += text
        else:
            out.content += text
