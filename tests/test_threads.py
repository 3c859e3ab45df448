"""The decode thread governor (engine/threads.py) keeps the faster thread count, measured on the steps:
driven here with step times that depend on the count it set, as a busy or an idle machine gives them."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

from llmchat.engine import threads as threads_module
from llmchat.engine.threads import ThreadGovernor


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _drive(governor: ThreadGovernor, steps: int, seconds: Callable[[int, int], float]) -> list[int]:
    """Run `steps` decode steps; seconds(step, threads) is a step's time. Returns each step's thread count."""
    used = []
    for step in range(steps):
        governor.before_step()
        count = torch.get_num_threads()
        used.append(count)
        governor.after_step(seconds(step, count))
    return used


def test_an_idle_machine_keeps_every_thread_and_probes_ever_more_rarely() -> None:
    governor = ThreadGovernor(2)
    used = _drive(governor, 4000, lambda step, n: 1.0 if n == 2 else 1.6)
    assert governor.threads == 2 and governor.switches == 0
    probe_steps = used.count(1)
    assert 0 < probe_steps <= 8 * threads_module.PROBE_STEPS  # backed off: 32, 64, ... 1024 steps apart
    assert used[-500:].count(1) <= threads_module.PROBE_STEPS


def test_a_busy_core_moves_decode_to_one_thread_soon_after_it_starts() -> None:
    """The load starts after 3000 steps (the probes backed off by then): the slowdown itself starts a probe."""
    governor = ThreadGovernor(2)
    busy_from = 3000

    def seconds(step: int, n: int) -> float:
        if step < busy_from:
            return 1.0 if n == 2 else 1.6
        return 6.0 if n == 2 else 1.7  # every barrier waits for the thread sharing the busy core

    used, chosen = [], []  # the count each step ran at, and the governor's choice after it
    for step in range(busy_from + 100):
        governor.before_step()
        used.append(torch.get_num_threads())
        governor.after_step(seconds(step, used[-1]))
        chosen.append(governor.threads)
    assert governor.threads == 1 and governor.switches == 1
    moved = chosen.index(1)
    # Not a thousand steps later: a window of slow steps and two probes (the second confirms the
    # first, CONFIRM_SECONDS later: one step here), after a probe that may have been under way when
    # the load came (compared with the idle steps before, it lost).
    assert busy_from <= moved <= busy_from + threads_module.WINDOW + 3 * threads_module.PROBE_STEPS + 1
    after = used[moved + 1 :]
    assert after.count(2) <= threads_module.PROBE_STEPS  # a probe of two threads lost, and backed off


def test_when_the_load_goes_away_every_thread_comes_back() -> None:
    governor = ThreadGovernor(2)
    used = _drive(governor, 3000, lambda step, n: (6.0 if n == 2 else 1.7) if step < 1000 else (1.0 if n == 2 else 1.6))
    assert governor.threads == 2 and governor.switches == 2
    assert used[1000:].index(2) < threads_module.MAX_INTERVAL + threads_module.WINDOW + 1


def test_bursts_of_load_are_judged_by_throughput_not_by_a_few_steps() -> None:
    """The chat's UI thread: 10 frames a second, a layout now and then. Two threads run most steps at
    full speed and a burst of steps at a fifth of it (the UI thread has the other core); one thread is
    never disturbed but always slower. Two threads give the higher throughput: keep them."""
    governor = ThreadGovernor(2)

    def seconds(step: int, n: int) -> float:
        if n == 1:
            return 0.016
        return 0.04 if step % 60 < 6 else 0.008  # a 6-step burst every 60 steps: mean 0.0112 s

    used = _drive(governor, 6000, seconds)
    assert governor.threads == 2
    assert used.count(2) > 0.95 * len(used)


def test_a_burst_shorter_than_the_confirmation_does_not_move_decode() -> None:
    """An answer's first frames in the chat: for its first 0.6 s the UI thread keeps a core busy
    (two threads 4x slower), then it is idle again. One thread wins the first probe, in the burst,
    and loses the one that would confirm it."""
    governor = ThreadGovernor(2)
    clock = [0.0]

    def seconds(step: int, n: int) -> float:
        burst = clock[0] < 0.6
        took = (0.02 if n == 2 else 0.008) if burst else (0.005 if n == 2 else 0.008)
        clock[0] += took
        return took

    _drive(governor, 3000, seconds)
    assert governor.switches == 0 and governor.threads == 2


def test_noise_alone_does_not_switch() -> None:
    """Two counts equally fast, with one step in four three times slower (a noisy machine): no switch."""
    governor = ThreadGovernor(2)
    _drive(governor, 3000, lambda step, n: 3.0 if step % 4 == 0 else 1.0)
    assert governor.switches == 0


def test_the_chosen_count_is_for_decode_steps_only() -> None:
    """After an answer on one thread, prefill (and a model loaded next, which reads torch's count as
    its configured one) runs on every thread again; the next answer's steps go back to one."""
    torch.set_num_threads(2)
    governor = ThreadGovernor(2)
    _drive(governor, 200, lambda step, n: 6.0 if n == 2 else 1.7)
    assert governor.threads == 1 and torch.get_num_threads() == 1
    governor.finish()
    assert torch.get_num_threads() == 2 and ThreadGovernor(torch.get_num_threads()).configured == 2
    governor.before_step()
    assert torch.get_num_threads() == 1


def test_one_configured_thread_is_left_alone() -> None:
    torch.set_num_threads(1)
    governor = ThreadGovernor(1)
    assert not governor.enabled
    assert set(_drive(governor, 200, lambda step, n: 1.0)) == {1}
