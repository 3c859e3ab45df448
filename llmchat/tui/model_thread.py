"""The one thread of the app that runs torch: loading, answering, the inspector's re-reads.

Why one: Textual runs thread workers on asyncio's executor, a pool of threads that live on, and
each thread that runs a parallel torch op gets an OpenMP thread team of its own (libgomp keeps one
per calling thread, for as long as the thread lives). A model loaded on one pool thread and
answered on another left two teams, more OpenMP threads than the 2 cores; libgomp then stops
spinning between parallel regions and puts its threads to sleep after each, and a decode step on
two threads took 16-20 ms instead of 5.5 (benchmarks/tui_speed.py: one run in two or three, at
random, decoded at half speed). All of it on one thread keeps one team.

`on_model_thread` wraps a thread worker's body: the worker hands it to the model thread and waits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Concatenate, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class ModelThread:
    """A single long-lived thread that runs whatever is handed to it, one piece at a time."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmchat-model")
        self._closed = False

    def run(self, work: Callable[[], T]) -> T:
        """Run `work` on the model thread and return its result (its exception, raised here)."""
        if self._closed:  # the app is closing: what is still asked for runs where it is
            return work()
        return self._executor.submit(work).result()

    def close(self) -> None:
        """Let the thread end once the piece it runs now is done (nothing queued runs)."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)


S = TypeVar("S", bound=Any)


def on_model_thread(method: Callable[Concatenate[S, P], T]) -> Callable[Concatenate[S, P], T]:
    """A method that runs on `self.model_thread` (the app's, or a screen's app's) when called."""

    @functools.wraps(method)
    def on_thread(self: S, *args: P.args, **kwargs: P.kwargs) -> T:
        owner = self if hasattr(self, "model_thread") else self.app
        return owner.model_thread.run(lambda: method(self, *args, **kwargs))

    return on_thread
