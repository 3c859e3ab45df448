"""Line breaks as the model wrote them (`chat.markdown`): the conversion, and the Markdown export."""

from __future__ import annotations

import random
import re

from markdown_it import MarkdownIt

from llmchat.chat.conversation import Conversation
from llmchat.chat.markdown import LineBreaks, hard_line_breaks
from llmchat.chat.transcript import to_markdown

POEM = "In the depths of the blue,\nThe sea abides,\nand waits."
# Everything Markdown must keep as it is: headings, lists, a table, code (fenced and indented), a quote.
BLOCKS = """# Title
Setext heading
==============

- one
- two
  continued

1. first
2. second

| a | b |
|---|---|
| 1 | 2 |

```python
x = 1
y = 2
```

~~~
a ``` inside
~~~

> quoted line
> next line

    indented code
    more

Ends with a break\\
already  
done
"""
MD = MarkdownIt("gfm-like")


def _html(text: str) -> str:
    return MD.render(text)


def test_single_newlines_of_prose_become_line_breaks() -> None:
    assert _html(POEM) == "<p>In the depths of the blue,\nThe sea abides,\nand waits.</p>\n"  # one line, drawn
    broken = "<p>In the depths of the blue,<br />\nThe sea abides,<br />\nand waits.</p>\n"
    assert _html(hard_line_breaks(POEM)) == broken


def test_code_headings_lists_tables_and_quotes_are_left_as_they_are() -> None:
    before, after = _html(BLOCKS), _html(hard_line_breaks(BLOCKS))
    # The only difference: a break in the list item and in the quote, where a soft break was.
    assert after.count("<br />") - before.count("<br />") == 2
    assert re.sub(r"<br />\n", "\n", after) == re.sub(r"<br />\n", "\n", before)
    for code in ("x = 1\ny = 2\n", "a ``` inside\n", "indented code\nmore\n"):
        assert code in after  # no trailing spaces added to code
    assert "<h1>Setext heading</h1>" in after and "<table>" in after


def test_streamed_in_pieces_it_converts_the_same() -> None:
    whole = hard_line_breaks(BLOCKS + POEM)
    rng = random.Random(7)
    for _ in range(20):
        breaks, out, i = LineBreaks(), [], 0
        while i < len(BLOCKS + POEM):
            n = rng.randint(1, 9)
            out.append(breaks.feed((BLOCKS + POEM)[i : i + n]))
            i += n
        assert "".join(out) == whole


def test_the_markdown_export_keeps_the_answers_line_breaks() -> None:
    conversation = Conversation(model={"name": "tiny"})
    conversation.add_user("A poem about the sea,\nplease.")
    conversation.add_assistant(POEM + "\n\n```\ncode line\nnext\n```\n", reasoning="Think:\nshort lines.")
    html = _html(to_markdown(conversation))
    assert "In the depths of the blue,<br />\nThe sea abides,<br />" in html
    assert "A poem about the sea,<br />\nplease." in html
    assert "Think:<br />\nshort lines." in html
    assert "<code>code line\nnext\n</code>" in html
