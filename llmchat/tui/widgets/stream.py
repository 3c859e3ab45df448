"""An answer's Markdown as it streams in, at a cost per frame that does not grow with the answer.

Textual's `Markdown.append` parses again from the start of the last top-level block, builds new
widgets for it (a whole list's, every time) and lays the screen out on every call. A block can grow
without end — a poem written line by line is one paragraph, a long program one code block, a long
list one list — so its frames would cost more and more. `StreamingMarkdown`:

- updates the open (last, growing) block's widgets in place: a paragraph's or a code block's text,
  a list's last item and its new rows — no widgets built for a frame that only adds text;
- keeps the open block short: past `OPEN_LIMIT` characters (or `OPEN_ITEMS` list items) it is cut
  where the drawing allows it (after a line break in a paragraph, between two lines of code,
  between two items of a list); its widget keeps the part above, sealed, the seam drawn without a
  gap, and a new widget takes the tail. A block followed by another is finished: its widget is
  never parsed, built or touched again;
- keeps `RUNWAY` blank lines of room under the open block (its min-height, from the moment it
  becomes the open block), so that a frame whose text fits in it repaints that block alone: no
  layout of the screen (~20 ms on 2 cores with a long chat) and no scroll of the chat (a repaint
  of all of it); both happen once per few lines;
- pins the height of each finished block while the answer streams (`styles.height`, the height it
  was laid out at): a layout then takes its height as given instead of wrapping its text again, so
  a layout costs the same after thousands of characters as at the start (measured: 22 ms at 100
  tokens, 44 ms at 1000 with every paragraph measured again). A resize unpins them.

When the answer ends, `finish()` lays the whole text out once as one document if a cut was made,
so the final drawing is Textual's own for the whole text (emphasis or a reference across a cut).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass

from markdown_it import MarkdownIt
from markdown_it.token import Token
from textual import events
from textual.await_complete import AwaitComplete
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.css.query import NoMatches
from textual.geometry import Size
from textual.reactive import Reactive
from textual.widgets import Label, Markdown
from textual.widgets._markdown import (
    MarkdownBlock,
    MarkdownBullet,
    MarkdownFence,
    MarkdownList,
    MarkdownListItem,
    MarkdownOrderedList,
    MarkdownParagraph,
)

from llmchat.tui.widgets.repaint import LineRepaint

OPEN_LIMIT = 1200  # characters of the open block before it is cut (~300 tokens; parsed every frame)
# Blank lines kept under the open block. A frame that makes the answer taller lays the screen out
# and scrolls the chat, and Textual then repaints all of it (~10x a frame that only redraws the
# growing paragraph); with room reserved the block grows into it, once per RUNWAY lines.
RUNWAY = 4
# Items of an open list before it is cut: Textual rebuilds a list's widgets (three an item) whenever
# it changes, so a list costs far more per character than a paragraph.
OPEN_ITEMS = 8


def quiet_virtual_size() -> Reactive[Size]:
    """A `virtual_size` that does not lay the screen out again when it changes.

    Textual's does, for every widget whose size changed in a layout: each frame that adds a line to
    an answer laid the screen out twice (the paragraph, the Markdown, the message and the chat all
    grew). The virtual size is a result of the layout, not an input to it; a scrollbar appearing
    has a layout trigger of its own. For the widgets an answer grows through.
    """
    return Reactive(Size(0, 0), layout=False)


def _fits(block: MarkdownBlock, height: int) -> bool:
    """Whether `height` lines fit in the room kept for the open `block`; if not, keep room for
    `RUNWAY` lines more (its min-height: the caller's update lays the screen out once)."""
    room = block.styles.min_height
    if room is not None and height <= room.value:
        return True
    block.styles.min_height = height + RUNWAY
    return False


def _keep_room(block: MarkdownBlock | None) -> None:
    """Room under a paragraph that has just become the open block, before its first layout, so that
    its next frames fit (without it, the first frame after each new block laid the screen out again)."""
    if isinstance(block, _QuietParagraph):
        block.styles.min_height = 1 + RUNWAY


def release_room(block: MarkdownBlock | None) -> None:
    """The block is no longer the open one: it takes its own height again."""
    if block is not None and block.styles.min_height is not None:
        block.styles.min_height = None


class _QuietParagraph(LineRepaint, MarkdownParagraph):
    """A paragraph that asks for a screen layout only when its new text outgrows the room kept for it."""

    virtual_size = quiet_virtual_size()

    def set_content(self, content: Content, *, open_block: bool = False) -> None:
        """New text; `open_block`: it is the answer's last block, which grows into room kept for it."""
        width = self.content_size.width if self.is_mounted else 0
        fits = False
        if width:  # laid out already
            height = content.get_height(self.styles, width)
            fits = _fits(self, height) if open_block else height == self.content_size.height
        self._content = content
        if fits:  # the same size: text added at the end repaints its last line or two, not all
            self.update_lines(content)
        else:
            self.update(content)


class _QuietFence(MarkdownFence):
    """A code block that asks for a layout only when its lines outgrow the room kept (code does not wrap)."""

    virtual_size = quiet_virtual_size()

    def set_content(self, content: Content, *, open_block: bool = False) -> None:
        fits = False
        with suppress(NoMatches):  # not composed yet: compose draws it
            label = self.query_one("#code-content", Label)
            padding = label.styles.padding
            if open_block:
                height = content.plain.count("\n") + 1 + padding.top + padding.bottom
                fits = self.is_mounted and _fits(self, height)
            else:
                fits = self.is_mounted and content.plain.count("\n") == self._content.plain.count("\n")
        self._content = content
        with suppress(NoMatches):
            self.query_one("#code-content", Label).update(content, layout=not fits)


@dataclass(frozen=True)
class Cut:
    """Where an open block is split: the sealed text above, the text that goes on growing below."""

    sealed: str
    rest: str


def _groups(tokens: list[Token]) -> list[tuple[int, list[Token]]]:
    """The tokens of each top-level block, with the block's first source line."""
    groups: list[tuple[int, list[Token]]] = []
    inside = False  # between a top-level block's opening and closing tokens
    for token in tokens:
        if token.level == 0 and token.nesting >= 0 and not inside:
            groups.append((token.map[0] if token.map else 0, [token]))
            inside = token.nesting == 1
        elif groups:
            groups[-1][1].append(token)
            inside = inside and not (token.level == 0 and token.nesting == -1)
    return groups


def _closes(line: str, fence: str) -> bool:
    """Whether `line` closes a code block opened with `fence` (``` or ~~~, or longer)."""
    text = line.strip()
    return len(text) >= len(fence) and set(text) == {fence[0]}


def find_cut(source: str, tokens: list[Token]) -> Cut | None:
    """The latest place where a one-block `source` can be split without changing how it is drawn.

    A paragraph splits after a hard line break, a list between two of its items, an unclosed code
    fence between two lines (the part above is closed, the part below opened again with the same
    fence). The part below keeps at least its last line, whole or not.
    """
    lines = source.splitlines(keepends=True)
    if len(lines) < 2 or not tokens:
        return None
    first = tokens[0]
    if first.type == "paragraph_open":
        for i in range(len(lines) - 1, 0, -1):
            if lines[i - 1].endswith(("  \n", "\\\n")) and lines[i - 1].strip():
                return Cut("".join(lines[:i]), "".join(lines[i:]))
        return None
    if first.type in ("bullet_list_open", "ordered_list_open"):
        starts = [t.map[0] for t in tokens if t.type == "list_item_open" and t.level == 1 and t.map]
        cut = next((s for s in reversed(starts) if 0 < s < len(lines)), None)
        return Cut("".join(lines[:cut]), "".join(lines[cut:])) if cut else None
    if first.type == "fence" and first.markup:
        closer = first.markup
        complete = len(lines) if lines[-1].endswith("\n") else len(lines) - 1
        if any(_closes(line, closer) for line in lines[1:complete]):
            return None  # closed: it will not grow any more
        cut = complete - 1  # the part below starts with a whole line of code
        if cut < 2:
            return None
        return Cut("".join(lines[:cut]) + closer + "\n", lines[0] + "".join(lines[cut:]))
    return None


# The seams of a cut block, as inline styles: a class would make Textual restyle the block and
# everything in it (a list: tens of widgets). Textual's own spacing: paragraphs and lists
# `margin: 0 0 1 0`; code `margin: 1 0` and its Label `padding: 1 2`.
def _join_below(block: MarkdownBlock) -> None:
    """No gap under `block`: the block below continues it."""
    top, right, _, left = block.styles.margin
    block.styles.margin = (top, right, 0, left)
    if isinstance(block, MarkdownFence):
        label = block.query_one(Label)
        top, right, _, left = label.styles.padding
        label.styles.padding = (top, right, 0, left)


def _join_above(block: MarkdownBlock) -> None:
    """No gap above `block`: it continues the block above."""
    _, right, bottom, left = block.styles.margin
    block.styles.margin = (0, right, bottom, left)
    if isinstance(block, MarkdownFence):
        with suppress(NoMatches):  # not composed yet: styled when it is
            label = block.query_one(Label)
            _, right, bottom, left = label.styles.padding
            label.styles.padding = (0, right, bottom, left)


def _bullets(markdown_list: MarkdownList, items: list[MarkdownListItem]) -> list[str]:
    """The bullet of each item as Textual draws it (numbers right-aligned to the widest one)."""
    if not isinstance(markdown_list, MarkdownOrderedList):
        return [item.bullet for item in items]
    try:
        start = int(items[0].bullet)
    except ValueError:
        start = 1
    width = max(len(f"{n}. ") for n in range(start, start + len(items)))
    return [f"{n}. ".rjust(width + 1) for n in range(start, start + len(items))]


def _take_content(block: MarkdownBlock, other: MarkdownBlock) -> bool:
    """Show `other`'s text in `block` (a paragraph or code block), if they are of one kind."""
    if isinstance(block, _QuietParagraph) and isinstance(other, _QuietParagraph):
        block.set_content(other._content)
        return True
    if isinstance(block, _QuietFence) and isinstance(other, _QuietFence):
        block.code, block._highlighted_code = other.code, other._highlighted_code
        block.set_content(other._highlighted_code)
        return True
    return False


async def _grow_list(shown: MarkdownList, fresh: MarkdownList) -> bool:
    """Bring a drawn list up to a fresh parse of it: its last item's text updated, new items added
    as rows. False (nothing changed) when it cannot be done in place: the caller rebuilds it."""
    items = [block for block in fresh._blocks if isinstance(block, MarkdownListItem)]
    rows = list(shown.query_children(Horizontal))
    bullets = _bullets(fresh, items)
    drawn = [str(row.query_one(MarkdownBullet).symbol) for row in rows]
    if not rows or len(items) < len(rows) or bullets[: len(rows)] != drawn:
        return False  # fewer items, or the numbers' width changed (9 → 10 items)
    column = rows[-1].query_one(Vertical)
    old, new = list(column.children), items[len(rows) - 1]._blocks
    if len(old) == len(new) and all(isinstance(b, _QuietParagraph) for b in (*old, *new)):
        for paragraph, update in zip(old, new):
            if paragraph._content != update._content:
                paragraph.set_content(update._content)
    else:  # the last item now holds more than text (a nested list, code): its column is rebuilt
        await column.remove_children()
        await column.mount_all(new)
    added = []
    for item, symbol in zip(items[len(rows) :], bullets[len(rows) :]):
        bullet = MarkdownBullet()
        bullet.symbol = symbol
        added.append(Horizontal(bullet, Vertical(*item._blocks)))
    if added:
        await shown.mount_all(added)
    return True


class StreamingMarkdown(Markdown):
    """Textual's Markdown, fed one fragment per frame with `write()` (see the module docstring)."""

    virtual_size = quiet_virtual_size()

    BLOCKS = {**Markdown.BLOCKS, "paragraph_open": _QuietParagraph, "fence": _QuietFence, "code_block": _QuietFence}

    def __init__(self, markdown: str | None = None, **kwargs: object) -> None:
        super().__init__(markdown, **kwargs)  # type: ignore[arg-type]
        self._stream_parser: MarkdownIt | None = None
        self._reset()

    def _reset(self) -> None:
        self._text = ""  # everything written since the last update()
        self._open = ""  # the source of the open block (a cut fence starts with its opener again)
        self._open_block: MarkdownBlock | None = None  # the widget that draws it
        self._continued = False  # the open block continues a sealed one (its seam has no gap)
        self.cuts = 0
        self._pinned: list[MarkdownBlock] = []  # finished blocks whose height is fixed while streaming
        self._pinned_width = 0  # the width they were laid out at
        # What the last write() cost, for tests: characters parsed and block widgets built.
        self.parsed_chars = 0
        self.built_blocks = 0

    def update(self, markdown: str) -> AwaitComplete:
        """Show a whole document at once (it replaces what was streamed)."""
        self._reset()
        self._text = markdown
        return super().update(markdown)

    def _parser(self) -> MarkdownIt:
        """One parser per widget: making one builds linkify's regular expressions (~0.5 ms a frame)."""
        if self._stream_parser is None:
            self._stream_parser = MarkdownIt("gfm-like") if self._parser_factory is None else self._parser_factory()
        return self._stream_parser

    def _build(self, tokens: Iterable[Token]) -> list[MarkdownBlock]:
        blocks = list(self._parse_markdown(tokens))
        self.built_blocks += len(blocks)
        return blocks

    async def write(self, fragment: str) -> None:
        """Append a fragment: parse the open block again and update its widget (one call per frame)."""
        if not fragment:
            return
        self._text += fragment
        self._markdown = self._text  # Markdown.source
        self._open += fragment
        self.parsed_chars = self.built_blocks = 0
        async with self.lock:
            with self.app.batch_update():
                await self._show_open()
                if len(self._open) > OPEN_LIMIT or self._open_items() > OPEN_ITEMS:
                    await self._cut_open()
                self._pin_finished()

    def _pin_finished(self) -> None:
        """Fix the height of blocks that will not change again, at the height of their last layout.

        The last three may still change (the open block, a seam's upper part, one mounted in this
        frame and not laid out yet); the ones above have been laid out since they last changed."""
        blocks = list(self.children)
        for block in blocks[len(self._pinned) : max(0, len(blocks) - 3)]:
            height = block.outer_size.height
            if not height:
                break  # not laid out (hidden, or a layout is pending): try again next frame
            block.styles.height = height
            self._pinned.append(block)

    def _unpin(self) -> None:
        """Blocks take their own height again (the width changed, or the answer ended)."""
        for block in self._pinned:
            block.styles.height = None
        self._pinned.clear()

    def on_resize(self, event: events.Resize) -> None:
        if event.size.width != self._pinned_width:  # it grows taller every few lines: that is not it
            self._unpin()  # pinned heights are for the old width
        self._pinned_width = event.size.width

    def _open_items(self) -> int:
        """Items of the open block if it is a list (its widget says: no parse needed)."""
        block = self._open_block
        if isinstance(block, MarkdownList):
            return len(block.query_children(Horizontal))  # Textual draws an item as a Horizontal row
        return 0

    async def _show_open(self) -> None:
        """Draw the open source; blocks that now have a block after them are finished and left."""
        self.parsed_chars += len(self._open)
        groups = _groups(self._parser().parse(self._open))
        if not groups:
            return
        if len(groups) == 1 and await self._update_in_place(groups[0][1]):
            return
        built = [self._build(tokens) for _, tokens in groups]
        fresh = [block for blocks in built for block in blocks]
        shown: list[MarkdownBlock] = []
        old = self._open_block
        release_room(old)
        if old is not None and fresh:
            await old._update_from_block(fresh[0])  # in place for text and code; lists are rebuilt
            shown.append(old if old.is_attached else fresh[0])
            fresh = fresh[1:]
        elif old is not None:
            await old.remove()
        if fresh:
            await self.mount_all(fresh)
        shown += fresh
        if self._continued and shown:
            _join_above(shown[0])  # a rebuilt list lost its seam
        if len(groups) > 1:  # the open block is the last one now
            self._open = "".join(self._open.splitlines(keepends=True)[groups[-1][0] :])
            self._continued = False
        self._open_block = shown[-1] if built[-1] else None
        if self._open_block is not old:
            _keep_room(self._open_block)

    async def _update_in_place(self, tokens: list[Token]) -> bool:
        """The common frame: the open paragraph, code block or list grew. New content for its
        widgets, without building (and mounting) widgets to take it from: that costs more than
        the parse, for a list many times more."""
        block, first = self._open_block, tokens[0]
        if isinstance(block, MarkdownList) and first.type == block._token.type:
            built = self._build(tokens)
            return len(built) == 1 and isinstance(built[0], MarkdownList) and await _grow_list(block, built[0])
        if isinstance(block, _QuietParagraph) and first.type == "paragraph_open" and len(tokens) == 3:
            block._inline_token = tokens[1]
            block.set_content(block._token_to_content(tokens[1]), open_block=True)
            return True
        if isinstance(block, _QuietFence) and first.type == "fence" and first.info == block.lexer:
            block.code = first.content.rstrip()
            block._highlighted_code = block.highlight(
                block.code, block.lexer, ansi=self.app.native_ansi_color, dark=self.app.current_theme.dark
            )
            block.set_content(block._highlighted_code, open_block=True)
            return True
        return False

    async def _cut_open(self) -> None:
        """Split a long open block: its widget keeps the part above (sealed), a new one the tail."""
        parser = self._parser()
        self.parsed_chars += len(self._open)
        block = self._open_block
        cut = find_cut(self._open, parser.parse(self._open))
        if cut is None or block is None:
            return
        rest = self._build(parser.parse(cut.rest))
        if len(rest) != 1:
            return  # not one block: leave the block whole
        if isinstance(block, MarkdownList):  # its rows above the cut are already drawn: drop the others
            kept = len([t for t in parser.parse(cut.sealed) if t.type == "list_item_open" and t.level == 1])
            await block.remove_children(list(block.query_children(Horizontal))[kept:])
        else:  # a paragraph or code: the same widget, shorter (no widget mounted for it)
            sealed = self._build(parser.parse(cut.sealed))
            if len(sealed) != 1 or not _take_content(block, sealed[0]):
                return
        release_room(block)
        _keep_room(rest[0])
        await self.mount(rest[0])
        _join_below(block)
        _join_above(rest[0])
        self._open, self._open_block, self._continued = cut.rest, rest[0], True
        self.cuts += 1

    async def finish(self) -> None:
        """The text is complete: lay it out as one document if it was cut while streaming."""
        release_room(self._open_block)
        self._unpin()
        if self.cuts:
            await self.update(self._text)
