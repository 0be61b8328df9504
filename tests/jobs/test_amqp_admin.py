"""The admin routes over a sidecar whose job queue is on RabbitMQ: dead letters are
listed and re-driven as with the other backends, and the queue gauges are scraped."""

from __future__ import annotations

from typing import Any

import aiohttp

from proxy.app import Sidecar
from proxy.jobs import Job
from tests.conftest import make_config


async def test_dead_letters_are_listed_and_redriven_through_the_admin_routes(
    amqp_url: str, start_server: Any, tmp_path: Any
) -> None:
    config = make_config(
        {
            "store": f"sqlite://{tmp_path}/state.db",
            "queue": {"store": amqp_url, "workers": False},
            "upstreams": {"payment": {"url": "http://127.0.0.1:9"}},
        }
    )
    sidecar = Sidecar(config)
    await sidecar.start(run_workers=False)
    try:
        queue = sidecar.durable.queue
        assert queue is not None
        admin = str((await start_server(sidecar.build_admin_app())).make_url("")).rstrip("/")
        for job_id in ("refund-1", "refund-2"):
            await queue.enqueue(Job(type="refund", payload={"amount": 3}, id=job_id))
            taken = await queue.take("w", 30.0)
            assert taken is not None
            await queue.bury(taken, "permanent: 400 from payment")

        async with aiohttp.ClientSession() as http:
            async with http.get(f"{admin}/admin/jobs/dead") as response:
                assert response.status == 200
                listed = (await response.json())["dead"]
            assert [(j["id"], j["attempts"], j["last_error"]) for j in listed] == [
                ("refund-1", 1, "permanent: 400 from payment"),
                ("refund-2", 1, "permanent: 400 from payment"),
            ]
            async with http.get(f"{admin}/metrics") as response:
                metrics = await response.text()
            assert "sidecar_queue_dead_letters 2.0" in metrics
            assert "sidecar_queue_depth 0.0" in metrics

            async with http.post(f"{admin}/admin/jobs/dead/refund-2/retry") as response:
                assert (response.status, await response.json()) == (
                    200,
                    {"redriven": "refund-2"},
                )
            async with http.post(f"{admin}/admin/jobs/dead/refund-2/retry") as response:
                assert response.status == 404
            async with http.get(f"{admin}/admin/jobs/dead") as response:
                assert [j["id"] for j in (await response.json())["dead"]] == ["refund-1"]

        again = await queue.take("w", 30.0)
        assert again is not None
        assert (again.id, again.attempts, again.payload) == ("refund-2", 0, {"amount": 3})
        await queue.ack(again)
    finally:
        await sidecar.close()
