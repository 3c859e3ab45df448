"""The user's settings: settings.toml in the config dir (model, sampling, panels, theme, keys).

Reading is forgiving: a setting that is missing, of the wrong type or out of range falls back to
its default, the good ones are kept, and each problem comes back as a line naming the file and
the key, so the app can show it and still start. Writing is careful: atomic, checked by reading
the new text back, and refused while the existing file does not parse, so a typo never costs the
user what they wrote.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmchat.actions import ACTIONS
from llmchat.engine.errors import LLMChatError
from llmchat.engine.knobs import KNOB
from llmchat.models import RegistryError, toml_string, write_atomic
from llmchat.paths import config_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

SETTINGS_FILE = "settings.toml"
DEFAULT_THEME = "llmchat-dark"
THEME_NAME = re.compile(r"[A-Za-z0-9_-]+")  # becomes a CSS class (-theme-NAME) in Textual

# The rebindable actions (llmchat/actions.py): id → (default key, footer label).
ACTION_KEYS: dict[str, tuple[str, str]] = {action.id: (action.key, action.label) for action in ACTIONS}

_MODIFIERS = frozenset({"ctrl", "shift", "alt", "meta", "super", "hyper"})
_KEY_PART = re.compile(r"[A-Za-z0-9_]+")


class SettingsError(LLMChatError):
    """settings.toml cannot be written (it is broken, or the disk refused)."""


@dataclass(frozen=True)
class Settings:
    """What the user chose; every field's default is what llmchat does without a settings file."""

    model: str | None = None  # a registry name or a path; None: the registry's default
    sampling: dict[str, float | int] = field(default_factory=dict)  # overrides of the model's defaults
    panels: bool = True
    theme: str = DEFAULT_THEME
    keys: dict[str, str] = field(default_factory=dict)  # action id → Textual key(s), only the changed ones


def settings_path() -> Path:
    return config_dir() / SETTINGS_FILE


def key_map(settings: Settings) -> dict[str, str]:
    """Every action's key string (comma-separated alternatives): the user's choice or the default."""
    return {action: settings.keys.get(action, default) for action, (default, _) in ACTION_KEYS.items()}


# ---------------------------------------------------------------------------------------------
# reading


def load_settings(path: Path | None = None) -> tuple[Settings, list[str]]:
    """The settings and a list of problems; never raises for what is in the file."""
    path = path or settings_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return Settings(), []
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return Settings(), [f"{path} cannot be read ({_why(exc)}); using the default settings"]
    return parse_settings(data, str(path))


def parse_settings(data: dict[str, Any], source: str) -> tuple[Settings, list[str]]:
    """Settings from parsed TOML; each bad entry is replaced by its default and reported."""
    problems: list[str] = []

    def report(message: str) -> None:
        problems.append(f"{source}: {message}")

    fields: dict[str, Any] = {}
    for name, value in data.items():
        check = _TOP_LEVEL.get(name)
        if check is None:
            report(f"unknown setting {name!r} (known: {', '.join(_TOP_LEVEL)}); ignoring it")
        elif name in ("sampling", "keys") and not isinstance(value, dict):
            report(f"{name} = {_show(value)} must be a [{name}] table; using the defaults")
        else:
            fields[name] = check(value, report)
    return Settings(**{k: v for k, v in fields.items() if v is not None}), problems


def _scalar(check: Callable[[Any], bool], requirement: str, name: str) -> Callable[[Any, Callable[[str], None]], Any]:
    def parse(value: Any, report: Callable[[str], None]) -> Any:
        if check(value):
            return value
        report(f"{name} = {_show(value)} {requirement}; using the default")
        return None

    return parse


def _parse_sampling(table: dict[str, Any], report: Callable[[str], None]) -> dict[str, float | int]:
    sampling: dict[str, float | int] = {}
    for name, value in table.items():
        knob = KNOB.get(name)  # the same ranges SamplingParams enforces
        if knob is None:
            report(f"[sampling] unknown setting {name!r} (known: {', '.join(KNOB)}); ignoring it")
            continue
        problem = _sampling_type_problem(knob.kind, value) or knob.problem(value)
        if problem:
            report(f"[sampling] {name} = {_show(value)} {problem}; using the default")
        else:
            sampling[name] = knob.kind(value)
    return sampling


def _sampling_type_problem(kind: type, value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "must be a number"
    if kind is int and not isinstance(value, int):
        return "must be a whole number"
    if not math.isfinite(value):
        return "must be a finite number"
    return None


def _parse_keys(table: dict[str, Any], report: Callable[[str], None]) -> dict[str, str]:
    chosen: dict[str, str] = {}
    for action, value in table.items():
        if action not in ACTION_KEYS:
            report(f"[keys] unknown action {action!r} (known: {', '.join(ACTION_KEYS)}); ignoring it")
            continue
        default = ACTION_KEYS[action][0]
        keys = normalize_keys(value) if isinstance(value, str) else None
        if keys is None:
            report(
                f'[keys] {action} = {_show(value)} is not a key like "f3", "ctrl+shift+x" or "f3,ctrl+up"; '
                f"using the default {toml_string(default)}"
            )
        else:
            chosen[action] = keys
    for action, keys, other in _drop_clashes(chosen):
        report(
            f"[keys] {action} = {toml_string(keys)} clashes with {other}'s key; "
            f"using the default {toml_string(ACTION_KEYS[action][0])}"
        )
    return chosen


def normalize_keys(text: str) -> str | None:
    """`text` as Textual key names ("F3, Ctrl+Up" → "f3,ctrl+up"), or None when it is not one.

    Each alternative is modifiers joined by "+" and then one key name; multi-letter names are
    lowercased (Textual's are), a single character keeps its case ("A" is shift+a).
    """
    alternatives: list[str] = []
    for alternative in text.split(","):
        parts = [part.strip() for part in alternative.split("+")]
        if not all(_KEY_PART.fullmatch(part) for part in parts):
            return None
        parts = [part.lower() if len(part) > 1 else part for part in parts]
        *modifiers, key = parts
        if key in _MODIFIERS or not all(m in _MODIFIERS for m in modifiers):
            return None
        normalized = "+".join(parts)
        if normalized not in alternatives:
            alternatives.append(normalized)
    return ",".join(alternatives)


def _drop_clashes(chosen: dict[str, str]) -> list[tuple[str, str, str]]:
    """Remove (in place) the user's keys that another action also has; the later entry yields.

    A reverted action gets its default key back, which can clash in turn, so repeat until no key
    is shared. Defaults never clash among themselves, so this ends.
    """
    dropped: list[tuple[str, str, str]] = []
    while True:
        keys = {action: default for action, (default, _) in ACTION_KEYS.items()} | chosen
        clash = next(((a, o) for a in reversed(chosen) if (o := _shares_key(a, keys))), None)
        if clash is None:
            return dropped
        action, other = clash
        dropped.append((action, chosen.pop(action), other))


def _shares_key(action: str, keys: dict[str, str]) -> str | None:
    mine = set(keys[action].split(","))
    return next((other for other, value in keys.items() if other != action and mine & set(value.split(","))), None)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


_TOP_LEVEL: dict[str, Callable[[Any, Callable[[str], None]], Any]] = {
    "model": _scalar(_is_name, "must be a model name or path (a non-empty string)", "model"),
    "theme": _scalar(
        lambda v: isinstance(v, str) and bool(THEME_NAME.fullmatch(v)),
        "must be a theme name (letters, digits, - and _)",
        "theme",
    ),
    "panels": _scalar(lambda v: isinstance(v, bool), "must be true or false", "panels"),
    "sampling": _parse_sampling,
    "keys": _parse_keys,
}


def _show(value: Any) -> str:
    """A value as it would look in the file, for problem lines."""
    if isinstance(value, str):
        return toml_string(value) if value.isprintable() else repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _why(exc: BaseException) -> str:
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return " ".join(detail.split())


# ---------------------------------------------------------------------------------------------
# writing


def render_settings(settings: Settings) -> str:
    """The settings as TOML; None and empty tables are left out."""
    lines = ["# llmchat settings. Keys: Textual key names, comma-separated alternatives.", ""]
    if settings.model is not None:
        lines.append(f"model = {_string(settings.model)}")
    lines += [f"theme = {_string(settings.theme)}", f"panels = {_show(settings.panels)}"]
    if settings.sampling:
        lines += ["", "[sampling]", *(f"{k} = {_number(v)}" for k, v in settings.sampling.items())]
    if settings.keys:
        lines += ["", "[keys]", *(f"{k} = {_string(v)}" for k, v in settings.keys.items())]
    return "\n".join(lines) + "\n"


def _string(value: str) -> str:
    try:
        return toml_string(value)
    except RegistryError:  # a path with bytes that are not UTF-8
        raise SettingsError(f"{value!r} is not valid UTF-8 and cannot be stored in {SETTINGS_FILE}") from None


def _number(value: Any) -> str:
    return repr(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _show(value)


def save_settings(settings: Settings, path: Path | None = None) -> None:
    """Write the settings atomically; refuse to replace a file that does not parse."""
    path = path or settings_path()
    _require_overwritable(path)
    text = render_settings(settings)
    _, problems = parse_settings(tomllib.loads(text), str(path))
    if problems:
        raise SettingsError(f"not saving invalid settings: {problems[0]}")
    try:
        write_atomic(path, text)
    except RegistryError as exc:
        raise SettingsError(str(exc)) from None


def _require_overwritable(path: Path) -> None:
    try:
        tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(
            f"{path} cannot be read ({_why(exc)}); fix or delete it, llmchat will not overwrite it"
        ) from None


def update_settings(path: Path | None = None, **changes: Any) -> Settings:
    """Load, change some fields, save: how the app remembers a choice (the theme, the panels)."""
    settings, _ = load_settings(path)
    updated = dataclasses.replace(settings, **changes)
    save_settings(updated, path)
    return updated
