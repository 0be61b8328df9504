"""`CallOrder`: a checkout's calls start slowest first, learnt from what they took."""

from __future__ import annotations

import pytest

from proxy.checkout.call_order import CallOrder


def _names(order: CallOrder, calls: list[str]) -> list[str]:
    return order.slowest_first(calls, lambda name: name)


def test_calls_never_seen_keep_the_plans_order() -> None:
    assert _names(CallOrder(), ["shipping", "coupon", "payment"]) == [
        "shipping",
        "coupon",
        "payment",
    ]


def test_the_slowest_known_call_starts_first() -> None:
    order = CallOrder()
    for name, seconds in (("inventory", 0.05), ("payment", 0.1), ("shipping", 0.15)):
        order.observe(name, seconds)
    order.observe("coupon", 0.2)

    assert _names(order, ["inventory", "payment", "shipping", "coupon"]) == [
        "coupon",
        "shipping",
        "payment",
        "inventory",
    ]


def test_unseen_calls_go_ahead_of_known_ones() -> None:
    """A new or renamed step may be the slow one: it is not held back behind known
    fast ones."""
    order = CallOrder()
    order.observe("payment", 0.1)

    assert _names(order, ["payment", "fresh"]) == ["fresh", "payment"]


def test_calls_about_as_slow_keep_the_plans_order() -> None:
    order = CallOrder(margin=1.25)
    order.observe("shipping", 0.100)
    order.observe("coupon", 0.120)  # slower, but within the margin: no swap on noise

    assert _names(order, ["shipping", "coupon"]) == ["shipping", "coupon"]
    order.observe("coupon", 0.300)  # its average now 0.156: beyond the margin
    assert order.expected("coupon") == pytest.approx(0.156)
    assert _names(order, ["shipping", "coupon"]) == ["coupon", "shipping"]


def test_the_average_follows_a_call_that_got_faster() -> None:
    order = CallOrder(weight=0.5)
    order.observe("coupon", 0.2)
    order.observe("shipping", 0.15)
    assert _names(order, ["shipping", "coupon"]) == ["coupon", "shipping"]

    for _ in range(4):
        order.observe("coupon", 0.01)

    assert order.expected("coupon") == pytest.approx(0.01 + 0.19 / 16)
    assert _names(order, ["shipping", "coupon"]) == ["shipping", "coupon"]


def test_a_negative_latency_is_ignored_and_bad_settings_refused() -> None:
    order = CallOrder()
    order.observe("coupon", -1.0)
    assert order.expected("coupon") is None
    with pytest.raises(ValueError, match="weight"):
        CallOrder(weight=0.0)
    with pytest.raises(ValueError, match="margin"):
        CallOrder(margin=0.9)
