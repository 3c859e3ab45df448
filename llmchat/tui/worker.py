"""The bridge between the engine (worker thread) and the UI thread.

The engine yields one event per token; the UI must not redraw per token or rendering would cap
the token rate. `Coalescer` folds events into `Batch`es: at most one per `interval` seconds, plus
one at once for every event that changes the phase (prefill done, finished). `run_generation`
drives a generation in the calling (worker) thread and hands each batch to `post`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llmchat.engine import Finished, PrefillDone, PrefillProgress, TokenEvent
from llmchat.engine.events import ForcedPrefix, GenerationEvent

# 10 UI updates per second at most. Each one costs the UI thread a Markdown re-parse, a layout and
# a repaint (~10-15 ms of Python), and all that time the decode loop waits for the GIL between
# kernels; measured on the demo model (benchmarks/tui_speed.py), 25/s cost a third of the token
# rate. `FrameBudget` spaces frames further when the UI thread still takes too much.
DEFAULT_INTERVAL = 0.1


@dataclass
class Batch:
    """Everything that happened since the previous batch."""

    tokens: list[TokenEvent] = field(default_factory=list)
    reasoning: str = ""  # new thinking text (reasoning models)
    content: str = ""  # new answer text
    prefill: PrefillProgress | PrefillDone | None = None  # the latest prefill event, if any
    prefix: ForcedPrefix | None = None  # a branch's kept tokens (their text is in reasoning/content)
    finished: Finished | None = None

    @property
    def last_token(self) -> TokenEvent | None:
        return self.tokens[-1] if self.tokens else None

    def __bool__(self) -> bool:
        return bool(self.tokens or self.prefill or self.prefix or self.finished)


class FrameBudget:
    """Spaces UI frames so the UI thread stays under `share` of one core while tokens stream.

    Why: on a 2-core CPU the UI thread's work lands on a core one of torch's threads is using, and
    a decode step waits for its slowest thread, so the token rate lost is about twice the UI's CPU
    share (benchmarks/tui_speed.py: 3% held decode at 0.89-0.96 of the bare engine, 5% at 0.85-0.91).
    A frame costs 15-35 ms (Markdown append, layout as the answer grows, repaint), so on such a
    machine frames settle near the slowest rate; on a fast one they stay at the fastest.

    The app calls `observe()` on the UI thread once per frame; the CPU time that thread used since
    the previous call (handling the batch, layout, repaint) over the wall time is its share. Above
    the budget the interval grows by a quarter, well under it shrinks back, within [fastest, slowest].
    The worker reads `interval` before each flush.
    """

    def __init__(
        self,
        share: float = 0.03,
        fastest: float = DEFAULT_INTERVAL,
        slowest: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.thread_time,
    ) -> None:
        self.share, self.fastest, self.slowest = share, fastest, slowest
        self._clock, self._cpu = clock, cpu
        self.interval = fastest
        self._last: tuple[float, float] | None = None

    def restart(self) -> None:
        """A new answer: start from the fastest rate again."""
        self.interval, self._last = self.fastest, None

    def observe(self) -> float:
        """Account for the UI thread's work since the last call; returns the share it used."""
        now, used = self._clock(), self._cpu()
        busy = 0.0
        if self._last is not None:
            busy = (used - self._last[1]) / max(now - self._last[0], 1e-6)
            if busy > self.share:
                self.interval = min(self.interval * 1.25, self.slowest)
            elif busy < self.share / 2:
                self.interval = max(self.interval / 1.25, self.fastest)
        self._last = (now, used)
        return busy


class Coalescer:
    """Folds a stream of generation events into batches, flushed by time or by phase change."""

    def __init__(
        self,
        interval: float | Callable[[], float] = DEFAULT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval  # seconds, or a function giving the current value
        self._clock = clock
        self._batch = Batch()
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._last_flush = -float("inf")
        self._streamed_reasoning = self._streamed_content = 0  # characters handed out so far

    def add(self, event: GenerationEvent) -> Batch | None:
        """Take one event; return a batch when it is time to show one."""
        urgent = False
        if isinstance(event, TokenEvent):
            self._batch.tokens.append(event)
            self._stream(event.reasoning, event.content)
        elif isinstance(event, ForcedPrefix):
            self._batch.prefix = event
            self._stream(event.reasoning, event.content)
            urgent = True
        elif isinstance(event, Finished):
            self._batch.finished = event
            # Text the engine held back to the end (a split character, a stop-string prefix, an
            # unfinished reasoning marker) is in Finished's totals but in no TokenEvent.
            self._reasoning.append(_rest(event.reasoning, self._streamed_reasoning))
            self._content.append(_rest(event.content, self._streamed_content))
            urgent = True
        else:
            self._batch.prefill = event
            urgent = isinstance(event, PrefillDone)
        interval = self.interval() if callable(self.interval) else self.interval
        if urgent or self._clock() - self._last_flush >= interval:
            return self.flush()
        return None

    def _stream(self, reasoning: str, content: str) -> None:
        """Text that reaches the UI through a batch (counted: Finished's totals hold the rest)."""
        self._reasoning.append(reasoning)
        self._content.append(content)
        self._streamed_reasoning += len(reasoning)
        self._streamed_content += len(content)

    def flush(self) -> Batch | None:
        """Hand over whatever is pending (None when nothing is)."""
        if not self._batch:
            return None
        batch = self._batch
        batch.reasoning, batch.content = "".join(self._reasoning), "".join(self._content)
        self._batch, self._reasoning, self._content = Batch(), [], []
        self._last_flush = self._clock()
        return batch


def _rest(total: str, streamed: int) -> str:
    return total[streamed:]


def run_generation(
    events: Iterable[GenerationEvent],
    post: Callable[[Batch], object],
    *,
    interval: float | Callable[[], float] = DEFAULT_INTERVAL,
) -> Finished | None:
    """Drive a generation to its end, posting coalesced batches; returns the `Finished` event."""
    coalescer = Coalescer(interval)
    finished: Finished | None = None
    for event in events:
        if isinstance(event, Finished):
            finished = event
        batch = coalescer.add(event)
        if batch is not None:
            post(batch)
    rest = coalescer.flush()
    if rest is not None:
        post(rest)
    return finished


class StopFlag:
    """The cancel flag the engine checks between steps (a thin threading.Event)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def is_set(self) -> bool:
        return self._event.is_set()
