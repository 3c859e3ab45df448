"""How many threads a CPU decode step runs on, chosen by measuring the steps themselves.

Why: a decode step is hundreds of small parallel regions, each ending at a barrier, so every step
waits for the slowest thread. When another process keeps one of two cores busy, the thread on that
core gets a share of it and every barrier waits for the scheduler: measured on the demo (2 cores,
one busy loop beside), 12-15 tok/s on two threads against 30-43 on one, while on an idle machine two
threads are faster (53 against 44). No setting wins both ways, and OpenMP's passive wait policy, the
usual remedy, cost 40% on the idle machine (24 tok/s). So the count is measured: every so often a few
steps run on the other count, and the faster one is kept.

The probes cost little: `PROBE_STEPS` steps (and `PROBE_SECONDS`) at the other count, at first after
`FIRST_INTERVAL` steps, then twice as far apart each time they lose (up to `MAX_INTERVAL`), and at
once when steps got much slower than when the count was last chosen (the load changed). Fewer
threads take over only after winning two probes `CONFIRM_SECONDS` apart.

Both counts are compared by their mean step time over windows of at least a few tenths of a second,
not by a median of a few steps: what slows decode in the chat is bursty (the UI thread lays out and
repaints about 10 times a second, an answer's first frames take it for 0.1-0.3 s), and a median over
8 steps (40 ms on the demo) either missed the bursts or, when one fell in the window, saw two threads
at a fraction of their speed; the chat then moved decode to one thread at half the rate. A mean over
a window that spans several frames is the throughput each count really gives.
"""

from __future__ import annotations

from collections import deque

import torch

WINDOW = 8  # steps (at least) whose mean is the current count's speed...
WINDOW_SECONDS = 0.4  # ...and seconds (at least) they span
PROBE_STEPS = 9  # steps (at least) a probe runs at the other count; the first is not counted...
PROBE_SECONDS = 0.2  # ...and seconds (at least) the counted ones span
FIRST_INTERVAL = 32  # steps before the first probe, and after a switch
MAX_INTERVAL = 1024
WIN_MARGIN = 0.85  # a probe wins when its mean step takes less than this share of the current one's
SLOWED_DOWN = 1.5  # steps this much slower than at the last decision: probe now
# Fewer threads must win twice, the second probe this many seconds of decode after the first: a load
# that lasts (another process) wins both; a burst of the UI's work (an answer's first frames, a
# layout: 0.1-0.3 s) only the first.
CONFIRM_SECONDS = 1.0


class ThreadGovernor:
    """Chooses between the configured thread count and one thread for decode steps, by their times.

    `before_step()` before each decode step's forward pass, `after_step(seconds)` with its time after
    it, `finish()` when decode ends: the count it sets with `torch.set_num_threads` is for decode steps
    only, and prefill runs at the configured count.
    `threads` is the count steps run at now, `probing` whether the current step is a probe."""

    def __init__(self, configured: int) -> None:
        self.configured = max(1, configured)
        self.threads = self.configured
        self.probing = False
        self.switches = 0
        self._recent: deque[float] = deque()  # the latest steps: at least WINDOW and WINDOW_SECONDS
        self._recent_sum = 0.0
        self._probe: list[float] = []
        self._interval = FIRST_INTERVAL
        self._until_probe = FIRST_INTERVAL
        self._baseline: float | None = None  # mean step time when the count was last chosen
        self._confirming: float | None = None  # seconds of decode since fewer threads first won

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

    def finish(self) -> None:
        """Decode is over: the configured count again for what runs next (a prefill, another model's
        load), while the count chosen here stays for the next answer's steps."""
        if not self.enabled:
            return
        self.probing, self._probe = False, []  # a probe cut short by the end measures nothing
        self._confirming = None
        if torch.get_num_threads() != self.configured:
            torch.set_num_threads(self.configured)

    def after_step(self, seconds: float) -> None:
        if not self.enabled:
            return
        if self.probing:
            self._probe.append(seconds)
            if len(self._probe) >= PROBE_STEPS and sum(self._probe[1:]) >= PROBE_SECONDS:
                self._decide()
            return
        self._remember(seconds)
        if self._confirming is not None:
            self._confirming += seconds
            if self._confirming >= CONFIRM_SECONDS:
                self.probing, self._probe = True, []
            return
        if len(self._recent) < WINDOW or self._recent_sum < WINDOW_SECONDS:
            return
        current = self._recent_sum / len(self._recent)
        if self._baseline is None:
            self._baseline = current
        self._until_probe -= 1
        if self._until_probe <= 0 or current > SLOWED_DOWN * self._baseline:
            self.probing, self._probe = True, []

    def _remember(self, seconds: float) -> None:
        """Add a step to the window and drop the oldest ones it does not need."""
        self._recent.append(seconds)
        self._recent_sum += seconds
        while len(self._recent) > WINDOW and self._recent_sum - self._recent[0] >= WINDOW_SECONDS:
            self._recent_sum -= self._recent.popleft()

    def _decide(self) -> None:
        current = self._recent_sum / len(self._recent)
        counted = self._probe[1:]  # the first step after a switch wakes or parks threads
        probe = sum(counted) / len(counted)
        self.probing = False
        won = probe < WIN_MARGIN * current
        if won and self.other < self.threads and self._confirming is None:
            self._confirming = 0.0  # probe again later: a burst would have passed by then
            return
        self._confirming = None
        if won:
            self.threads = self.other
            self.switches += 1
            self._recent.clear()
            self._recent_sum = 0.0
            self._baseline = None
            self._interval = FIRST_INTERVAL
        else:
            self._baseline = current
            self._interval = min(2 * self._interval, MAX_INTERVAL)
        self._until_probe = self._interval
