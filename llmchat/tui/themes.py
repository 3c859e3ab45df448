"""Colour themes from TOML files: the ones shipped with llmchat and the user's own.

Shipped themes live in the repo's top-level `themes/` folder, which a wheel installs as
`llmchat/themes/`; user themes live in `<config dir>/themes/` and win over a shipped theme of the
same name. A theme file is a few colours and an optional `[variables]` table of Textual theme
variables. A broken user theme is reported and skipped, never a reason not to start.

Textual registers its own twenty-odd themes in every app; llmchat's F10 cycle and theme picker
offer only the themes from these files (`theme_cycle`), which are the ones made for its panels.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from textual.app import App
from textual.color import Color, ColorParseError
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.css.styles import Styles
from textual.theme import BUILTIN_THEMES, Theme

from llmchat.engine.errors import LLMChatError
from llmchat.paths import config_dir
from llmchat.settings import DEFAULT_THEME, THEME_NAME

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "DEFAULT_THEME",
    "ThemeChoices",
    "ThemeError",
    "apply_theme",
    "load_theme_file",
    "load_themes",
    "register_themes",
    "shipped_themes_dir",
    "theme_cycle",
    "user_themes_dir",
]

COLOURS = (
    "primary",
    "secondary",
    "accent",
    "foreground",
    "background",
    "surface",
    "panel",
    "success",
    "warning",
    "error",
)
_FIELDS = ("name", "dark", *COLOURS, "variables")


class ThemeError(LLMChatError):
    """A theme file cannot be read, or a field in it is missing or not valid."""


def shipped_themes_dir() -> Path:
    """`llmchat/themes` in an installed wheel; the repo's `themes/` in a source checkout."""
    packaged = resources.files("llmchat") / "themes"
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "themes"


def user_themes_dir() -> Path:
    return config_dir() / "themes"


def load_theme_file(path: Path) -> Theme:
    """One theme file as a Textual Theme; ThemeError names the file and the field that is wrong."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ThemeError(f"{path}: cannot read the theme ({' '.join(detail.split())})") from None
    return _theme_from(data, path)


def _theme_from(data: dict[str, Any], path: Path) -> Theme:
    unknown = [key for key in data if key not in _FIELDS]
    if unknown:
        raise ThemeError(f"{path}: unknown field {unknown[0]!r} (known: {', '.join(_FIELDS)})")
    name = data.get("name")
    if not isinstance(name, str) or not THEME_NAME.fullmatch(name):
        raise ThemeError(f"{path}: name = {name!r} must be a theme name (letters, digits, - and _)")
    dark = data.get("dark", True)
    if not isinstance(dark, bool):
        raise ThemeError(f"{path}: dark = {dark!r} must be true or false")
    if "primary" not in data:
        raise ThemeError(f"{path}: the colour 'primary' is missing")
    colours: dict[str, Any] = {key: _colour(path, key, data[key]) for key in COLOURS if key in data}
    return Theme(name=name, dark=dark, variables=_variables(path, data.get("variables", {})), **colours)


def _colour(path: Path, key: str, value: Any) -> str:
    """Checked here, because Textual would only fail later, when the theme is applied."""
    try:
        if not isinstance(value, str):
            raise ColorParseError(f"{value!r} is not a string")
        Color.parse(value)
    except ColorParseError:
        raise ThemeError(f'{path}: {key} = {value!r} is not a colour (try "#rrggbb")') from None
    return value


def _variables(path: Path, table: Any) -> dict[str, str]:
    """Textual substitutes these into its CSS when the theme is applied, and a value it cannot
    parse then stops the app; so each known variable must suit the property its default suits."""
    if not isinstance(table, dict):
        raise ThemeError(f"{path}: variables must be a [variables] table")
    kinds = _variable_kinds()
    for key, value in table.items():
        if not isinstance(value, str) or not value.strip() or any(c in value for c in ";{}"):
            raise ThemeError(f"{path}: [variables] {key} = {value!r} must be a CSS value (a non-empty string)")
        kind = kinds.get(key)
        if kind is not None and not _accepts(kind, value):
            raise ThemeError(f"{path}: [variables] {key} = {value!r} is not a valid {kind} value")
    return dict(table)


@functools.cache
def _variable_kinds() -> dict[str, str]:
    """Textual's own theme variables → the CSS property ("color" or "text-style") their values are for."""
    defaults = Theme(name="probe", primary="#808080").to_color_system().generate()
    kinds = {
        name: next((p for p in ("color", "text-style") if _accepts(p, value)), "") for name, value in defaults.items()
    }
    return {name: kind for name, kind in kinds.items() if kind}


def _accepts(css_property: str, value: str) -> bool:
    try:
        Styles.parse(f"{css_property}: {value};", ("theme", css_property))
    except Exception:  # Textual's parser has several error types; any of them is a no
        return False
    return True


def load_themes() -> tuple[list[Theme], list[str]]:
    """Shipped themes, then user themes (same name: the user's wins), and a problem line per bad file."""
    themes: dict[str, Theme] = {}
    problems: list[str] = []
    folders = [shipped_themes_dir()]
    try:
        folders.append(user_themes_dir())
    except LLMChatError as exc:  # the config dir cannot be created: run with the shipped themes
        problems.append(str(exc))
    for folder in folders:
        for path in sorted(folder.glob("*.toml")):
            try:
                theme = load_theme_file(path)
            except ThemeError as exc:
                problems.append(f"{exc}; skipping this theme")
                continue
            themes[theme.name] = theme
    return list(themes.values()), problems


def register_themes(app: App[Any]) -> list[str]:
    """Make every theme available to `app` (then `app.theme = name` works); returns the problems."""
    themes, problems = load_themes()
    for theme in themes:
        app.register_theme(theme)
    return problems


def apply_theme(app: App[Any], name: str) -> str | None:
    """Switch to theme `name`, or to DEFAULT_THEME with a problem line when it is not registered."""
    if name in app.available_themes:
        app.theme = name
        return None
    if DEFAULT_THEME in app.available_themes:
        app.theme = DEFAULT_THEME
    return f"theme {name!r} is not installed (known: {', '.join(theme_cycle(app))}); using {app.theme!r}"


def theme_cycle(app: App[Any]) -> list[str]:
    """The themes F10 steps through: those registered from theme files (llmchat's, then the
    user's), not Textual's built-ins; a user theme that took a built-in's name is the user's."""
    ours = [name for name, theme in app.available_themes.items() if BUILTIN_THEMES.get(name) is not theme]
    return sorted(ours, key=lambda name: (not name.startswith("llmchat"), name))


class ThemeChoices(Provider):
    """The command palette's theme list (Textual's own lists its built-ins too). Picking one runs
    the app's `use_theme` action, so the choice is applied and saved the way F10's is."""

    def _choices(self) -> list[tuple[str, Callable[[], Any]]]:
        app = self.app
        return [(name, functools.partial(app.run_action, f"use_theme({name!r})")) for name in theme_cycle(app)]

    async def discover(self) -> Hits:
        for name, choose in self._choices():
            yield DiscoveryHit(name, choose, help="the current theme" if name == self.app.theme else None)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, choose in self._choices():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), choose, text=name)
