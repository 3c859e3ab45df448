"""The bridge between the engine (worker thread) and the UI thread.

The engine yields one event per token; the UI must not redraw per token or rendering would cap
the token rate. `Coalescer` folds events into `Batch`es: about one per `interval` seconds, plus
one at once for every event that changes the phase (prefill done, finished). `run_generation`
drives a generation in the calling (worker) thread and hands each batch to `post`.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llmchat.engine import Finished, PrefillDone, PrefillProgress, TokenEvent
from llmchat.engine.events import ForcedPrefix, GenerationEvent

# About 10 UI updates per second: streaming reads as smooth from there on. Each one costs the UI
# thread a parse of the growing block and a repaint (benchmarks/tui_speed.py --frames), and all
# that time the decode loop waits for the GIL between kernels; measured on the demo model, 25/s cost
# a third of the token rate. `FrameBudget` spaces frames further when the UI thread takes too much.
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
    a decode step waits for its slowest thread. With the GIL handed back every 0.1 ms (app.py), a
    10% share gave ~10 frames/s with decode at 0.76-0.95 of the bare engine on 2 cores, 5% ~5.5
    frames/s at 0.84-1.0 (benchmarks/tui_speed.py --share, 2026-12-02, AMD EPYC; runs vary a lot).

    Two rates are budgeted, the text's first: `interval` (the answer's frames) and `panel_interval`
    (the side panels and status bar, whose repaint costs as much as a few text frames). The app
    calls `observe()` on the UI thread once per frame; the CPU time that thread used since the
    previous call (handling the batch, layout, repaints) over the wall time is its share. Above the
    budget the panels slow down by a quarter at a time to `panel_slowest`, and only then the text,
    to `slowest`; well under it the text comes back to `fastest` first, then the panels to
    `panel_fastest`. The worker reads `interval` before each flush.
    """

    def __init__(
        self,
        share: float = 0.1,
        fastest: float = DEFAULT_INTERVAL,
        slowest: float = 0.5,
        panel_fastest: float = 0.25,
        panel_slowest: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.thread_time,
    ) -> None:
        self.share, self.fastest, self.slowest = share, fastest, slowest
        self.panel_fastest, self.panel_slowest = panel_fastest, panel_slowest
        self._clock, self._cpu = clock, cpu
        self.interval, self.panel_interval = fastest, panel_fastest
        self._last: tuple[float, float] | None = None

    def restart(self) -> None:
        """A new answer: start from the fastest rates again."""
        self.interval, self.panel_interval, self._last = self.fastest, self.panel_fastest, None

    def observe(self) -> float:
        """Account for the UI thread's work since the last call; returns the share it used."""
        now, used = self._clock(), self._cpu()
        busy = 0.0
        if self._last is not None:
            busy = (used - self._last[1]) / max(now - self._last[0], 1e-6)
            if busy > self.share:
                if self.panel_interval < self.panel_slowest:
                    self.panel_interval = min(self.panel_interval * 1.25, self.panel_slowest)
                else:
                    self.interval = min(self.interval * 1.25, self.slowest)
            elif busy < self.share / 2:
                if self.interval > self.fastest:
                    self.interval = max(self.interval / 1.25, self.fastest)
                else:
                    self.panel_interval = max(self.panel_interval / 1.25, self.panel_fastest)
        self._last = (now, used)
        return busy


class CollectorPause:
    """Python's cyclic garbage collector held off while an answer streams, and let go after it.

    Why: a frame makes thousands of short-lived objects (Textual's strips and segments, the engine's
    events), so the collector ran several times a frame, and now and then a full pass over every
    object of the app and the model took 100-200 ms on the UI thread: a visible stall, and a third of
    the UI's time while it streams (measured with `benchmarks/tui_speed.py --frames`, 2 cores: 0.73 s
    of 20 s; 0.04 s paused). Objects without cycles are still freed at once by reference counting;
    the few cyclic ones an answer leaves (widgets of a list rebuilt mid-stream) wait for `resume()`.
    `gc.disable()` does not stop an explicit `gc.collect()` (a library may call one): `gc.freeze()`
    on pausing makes such a pass skip everything older than the answer; resuming unfreezes it all,
    so nothing stays uncollectable.
    """

    def __init__(self) -> None:
        self.paused = False

    def pause(self) -> None:
        if not self.paused and gc.isenabled():
            gc.freeze()
            gc.disable()
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            gc.unfreeze()
            gc.enable()


class DecodeRate:
    """Decode tokens per second of the answer streaming now, counted as `Finished` counts it.

    The steps after the first token over their time (`TokenEvent.seconds`); the first token's time
    is the prefill's. So the number the status bar shows live ends where the stats line begins.
    """

    def __init__(self) -> None:
        self.steps = 0
        self.seconds = 0.0
        self._first = True

    def add(self, tokens: Iterable[TokenEvent]) -> None:
        for token in tokens:
            if self._first:
                self._first = False
                continue
            self.steps += 1
            self.seconds += token.seconds

    @property
    def per_second(self) -> float | None:
        """None until two tokens have come."""
        return self.steps / self.seconds if self.steps and self.seconds > 0 else None


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
        self._last_event: float | None = None
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
        now = self._clock()
        # The frame goes out with the event nearest its time: waiting for the next event (about one
        # gap away) would overshoot more than this one falls short. At 30 tok/s and 0.1 s the frame
        # then takes 3 tokens (0.10 s), where "at least 0.1 s" took 4 (0.13 s: 7.5 frames/s).
        gap = now - self._last_event if self._last_event is not None else 0.0
        self._last_event = now
        if urgent or now - self._last_flush >= interval - gap / 2:
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
