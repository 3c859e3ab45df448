"""Themes: the shipped TOML files, user themes in the config dir, and registering them on a real App."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from textual.app import App, ComposeResult
from textual.widgets import Footer, Input, Markdown, Static

from llmchat.settings import DEFAULT_THEME
from llmchat.tui import themes
from llmchat.tui.themes import ThemeError, apply_theme, load_theme_file, load_themes, register_themes

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
SHIPPED = {"llmchat-dark", "llmchat-light", "llmchat-high-contrast"}


def relative_luminance(hex_colour: str) -> float:
    """WCAG 2.x relative luminance of "#rrggbb"."""
    digits = hex_colour.lstrip("#")
    assert len(digits) == 6, hex_colour

    def linear(channel: int) -> float:
        c = channel / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(int(digits[i : i + 2], 16)) for i in (0, 2, 4))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    high, low = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def shipped_file(name: str) -> dict[str, object]:
    return tomllib.loads((REPO / "themes" / f"{name}.toml").read_text(encoding="utf-8"))


def user_theme(llmchat_dirs: dict[str, Path], file_name: str, text: str) -> Path:
    folder = llmchat_dirs["config"] / "themes"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name
    path.write_text(text, encoding="utf-8")
    return path


GOOD = 'name = "{name}"\ndark = true\nprimary = "#112233"\nbackground = "#000000"\nforeground = "#eeeeee"\n'


# --- the shipped themes --------------------------------------------------------------------------------


def test_the_wcag_helper_matches_known_ratios() -> None:
    assert contrast("#000000", "#ffffff") == pytest.approx(21.0)
    assert contrast("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)


def test_shipped_themes_load_with_distinct_names() -> None:
    assert themes.shipped_themes_dir() == REPO / "themes"  # a source checkout: the top-level folder
    files = sorted(themes.shipped_themes_dir().glob("*.toml"))
    loaded = [load_theme_file(path) for path in files]
    names = [theme.name for theme in loaded]
    assert len(names) == len(set(names)) >= 3
    assert set(names) >= SHIPPED and DEFAULT_THEME in names
    assert all(path.stem == theme.name for path, theme in zip(files, loaded))
    assert any(not theme.dark for theme in loaded)
    assert any("high-contrast" in name for name in names)


def test_load_themes_returns_every_shipped_theme_without_problems() -> None:
    loaded, problems = load_themes()
    assert problems == []
    assert {theme.name for theme in loaded} >= SHIPPED


@pytest.mark.parametrize(("name", "minimum"), [("llmchat-light", 7.0), ("llmchat-high-contrast", 15.0)])
def test_text_contrast(name: str, minimum: float) -> None:
    data = shipped_file(name)
    assert contrast(str(data["foreground"]), str(data["background"])) >= minimum


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_accent_colour_is_readable_on_the_background(name: str) -> None:
    data = shipped_file(name)
    for key in ("primary", "secondary", "accent", "success", "warning", "error"):
        assert contrast(str(data[key]), str(data["background"])) >= 4.5, key


def test_the_light_theme_is_dark_text_on_a_light_background() -> None:
    data = shipped_file("llmchat-light")
    assert data["dark"] is False
    assert relative_luminance(str(data["background"])) > 0.8 > 0.05 > relative_luminance(str(data["foreground"]))


def test_high_contrast_is_white_on_pure_black() -> None:
    data = shipped_file("llmchat-high-contrast")
    assert str(data["background"]).lower() == "#000000" and str(data["foreground"]).lower() == "#ffffff"


# --- theme files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('name = "x"\nprimary = "#12345"\n', "primary"),
        ('name = "x"\nprimary = "#123456"\nbackground = "darkish"\n', "background"),
        ('name = "x"\nprimary = "#123456"\nerror = 3\n', "error"),
        ('name = "x"\nbackground = "#000000"\n', "'primary' is missing"),
        ('primary = "#123456"\n', "name"),
        ('name = "my theme"\nprimary = "#123456"\n', "name"),
        ('name = "x"\nprimary = "#123456"\ndark = "yes"\n', "dark"),
        ('name = "x"\nprimary = "#123456"\nbackgroud = "#000000"\n', "unknown field 'backgroud'"),
        ('name = "x"\nprimary = "#123456"\nvariables = 3\n', "variables"),
        ('name = "x"\nprimary = "#123456"\n[variables]\n"footer-key-foreground" = "notacolor"\n', "footer-key"),
        ('name = "x"\nprimary = "#123456"\n[variables]\n"link-style" = "wobbly"\n', "link-style"),
        ('name = "x"\nprimary = "#123456"\n[variables]\n"text" = "#fff; x: y"\n', "text"),
        ('name = "x"\nprimary = "#123456"\n[variables]\n"my-var" = 3\n', "my-var"),
        ('name = "x"\nprimary = [\n', "cannot read"),
    ],
)
def test_a_broken_theme_file_names_the_file_and_the_field(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ThemeError) as caught:
        load_theme_file(path)
    assert str(path) in str(caught.value) and needle in str(caught.value)


def test_a_minimal_theme_file_is_enough(tmp_path: Path) -> None:
    path = tmp_path / "tiny.toml"
    path.write_text('name = "tiny"\nprimary = "#123456"\n[variables]\n"my-var" = "anything"\n', encoding="utf-8")
    theme = load_theme_file(path)
    assert (theme.name, theme.primary, theme.dark, theme.background) == ("tiny", "#123456", True, None)
    assert theme.variables == {"my-var": "anything"}


# --- user themes ---------------------------------------------------------------------------------------


def test_user_themes_are_found_and_override_shipped_ones(llmchat_dirs: dict[str, Path]) -> None:
    assert themes.user_themes_dir() == llmchat_dirs["config"] / "themes"
    user_theme(llmchat_dirs, "mine.toml", GOOD.format(name="mine"))
    user_theme(llmchat_dirs, "dark.toml", GOOD.format(name="llmchat-dark").replace("#000000", "#010203"))
    loaded, problems = load_themes()
    assert problems == []
    by_name = {theme.name: theme for theme in loaded}
    assert len(by_name) == len(loaded)
    assert by_name["mine"].primary == "#112233"
    assert by_name["llmchat-dark"].background == "#010203"  # the user's, not the shipped one
    assert set(by_name) >= SHIPPED


def test_broken_user_themes_are_reported_and_skipped(llmchat_dirs: dict[str, Path]) -> None:
    bad_colour = user_theme(llmchat_dirs, "a-bad-colour.toml", GOOD.format(name="bad").replace("#112233", "#12"))
    bad_toml = user_theme(llmchat_dirs, "b-bad-toml.toml", 'name = "worse"\nprimary = \n')
    user_theme(llmchat_dirs, "c-good.toml", GOOD.format(name="good"))
    loaded, problems = load_themes()
    names = {theme.name for theme in loaded}
    assert "good" in names and names >= SHIPPED and not {"bad", "worse"} & names
    assert len(problems) == 2
    assert bad_colour.name in problems[0] and "primary" in problems[0]
    assert bad_toml.name in problems[1]


# --- on a real Textual app -----------------------------------------------------------------------------


class ThemedApp(App[None]):
    """Widgets whose CSS uses the theme variables, so a bad theme would break the stylesheet."""

    CSS = "Static { color: $text-muted; background: $panel; border: round $primary; }"

    def compose(self) -> ComposeResult:
        yield Static("hello")
        yield Input("typed")
        yield Markdown("# Title\n\n[a link](https://example.org)")
        yield Footer()


async def test_registered_themes_can_be_switched_to(llmchat_dirs: dict[str, Path]) -> None:
    user_theme(llmchat_dirs, "broken.toml", "name = [")
    app = ThemedApp()
    problems = register_themes(app)
    assert len(problems) == 1 and "broken.toml" in problems[0]
    async with app.run_test() as pilot:
        for name in sorted(SHIPPED):
            app.theme = name
            await pilot.pause()
            expected = str(shipped_file(name)["background"]).lower()
            assert app.theme == name and app.theme_variables["background"].lower() == expected
        app.theme = "llmchat-light"
        await pilot.pause()
        assert app.theme_variables["background"].lower() == str(shipped_file("llmchat-light")["background"]).lower()
        assert app.current_theme.dark is False


async def test_apply_theme_falls_back_to_the_default_for_an_unknown_name() -> None:
    app = ThemedApp()
    register_themes(app)
    async with app.run_test() as pilot:
        assert apply_theme(app, "llmchat-high-contrast") is None
        await pilot.pause()
        assert app.theme == "llmchat-high-contrast"
        problem = apply_theme(app, "no-such-theme")
        await pilot.pause()
        assert app.theme == DEFAULT_THEME
        assert problem is not None and "no-such-theme" in problem and DEFAULT_THEME in problem


async def test_f10_cycles_llmchats_themes_and_the_users_not_textuals(
    llmchat_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Textual registers twenty-odd themes of its own; F10 steps through the shipped ones and the
    user's (a user theme may even take a built-in's name), back to the start, and saves each."""
    from textual.theme import BUILTIN_THEMES

    from llmchat.chat.store import ConversationStore
    from llmchat.settings import load_settings
    from llmchat.tui.app import LLMChatApp

    user_theme(llmchat_dirs, "mine.toml", GOOD.format(name="mine"))
    user_theme(llmchat_dirs, "nord.toml", GOOD.format(name="nord"))  # the user's "nord", not Textual's
    app = LLMChatApp(None, store=ConversationStore(tmp_path / "c"))
    async with app.run_test(size=(100, 30)) as pilot:
        assert len(app.available_themes) > len(SHIPPED) + 2  # Textual's are registered too
        start, seen = app.theme, []
        for _ in range(len(SHIPPED) + 2):
            await pilot.press("f10")
            seen.append(app.theme)
            assert load_settings()[0].theme == app.theme
        assert seen[-1] == start and len(set(seen)) == len(seen)
        assert set(seen) == SHIPPED | {"mine", "nord"}
        assert app.available_themes["nord"] is not BUILTIN_THEMES["nord"]
        assert not set(seen) & (set(BUILTIN_THEMES) - {"nord"})


# --- packaging -----------------------------------------------------------------------------------------


def test_pyproject_ships_the_themes_and_every_package() -> None:
    """The package list is explicit (see pyproject.toml), so a new subpackage must be added to it."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    on_disk = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "llmchat").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert on_disk | {"llmchat.themes"} == set(setuptools["packages"])
    assert setuptools["package-dir"]["llmchat.themes"] == "themes"
    assert "*.toml" in setuptools["package-data"]["llmchat.themes"]
