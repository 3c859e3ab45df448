"""How many threads a CPU decode step runs on, chosen by measuring the steps themselves.

Why: a decode step is hundreds of small parallel regions, each ending at a barrier, so every step
waits for the slowest thread. When another process keeps one of two cores busy, the thread on that
core gets a share of it and every barrier waits for the scheduler: measured on the demo (2 cores,
one busy loop beside), 12-15 tok/s on two threads against 30-43 on one, while on an idle machine two
threads are faster (53 against 44). No setting wins both ways, and OpenMP's passive wait policy, the
usual remedy, cost 40% on the idle machine (24 tok/s). So the count is measured: every so often a few
steps run on the other count, and the faster one is kept.

The probes cost little: a few steps of `PROBE_STEPS` at the other count, at first after
`FIRST_INTERVAL` steps, then twice as far apart each time they lose (up to `MAX_INTERVAL`), and at
once when steps got much slower than when the count was last chosen (the load changed).
"""

from __future__ import annotations

import statistics
from collections import deque

import torch

WINDOW = 8  # steps whose median is the current count's speed
PROBE_STEPS = 4  # steps a probe runs at the other count
FIRST_INTERVAL = 32  # steps before the first probe, and after a switch
MAX_INTERVAL = 1024
WIN_MARGIN = 0.85  # a probe wins when its median step takes less than this share of the current one's
SLOWED_DOWN = 1.5  # steps this much slower than at the last decision: probe now


class ThreadGovernor:
    """Chooses between the configured thread count and one thread for decode steps, by their times.

    `before_step()` before each decode step's forward pass, `after_step(seconds)` with its time after
    it. The count it sets with `torch.set_num_threads` applies to everything after (prefill too).
    `threads` is the count steps run at now, `probing` whether the current step is a probe."""

    def __init__(self, configured: int) -> None:
        self.configured = max(1, configured)
        self.threads = self.configured
        self.probing = False
        self.switches = 0
        self._recent: deque[float] = deque(maxlen=WINDOW)
        self._probe: list[float] = []
        self._interval = FIRST_INTERVAL
        self._until_probe = FIRST_INTERVAL
        self._baseline: float | None = None  # median step time when the count was last chosen

    @property
    def enabled(self) -> bool:
        return self.configured > 1

    @property
    def other(self) -> int:
        return 1 if self.threads > 1 else self.configured

    def before_step(self) -> None:
        if not self.enabled:
            return
        wanted = self.other if self.probing else self.threads
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    def after_step(self, seconds: float) -> None:
        if not self.enabled:
            return
        if self.probing:
            self._probe.append(seconds)
            if len(self._probe) == PROBE_STEPS:
                self._decide()
            return
        self._recent.append(seconds)
        if len(self._recent) < WINDOW:
            return
        current = statistics.median(self._recent)
        if self._baseline is None:
            self._baseline = current
        self._until_probe -= 1
        if self._until_probe <= 0 or current > SLOWED_DOWN * self._baseline:
            self.probing, self._probe = True, []

    def _decide(self) -> None:
        current = statistics.median(self._recent)
        probe = statistics.median(self._probe[1:])  # the first step after a switch wakes or parks threads
        self.probing = False
        if probe < WIN_MARGIN * current:
            self.threads = self.other
            self.switches += 1
            self._recent.clear()
            self._baseline = None
            self._interval = FIRST_INTERVAL
        else:
            self._baseline = current
            self._interval = min(2 * self._interval, MAX_INTERVAL)
        self._until_probe = self._interval
