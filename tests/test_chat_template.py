"""Chat templates must render byte for byte like transformers, or the model gets a foreign prompt.

Three kinds of evidence: recorded conformance cases (shared/conformance/chat_templates), a live
comparison with the installed transformers on conversations made up here, and unit tests for
template selection, the sandbox and error reporting.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from llmchat.engine.chat_template import (
    ChatTemplate,
    ChatTemplateError,
    ChatTemplates,
    read_special_tokens,
)
from llmchat.engine.errors import LLMChatError, TemplateError

CONFORMANCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "conformance" / "chat_templates"
FROZEN = datetime(2024, 7, 26, 12, 0, 0)

Outcome = tuple[str, str]  # ("ok", rendered text) or ("error", "Type: message")


def _frozen_clock(moment: datetime = FROZEN) -> Callable[[], datetime]:
    return lambda: moment


def _render(template: ChatTemplate, messages: list[dict], **kwargs: Any) -> Outcome:
    try:
        return "ok", template.render(messages, **kwargs)
    except ChatTemplateError as exc:
        return "error", f"{exc.kind}: {exc.detail}"


# --- 1. conformance ---------------------------------------------------------------------------------


def _conformance_params() -> list[Any]:
    if not CONFORMANCE_DIR.is_dir():
        reason = f"conformance data not found at {CONFORMANCE_DIR}"
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=reason), id="no-conformance-data")]
    params = []
    for path in sorted(CONFORMANCE_DIR.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for case in data["cases"]:
            params.append(pytest.param(data, case, id=f"{path.stem}::{case['scenario']}"))
    return params


@functools.cache
def _conformance_template(source: str, now: str) -> ChatTemplate:
    """Compiling the big templates takes a while: once per file, not once per case."""
    return ChatTemplate(source, now=_frozen_clock(datetime.fromisoformat(now)))


@pytest.mark.parametrize(("data", "case"), _conformance_params())
def test_conformance(data: dict, case: dict) -> None:
    template = _conformance_template(data["template"], data["now"])
    got = _render(
        template,
        case["messages"],
        tools=case["tools"],
        add_generation_prompt=case["add_generation_prompt"],
        **(case["variables"] or {}),
    )
    expected = ("ok", case["expected"]) if "expected" in case else ("error", case["expected_error"])
    assert got == expected


def test_conformance_data_present() -> None:
    """Guard against the parametrized test silently collecting nothing."""
    if not CONFORMANCE_DIR.is_dir():
        pytest.skip(f"conformance data not found at {CONFORMANCE_DIR}")
    assert len(list(CONFORMANCE_DIR.glob("*.json"))) >= 30


# --- 2. live cross-check with transformers -----------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current time in a time zone.",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "description": "IANA zone, e.g. Europe/Paris"}},
                "required": ["zone"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "Search the web. Returns «snippets».",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1}},
                "required": ["query"],
            },
        },
    },
]

CONVERSATIONS: dict[str, dict[str, Any]] = {
    "multi_turn": {
        "messages": [
            {"role": "system", "content": "Answer in one line."},
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Another, bigger — please 🙏"},
        ],
    },
    "tools_two_calls": {
        "tools": TOOLS,
        "messages": [
            {"role": "user", "content": "Time in Tokyo, and news about it?"},
            {
                "role": "assistant",
                "content": None,  # as OpenAI-style clients send it: transformers drops None values
                "tool_calls": [
                    {
                        "id": "a1b2c3d4e",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": {"zone": "Asia/Tokyo"}},
                    },
                    {
                        "id": "f5g6h7i8j",
                        "type": "function",
                        "function": {"name": "search", "arguments": {"query": "Tokyo news", "limit": 2}},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "a1b2c3d4e", "name": "get_time", "content": "21:04"},
            {"role": "tool", "tool_call_id": "f5g6h7i8j", "name": "search", "content": '["Snow", "Rain"]'},
        ],
    },
    "reasoning_thinking_on": {
        "variables": {"enable_thinking": True},
        "messages": [
            {"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": "5", "reasoning_content": "Add them."},
            {"role": "user", "content": "Times 4?"},
            {"role": "assistant", "content": "20", "reasoning": "5*4", "name": None},
            {"role": "user", "content": "Minus 1?"},
        ],
    },
    "thinking_off": {
        "variables": {"enable_thinking": False},
        "messages": [{"role": "user", "content": "Say hi."}],
    },
    "no_generation_prompt": {
        "add_generation_prompt": False,
        "messages": [{"role": "user", "content": "Ping"}, {"role": "assistant", "content": "Pong"}],
    },
}

# Exercises the environment itself: tojson options, namespace, dict, loop controls, the generation
# block's scope, strftime_now, documents, and the message keys transformers adds and drops.
FEATURE_TEMPLATE = """\
{%- set ns = namespace(count=0) -%}
{%- set extra = dict(a=1, b=[1, 2]) -%}
Today: {{ strftime_now("%Y-%m-%d %H:%M") }}
{{ extra | tojson(indent=2, sort_keys=True) }}
{% for message in messages %}
{%- if loop.index > 6 %}{% break %}{% endif %}
{%- if message.role == "tool" %}{% continue %}{% endif %}
{%- set ns.count = ns.count + 1 %}
{% generation %}{% set inner = "scoped" %}[{{ message.role }}] {{ message | tojson }}{% endgeneration %}
{{ inner is defined }} {{ message.keys() | list | join(",") }}
{% endfor %}
{% if tools %}{{ tools | tojson(separators=(",", ":")) }}
{{ tools | tojson(ensure_ascii=True) }}{% endif %}
{% if documents %}{% for d in documents %}<doc {{ d.title }}>{{ d.text }}</doc>{% endfor %}{% endif %}
{{ ns.count }} {{ bos_token }}|{{ eos_token }}|{{ enable_thinking | default("unset") }}
{%- if add_generation_prompt %}<assistant>{% endif %}
"""

LIVE_TEMPLATES = [
    "Qwen-Qwen2.5-7B-Instruct",
    "meta-llama-Llama-3.2-3B-Instruct",
    "deepseek-ai-DeepSeek-V3.2",
    "google-gemma-4-31B-it",
    "GLM-4.7-Flash",
    "openbmb-MiniCPM5-1B",
    "Qwen3-Coder",
    "mistralai-Mistral-Nemo-Instruct-2407",
]

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def _template_source(name: str) -> str:
    if name == "feature":
        return FEATURE_TEMPLATE
    path = CONFORMANCE_DIR / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"conformance data not found at {path}")
    return json.loads(path.read_text(encoding="utf-8"))["template"]


@pytest.fixture
def hf_frozen(monkeypatch: pytest.MonkeyPatch) -> Any:
    """transformers' chat_template_utils module, its `strftime_now` clock frozen at FROZEN."""
    ctu = pytest.importorskip("transformers.utils.chat_template_utils")

    class FrozenDatetime(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # noqa: ARG003 - same signature as datetime.now
            return FROZEN

    monkeypatch.setattr(ctu, "datetime", FrozenDatetime)
    return ctu


def _hf_tokenizer(chat_template: str) -> Any:
    """A tiny in-memory tokenizer, to call the real `apply_chat_template` (None dropping and all)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template, **SPECIAL_TOKENS)


def _hf_apply(tokenizer: Any, conversation: dict[str, Any]) -> Outcome:
    try:
        return "ok", tokenizer.apply_chat_template(
            conversation["messages"],
            tools=conversation.get("tools"),
            documents=conversation.get("documents"),
            add_generation_prompt=conversation.get("add_generation_prompt", True),
            tokenize=False,
            **conversation.get("variables", {}),
        )
    except Exception as exc:  # any template failure is an outcome to compare
        return "error", f"{type(exc).__name__}: {exc}"


def _ours(source: str, conversation: dict[str, Any]) -> Outcome:
    template = ChatTemplate(source, special_tokens=SPECIAL_TOKENS, now=_frozen_clock())
    return _render(
        template,
        conversation["messages"],
        tools=conversation.get("tools"),
        documents=conversation.get("documents"),
        add_generation_prompt=conversation.get("add_generation_prompt", True),
        **conversation.get("variables", {}),
    )


@pytest.mark.usefixtures("hf_frozen")
@pytest.mark.parametrize("conversation_name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("template_name", ["feature", *LIVE_TEMPLATES])
def test_matches_transformers_apply_chat_template(template_name: str, conversation_name: str) -> None:
    source = _template_source(template_name)
    conversation = CONVERSATIONS[conversation_name]
    assert _ours(source, conversation) == _hf_apply(_hf_tokenizer(source), conversation)


def test_matches_transformers_render_jinja_template(hf_frozen: Any) -> None:
    """The low-level renderer, with documents and variables overriding special tokens."""
    conversation = {
        "messages": [{"role": "user", "content": "Summarise the docs."}],
        "documents": [{"title": "a", "text": "Alpha."}, {"title": "b", "text": "Beta é."}],
        "tools": TOOLS,
    }
    variables = {**SPECIAL_TOKENS, "bos_token": "<BOS>", "enable_thinking": False}
    rendered, _ = hf_frozen.render_jinja_template(
        conversations=[conversation["messages"]],
        tools=conversation["tools"],
        documents=conversation["documents"],
        chat_template=FEATURE_TEMPLATE,
        add_generation_prompt=True,
        **variables,
    )
    template = ChatTemplate(FEATURE_TEMPLATE, special_tokens=SPECIAL_TOKENS, now=_frozen_clock())
    ours = template.render(
        conversation["messages"],
        tools=conversation["tools"],
        documents=conversation["documents"],
        bos_token="<BOS>",
        enable_thinking=False,
    )
    assert ours == rendered[0]
    assert "<BOS>|</s>|False" in ours


def test_feature_template_shows_transformers_message_rewrites() -> None:
    """Pin the rewrites themselves, so they are checked even without transformers installed."""
    messages = [{"role": "assistant", "content": "5", "reasoning": "r", "tool_calls": None}]
    text = ChatTemplate(FEATURE_TEMPLATE, now=_frozen_clock()).render(messages)
    assert "thinking,role,content,reasoning,reasoning_content" in text
    assert "tool_calls" not in text
    assert "Today: 2024-07-26 12:00" in text
    assert "False thinking" in text  # `{% set %}` inside `{% generation %}` does not leak


# --- 3. named templates, precedence, special tokens ----------------------------------------------


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value), encoding="utf-8")


def _write_tokenizer_json(folder: Path) -> None:
    """Just enough for AutoTokenizer to load the folder."""
    from tokenizers import Tokenizer, models

    vocab = {token: i for i, token in enumerate(["<s>", "</s>", "<unk>", "<pad>"])}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(folder / "tokenizer.json"))


LAYOUTS: dict[str, dict[str, Any]] = {
    "config_string": {"config": "C"},
    "config_list": {"config": [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]},
    "jinja_beats_config": {"config": [{"name": "default", "template": "D"}], "jinja": "J"},
    "jinja_and_extra_files": {"config": "C", "jinja": "J", "extra": {"rag": "R", "tool_use": "T"}},
    "extra_files_replace_config": {"config": "C", "extra": {"rag": "R"}},
}


def _make_layout(folder: Path, layout: dict[str, Any]) -> None:
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    if "config" in layout:
        config["chat_template"] = layout["config"]
    _write_json(folder / "tokenizer_config.json", config)
    if "jinja" in layout:
        (folder / "chat_template.jinja").write_text(layout["jinja"], encoding="utf-8")
    if "extra" in layout:
        (folder / "additional_chat_templates").mkdir()
        for name, text in layout["extra"].items():
            (folder / "additional_chat_templates" / f"{name}.jinja").write_text(text, encoding="utf-8")


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_folder_precedence_matches_autotokenizer(tmp_path: Path, layout_name: str) -> None:
    transformers = pytest.importorskip("transformers")
    _make_layout(tmp_path, LAYOUTS[layout_name])
    _write_tokenizer_json(tmp_path)
    hf_template = transformers.AutoTokenizer.from_pretrained(str(tmp_path)).chat_template
    expected = hf_template if isinstance(hf_template, dict) else {"default": hf_template}
    templates = ChatTemplates.from_folder(tmp_path)
    assert templates is not None
    assert templates.templates == expected


def test_selection_like_get_chat_template(tmp_path: Path) -> None:
    _make_layout(tmp_path, LAYOUTS["jinja_and_extra_files"])
    templates = ChatTemplates.from_folder(tmp_path)
    assert templates is not None
    assert templates.get().source == "J"
    assert templates.get(tools=True).source == "T"
    assert templates.get(tools=True).name == "tool_use"
    assert templates.get("rag", tools=True).source == "R"
    with pytest.raises(TemplateError, match=r"no chat template named 'nope'.*default, rag, tool_use"):
        templates.get("nope")


def test_single_template_serves_tools_too() -> None:
    assert ChatTemplates({"default": "D"}).get(tools=True).source == "D"


def test_no_default_template_is_a_clear_error(tmp_path: Path) -> None:
    """transformers quirk: extra template files alone replace the config's template, leaving no default."""
    _make_layout(tmp_path, LAYOUTS["extra_files_replace_config"])
    templates = ChatTemplates.from_folder(tmp_path)
    assert templates is not None
    with pytest.raises(TemplateError, match=r"none is the default.*rag"):
        templates.get()


def test_legacy_chat_template_json(tmp_path: Path) -> None:
    _write_json(tmp_path / "chat_template.json", {"chat_template": "L"})
    templates = ChatTemplates.from_folder(tmp_path)
    assert templates is not None and templates.templates == {"default": "L"}
    (tmp_path / "chat_template.jinja").write_text("J", encoding="utf-8")
    assert ChatTemplates.from_folder(tmp_path).templates == {"default": "J"}  # type: ignore[union-attr]


def test_folder_without_template(tmp_path: Path) -> None:
    assert ChatTemplates.from_folder(tmp_path) is None
    _write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<s>"})
    assert ChatTemplates.from_folder(tmp_path) is None


@pytest.mark.parametrize("bad", [{"chat_template": 3}, {"chat_template": [{"name": "x"}]}])
def test_malformed_config_template(tmp_path: Path, bad: dict) -> None:
    _write_json(tmp_path / "tokenizer_config.json", bad)
    with pytest.raises(TemplateError, match="chat_template must be"):
        ChatTemplates.from_folder(tmp_path)


def test_unreadable_config(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TemplateError, match=r"tokenizer_config\.json"):
        ChatTemplates.from_folder(tmp_path)


TOKEN_LAYOUTS: dict[str, dict[str, Any]] = {
    "strings_and_added_token_dicts": {
        "config": {
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False},
            "eos_token": "</s>",
            "pad_token": None,
        },
    },
    "legacy_map_overrides_config": {
        "config": {"bos_token": "<s>", "eos_token": "</s>"},
        "map": {"eos_token": {"content": "<pad>", "special": True}, "unk_token": "<unk>", "bos_token": None},
    },
    "map_ignored_with_added_tokens_decoder": {
        "config": {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "added_tokens_decoder": {
                "0": {"content": "<s>", "special": True},
                "1": {"content": "</s>", "special": True},
            },
        },
        "map": {"eos_token": "<pad>", "pad_token": "<pad>"},
    },
}


@pytest.mark.parametrize("layout_name", sorted(TOKEN_LAYOUTS))
def test_special_tokens_match_autotokenizer(tmp_path: Path, layout_name: str) -> None:
    transformers = pytest.importorskip("transformers")
    layout = TOKEN_LAYOUTS[layout_name]
    _write_json(tmp_path / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", **layout["config"]})
    if "map" in layout:
        _write_json(tmp_path / "special_tokens_map.json", layout["map"])
    _write_tokenizer_json(tmp_path)
    expected = transformers.AutoTokenizer.from_pretrained(str(tmp_path)).special_tokens_map
    assert read_special_tokens(tmp_path) == expected


def test_special_tokens_without_files(tmp_path: Path) -> None:
    assert read_special_tokens(tmp_path) == {}


# --- 4. sandbox -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__base__ }}",
        "{{ raise_exception.__globals__['__builtins__'] }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ dict.__class__.__subclasses__() }}",
        "{% set ns = namespace(_private=1) %}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
        "{{ messages.append({'role': 'x'}) }}",
        "{{ messages[0].update(role='x') }}",
        "{{ range(10**9) | list | length }}",
    ],
)
def test_sandbox_blocks_escapes(source: str) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate(source).render(messages)
    assert info.value.kind in {"SecurityError", "UndefinedError", "OverflowError"}
    assert messages == [{"role": "user", "content": "hi"}]


def test_blocked_attribute_prints_nothing() -> None:
    assert ChatTemplate("[{{ ''.__class__ }}]").render([{"role": "user", "content": "x"}]) == "[]"


def test_unknown_objects_reach_the_template_as_placeholders() -> None:
    """Like transformers, only JSON data reaches the sandbox: methods of rich objects stay out of reach."""
    text = ChatTemplate("{{ messages[0].content }}|{{ extra }}").render(
        [{"role": "user", "content": object()}], extra=Path("/")
    )
    assert text == "<object>|<PosixPath>"


# --- 5. errors and API details ---------------------------------------------------------------------


def test_syntax_error_names_problem_and_line() -> None:
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate("line one\n{% if x %}\n{{ oops( }}\n{% endif %}", name="broken")
    error = info.value
    assert isinstance(error, TemplateError) and isinstance(error, LLMChatError)
    assert error.kind == "TemplateSyntaxError"
    assert error.line == 3
    assert "line 3" in str(error) and "'broken'" in str(error) and "TemplateSyntaxError" in str(error)


def test_unclosed_block_is_a_syntax_error() -> None:
    with pytest.raises(ChatTemplateError, match="endfor"):
        ChatTemplate("{% for m in messages %}{{ m }}")


def test_raise_exception_message_preserved() -> None:
    source = (
        "{{ bos_token }}\n"
        "{% if messages[0].role == 'system' %}{{ raise_exception('No system role, sorry!') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate(source).render([{"role": "system", "content": "x"}])
    assert info.value.kind == "TemplateError"
    assert info.value.detail == "No system role, sorry!"
    assert info.value.line == 2
    assert "rejected the conversation (line 2): No system role, sorry!" in str(info.value)


def test_python_errors_inside_templates_become_template_errors() -> None:
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate("{{ messages[0].content + 1 }}").render([{"role": "user", "content": "x"}])
    assert info.value.kind == "TypeError"
    assert "concatenate" in info.value.detail


def test_invalid_inputs() -> None:
    template = ChatTemplate("{{ messages }}")
    with pytest.raises(TemplateError, match="empty conversation"):
        template.render([])
    with pytest.raises(TemplateError, match="messages must be dicts"):
        template.render(["hi"])  # type: ignore[list-item]
    with pytest.raises(TemplateError, match="tools must be dicts"):
        template.render([{"role": "user", "content": "x"}], tools=["get_time"])  # type: ignore[list-item]


def test_variables_override_special_tokens_and_defaults() -> None:
    template = ChatTemplate(
        "{{ bos_token }}{{ eos_token }}{{ add_generation_prompt }}{{ tools }}{{ documents }}",
        special_tokens={"bos_token": "<s>", "eos_token": "</s>"},
    )
    messages = [{"role": "user", "content": "x"}]
    assert template.render(messages) == "<s></s>TrueNoneNone"
    assert template.render(messages, eos_token="<|end|>", add_generation_prompt=False) == "<s><|end|>FalseNoneNone"


def test_clock_is_injectable_and_read_at_render_time() -> None:
    moments = iter([datetime(2025, 1, 2), datetime(2026, 3, 4)])
    template = ChatTemplate('{{ strftime_now("%d %b %Y") }}', now=lambda: next(moments))
    messages = [{"role": "user", "content": "x"}]
    assert template.render(messages) == "02 Jan 2025"
    assert template.render(messages) == "04 Mar 2026"


def test_template_compiled_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    calls = []
    original = ImmutableSandboxedEnvironment.from_string

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ImmutableSandboxedEnvironment, "from_string", counting)
    template = ChatTemplate("{{ messages | length }}")
    for _ in range(3):
        assert template.render([{"role": "user", "content": "x"}]) == "1"
    assert len(calls) == 1


def test_caller_messages_untouched() -> None:
    messages = [{"role": "assistant", "content": "a", "reasoning_content": "r", "name": None}]
    ChatTemplate("{{ messages }}").render(messages)
    assert messages == [{"role": "assistant", "content": "a", "reasoning_content": "r", "name": None}]
