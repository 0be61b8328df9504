"""PerTryTimers: per-try timeouts on one loop timer, driven by a fake loop (no sleeping)."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from proxy.resilience.timers import PerTryTimers


class FakeHandle:
    def __init__(self, loop: FakeLoop, when: float, callback: Any) -> None:
        self.loop, self.when, self.callback = loop, when, callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """`time()` and `call_at` only; `advance` runs the handles that came due, in order."""

    def __init__(self) -> None:
        self.now = 100.0
        self.handles: list[FakeHandle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any) -> FakeHandle:
        handle = FakeHandle(self, when, callback)
        self.handles.append(handle)
        return handle

    def pending(self) -> list[FakeHandle]:
        return [h for h in self.handles if not h.cancelled]

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while True:
            due = sorted((h for h in self.pending() if h.when <= self.now), key=lambda h: h.when)
            if not due:
                return
            due[0].cancelled = True  # ran: not pending any more
            due[0].callback()


class FakeTask:
    def __init__(self) -> None:
        self.cancels = 0

    def cancel(self) -> bool:
        self.cancels += 1
        return True


def timers_on(loop: FakeLoop) -> PerTryTimers:
    return PerTryTimers(loop)  # type: ignore[arg-type]


def test_a_timer_fires_at_its_time_and_cancels_its_task() -> None:
    loop = FakeLoop()
    timers = timers_on(loop)
    task = FakeTask()
    entry = timers.start(loop.now + 1.0, task)  # type: ignore[arg-type]
    loop.advance(0.999)
    assert task.cancels == 0
    loop.advance(0.001)
    assert task.cancels == 1
    assert timers.stop(entry) is True  # fired: the attempt takes the cancellation as a timeout
    assert len(timers) == 0


def test_a_stopped_timer_never_fires() -> None:
    loop = FakeLoop()
    timers = timers_on(loop)
    task = FakeTask()
    entry = timers.start(loop.now + 1.0, task)  # type: ignore[arg-type]
    assert timers.stop(entry) is False
    assert timers.stop(entry) is False  # twice is harmless
    loop.advance(5.0)
    assert task.cancels == 0
    assert not loop.pending()  # the wake-up for a stopped entry does not re-arm


def test_one_loop_timer_serves_later_entries_and_an_earlier_one_moves_it() -> None:
    loop = FakeLoop()
    timers = timers_on(loop)
    first, later, earliest = FakeTask(), FakeTask(), FakeTask()
    timers.start(loop.now + 1.0, first)  # type: ignore[arg-type]
    timers.start(loop.now + 2.0, later)  # type: ignore[arg-type]
    assert len(loop.pending()) == 1  # a later entry arms nothing
    timers.start(loop.now + 0.5, earliest)  # type: ignore[arg-type]
    assert [h.when for h in loop.pending()] == [loop.now + 0.5]
    loop.advance(0.5)
    assert (earliest.cancels, first.cancels, later.cancels) == (1, 0, 0)
    loop.advance(0.5)
    assert (first.cancels, later.cancels) == (1, 0)
    loop.advance(1.0)
    assert later.cancels == 1
    assert not loop.pending()


def test_a_stopped_entry_at_the_top_only_delays_the_rearm_to_the_next_live_one() -> None:
    loop = FakeLoop()
    timers = timers_on(loop)
    done, live = FakeTask(), FakeTask()
    entry = timers.start(loop.now + 1.0, done)  # type: ignore[arg-type]
    timers.start(loop.now + 3.0, live)  # type: ignore[arg-type]
    timers.stop(entry)
    loop.advance(1.0)
    assert [h.when for h in loop.pending()] == [loop.now + 2.0]
    loop.advance(2.0)
    assert (done.cancels, live.cancels) == (0, 1)


def test_stopped_entries_do_not_pile_up_behind_a_long_one() -> None:
    loop = FakeLoop()
    timers = timers_on(loop)
    slow = FakeTask()
    timers.start(loop.now + 30.0, slow)  # type: ignore[arg-type]
    for _ in range(10_000):
        timers.stop(timers.start(loop.now + 31.0, FakeTask()))  # type: ignore[arg-type]
    assert len(timers) == 1
    assert len(timers._heap) <= 64
    loop.advance(30.0)
    assert slow.cancels == 1


def test_a_wake_up_a_hair_early_still_fires_what_was_due() -> None:
    loop = FakeLoop()
    timers = timers_on(loop)
    task = FakeTask()
    timers.start(loop.now + 1.0, task)  # type: ignore[arg-type]
    (handle,) = loop.pending()
    loop.now += 0.9995  # the loop's clock reads a little before the armed time
    handle.cancelled = True
    handle.callback()
    assert task.cancels == 1


@given(st.lists(st.tuples(st.floats(0.0, 10.0), st.booleans()), max_size=60))
def test_every_live_entry_fires_once_at_its_time_and_no_stopped_one_does(
    plan: list[tuple[float, bool]],
) -> None:
    loop = FakeLoop()
    timers = timers_on(loop)
    started = loop.now
    tasks = []
    for delay, stopped in plan:
        task = FakeTask()
        entry = timers.start(started + delay, task)  # type: ignore[arg-type]
        if stopped:
            timers.stop(entry)
        tasks.append((delay, stopped, task))
    for step in range(1, 221):  # past the last delay, float steps and all
        loop.advance(0.05)
        elapsed = step * 0.05
        for delay, stopped, task in tasks:
            expected = 0 if stopped or started + delay > loop.now else 1
            assert task.cancels == expected, (delay, stopped, elapsed)
    assert len(timers) == 0
