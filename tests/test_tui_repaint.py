"""What a streaming frame repaints: only the lines that changed (widgets/repaint.py), and no
garbage-collector pauses while an answer streams (worker.CollectorPause)."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

from textual.app import App, ComposeResult
from textual.geometry import Region
from textual.widgets import Static

from llmchat.tui.widgets.repaint import LineRepaint
from llmchat.tui.widgets.stream import StreamingMarkdown
from llmchat.tui.worker import CollectorPause


class _Lines(LineRepaint, Static):
    DEFAULT_CSS = "_Lines { height: 7; border: round white; }"


class _One(App[None]):
    def __init__(self, widget: Static) -> None:
        super().__init__()
        self.widget = widget

    def compose(self) -> ComposeResult:
        yield self.widget


def _screen(app: App[None]) -> list[str]:
    return [strip.text for strip in app.screen._compositor.render_strips()]


def _lines(changed: int | None = None) -> str:
    return "\n".join(f"row {i}" + (" changed" if i == changed else "") for i in range(5))


async def test_a_changed_line_repaints_that_line_alone_and_shows_it() -> None:
    widget = _Lines(_lines())
    app = _One(widget)
    async with app.run_test(size=(40, 10)) as pilot:
        await pilot.pause()
        widget.update_lines(_lines(changed=3))
        # widget coordinates: the border is line 0, so content row 3 is line 4
        assert widget._repaint_regions == {Region(1, 4, 38, 1)}
        await pilot.pause()
        assert any("row 3 changed" in line for line in _screen(app))
        assert not any("row 2 changed" in line for line in _screen(app))
        widget.update_lines(_lines(changed=3))  # the same again: nothing to repaint
        assert not widget._repaint_regions
        await pilot.pause()
        text = "\n".join(f"row {i}" + (" changed" if i in (0, 4) else "") for i in range(5))
        widget.update_lines(text)  # rows 3 (back), 0 and 4 changed: rows 1 and 2 are not repainted
        assert widget._repaint_regions == {Region(1, 1, 38, 1), Region(1, 4, 38, 2)}
        await pilot.pause()
        widget.update_lines(text)
        assert not widget._repaint_regions
        widget.update(_lines())  # Static's own update still draws it all
        await pilot.pause()
        assert not any("changed" in line for line in _screen(app))


async def test_a_new_border_subtitle_repaints_the_bottom_border_only() -> None:
    widget = _Lines(_lines())
    app = _One(widget)
    async with app.run_test(size=(40, 10)) as pilot:
        await pilot.pause()
        widget.set_border_subtitle("token 7")
        assert widget._repaint_regions == {Region(0, 6, 40, 1)}
        assert widget.border_subtitle == "token 7"
        await pilot.pause()
        assert "token 7" in _screen(app)[6]


async def test_text_added_to_the_open_paragraph_repaints_its_last_line() -> None:
    doc = StreamingMarkdown()
    app = _One(doc)
    async with app.run_test(size=(60, 20)) as pilot:
        await doc.write("The dragon woke before the sun and padded down to the village bakery, where")
        await pilot.pause()
        paragraph = doc.children[-1]
        height = paragraph.size.height
        await doc.write(" the old baker kept")
        regions = paragraph._repaint_regions
        assert regions and all(region.height <= 2 for region in regions)  # not the whole paragraph
        assert paragraph.size.height == height  # it grew into the room kept under it: no layout
        await pilot.pause()
        assert "the old baker kept" in " ".join(_screen(app))


def test_the_collector_waits_while_an_answer_streams() -> None:
    assert gc.isenabled()
    pause = CollectorPause()
    pause.pause()
    try:
        assert not gc.isenabled() and gc.get_freeze_count() > 0
        pause.pause()  # twice is once
    finally:
        pause.resume()
    assert gc.isenabled() and gc.get_freeze_count() == 0
    pause.resume()  # and resuming what is not paused does nothing
    assert gc.isenabled()


def test_the_app_holds_the_collector_off_exactly_while_it_generates(tmp_path: Path) -> None:
    """`generating` is the switch: set, the collector waits; cleared (an answer's end, a failure, the
    app closing), it runs again."""
    from llmchat.chat.store import ConversationStore
    from llmchat.tui.app import LLMChatApp

    app = LLMChatApp(None, store=ConversationStore(tmp_path / "c"))
    try:
        assert gc.isenabled() and not app.generating
        app.generating = True
        assert not gc.isenabled()
        app.generating = False
        assert gc.isenabled() and gc.get_freeze_count() == 0
        app.generating = True
        app._switch_interval = sys.getswitchinterval()  # what on_mount keeps (it did not run here)
        app.on_unmount()  # the app closes mid-answer
        assert gc.isenabled()
    finally:
        app._collector.resume()
        app.model_thread.close()
