"""Thinking kept apart from the answer; model kinds read from what a package ships."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llmchat
from llmchat.engine.chat_template import ChatTemplates
from llmchat.engine.events import Finished, TokenEvent
from llmchat.engine.model_type import detect
from llmchat.engine.reasoning import ReasoningSplitter, prompt_opens_reasoning
from llmchat.engine.tokenizer import Tokenizer
from tests.tiny_models import build_tiny_model


def _feed_all(splitter: ReasoningSplitter, pieces: list[str]) -> tuple[str, str]:
    reasoning = content = ""
    for piece in pieces:
        split = splitter.feed(piece)
        reasoning, content = reasoning + split.reasoning, content + split.content
    split = splitter.flush()
    return reasoning + split.reasoning, content + split.content


@pytest.mark.parametrize(
    "pieces",
    [
        ["<think>", "let me see", "</think>", "Paris."],
        ["<th", "ink>let me", " see</thi", "nk>Par", "is."],
        ["<think>let me see</think>Paris."],
        ["<", "t", "h", "i", "n", "k", ">", "let me see", "<", "/", "think", ">", "Paris."],
    ],
)
def test_markers_split_across_pieces(pieces: list[str]) -> None:
    assert _feed_all(ReasoningSplitter(), pieces) == ("let me see", "Paris.")


def test_answer_that_starts_inside_the_block() -> None:
    assert _feed_all(ReasoningSplitter(inside=True), ["hmm", "</think>", "\n\nYes"]) == ("hmm", "\n\nYes")


def test_a_lone_angle_bracket_is_content_in_the_end() -> None:
    assert _feed_all(ReasoningSplitter(), ["a <", "b"]) == ("", "a <b")
    assert _feed_all(ReasoningSplitter(), ["x <th"]) == ("", "x <th")


def test_prompt_that_opens_the_block() -> None:
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")


QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("qwen3", tmp_path_factory.mktemp("reasoning") / "qwen3")


def _with_template(folder: Path, tmp_path: Path, template: str | None) -> Path:
    import shutil

    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    config = json.loads((copy / "tokenizer_config.json").read_text())
    if template is None:
        config.pop("chat_template", None)
    else:
        config["chat_template"] = template
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    return copy


def test_model_kinds(folder: Path, tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_folder(folder)
    chat = detect(ChatTemplates.from_folder(folder), tokenizer)
    assert (chat.kind, chat.labels, chat.reasoning_markers) == ("chat", ["chat"], None)
    base = detect(None, tokenizer)
    assert (base.kind, base.labels) == ("base", [])
    thinking = detect(ChatTemplates({"default": QWEN3_LIKE}), tokenizer)
    assert thinking.kind == "reasoning" and thinking.labels == ["chat", "reasoning", "tools"]
    assert thinking.template_variables == ("enable_thinking",)
    assert thinking.reasoning_markers == ("<think>", "</think>")


def test_generation_keeps_thinking_apart(folder: Path, tmp_path: Path) -> None:
    model = llmchat.load(
        _with_template(folder, tmp_path, QWEN3_LIKE), device="cpu", dtype="float32", context_length=128
    )
    assert model.traits.reasoning
    text = model.template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    events = list(
        model.generate(
            model.tokenizer.encode(text), sampling=llmchat.SamplingParams(seed=0), max_new_tokens=12, stop_on_eos=False
        )
    )
    done = events[-1]
    assert isinstance(done, Finished)
    # The prompt opened <think>, so everything the tiny model says is reasoning until it closes it.
    assert done.content == "" and done.reasoning == done.text
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert "".join(e.reasoning for e in tokens) + done.tail == done.reasoning
    off = model.template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True, enable_thinking=False)
    events = list(
        model.generate(
            model.tokenizer.encode(off), sampling=llmchat.SamplingParams(seed=0), max_new_tokens=12, stop_on_eos=False
        )
    )
    done = events[-1]
    assert done.reasoning == "" and done.content == done.text
