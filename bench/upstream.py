"""The fast upstream the benchmarks proxy to: as cheap as an aiohttp server can be.

It must never be the bottleneck, so it answers a fixed JSON body from memory and
streams `/bytes/{n}` from one preallocated chunk, and runs on uvloop when present.

    python -m bench.upstream --port 0
"""

from __future__ import annotations

import argparse

from aiohttp import web

from bench.serve import run, use_loop

JSON_BODY = b'{"ok":true,"service":"bench-upstream","items":[1,2,3]}'
CHUNK = b"x" * (64 * 1024)


async def small_json(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=JSON_BODY, content_type="application/json")


async def stream_bytes(request: web.Request) -> web.StreamResponse:
    """Exactly n bytes with a Content-Length, written chunk by chunk (never held whole)."""
    n = int(request.match_info["n"])
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = n
    await response.prepare(request)
    view = memoryview(CHUNK)
    left = n
    while left > 0:
        step = min(left, len(CHUNK))
        await response.write(view[:step])
        left -= step
    await response.write_eof()
    return response


def build_app() -> web.Application:
    app = web.Application()
    app.router.add_get(r"/bytes/{n:\d+}", stream_bytes)
    app.router.add_route("*", "/{tail:.*}", small_json)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    args = parser.parse_args()
    use_loop(args.loop)
    run(build_app(), args.host, args.port, "bench-upstream")


if __name__ == "__main__":
    main()
