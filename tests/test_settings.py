"""settings.toml: forgiving reads (defaults for what is broken, a problem line for each), careful writes.

Every test runs against the per-test config dir from conftest's autouse fixture (LLMCHAT_CONFIG_DIR).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from llmchat.settings import (
    ACTION_KEYS,
    DEFAULT_THEME,
    Settings,
    SettingsError,
    key_map,
    load_settings,
    normalize_keys,
    save_settings,
    settings_path,
    update_settings,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@pytest.fixture()
def settings_file(llmchat_dirs: dict[str, Path]) -> Path:
    llmchat_dirs["config"].mkdir(parents=True, exist_ok=True)
    return llmchat_dirs["config"] / "settings.toml"


def write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


# --- reading -----------------------------------------------------------------------------------------


def test_the_file_lives_in_the_config_dir(llmchat_dirs: dict[str, Path]) -> None:
    assert settings_path() == llmchat_dirs["config"] / "settings.toml"


def test_a_missing_file_gives_the_defaults_and_no_problems(settings_file: Path) -> None:
    settings, problems = load_settings()
    assert (settings, problems) == (Settings(), [])
    assert settings.model is None and settings.panels is True and settings.theme == DEFAULT_THEME == "llmchat-dark"
    assert not settings_file.exists()  # reading never creates it


def test_the_documented_layout_is_read(settings_file: Path) -> None:
    write(
        settings_file,
        'model = "demo"\ntheme = "llmchat-light"\npanels = false\n'
        "[sampling]\ntemperature = 0.7\ntop_p = 0.9\ntop_k = 40\nmin_p = 0\nrepetition_penalty = 1.1\n"
        '[keys]\ntemperature_up = "f3"\nstop = "escape"\nhelp = "F12, ctrl+h"\n',
    )
    settings, problems = load_settings()
    assert problems == []
    assert settings.model == "demo" and settings.theme == "llmchat-light" and settings.panels is False
    assert settings.sampling == {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.0, "repetition_penalty": 1.1}
    assert isinstance(settings.sampling["min_p"], float) and isinstance(settings.sampling["top_k"], int)
    assert settings.keys == {"temperature_up": "f3", "stop": "escape", "help": "f12,ctrl+h"}
    assert key_map(settings)["help"] == "f12,ctrl+h" and key_map(settings)["quit"] == "ctrl+q"


def test_broken_toml_gives_the_defaults_and_a_problem_naming_the_file(settings_file: Path) -> None:
    write(settings_file, 'theme = "llmchat-light"\n[sampling\ntemperature = 0.3\n')
    settings, problems = load_settings()
    assert settings == Settings()
    assert len(problems) == 1 and str(settings_file) in problems[0]


def test_a_file_that_is_not_utf8_is_a_problem_not_a_crash(settings_file: Path) -> None:
    settings_file.write_bytes(b'theme = "\xff\xfe"\n')
    settings, problems = load_settings()
    assert settings == Settings() and len(problems) == 1 and "settings.toml" in problems[0]


def test_a_bad_value_keeps_the_good_ones(settings_file: Path) -> None:
    write(
        settings_file,
        'model = "demo"\ntheme = "llmchat-light"\npanels = "yes"\n[sampling]\ntemperature = 0.7\ntop_p = 3.0\n',
    )
    settings, problems = load_settings()
    assert settings == Settings(model="demo", theme="llmchat-light", sampling={"temperature": 0.7})
    assert len(problems) == 2
    top_p = next(p for p in problems if "top_p" in p)
    assert top_p.startswith(f"{settings_file}: [sampling] top_p = 3.0 ") and "(0, 1]" in top_p
    assert any('panels = "yes"' in p and "true or false" in p for p in problems)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("temperature = -0.1", ">= 0"),
        ("temperature = inf", "finite"),
        ("temperature = nan", "finite"),
        ('temperature = "hot"', "number"),
        ("temperature = true", "number"),
        ("top_p = 0", "(0, 1]"),
        ("top_p = 1.01", "(0, 1]"),
        ("top_k = -1", ">= 0"),
        ("top_k = 2.5", "whole number"),
        ("top_k = 40.0", "whole number"),
        ("min_p = 1.5", "[0, 1]"),
        ("min_p = -0.01", "[0, 1]"),
        ("repetition_penalty = 0", "> 0"),
        ("seed = 3", "unknown setting 'seed'"),
    ],
)
def test_each_bad_sampling_value_is_reported_and_dropped(settings_file: Path, line: str, needle: str) -> None:
    good_name, good_value = ("top_k", 5) if line.startswith("temperature") else ("temperature", 0.5)
    write(settings_file, f"[sampling]\n{good_name} = {good_value}\n{line}\n")
    settings, problems = load_settings()
    assert settings.sampling == {good_name: good_value}
    assert len(problems) == 1 and "[sampling]" in problems[0] and needle in problems[0], problems


def test_sampling_boundaries_are_accepted(settings_file: Path) -> None:
    write(settings_file, "[sampling]\ntemperature = 0\ntop_p = 1\ntop_k = 0\nmin_p = 1\nrepetition_penalty = 0.01\n")
    settings, problems = load_settings()
    assert problems == []
    assert settings.sampling == {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 1.0, "repetition_penalty": 0.01}
    assert isinstance(settings.sampling["temperature"], float)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("colour = 1", "unknown setting 'colour'"),
        ("model = 3", "model = 3"),
        ('model = ""', 'model = ""'),
        ('theme = "my theme"', 'theme = "my theme"'),
        ("sampling = 0.7", "[sampling] table"),
        ('keys = "f3"', "[keys] table"),
    ],
)
def test_bad_top_level_entries_are_reported(settings_file: Path, text: str, needle: str) -> None:
    write(settings_file, f"panels = false\n{text}\n")
    settings, problems = load_settings()
    assert settings == Settings(panels=False)
    assert len(problems) == 1 and needle in problems[0] and str(settings_file) in problems[0], problems


# --- keys ----------------------------------------------------------------------------------------------


def test_the_default_keys_are_valid_and_distinct() -> None:
    assert len(ACTION_KEYS) == 30 and ACTION_KEYS["temperature_up"] == ("f3", "Temp+")
    keys = [default for default, _ in ACTION_KEYS.values()]
    assert all(normalize_keys(key) == key for key in keys)
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("f3", "f3"),
        ("F3, Ctrl+Up", "f3,ctrl+up"),
        ("ctrl+shift+x", "ctrl+shift+x"),
        ("A", "A"),
        ("f3,f3", "f3"),
        ("", None),
        ("ctrl+", None),
        ("ctrl", None),
        ("x+ctrl", None),
        ("f3,", None),
        ("f 3", None),
        ("ctrl+ü", None),
    ],
)
def test_key_strings_are_checked_and_normalized(text: str, expected: str | None) -> None:
    assert normalize_keys(text) == expected


def test_an_unknown_action_and_a_bad_key_are_reported_and_the_rest_kept(settings_file: Path) -> None:
    write(settings_file, '[keys]\nfly = "f11"\nstop = "ctrl+"\nquit = 5\ntemperature_up = "ctrl+up"\n')
    settings, problems = load_settings()
    assert settings.keys == {"temperature_up": "ctrl+up"}
    assert len(problems) == 3
    assert any("unknown action 'fly'" in p for p in problems)
    assert any('stop = "ctrl+"' in p and 'default "escape"' in p for p in problems)
    assert any("quit = 5" in p and 'default "ctrl+q"' in p for p in problems)


def test_a_key_taken_from_another_action_falls_back_to_the_default(settings_file: Path) -> None:
    write(settings_file, '[keys]\ntop_p_up = "f2"\n')  # f2 is temperature_down's key
    settings, problems = load_settings()
    assert settings.keys == {}
    assert len(problems) == 1 and "top_p_up" in problems[0] and "temperature_down" in problems[0]
    assert key_map(settings)["top_p_up"] == "f5" and key_map(settings)["temperature_down"] == "f2"


def test_of_two_actions_given_the_same_key_the_later_one_yields(settings_file: Path) -> None:
    write(settings_file, '[keys]\nhelp = "f11,f12"\nmodels = "ctrl+m,f12"\n')
    settings, problems = load_settings()
    assert settings.keys == {"help": "f11,f12"}
    assert len(problems) == 1 and problems[0].startswith(f'{settings_file}: [keys] models = "ctrl+m,f12"')
    assert key_map(settings)["models"] == "ctrl+l"


def test_swapping_two_keys_is_not_a_clash(settings_file: Path) -> None:
    write(settings_file, '[keys]\ntemperature_down = "f3"\ntemperature_up = "f2"\n')
    settings, problems = load_settings()
    assert problems == []
    assert key_map(settings)["temperature_down"] == "f3" and key_map(settings)["temperature_up"] == "f2"


def test_a_reverted_key_that_clashes_again_reverts_the_other_too(settings_file: Path) -> None:
    # theme takes help's f1 and help takes theme's f10; then quit takes f10 as well: quit yields
    # first (latest), and the swap stays intact.
    write(settings_file, '[keys]\ntheme = "f1"\nhelp = "f10"\nquit = "f10"\n')
    settings, problems = load_settings()
    assert settings.keys == {"theme": "f1", "help": "f10"}
    assert len(problems) == 1 and "quit" in problems[0]
    resolved = [set(keys.split(",")) for keys in key_map(settings).values()]
    assert all(not (a & b) for i, a in enumerate(resolved) for b in resolved[i + 1 :])


# --- writing -------------------------------------------------------------------------------------------


def test_settings_round_trip_through_save_and_load(settings_file: Path) -> None:
    chosen = Settings(
        model='/models/my model "q4".gguf',
        sampling={"temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1},
        panels=False,
        theme="llmchat-high-contrast",
        keys={"temperature_up": "f3,ctrl+up", "stop": "ctrl+x"},
    )
    save_settings(chosen)
    assert load_settings() == (chosen, [])
    data = tomllib.loads(settings_file.read_text(encoding="utf-8"))
    assert data["sampling"]["top_k"] == 40 and data["keys"]["stop"] == "ctrl+x" and data["panels"] is False


def test_defaults_save_without_a_model_line(settings_file: Path) -> None:
    save_settings(Settings())
    data = tomllib.loads(settings_file.read_text(encoding="utf-8"))
    assert data == {"theme": DEFAULT_THEME, "panels": True}


def test_save_refuses_to_overwrite_a_file_that_does_not_parse(settings_file: Path) -> None:
    original = b'theme = "llmchat-light"\n[sampling\n# my notes\n'
    settings_file.write_bytes(original)
    with pytest.raises(SettingsError, match="will not overwrite") as caught:
        save_settings(Settings(theme="llmchat-dark"))
    assert str(settings_file) in str(caught.value)
    with pytest.raises(SettingsError):
        update_settings(theme="llmchat-dark")
    assert settings_file.read_bytes() == original
    assert sorted(os.listdir(settings_file.parent)) == ["settings.toml"]


def test_save_refuses_settings_that_load_would_reject(settings_file: Path) -> None:
    for bad in (Settings(sampling={"top_p": 3.0}), Settings(model=""), Settings(keys={"fly": "f3"})):
        with pytest.raises(SettingsError, match="not saving invalid settings"):
            save_settings(bad)
    assert not settings_file.exists()


def test_writes_are_atomic_and_leave_no_temp_files(settings_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_settings(Settings(theme="llmchat-light"))
    save_settings(Settings(theme="llmchat-high-contrast", panels=False))
    assert sorted(os.listdir(settings_file.parent)) == ["settings.toml"]
    before = settings_file.read_bytes()

    def disk_fails(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", disk_fails)  # the write fails after the new text was written out
    with pytest.raises(SettingsError, match="Input/output error"):
        save_settings(Settings(theme="llmchat-dark"))
    assert settings_file.read_bytes() == before  # the old file is whole, not truncated or half-new
    assert sorted(os.listdir(settings_file.parent)) == ["settings.toml"]


def test_update_settings_changes_one_field_and_keeps_the_rest(settings_file: Path) -> None:
    save_settings(Settings(model="demo", sampling={"temperature": 0.2}, keys={"help": "f12"}))
    updated = update_settings(theme="llmchat-light")
    assert updated == Settings(model="demo", sampling={"temperature": 0.2}, keys={"help": "f12"}, theme="llmchat-light")
    assert load_settings() == (updated, [])


def test_update_settings_creates_the_file_when_there_is_none(settings_file: Path) -> None:
    update_settings(panels=False)
    assert load_settings() == (Settings(panels=False), [])
