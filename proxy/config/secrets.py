"""`${file:/path}`: config values read from files, and what must never be shown of them.

Kubernetes mounts a Secret as files, and unlike an environment variable a file can
change under a running process (the kubelet swaps a `..data` symlink), so secrets
such as the admin token or a store's password are better read from files than from
the environment. Reading one is the easy part; this module also remembers, for the
config it belongs to, every value that came from a file (so `/admin/config`, config
errors and log lines replace it with `***` wherever it appears, whole or inside a
URL) and the digest of every file read (so the reloader can tell when one changed
without keeping or showing its content).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

REDACTED = "***"


class SecretFileError(ValueError):
    """A `${file:...}` that cannot be used; the message names the file, never its content.

    `digest` is the sha256 of the bytes read when the file could be read (empty, not
    UTF-8), so a reloader waits for those bytes to change before trying again.
    """

    def __init__(self, message: str, digest: str | None = None) -> None:
        super().__init__(message)
        self.digest = digest


def file_digest(path: str | Path) -> str | None:
    """sha256 of what `path` resolves to now (symlinks followed), or None if unreadable."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def trim_final_newline(text: str) -> str:
    """`text` without ONE final `\\n` or `\\r\\n`: what `echo` and editors add, and no more.

    Only one is taken, so a secret that really ends in whitespace keeps the rest of it.
    """
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


def read_secret_file(path: str) -> tuple[str, str]:
    """The secret in the file at `path` (trimmed), and the sha256 of the bytes read.

    Raises SecretFileError for a relative path (relative to what? the working
    directory of a container is an accident), a file that cannot be read, one that
    is not UTF-8, and an empty one (an unpopulated Secret, not a password).
    """
    if not path.startswith("/"):
        raise SecretFileError(f"secret file {path!r} must be an absolute path")
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecretFileError(f"cannot read secret file {path}: {exc.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretFileError(f"secret file {path} is not UTF-8 text", digest) from None
    value = trim_final_newline(text)
    if not value:
        raise SecretFileError(f"secret file {path} is empty", digest)
    return value, digest


def _forms(value: str) -> set[str]:
    """`value` as written, as it looks inside a URL (percent-encoded or decoded: a
    client library may print a store URL's password either way), and as `repr`
    escapes it (a validation error quotes the input it refused with `!r`)."""
    forms = (value, quote(value, safe=""), unquote(value), repr(value)[1:-1])
    return {form for form in forms if form}


@dataclass(frozen=True)
class FileSecrets:
    """What of one config came from files: the values to hide, the files to watch."""

    values: frozenset[str] = frozenset()
    """Every value read from a file, in each form it may be printed in."""
    digests: Mapping[str, str | None] = field(default_factory=dict, hash=False)
    """Each file referenced -> sha256 of the bytes read (None: it could not be read)."""
    _longest_first: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # the longest first, so a secret containing a shorter one is hidden whole
        ordered = tuple(sorted(self.values, key=len, reverse=True))
        object.__setattr__(self, "_longest_first", ordered)

    @classmethod
    def of(cls, values: Iterable[str], digests: Mapping[str, str | None]) -> FileSecrets:
        """From the raw values read; each is kept in its URL forms too."""
        forms: set[str] = set()
        for value in values:
            forms |= _forms(value)
        return cls(frozenset(forms), dict(digests))

    def __bool__(self) -> bool:
        return bool(self.values)

    def __or__(self, other: FileSecrets) -> FileSecrets:
        return FileSecrets(self.values | other.values, {**self.digests, **other.digests})

    def redact(self, text: str) -> str:
        """`text` with every secret value in it replaced by `***`."""
        for secret in self._longest_first:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text
