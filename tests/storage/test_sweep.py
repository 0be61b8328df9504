"""A store's sweep of expired rows rides with at most one write per `every` seconds."""

from __future__ import annotations

import pytest

from proxy.storage.sweep import Sweep


def test_the_first_write_sweeps_and_the_next_ones_wait_their_interval() -> None:
    sweep = Sweep(every=0.1)

    assert sweep.due(100.0)
    assert not sweep.due(100.05)
    assert not sweep.due(100.099)
    assert sweep.due(100.1)
    assert not sweep.due(100.15)


def test_a_clock_stepped_back_waits_no_longer_than_one_interval() -> None:
    sweep = Sweep(every=0.1)
    assert sweep.due(100.0)

    assert sweep.due(40.0)  # NTP stepped the clock back a minute: not held off a minute
    assert not sweep.due(40.05)
    assert sweep.due(40.1)


def test_an_interval_of_zero_sweeps_with_every_write() -> None:
    sweep = Sweep(every=0.0)

    assert all(sweep.due(5.0) for _ in range(3))


def test_a_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        Sweep(every=-1.0)
