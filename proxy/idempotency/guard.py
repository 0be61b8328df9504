"""The Idempotency-Key protocol around one request: run once, replay after.

Follows the IETF draft "The Idempotency-Key HTTP Header Field" and Stripe's
practice. A first request claims its key atomically and runs; its final response
is stored, whatever it was (an ambiguous timeout or 5xx is still what happened).
A repeat with the same payload is answered from the store with
`Idempotent-Replayed: true`; a repeat while the first still runs gets 409; the
same key with another payload gets 422. When the store cannot be reached the
request is refused with 503 rather than run unprotected, because running a
payment twice is worse than not running it now.

The guard is transport glue only: the caller's `run` does the work and turns its
own failures into a `StoredResponse`, and telemetry leaves through `on_result`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from aiohttp import web
from multidict import CIMultiDict

from proxy.errors import json_error
from proxy.idempotency.store import (
    ClaimResult,
    ClaimState,
    IdempotencyStore,
    JointClaims,
    JointCompletes,
    KeptResponse,
    StoredResponse,
)
from proxy.storage.errors import StoreUnavailable
from proxy.storage.joint import JointInsert

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 255
REPLAYED_HEADER = "Idempotent-Replayed"

KEPT_HEADERS = frozenset(
    {
        "content-type",
        "content-encoding",
        "location",
        "retry-after",
        "x-sidecar-error",  # the body is the sidecar's own error, not the upstream's
        "x-sidecar-attempts",
    }
)
"""Response headers stored for replay by default: those that change what the body means."""

_NOT_REPLAYABLE = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",  # aiohttp sets it from the body
    }
)

RESULTS = (
    "first",
    "replayed",
    "conflict_in_progress",
    "mismatch",
    "missing",
    "invalid",
    "store_unavailable",
)
"""Every value `on_result` can be called with."""


def validate_key(key: str) -> str | None:
    """Why `key` is not a usable idempotency key, or None when it is.

    At most 255 characters of printable ASCII (0x20-0x7E): enough for UUIDs and
    composite keys such as `<key>:<step>:commit`, and nothing that could smuggle
    control characters into logs or store keys.
    """
    if not key:
        return "the idempotency key is empty"
    if len(key) > MAX_KEY_LENGTH:
        return (
            f"the idempotency key is {len(key)} characters long;"
            f" at most {MAX_KEY_LENGTH} are allowed"
        )
    for position, char in enumerate(key):
        if not " " <= char <= "~":
            return (
                f"the idempotency key has a character outside printable ASCII "
                f"at position {position} ({char!r})"
            )
    return None


def parse_key_header(raw: str) -> tuple[str, str | None]:
    """The key in a header value and an error message, if any.

    The IETF draft sends the key as a Structured Field string (`"abc"`); Stripe and
    most clients send it bare. Both are accepted and mean the same key.
    """
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        chars: list[str] = []
        inner = raw[1:-1]
        position = 0
        while position < len(inner):
            char = inner[position]
            if char == "\\" and position + 1 < len(inner) and inner[position + 1] in '"\\':
                chars.append(inner[position + 1])
                position += 2
                continue
            if char in '"\\':
                return raw, "the idempotency key is a malformed quoted string"
            chars.append(char)
            position += 1
        raw = "".join(chars)
    return raw, validate_key(raw)


def _canonical_body(body: bytes, content_type: str) -> bytes:
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "application/json" or media_type.endswith("+json"):
        try:
            document = json.loads(body)
        except ValueError:  # includes UnicodeDecodeError: not JSON after all, hash raw
            return body
        return json.dumps(
            document, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")
    return body


def fingerprint(method: str, path: str, body: bytes, content_type: str) -> str:
    """A digest of what a request asks for, to tell a true repeat from key reuse.

    JSON bodies are canonicalised (sorted keys, no whitespace) so a client that
    re-serialises the same document is still recognised; other bodies count byte
    for byte.
    """
    body_digest = hashlib.sha256(_canonical_body(body, content_type)).hexdigest()
    material = f"{method.upper()}\n{path}\n{body_digest}"
    return hashlib.sha256(material.encode("utf-8", "surrogateescape")).hexdigest()


def scoped_key(scope: str, client: str, key: str) -> str:
    """The store key: route scope, client identity and key, unambiguously joined.

    Each part is percent-encoded so a `:` inside one cannot forge another's key.
    """
    return ":".join(quote(part, safe="") for part in (scope, client, key))


def _error(status: int, reason: str, message: str, **extra: Any) -> web.Response:
    """The sidecar's one JSON error shape; a `retry_after` also becomes the header."""
    headers = None
    if "retry_after" in extra:
        headers = {"Retry-After": str(extra["retry_after"])}
    return json_error(status, message, reason, headers=headers, **extra)


def to_web_response(stored: StoredResponse, *, replayed: bool = False) -> web.Response:
    """The aiohttp response for a stored (or fresh) one; the body goes out unchanged."""
    headers: CIMultiDict[str] = CIMultiDict(
        (name, value) for name, value in stored.headers if name.lower() not in _NOT_REPLAYABLE
    )
    if replayed:
        headers[REPLAYED_HEADER] = "true"
    return web.Response(status=stored.status, body=stored.body, headers=headers)


@dataclass(frozen=True, slots=True)
class KeyIdentity:
    """Where a request's idempotency record lives, and what it must match."""

    key: str
    fingerprint: str

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeyIdentity:
        return cls(str(data["key"]), str(data["fingerprint"]))


def _fingerprint_of(request: web.BaseRequest, body: bytes) -> str:
    return fingerprint(
        request.method, request.path_qs, body, request.headers.get("Content-Type", "")
    )


class NotRun(Exception):
    """Raised by a `run` that refused before anything happened upstream.

    The guard gives the key back (a repeat may run) and the caller answers with
    `response` itself; Stripe keeps no result for a request that never started.
    """

    def __init__(self, response: web.Response) -> None:
        super().__init__("not run")
        self.response = response


class IdempotencyGuard:
    """Runs a request at most once per (scope, client, key) and replays its answer.

    `ttl` is how long a completed response is kept; `in_progress_timeout` is the
    claim's lease, after which a request that crashed mid-way no longer blocks
    its key. `scope_header` names a client identity header (e.g. x-customer-id)
    that becomes part of the store key, so one client never sees another's
    response; when configured, a keyed request without it is refused.
    """

    def __init__(
        self,
        store: IdempotencyStore,
        *,
        header: str = "Idempotency-Key",
        ttl: float = 86400,
        in_progress_timeout: float = 60,
        scope_header: str | None = None,
        required: bool = False,
        stored_headers: Iterable[str] = (),
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        # the optional protocols, asked once: isinstance() against a runtime-checkable
        # Protocol walks its members every time (about 8 us in Python 3.11)
        self._joint_claims: JointClaims | None = store if isinstance(store, JointClaims) else None
        self._joint_completes: JointCompletes | None = (
            store if isinstance(store, JointCompletes) else None
        )
        self.header = header
        self.ttl = ttl
        self.in_progress_timeout = in_progress_timeout
        self.scope_header = scope_header
        self.required = required
        self.kept_headers = KEPT_HEADERS | {name.lower() for name in stored_headers}
        self._on_result = on_result

    def _report(self, result: str) -> None:
        if self._on_result is None:
            return
        try:
            self._on_result(result)
        except Exception:  # a telemetry bug must not change the answer
            log.exception("idempotency on_result hook failed for %s", result)

    def _keepable(self, response: StoredResponse) -> StoredResponse:
        headers = [(n, v) for n, v in response.headers if n.lower() in self.kept_headers]
        return StoredResponse(response.status, headers, response.body)

    def identity(self, request: web.BaseRequest, body: bytes, scope: str) -> KeyIdentity | None:
        """The store key and fingerprint `handle` uses for `request`; None without a usable key.

        Kept with work that may outlive its request (a checkout's journal record), so
        whoever finishes that work can `settle` the key for a client's retry.
        """
        raw_key = request.headers.get(self.header)
        if raw_key is None:
            return None
        key, problem = parse_key_header(raw_key)
        client = request.headers.get(self.scope_header, "") if self.scope_header else ""
        if problem is not None or (self.scope_header is not None and not client):
            return None
        return KeyIdentity(scoped_key(scope, client, key), _fingerprint_of(request, body))

    async def settle(self, identity: KeyIdentity, response: StoredResponse) -> None:
        """Keep the final answer of a key whose own request is gone (its replica died).

        A retry of that request is then replayed this answer at once, instead of
        waiting out the dead request's claim. Raises `StoreUnavailable`.
        """
        await self.store.complete(
            identity.key, identity.fingerprint, self._keepable(response), self.ttl
        )

    def joint_settle(
        self, identity: KeyIdentity, response: StoredResponse
    ) -> tuple[JointInsert, ...] | None:
        """`settle` as statements for another store's transaction (the checkout's final
        journal write), or None when the store cannot hand them out."""
        if self._joint_completes is None:
            return None
        return self._joint_completes.joint_complete(
            identity.key, identity.fingerprint, self._keepable(response), self.ttl
        )

    def accepts(self, joint: JointInsert) -> bool:
        """Whether the store can commit `joint` with a claim (`handle_joint`): it is a
        `JointClaims` store in the database the insert goes to."""
        return self._joint_claims is not None and self._joint_claims.accepts(joint)

    async def handle(
        self,
        request: web.BaseRequest,
        body: bytes,
        scope: str,
        run: Callable[[], Awaitable[StoredResponse]],
        *,
        error_fields: Mapping[str, Any] | None = None,
    ) -> web.Response:
        """Answer `request` by running `run` once per key, or from the store.

        `body` is the request body already read by the caller; `scope` names the
        route. `run` must return a response for every outcome it can classify;
        if it raises, nothing is stored, the claim is given back and the
        exception propagates. A cancelled `run` (its outcome unknown) keeps the
        claim, which lapses after `in_progress_timeout`. `error_fields` are added to
        the guard's own error answers (a proxied route names its upstream and 0
        attempts there, as its other errors do).
        """

        async def run_alone(joint: bool) -> StoredResponse:
            return await run()

        return await self.handle_joint(
            request, body, scope, run_alone, joint=None, error_fields=error_fields
        )

    async def handle_joint(
        self,
        request: web.BaseRequest,
        body: bytes,
        scope: str,
        run: Callable[[bool], Awaitable[StoredResponse]],
        *,
        joint: JointInsert | None,
        error_fields: Mapping[str, Any] | None = None,
    ) -> web.Response:
        """`handle`, with another store's first row committed together with the claim.

        When the store `accepts` `joint`, the claim and the insert are one transaction
        (both rows exist afterwards, or neither) and `run(True)` is told the row is
        there; otherwise, or when the row already existed, `run(False)` writes it
        itself, as `handle`'s callers always do. An insert that fails refuses the
        request with 503, as an unreachable store does.
        """
        fields = dict(error_fields or {})
        raw_key = request.headers.get(self.header)
        if raw_key is None:
            if self.required:
                self._report("missing")
                return _error(
                    400,
                    "idempotency_key_missing",
                    f"this endpoint requires an {self.header} header",
                    header=self.header,
                    **fields,
                )
            return to_web_response(await run(False))

        key, problem = parse_key_header(raw_key)
        if problem is not None:
            self._report("invalid")
            return _error(400, "idempotency_key_invalid", problem, header=self.header, **fields)

        client = ""
        if self.scope_header is not None:
            client = request.headers.get(self.scope_header, "")
            if not client:
                self._report("invalid")
                return _error(
                    400,
                    "idempotency_scope_missing",
                    f"a request with an {self.header} must also carry {self.scope_header}",
                    header=self.scope_header,
                    **fields,
                )

        store_key = scoped_key(scope, client, key)
        request_fingerprint = _fingerprint_of(request, body)
        try:
            claim = await self._claim(store_key, request_fingerprint, joint)
        except StoreUnavailable as exc:
            log.warning("idempotency claim refused: %s", exc)
            self._report("store_unavailable")
            return self._store_unavailable(exc, fields)

        if claim.state is ClaimState.COMPLETED:
            assert claim.response is not None
            self._report("replayed")
            return to_web_response(claim.response, replayed=True)
        if claim.state is ClaimState.IN_PROGRESS:
            self._report("conflict_in_progress")
            return _error(
                409,
                "idempotency_key_in_progress",
                "a request with this idempotency key is still being processed; retry later",
                retry_after=max(1, math.ceil(claim.retry_after)),
                **fields,
            )
        if claim.state is ClaimState.MISMATCH:
            self._report("mismatch")
            return _error(
                422,
                "idempotency_key_reused",
                "this idempotency key was already used for a different request",
                header=self.header,
                **fields,
            )

        try:
            response = await run(claim.joint)
        except Exception:
            try:
                await self.store.abandon(store_key)
            except StoreUnavailable as exc:  # the lease runs out on its own
                log.warning("could not release idempotency claim: %s", exc)
            raise

        if isinstance(response, KeptResponse):  # `run` stored it with its own last write
            self._report("first")
            return to_web_response(response)
        try:
            await self.store.complete(
                store_key, request_fingerprint, self._keepable(response), self.ttl
            )
        except StoreUnavailable as exc:
            # The work is done and cannot be undone here: the client gets its real
            # answer; a repeat sees 409 until the lease ends.
            log.warning("idempotency response not stored: %s", exc)
            self._report("store_unavailable")
            return to_web_response(response)
        self._report("first")
        return to_web_response(response)

    async def _claim(
        self, store_key: str, request_fingerprint: str, joint: JointInsert | None
    ) -> ClaimResult:
        ttl = self.in_progress_timeout
        claims = self._joint_claims
        if joint is not None and claims is not None and claims.accepts(joint):
            return await claims.claim_joint(store_key, request_fingerprint, ttl, joint)
        return await self.store.claim(store_key, request_fingerprint, ttl)

    @staticmethod
    def _store_unavailable(exc: StoreUnavailable, fields: Mapping[str, Any]) -> web.Response:
        return _error(
            503,
            "store_unavailable",
            f"the idempotency store {exc.store} is unavailable, so the request was not run",
            store=exc.store,
            retry_after=1,
            **fields,
        )
