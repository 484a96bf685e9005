"""The bearer token clients must send, followed as its file changes: a rotated Kubernetes
Secret (or any rewrite of ``auth.bearer_token_file``) takes effect within
two looks of ``server.app.SECRETS_POLL_S`` (5-10 s: taken once unchanged over a look)
without a restart, and the token it replaced is still
accepted for ``auth.rotation_grace_s`` while clients move to the new one. Before, the file was read
once at start: a rotation needed every pod restarted, and a client given the new token
first was refused until then.

Invariants: auth never turns off - a file that reads empty, unreadable or not a valid
token keeps the current token (and says why, once per spell); the token is never logged,
only a short fingerprint. No grpc here; the file is read off the event loop by the caller
(``reload`` blocks on the file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import stat
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
    """The token in force, and each it replaced until that one's grace ends (a second
    rotation within the grace kept only the last: the clients' token was refused at once).

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
        self.path = path
        self.grace_s = grace_s
        self.clock = clock
        self._previous: list[tuple[bytes, float]] = []  # (token, accepted until)
        self._said: str | None = None  # the last problem logged (once per spell)
        self._unsettled = 0  # looks in a row that found the file changed again
        self._seen = self._settling = _stamp(path) if path is not None else None
        if path is not None:  # read again after the stamp: a token written between the
            # config's read and now was in force nowhere, and never looked at again
            with contextlib.suppress(OSError, UnicodeDecodeError, ValueError):
                fresh = _read_token(path)
                if token_problem(fresh) is None:
                    token = fresh
        self.current = token.encode()

    def accepts(self, given: bytes) -> bool:
        """Whether ``given`` is the token, or one it replaced still within that one's grace
        (each compared in constant time)."""
        ok = hmac.compare_digest(given, self.current)
        if self._previous:
            now = self.clock()
            self._previous = [(t, until) for t, until in self._previous if now < until]
            for old, _ in self._previous:
                ok |= hmac.compare_digest(given, old)
        return ok

    def reload(self) -> bool:
        """``read`` and ``rotate`` in one (tests, and callers without a loop); whether the
        token changed."""
        new = self.read()
        return new is not None and self.rotate(new)

    def read(self) -> bytes | None:
        """The file's token if the file changed - and has stayed as it is since the last
        look (a file rewritten in place is not taken half written) - and holds a usable
        one, else None (blocking: run it off the event loop; it touches only the file's
        bookkeeping)."""
        if self.path is None:
            return None
        stamp = _stamp(self.path)
        if stamp == self._seen:
            return None
        if stamp != self._settling:  # changed since the last look: looked at next time
            self._settling = stamp
            self._unsettled += 1
            if self._unsettled == UNSETTLED_SAID:  # (rewritten faster than it is looked at)
                log.warning("auth: %s has changed at each of %d looks; the token in force "
                            "(%s) stays until the file holds still for one", self.path,
                            UNSETTLED_SAID, fingerprint(self.current))  # fmt: skip
            return None
        self._unsettled = 0
        try:
            token = _read_token(self.path)
            problem = token_problem(token)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
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
        self._previous.append((self.current, self.clock() + self.grace_s))
        log.warning("auth: the bearer token changed (%s -> %s); the previous one is "
                    "accepted for %.0f s more", fingerprint(self.current), fingerprint(new),
                    self.grace_s)  # fmt: skip
        self.current = new
        return True


UNSETTLED_SAID = 3  # looks in a row finding the file changed again before that is said
MAX_TOKEN_FILE_BYTES = 4096  # beyond: no token (one gRPC metadata carries), not read whole


def _read_token(path: Path) -> str:
    """The token in ``path``, stripped: a regular file (a FIFO in its place hung the read,
    and with it the follower and the server's exit), read to ``MAX_TOKEN_FILE_BYTES``
    (a 200 MiB file was read whole and put in force)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = os.read(fd, MAX_TOKEN_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise ValueError(f"more than {MAX_TOKEN_FILE_BYTES} bytes")
    return data.decode().strip()


def _stamp(path: Path) -> tuple | None:
    """What tells a rewritten file (a Secret's swap changes the inode), or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
