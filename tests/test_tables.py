"""Things declared once, and the places that follow the table.

The sampling knobs (llmchat/engine/knobs.py): SamplingParams' checks, the CLI flags, settings.toml,
the inspector's labels and generation_config.json. The chat's actions (llmchat/actions.py): the
settings' rebindable ids, the app's key bindings, footer, help screen and command palette. A row
added to a table without the rest breaks one of these."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout

import pytest

from llmchat.cli import build_parser
from llmchat.engine.inspector import STAGE_TITLES
from llmchat.engine.knobs import KNOBS
from llmchat.engine.sampling import SamplingParams
from llmchat.settings import _parse_sampling


def _edges(knob) -> tuple[list[float], list[float]]:
    """Values just inside and just outside the knob's range."""
    inside = [knob.neutral, knob.low if not knob.low_open else knob.low + 0.01]
    outside = [knob.low - 1 if not knob.low_open else knob.low, float("nan")]
    if knob.high is not None:
        inside.append(knob.high)
        outside.append(knob.high + 0.5)
    return inside, outside


@pytest.mark.parametrize("knob", KNOBS, ids=lambda k: k.name)
def test_the_neutral_value_is_the_default_and_turns_the_stage_off(knob) -> None:
    assert getattr(SamplingParams(), knob.name) == knob.neutral
    assert STAGE_TITLES[knob.name] == knob.label


@pytest.mark.parametrize("knob", KNOBS, ids=lambda k: k.name)
def test_sampling_params_and_settings_check_the_same_range(knob) -> None:
    inside, outside = _edges(knob)
    for value in inside:
        value = knob.kind(value)
        SamplingParams(**{knob.name: value})
        assert _parse_sampling({knob.name: value}, lambda problem: pytest.fail(problem)) == {knob.name: value}
    for value in outside:
        if knob.kind is int and value != value:  # NaN is no whole number: the type check speaks first
            continue
        value = knob.kind(value) if value == value else value
        with pytest.raises(ValueError, match=re.escape(f"{knob.name} must be {knob.rule}")):
            SamplingParams(**{knob.name: value})
        problems: list[str] = []
        assert _parse_sampling({knob.name: value}, problems.append) == {}
        assert len(problems) == 1 and knob.name in problems[0]


@pytest.mark.parametrize("command", ["run", "inspect"])
def test_every_knob_is_a_flag_with_its_help(command: str) -> None:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(out.getvalue().split())  # argparse wraps help lines
    for knob in KNOBS:
        flag = "--sample-top-k" if command == "inspect" and knob.name == "top_k" else "--" + knob.name.replace("_", "-")
        assert flag in text, flag
        if knob.name not in ("temperature", "top_k"):  # those two say more for inspect
            assert " ".join(knob.help.split()) in text, knob.help


def test_generation_config_reads_every_knob() -> None:
    given = {"temperature": 0.6, "top_k": 7, "top_p": 0.8, "min_p": 0.1, "repetition_penalty": 1.2}
    assert set(given) == {knob.name for knob in KNOBS if knob.generation_config}
    params = SamplingParams.from_generation_config(given)
    assert {name: getattr(params, name) for name in given} == given


def test_the_app_binds_every_action_of_the_table() -> None:
    from llmchat.actions import ACTIONS
    from llmchat.settings import ACTION_KEYS
    from llmchat.tui.app import COMMAND_TITLES, LLMChatApp

    bindings = {binding.id: binding for binding in LLMChatApp.BINDINGS}
    assert list(ACTION_KEYS) == [action.id for action in ACTIONS] == list(bindings)
    for action in ACTIONS:
        binding = bindings[action.id]
        assert (binding.key, binding.action, binding.description) == (action.key, action.runs, action.label)
        assert binding.show == action.in_footer and COMMAND_TITLES[action.id] == action.title
