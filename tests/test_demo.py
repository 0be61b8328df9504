"""`checkout-sidecar demo` runs its whole story in-process, holds its invariants, and
writes nothing where it was started."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import pytest

from proxy.demo import run_demo
from proxy.demo_story import SCENARIOS

CONFIG = Path(__file__).resolve().parent.parent / "config" / "sidecar.yaml"


@pytest.mark.timeout(60)
def test_demo_tells_every_scenario_and_holds_its_invariants(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a relative store path would land here
    out = io.StringIO()

    code = run_demo(str(CONFIG), out=out)

    text = out.getvalue()
    assert code == 0, text
    for scenario in SCENARIOS:
        assert scenario in text, f"{scenario!r} missing from:\n{text}"
    assert "invariants:" in text and "... OK" in text
    assert "Idempotent-Replayed: true" in text
    assert "sidecar_breaker_transitions_total" in text
    assert list(tmp_path.iterdir()) == [], "the demo left files where it was started"


BROKER = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def _broker_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.timeout(90)
def test_demo_with_a_broker_prints_the_events_its_consumer_received(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _broker_up():
        pytest.skip("no RabbitMQ on 127.0.0.1:5672")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEMO_BROKER", BROKER)
    out = io.StringIO()

    code = run_demo(str(CONFIG), out=out)

    text = out.getvalue()
    assert code == 0, text
    assert "# events received" in text, text
    table = text.split("# events received", 1)[1]
    assert "checkout.confirmed" in table, text
    assert "checkout.rejected" in table, text
