"""Tool calls found in answers: each model family's wrapper, and text that only looks like one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmchat.engine.tool_calls import split_tool_calls, tool_calls_json

WEATHER = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance" / "chat_templates"


def test_hermes_qwen_wrapper_with_text_around() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = split_tool_calls(text)
    assert content == "Let me check."
    assert calls == [WEATHER]


def test_several_hermes_calls_keep_their_order() -> None:
    text = (
        '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call>'
    )
    _, calls = split_tool_calls(text)
    assert [c["function"]["name"] for c in calls] == ["a", "b"]
    assert calls[1]["function"]["arguments"] == {"y": 2}  # a JSON string of arguments is decoded


def test_unfinished_hermes_call_at_the_end_of_a_stopped_answer() -> None:
    _, calls = split_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}')
    assert calls == [WEATHER]


def test_mistral_list() -> None:
    text = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    assert split_tool_calls(text) == ("", [WEATHER])


def test_llama_python_tag_and_bare_json() -> None:
    call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert split_tool_calls("<|python_tag|>" + call) == ("", [WEATHER])
    assert split_tool_calls(call) == ("", [WEATHER])


@pytest.mark.parametrize(
    "text",
    [
        "Use <tool_call> tags to call tools.",  # talks about the wrapper
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '{"name": "Ada", "age": 36}',  # JSON, but not Llama's call shape
        "Plain answer.",
    ],
)
def test_text_that_is_not_a_call_stays_text(text: str) -> None:
    assert split_tool_calls(text) == (text, [])


def test_json_shown_for_one_and_for_several_calls() -> None:
    assert json.loads(tool_calls_json([WEATHER])) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert len(json.loads(tool_calls_json([WEATHER, WEATHER]))) == 2


@pytest.mark.parametrize("name", ["Qwen-Qwen2.5-7B-Instruct", "NousResearch-Hermes-3-Llama-3.1-8B-tool_use"])
def test_calls_read_back_from_what_transformers_rendered(name: str) -> None:
    """The assistant turn a real template renders for a tool call parses back to the same call."""
    path = CONFORMANCE / f"{name}.json"
    if not path.exists():
        pytest.skip("../shared/conformance is not beside this checkout")
    cases = [c for c in json.loads(path.read_text())["cases"] if any(m.get("tool_calls") for m in c["messages"])]
    assert cases
    for case in cases:
        wanted = [m["tool_calls"] for m in case["messages"] if m.get("tool_calls")]
        turns = re.findall(r"<\|im_start\|>assistant\n(.*?)<\|im_end\|>", case["expected"], re.DOTALL)
        found = [split_tool_calls(t)[1] for t in turns if "<tool_call>" in t]
        normalized = [[{"type": "function", "function": c["function"]} for c in calls] for calls in wanted]
        assert found == normalized
