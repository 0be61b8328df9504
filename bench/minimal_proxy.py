"""The baseline: the smallest honest aiohttp reverse proxy, no policies at all.

The sidecar's throughput target is measured against this, so it is what a
developer would write in five minutes: one ClientSession, read the whole request,
forward method, path and headers, read the whole answer, return it. Run it on
both loops (`--loop asyncio|uvloop`) so the comparison with the sidecar (which
uses uvloop) is like for like.

    python -m bench.minimal_proxy --upstream http://127.0.0.1:9000 --loop uvloop
"""

from __future__ import annotations

import argparse

from aiohttp import ClientSession, web

from bench.serve import run, use_loop

SESSION: web.AppKey[ClientSession] = web.AppKey("session")


def build_app(upstream: str) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() != "host"}
        async with request.app[SESSION].request(
            request.method, upstream + request.path_qs, headers=headers, data=body or None
        ) as resp:
            payload = await resp.read()
            return web.Response(status=resp.status, body=payload, content_type=resp.content_type)

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[SESSION] = ClientSession()
        yield
        await app[SESSION].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    loop = use_loop(args.loop)
    run(build_app(args.upstream.rstrip("/")), args.host, args.port, f"minimal-proxy-{loop}")


if __name__ == "__main__":
    main()
