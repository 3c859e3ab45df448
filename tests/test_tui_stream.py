"""An answer streaming into the chat: the work per frame stays bounded however long it gets, the cut
blocks draw as the whole text would, and line breaks show as the model wrote them."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from textual.app import App, ComposeResult
from textual.widgets import Markdown

from llmchat.chat.conversation import Conversation
from llmchat.chat.markdown import hard_line_breaks
from llmchat.chat.store import ConversationStore
from llmchat.tui.app import LLMChatApp
from llmchat.tui.widgets import stream
from llmchat.tui.widgets.messages import AssistantMessage, ChatView
from llmchat.tui.widgets.stream import StreamingMarkdown

STORY = "".join(
    f"Paragraph {i}: the dragon kneads the dough, folds it twice and waits for it to rise by the oven.\n\n"
    for i in range(50)
)
POEM = hard_line_breaks("".join(f"line {i} of a poem that never ends,\n" for i in range(130)))
CODE = "Code:\n\n```python\n" + "".join(f"x{i} = {i}  # step {i}\n" for i in range(200)) + "```\n\nDone.\n"
BULLETS = "A list:\n\n" + "".join(f"- item {i} with a few words\n" for i in range(100)) + "\nEnd.\n"
NUMBERED = "".join(f"{i}. item {i}\n" for i in range(1, 120))
SHAPES = {"story": STORY, "poem": POEM, "code": CODE, "bullets": BULLETS, "numbered": NUMBERED}


class _Doc(App[None]):
    CSS = "Screen { overflow-y: auto; }"

    def __init__(self, widget: Markdown) -> None:
        super().__init__()
        self.widget = widget

    def compose(self) -> ComposeResult:
        yield self.widget


def _pieces(text: str, seed: int = 1) -> list[str]:
    rng, out, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.randint(5, 40)  # a frame's worth of tokens
        out.append(text[i : i + n])
        i += n
    return out


def _blocks(markdown: Markdown) -> list[tuple[str, str]]:
    """What a document draws, block by block: its kind and its text (code included)."""
    kinds = []
    for block in markdown.children:
        kind = next(c.__name__ for c in type(block).__mro__ if c.__name__.startswith("Markdown"))  # Textual's own
        text = getattr(block, "code", None) or getattr(block, "_content", "")
        inner = "".join(str(widget.render()) for widget in block.query("Static"))
        kinds.append((kind, str(getattr(text, "plain", text)) + inner))
    return kinds


@pytest.mark.parametrize("shape", SHAPES)
async def test_the_work_of_a_frame_does_not_grow_with_the_answer(shape: str) -> None:
    """Per write: at most about two open blocks' worth of text parsed and a few widgets built, at the
    start as after thousands of characters; the blocks finished before stay the same widgets."""
    text = SHAPES[shape]
    app = _Doc(StreamingMarkdown())
    async with app.run_test(size=(100, 40)) as pilot:
        doc = app.widget
        parsed, built, finished = [], [], None
        for n, piece in enumerate(pieces := _pieces(text)):
            await doc.write(piece)
            parsed.append(doc.parsed_chars)
            built.append(doc.built_blocks)
            if n == len(pieces) // 2:
                await pilot.pause()
                finished = list(doc.children)[:-2]  # the open block (and a seam's upper part) may change
        bound = 2 * stream.OPEN_LIMIT + 2 * 40
        assert max(parsed) <= bound and max(built) <= 4
        late = parsed[len(parsed) * 3 // 4 :]
        assert max(late) <= bound  # no more work at the end than at the start
        assert finished and all(block.parent is doc for block in finished)
        assert list(doc.children)[: len(finished)] == finished  # the same objects, in place
        if shape != "story":  # one block that never ends: it was cut to keep frames short
            assert doc.cuts > 0
        await doc.finish()
        await pilot.pause()
        assert doc.source == text


@pytest.mark.parametrize("shape", ["poem", "code", "bullets", "numbered"])
async def test_a_cut_block_draws_as_the_whole_text_would(shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mid-stream, seams and all, the screen shows what Textual draws for the whole text at once;
    at the end the document is Textual's own, block for block."""
    monkeypatch.setattr(stream, "OPEN_LIMIT", 200)  # many cuts in a short text
    monkeypatch.setattr(stream, "RUNWAY", 0)  # no room kept below: the screens compare line for line
    text = SHAPES[shape][:1500]
    text = text[: text.rindex("\n") + 1]

    async def screen(widget: Markdown, streamed: bool) -> tuple[list[str], list[tuple[str, str]], int]:
        app = _Doc(widget)
        async with app.run_test(size=(80, 300)) as pilot:
            if isinstance(widget, StreamingMarkdown) and streamed:
                for piece in _pieces(text):
                    await widget.write(piece)
            else:
                await widget.update(text)
            await pilot.pause()
            lines = [strip.text.rstrip() for strip in app.screen._compositor.render_strips()]
            cuts = getattr(widget, "cuts", 0)
            if isinstance(widget, StreamingMarkdown):
                await widget.finish()
                await pilot.pause()
            return lines, _blocks(widget), cuts

    streamed, final, cuts = await screen(StreamingMarkdown(), streamed=True)
    whole, blocks, _ = await screen(Markdown(), streamed=False)
    assert cuts >= 3
    if shape == "numbered":  # numbers are right-aligned to the widest in their part: 9 and 10 may shift
        streamed, whole = [line.strip() for line in streamed], [line.strip() for line in whole]
    assert streamed == whole
    assert final == blocks


async def test_answers_show_the_line_breaks_the_model_wrote(tmp_path: Path) -> None:
    """In a saved answer and in one that streams in: a poem keeps its lines (code keeps its own)."""
    poem = "In the depths of the blue,\nThe sea abides,\nand waits.\n\n```\nkeep  \nthis\n```"
    conversation = Conversation(model={"name": "tiny"})
    conversation.add_user("A poem?")
    conversation.add_assistant(poem)
    app = LLMChatApp(None, store=ConversationStore(tmp_path / "c"), conversation=conversation)
    async with app.run_test(size=(100, 40)) as pilot:
        saved = app.query_one(AssistantMessage)
        streaming = await app.query_one(ChatView).add_assistant()
        for piece in _pieces(poem, seed=3):
            await streaming.append("", piece, [])
        await pilot.pause()
        for answer in (saved, streaming):
            region = answer.query_one(".content", StreamingMarkdown).region
            screen = app.screen._compositor.render_strips()
            drawn = [strip.crop(region.x, region.right).text.strip() for strip in screen[region.y : region.bottom]]
            lines = [line for line in drawn if line]
            assert lines[:3] == ["In the depths of the blue,", "The sea abides,", "and waits."]
            assert "keep" in lines and "this" in lines
            assert answer.content_text == poem  # the text itself is unchanged (saved as the model wrote it)
