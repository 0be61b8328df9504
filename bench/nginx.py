"""nginx as the benchmarks' fast upstream: `python -m bench.nginx --port 0`.

An aiohttp upstream costs a proxy benchmark a good share of a 2-core machine's CPU,
so the proxies it compares wait on it as much as on themselves. nginx answers the
same small JSON from its config for a few microseconds of CPU, which leaves the
proxies as the bottleneck the benchmark means to measure. It runs in the
foreground (no daemon, one worker) from a temp prefix, and prints the ready line
the other bench servers print (`bench/serve.py`) once its port accepts.

The body is `bench.upstream.JSON_BODY`, so the proxied answer is the same as with
the aiohttp upstream. `/bytes/{n}` is not served: the download phase keeps the
aiohttp upstream.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.upstream import JSON_BODY

CONFIG = """\
daemon off;
master_process off;
worker_processes 1;
error_log {prefix}/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    server {{
        listen {host}:{port} backlog=1024;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def nginx_path() -> str | None:
    """nginx from the PATH or Debian's /usr/sbin (not on a user's PATH)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _wait_listening(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"nginx exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)  # polling a port nginx binds in its own process: no event to await
    raise SystemExit(f"nginx did not listen on {host}:{port} within {timeout:g}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    binary = nginx_path()
    if binary is None:
        raise SystemExit("nginx is not installed (Debian: apt-get install nginx-light)")
    port = args.port or _free_port(args.host)
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as prefix:
        conf = Path(prefix) / "nginx.conf"
        body = JSON_BODY.decode().replace("'", "\\'")
        conf.write_text(CONFIG.format(prefix=prefix, host=args.host, port=port, body=body))
        argv = [binary, "-p", prefix, "-c", str(conf), "-e", f"{prefix}/error.log"]
        if os.geteuid() == 0:
            argv += ["-g", "user root;"]  # the worker keeps root's rights to the temp prefix
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        # nginx's own pid stands for this wrapper in CPU accounting: print it
        stop = lambda *_: proc.terminate()  # noqa: E731
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            _wait_listening(args.host, port, proc, 10.0)
            url = f"http://{args.host}:{port}"
            event = {"msg": "nginx started", "event": "start", "listen": url, "pid": proc.pid}
            print(json.dumps(event), flush=True)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    sys.exit(0)


if __name__ == "__main__":
    main()
