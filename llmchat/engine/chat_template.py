"""Chat templates: render a conversation to prompt text exactly as transformers does.

A model package ships its prompt format as a Jinja template. The text must match what
`tokenizer.apply_chat_template(..., tokenize=False)` produces in transformers, byte for byte, or the
model sees a prompt it was never trained on. So this module rebuilds transformers' environment:

- `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with `loopcontrols` and a
  `{% generation %}` block (transformers uses it for training masks; here it just renders its body);
- transformers' `tojson` filter, `raise_exception`, `strftime_now`, and its hardened `dict` and
  `namespace` globals;
- its preparation of the inputs: keys whose value is None are dropped from messages, everything is
  rebuilt from plain JSON types, and a message's reasoning is copied to both `reasoning_content` and
  `thinking`;
- its loading and selection of named templates (`ChatTemplates`) and of the special-token variables
  (`read_special_tokens`).

Templates come from the internet and are untrusted code: the sandbox keeps them away from Python
internals, and every failure, at parse or render time, becomes a `TemplateError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmchat.engine.errors import TemplateError
from llmchat.engine.jsonfile import read_json_object

Clock = Callable[[], datetime]

# The named special tokens transformers passes to every template (`tokenizer.special_tokens_map`).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Names a message's reasoning goes by; transformers fills the first and `thinking` from whichever is set.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
LEGACY_TEMPLATE_FILE = "chat_template.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


class ChatTemplateError(TemplateError):
    """A template failure that keeps what went wrong apart from where.

    `kind` is the original exception's type name ("TemplateError" for `raise_exception`,
    "SecurityError", "TypeError", "TemplateSyntaxError", ...), `detail` its message and `line` the
    template line, when known: the conformance data records errors as "kind: detail".
    """

    def __init__(self, template_name: str, kind: str, detail: str, line: int | None) -> None:
        where = f" (line {line})" if line is not None else ""
        if kind == "TemplateError":  # the template's own `raise_exception`: its words are for the user
            message = f"chat template {template_name!r} rejected the conversation{where}: {detail}"
        else:
            message = f"chat template {template_name!r} failed{where}: {kind}: {detail}"
        super().__init__(message)
        self.kind = kind
        self.detail = detail
        self.line = line


# --- the Jinja environment ------------------------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body, in its own scope like transformers'."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateDict:
    """The `dict` global: builds dicts without exposing the `dict` type itself to the template."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """The `namespace` global: refuses underscore names, which could reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]  # Jinja's own trick, so that `namespace(self=1)` works
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_namespace_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_namespace_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_namespace_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}. "
            "Please rename the attribute."
        )


def _raise_exception(message: str) -> None:
    """Templates call this to refuse a conversation; the message reaches the user."""
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson`: plain `json.dumps`, without Jinja's HTML escaping, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _build_environment(now: Clock) -> ImmutableSandboxedEnvironment:
    """One environment per template, because `strftime_now` reads that template's clock."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def template_variables(source: str) -> set[str]:
    """The variables a template reads without defining them (empty if it does not parse)."""
    try:
        return set(jinja2.meta.find_undeclared_variables(_build_environment(datetime.now).parse(source)))
    except jinja2.TemplateSyntaxError:
        return set()


def _template_line(exc: BaseException) -> int | None:
    """The template line an exception was raised at: Jinja rewrites tracebacks to show it."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


# --- preparing the inputs -------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Rebuild `value` from exact JSON types, as transformers does, so the sandbox only sees data.

    Subclasses of str/int/float (enums...) lose their extra methods; anything else becomes an inert
    "<TypeName>" placeholder.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return f"<{type(value).__name__}>"


def _prepare_message(message: Any) -> dict:
    """Drop None values (templates handle a missing key, not None) and alias the reasoning fields."""
    if not isinstance(message, Mapping):
        raise TemplateError(f"chat messages must be dicts, but got {message!r}")
    message = {key: value for key, value in _plain(message).items() if value is not None}
    reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
    if reasoning is None:
        return message
    # transformers' exact key order: `thinking` first unless present, `reasoning_content` last unless present
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _prepare_dicts(what: str, items: list[dict] | None) -> list[dict] | None:
    """Tools and documents are lists of dicts (JSON schemas, {"title", "text"}), or None."""
    if items is None:
        return None
    for item in items:
        if not isinstance(item, Mapping):
            raise TemplateError(f"{what} must be dicts, but got {item!r}")
    return _plain(list(items))


# --- one template ---------------------------------------------------------------------------------


class ChatTemplate:
    """One compiled chat template, ready to render conversations."""

    def __init__(
        self,
        source: str,
        *,
        special_tokens: dict[str, str] | None = None,
        name: str = "default",
        now: Clock = datetime.now,
    ) -> None:
        self.source = source
        self.name = name
        self.special_tokens = dict(special_tokens or {})
        self._template = self._compile(source, now)

    def _compile(self, source: str, now: Clock) -> jinja2.Template:
        try:
            return _build_environment(now).from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ChatTemplateError(self.name, type(exc).__name__, exc.message or str(exc), exc.lineno) from exc

    def render(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **variables: Any,
    ) -> str:
        """The prompt text for `messages`; special tokens are variables, and `variables` override them."""
        if not messages:
            raise TemplateError("cannot render an empty conversation: give at least one message")
        context = {
            **_plain({**self.special_tokens, **variables}),
            "messages": [_prepare_message(message) for message in messages],
            "tools": _prepare_dicts("tools", tools),
            "documents": _prepare_dicts("documents", documents),
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(**context)
        except Exception as exc:  # the template is foreign code: whatever it raises is its failure
            raise ChatTemplateError(self.name, type(exc).__name__, str(exc), _template_line(exc)) from exc


_PROBE_SYSTEM, _PROBE_USER = "llmchat-probe-system-7f3a", "llmchat-probe-user-7f3a"


def default_system_prompt(template: ChatTemplate) -> str | None:
    """The system prompt `template` writes by itself when a conversation has none, or None.

    Some templates fill the system turn when it is missing (SmolLM2: "You are a helpful AI
    assistant named SmolLM, trained by Hugging Face"; Qwen2.5: "You are Qwen, …"), so an empty
    system prompt is not "none" for them. Found by rendering one user message with and without a
    probe system message: whatever stands, without it, where the probe's text stood is the default.
    A template that prepends the system text to the user's turn, or keeps a fixed preamble (the
    date lines of Llama 3), leaves nothing there: no default. A template that fails: None.
    """
    user = {"role": "user", "content": _PROBE_USER}
    try:
        with_system = template.render([{"role": "system", "content": _PROBE_SYSTEM}, user], add_generation_prompt=False)
        without = template.render([user], add_generation_prompt=False)
    except TemplateError:
        return None
    if with_system.count(_PROBE_SYSTEM) != 1:
        return None  # the template drops a system message (or repeats it): nothing to compare
    before, after = with_system.split(_PROBE_SYSTEM)
    if len(without) < len(before) + len(after) or not (without.startswith(before) and without.endswith(after)):
        return None
    default = without[len(before) : len(without) - len(after)].strip()
    return default or None


# --- the templates a package ships ----------------------------------------------------------------


class ChatTemplates:
    """The named templates of one model package, chosen between like transformers' `get_chat_template`."""

    def __init__(self, templates: dict[str, str]) -> None:
        self.templates = templates

    def get(
        self,
        name: str | None = None,
        *,
        tools: bool = False,
        special_tokens: dict[str, str] | None = None,
        now: Clock = datetime.now,
    ) -> ChatTemplate:
        """The template called `name`; without one, `tool_use` when tools are given, else `default`.

        `tools` means "the request carries a tools list": transformers picks `tool_use` for any
        `tools` that is not None, even an empty list.
        """
        chosen = name if name is not None else self._default_name(tools)
        if chosen not in self.templates:
            raise TemplateError(f"no chat template named {chosen!r}; this model has {self._names()}")
        return ChatTemplate(self.templates[chosen], special_tokens=special_tokens, name=chosen, now=now)

    def _default_name(self, tools: bool) -> str:
        if tools and "tool_use" in self.templates:
            return "tool_use"
        if "default" in self.templates:
            return "default"
        raise TemplateError(
            f"this model has several chat templates and none is the default: pick one of {self._names()}"
        )

    def _names(self) -> str:
        return ", ".join(sorted(self.templates))

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTemplates | None:
        """The templates in a model folder, or None when it has none.

        Precedence follows transformers' tokenizer loading: template files (`chat_template.jinja` as
        "default", `additional_chat_templates/NAME.jinja`) replace whatever tokenizer_config.json holds;
        then tokenizer_config.json's `chat_template`; the processors' legacy `chat_template.json` (which
        the tokenizer never reads) is only a last resort, for packages that ship nothing else.
        """
        folder = Path(folder)
        templates = (
            _templates_from_files(folder)
            or _templates_from_json(folder / TOKENIZER_CONFIG_FILE)
            or _templates_from_json(folder / LEGACY_TEMPLATE_FILE)
        )
        return cls(templates) if templates else None


def _templates_from_files(folder: Path) -> dict[str, str]:
    templates = {}
    extra_dir = folder / TEMPLATE_DIR
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = _read_text(path)
    if (folder / TEMPLATE_FILE).is_file():
        templates["default"] = _read_text(folder / TEMPLATE_FILE)
    return templates


def _templates_from_json(path: Path) -> dict[str, str]:
    """`chat_template` of a JSON file: one template, or a list of {"name", "template"}."""
    value = (read_json_object(path, TemplateError) or {}).get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(_is_named_template(entry) for entry in value):
        return {entry["name"]: entry["template"] for entry in value}
    raise TemplateError(f"{path}: chat_template must be a string or a list of {{'name', 'template'}} entries")


def _is_named_template(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("template"), str)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TemplateError(f"cannot read chat template {path}: {exc}") from exc


# --- special tokens -------------------------------------------------------------------------------


def read_special_tokens(folder: Path) -> dict[str, str]:
    """`bos_token`, `eos_token`, ... as strings, the values transformers passes to templates.

    Like transformers, special_tokens_map.json is a legacy file: it is read, and overrides
    tokenizer_config.json, only when the config has no `added_tokens_decoder`.
    """
    folder = Path(folder)
    config = read_json_object(folder / TOKENIZER_CONFIG_FILE, TemplateError) or {}
    sources = [config]
    if "added_tokens_decoder" not in config:
        sources.append(read_json_object(folder / SPECIAL_TOKENS_MAP_FILE, TemplateError) or {})
    tokens: dict[str, str] = {}
    for source in sources:
        for name in (name for name in SPECIAL_TOKEN_NAMES if name in source):
            text = _token_text(source[name])
            if text is None:
                tokens.pop(name, None)  # a later null clears the token, as in transformers
            else:
                tokens[name] = text
    return tokens


def _token_text(value: Any) -> str | None:
    """A token is a string, or an AddedToken-style dict whose text is under "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
