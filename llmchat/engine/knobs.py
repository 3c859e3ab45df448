"""The sampling knobs, declared once: name, what turns each off, its range, how the chat steps it,
and the words for it.

Everything else is derived from this table: `SamplingParams` checks its fields with it, the CLI
builds its flags and their help from it, settings.toml is checked with it, the inspector and the
status bar take their labels from it, the chat's keys their steps, and a model's
generation_config.json is read for the knobs it lists. A new knob is one row here (and its stage
in sampling.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Knob:
    """One knob of the decoding policy (a field of SamplingParams)."""

    name: str  # the SamplingParams field, settings.toml key and generation_config.json key
    label: str  # in words: "top-p", "repetition penalty"
    short: str  # in a narrow column: "top-p", "penalty"
    kind: type  # float or int
    neutral: float  # the value that turns it off (temperature: 1, the unchanged distribution)
    low: float  # the range: low < value (low_open) or low <= value, and value <= high
    low_open: bool = False
    high: float | None = None
    rule: str = ""  # the range in words, as messages say it: "in (0, 1] (1 disables it)"
    help: str = ""  # the CLI flag's help
    step: float = 0.0  # one key press in the chat (0: the knob has no keys; top-k steps through TOP_K_STEPS)
    generation_config: bool = True  # read from a model's generation_config.json

    def problem(self, value: float) -> str | None:
        """Why `value` is out of range, in words ("must be in (0, 1] (1 disables it)"), or None."""
        if not math.isfinite(value):
            return f"must be {self.rule}"
        below = value <= self.low if self.low_open else value < self.low
        if below or (self.high is not None and value > self.high):
            return f"must be {self.rule}"
        return None


KNOBS: tuple[Knob, ...] = (
    Knob(
        "temperature",
        "temperature",
        "temp",
        float,
        neutral=1.0,
        low=0.0,
        rule=">= 0 (0 means greedy)",
        help="0 = greedy",
        step=0.1,
    ),
    Knob(
        "top_k",
        "top-k",
        "top-k",
        int,
        neutral=0,
        low=0,
        rule=">= 0 (0 disables it)",
        help="keep only the K likeliest tokens (0 = off)",
        step=1,
    ),
    Knob(
        "top_p",
        "top-p",
        "top-p",
        float,
        neutral=1.0,
        low=0.0,
        low_open=True,
        high=1.0,
        rule="in (0, 1] (1 disables it)",
        help="nucleus: keep the likeliest tokens up to this probability mass, in (0, 1] (1 = off)",
        step=0.05,
    ),
    Knob(
        "min_p",
        "min-p",
        "min-p",
        float,
        neutral=0.0,
        low=0.0,
        high=1.0,
        rule="in [0, 1] (0 disables it)",
        help="drop tokens below this share of the likeliest one's probability, in [0, 1] (0 = off)",
    ),
    Knob(
        "repetition_penalty",
        "repetition penalty",
        "penalty",
        float,
        neutral=1.0,
        low=0.0,
        low_open=True,
        rule="> 0 (1 disables it)",
        help="> 0 (1 = off)",
    ),
)
KNOB = {knob.name: knob for knob in KNOBS}
# The chat's top-k keys step through these (a fixed step would crawl from 0 to 200).
TOP_K_STEPS = (0, 1, 2, 3, 5, 10, 20, 40, 50, 100, 200)
