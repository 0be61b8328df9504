"""The `events:` section: absent means no events; present, it is checked at load."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from proxy.config.model import EVENT_TYPES, Config


def test_no_events_section_means_no_events() -> None:
    assert Config.model_validate({}).events is None


def test_an_events_section_defaults_to_every_type_on_checkout_events() -> None:
    events = Config.model_validate({"events": {"broker": "amqp://guest:guest@h:5672/%2F"}}).events

    assert events is not None
    assert events.exchange == "checkout.events"
    assert tuple(events.types) == EVENT_TYPES
    assert events.source == "urn:checkout-sidecar"
    assert events.relay_interval == 2.0


def test_an_unknown_event_type_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"checkout\.shipped"):
        Config.model_validate({"events": {"broker": "amqp://h/", "types": ["checkout.shipped"]}})


def test_a_broker_that_is_not_amqp_is_refused() -> None:
    with pytest.raises(ValidationError, match="broker"):
        Config.model_validate({"events": {"broker": "kafka://h:9092"}})
