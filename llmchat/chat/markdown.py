"""Markdown with the line breaks the model wrote.

In Markdown a single newline inside a paragraph is a soft break, drawn as a space, so a poem or
an address written line by line comes out as one run-on line. Chat UIs show the lines as written;
so does llmchat, in the chat and in the Markdown export: each newline that ends a line of prose
becomes a hard break (two trailing spaces). Fenced and indented code keep their lines untouched.

Two trailing spaces are harmless wherever else they land — at the end of a paragraph, a heading,
a list item, a table row or a thematic break Markdown ignores them — so the decision needs only
the line itself and whether it is code: text can be converted as it streams (`LineBreaks.feed`),
each newline once, without waiting for the next line.
"""

from __future__ import annotations

import re

HARD_BREAK = "  \n"
# A fence opener or closer, possibly inside block quotes or a list item's indentation.
_FENCE = re.compile(r"^[ \t]*(?:>[ \t]?)*[ \t]*(`{3,}|~{3,})(.*)$")
_QUOTES = re.compile(r"^[ \t]{0,3}(?:>[ \t]?)+")
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-+*]|\d{1,9}[.)])(?:[ \t]|$)")


class LineBreaks:
    """Turns the single newlines of prose into hard breaks, for text that arrives in pieces.

    `feed` returns the converted text of each piece; the concatenation of the results is
    `hard_line_breaks` of the concatenated pieces.
    """

    def __init__(self) -> None:
        self._line = ""  # the current line's text so far (its newline has not arrived)
        self._fence: tuple[str, int] | None = None  # (character, length) of the open code fence
        self._after_blank = True  # the previous line was blank (or there was none)
        self._in_code = False  # the previous line was in an indented code block
        self._in_list = False  # the text is in a list: indented lines continue an item, not code

    def feed(self, text: str) -> str:
        out: list[str] = []
        start = 0
        while (end := text.find("\n", start)) >= 0:
            out.append(text[start:end])
            out.append(self._line_end(self._line + text[start:end]))
            self._line = ""
            start = end + 1
        self._line += text[start:]
        out.append(text[start:])
        return "".join(out)

    def _line_end(self, line: str) -> str:
        """The newline to write after `line`: a hard break for prose, a plain one otherwise."""
        fence = _FENCE.match(line)
        if self._fence is not None:  # inside fenced code: only its closer ends it
            char, length = self._fence
            if fence and fence[1][0] == char and len(fence[1]) >= length and not fence[2].strip():
                self._fence = None
            return "\n"
        if fence and (fence[1][0] == "~" or "`" not in fence[2]):  # backtick fences take no backtick info
            self._fence = (fence[1][0], len(fence[1]))
            self._after_blank = False
            return "\n"
        if not line.strip():
            self._after_blank, self._in_code = True, False
            return "\n"
        expanded = line.expandtabs(4)
        indent = len(expanded) - len(expanded.lstrip())
        if indent >= 4 and (self._after_blank or self._in_code) and not self._in_list:
            self._in_code, self._after_blank = True, False
            return "\n"
        body = _QUOTES.sub("", line)
        if _LIST_ITEM.match(body):
            self._in_list = True
        elif self._after_blank and indent == 0:
            self._in_list = False
        self._after_blank = self._in_code = False
        if line.endswith(("  ", "\\")):  # a hard break already
            return "\n"
        return HARD_BREAK


def hard_line_breaks(text: str) -> str:
    """`text` with each single newline of prose made a Markdown hard break (code left as it is)."""
    return LineBreaks().feed(text)
