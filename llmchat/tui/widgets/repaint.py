"""Repaint only the lines of a widget that changed.

Textual repaints the whole of a widget whose content is updated. For the widgets that change on
every frame of a streaming answer that is most of a frame's cost: the open paragraph (its text
grows at the end, yet all its lines were drawn again) and the side panels (a few numbers change,
yet the 37 rows of the KV-cache and top-k panels were drawn again: 5-10 ms a frame on 2 cores).
`LineRepaint.update_lines()` draws the new content at the widget's current size, compares it with
what is on screen line by line, and marks only the lines that differ as dirty.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.geometry import Region
from textual.visual import Visual, VisualType, visualize
from textual.widget import _RenderCache
from textual.widgets import Static
from typing_extensions import Self  # typing.Self is 3.11+

# A mixin, not a subclass of Static: Textual takes a widget's CSS type names from the chain of its
# first bases only, so `class P(LineRepaint, MarkdownParagraph)` stays a MarkdownParagraph to CSS and
# queries, and Static's methods are LineRepaint's to extend.
_Base = Static if TYPE_CHECKING else object


class LineRepaint(_Base):
    """Mixed into a Static: `update_lines()` repaints the lines that changed, not the whole widget."""

    # What update_lines() drew, while it is newer than Static's own content (None: Static's is).
    _drawn: Visual | None = None
    _border_line_only = False  # a refresh() now is for the bottom border's line (set_border_subtitle)

    def update(self, content: VisualType = "", *, layout: bool = True) -> None:
        self._drawn = None
        super().update(content, layout=layout)

    def render(self) -> Visual:  # type: ignore[override]
        return self._drawn if self._drawn is not None else super().render()  # type: ignore[return-value]

    def refresh(self, *regions: Region, repaint: bool = True, layout: bool = False, recompose: bool = False) -> Self:
        if self._border_line_only and not (regions or layout or recompose):
            offset, outer = self.content_offset, self.outer_size
            regions = (Region(-offset.x, outer.height - 1 - offset.y, outer.width, 1),)  # in content coordinates
        return super().refresh(*regions, repaint=repaint, layout=layout, recompose=recompose)

    def set_border_subtitle(self, subtitle: str) -> None:
        """`border_subtitle = subtitle`, repainting the bottom border's line only (Textual repaints
        the whole widget for it: a top-k panel's 30 rows, every token it shows)."""
        if subtitle == self.border_subtitle:
            return
        self._border_line_only = True
        try:
            self.border_subtitle = subtitle
        finally:
            self._border_line_only = False
        self._dirty_regions.clear()  # the content did not change: no need to draw it again

    def update_lines(self, content: VisualType) -> None:
        """`update(content, layout=False)`, repainting only the lines whose drawing changed.

        For content that keeps the widget's size (the caller knows: a fixed-height panel, a block
        with room kept under it); what does not fit is cut, as `update(layout=False)` cuts it.
        """
        size, shown = self._render_cache
        if not self.is_mounted or size != self.size or not shown or not size:
            self.update(content, layout=False)  # nothing drawn at this size yet: draw it all
            return
        visual = visualize(self, content, markup=self._render_markup)
        lines = Visual.to_strips(self, visual, size.width, size.height, self.visual_style)
        if len(lines) != len(shown):  # it did not keep its size after all
            self.update(content, layout=False)
            return
        changed = [y for y, (old, new) in enumerate(zip(shown, lines)) if old != new]
        self._drawn = visual
        # The new drawing goes where render_line() looks for it, so it is not drawn a second time.
        self._render_cache = _RenderCache(size, lines)
        if changed:  # one region per run of changed lines (a panel's numbers move in two places)
            runs: list[list[int]] = []
            for y in changed:
                if runs and y == runs[-1][1]:
                    runs[-1][1] = y + 1
                else:
                    runs.append([y, y + 1])
            self.refresh(*(Region(0, start, size.width, end - start) for start, end in runs))
            self._dirty_regions.clear()  # drawn already (refresh() would have render_line draw it all)
