"""Simulator YAML: the shipped file validates, mistakes name file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.simulator import SimulatorConfigError, load_config, parse_config
from proxy.simulator.config import LognormalLatency

SHIPPED = Path(__file__).resolve().parents[2] / "config" / "simulator.yaml"


def test_shipped_config_is_valid():
    config = load_config(SHIPPED)
    assert config.upstreams.payment.port == 9101
    assert isinstance(config.upstreams.payment.latency, LognormalLatency)
    assert config.upstreams.inventory.stock["sku-1"] == 100


def test_empty_config_means_defaults_on_free_ports():
    config = parse_config(None)
    assert config.host == "127.0.0.1"
    assert config.upstreams.coupon.port == 0


def test_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "sim.yaml"
    path.write_text(
        "seed: 1\n"
        "upstreams:\n"
        "  payment:\n"
        "    error_rate: 1.5\n"
        "  fraud:\n"
        "    latency: {dist: uniform, min_ms: 9, max_ms: 1}\n"
        "  shiping: {}\n"
    )
    with pytest.raises(SimulatorConfigError) as caught:
        load_config(path)
    lines = str(caught.value).splitlines()
    assert lines[0].startswith(f"{path}:4 upstreams.payment.error_rate: ")
    assert lines[1] == f"{path}:6 upstreams.fraud.latency: Value error, max_ms must be >= min_ms"
    assert lines[2] == f"{path}:7 upstreams.shiping: Extra inputs are not permitted"


def test_business_keys_belong_to_their_upstream():
    with pytest.raises(SimulatorConfigError, match=r"upstreams.payment.stock: Extra inputs"):
        parse_config({"upstreams": {"payment": {"stock": {"a": 1}}}})


def test_coupon_needs_exactly_one_kind_of_discount():
    with pytest.raises(SimulatorConfigError, match="exactly one of percent or amount_off"):
        parse_config({"upstreams": {"coupon": {"coupons": {"X": {"percent": 5, "amount_off": 1}}}}})


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "sim.yaml"
    path.write_text("upstreams: [\n")
    with pytest.raises(SimulatorConfigError, match="not valid YAML"):
        load_config(path)
