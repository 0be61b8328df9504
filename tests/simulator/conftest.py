"""A running simulator on free ports and a client session, per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.simulator import Simulator, start_simulator

SIM_CONFIG = {
    "upstreams": {
        "payment": {"decline_over": 100_000},
        "inventory": {"stock": {"sku-1": 5}},
        "coupon": {"coupons": {"SAVE10": {"percent": 10}, "FIVEOFF": {"amount_off": 500}}},
        "fraud": {"customers": {"cust-bad": "reject"}},
    }
}


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with await start_simulator(SIM_CONFIG) as simulator:
        yield simulator


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session
