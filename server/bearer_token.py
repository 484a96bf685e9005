"""The bearer token clients must send, followed as its file changes: a rotated Kubernetes
Secret (or any rewrite of ``auth.bearer_token_file``) takes effect within
``server.app.SECRETS_POLL_S`` (5 s) without a restart, and the token it replaced is still
accepted for ``auth.rotation_grace_s`` while clients move to the new one. Before, the file was read
once at start: a rotation needed every pod restarted, and a client given the new token
first was refused until then.

Invariants: auth never turns off - a file that reads empty, unreadable or not a valid
token keeps the current token (and says why, once per spell); the token is never logged,
only a short fingerprint. No grpc here; the file is read off the event loop by the caller
(``reload`` blocks on the file system).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from server.config import token_problem

log = logging.getLogger("innfer.token")


def fingerprint(token: bytes) -> str:
    """What the logs say of a token: the start of its SHA-256 (not the token).

    Example:
        >>> fingerprint(b"s3cret-token")
        'sha256:a81e611a'
    """
    return "sha256:" + hashlib.sha256(token).hexdigest()[:8]


class BearerToken:
    """The token in force, and the one it replaced until its grace ends.

    Example:
        >>> t = BearerToken("first-token", grace_s=60, clock=lambda: 0.0)
        >>> t.accepts(b"first-token"), t.accepts(b"other-token")
        (True, False)
    """

    def __init__(
        self,
        token: str,
        path: Path | None = None,
        grace_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.current = token.encode()
        self.path = path
        self.grace_s = grace_s
        self.clock = clock
        self._previous: bytes | None = None
        self._previous_until = 0.0
        self._seen = _stamp(path) if path is not None else None
        self._said: str | None = None  # the last problem logged (once per spell)

    def accepts(self, given: bytes) -> bool:
        """Whether ``given`` is the token, or the one it replaced within its grace (both
        compared in constant time)."""
        ok = hmac.compare_digest(given, self.current)
        if self._previous is not None:
            if self.clock() < self._previous_until:
                ok |= hmac.compare_digest(given, self._previous)
            else:
                self._previous = None
        return ok

    def reload(self) -> bool:
        """``read`` and ``rotate`` in one (tests, and callers without a loop); whether the
        token changed."""
        new = self.read()
        return new is not None and self.rotate(new)

    def read(self) -> bytes | None:
        """The file's token if the file changed and holds a usable one, else None
        (blocking: run it off the event loop; it touches only the file's bookkeeping)."""
        if self.path is None:
            return None
        stamp = _stamp(self.path)
        if stamp == self._seen:
            return None
        try:
            token = self.path.read_text().strip()
            problem = token_problem(token)
        except (OSError, UnicodeDecodeError) as exc:
            problem = getattr(exc, "strerror", None) or str(exc)
        if problem is not None:  # kept: never auth off, never a token no client can send
            if problem != self._said:
                log.error("auth: %s does not hold a usable token (%s); the current token "
                          "(%s) stays in force", self.path, problem,
                          fingerprint(self.current))  # fmt: skip
                self._said = problem
            return None
        self._seen, self._said = stamp, None
        return token.encode()

    def rotate(self, new: bytes) -> bool:
        """Make ``new`` the token, the current one accepted for ``grace_s`` more (on the
        event loop, where ``accepts`` runs); whether it changed."""
        if new == self.current:
            return False
        self._previous, self._previous_until = self.current, self.clock() + self.grace_s
        log.warning("auth: the bearer token changed (%s -> %s); the previous one is "
                    "accepted for %.0f s more", fingerprint(self.current), fingerprint(new),
                    self.grace_s)  # fmt: skip
        self.current = new
        return True


def _stamp(path: Path) -> tuple | None:
    """What tells a rewritten file (a Secret's swap changes the inode), or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
