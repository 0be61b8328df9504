"""`bench.checkout_cpu`: each thread's CPU per checkout from /proc readings."""

from __future__ import annotations

import os
import time

import pytest

from bench.checkout_cpu import _TICKS, BlockTimes, per_checkout, thread_times


def test_per_checkout_is_each_threads_share_busiest_first() -> None:
    before = {"1": ("main", 100, 10), "2": ("sqlite", 50, 5), "3": ("idle", 7, 7)}
    after = {
        "1": ("main", 100 + 2 * _TICKS, 10),
        "2": ("sqlite", 50, 5 + _TICKS),
        "3": ("idle", 7, 7),
        "4": ("new", _TICKS, 0),  # started during the run
    }
    rows = per_checkout(before, after, checkouts=1000)
    assert [name for name, _, _ in rows] == ["main (1)", "sqlite (2)", "new (4)"]
    assert rows[0][1:] == pytest.approx((2.0, 0.0))  # 2 s over 1,000 checkouts
    assert rows[1][1:] == pytest.approx((0.0, 1.0))


def test_thread_times_reads_this_process() -> None:
    found = thread_times(os.getpid())
    assert str(os.getpid()) in found  # the main thread's id is the pid
    assert all(user >= 0 and system >= 0 for _, user, system in found.values())


def _busy_for(ticks: int) -> None:
    """Spend at least `ticks` of this thread's CPU (as /proc counts it), bounded."""
    me = str(os.getpid())
    _, user, system = thread_times(os.getpid())[me]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, now_user, now_system = thread_times(os.getpid())[me]
        if now_user + now_system - user - system >= ticks:
            return
    raise AssertionError(f"{ticks} ticks of CPU not spent in 30 s")


def test_block_times_add_up_the_blocks_and_nothing_between_them() -> None:
    times = BlockTimes(os.getpid())
    with times.block():
        _busy_for(2)
    _busy_for(3)  # between the blocks: not counted
    with times.block():
        _busy_for(2)

    _, user, system = times.spent[str(os.getpid())]
    assert 4 <= user + system <= 6, times.spent
