"""The bearer token followed as its file changes (server/bearer_token.py): a rotated Secret
takes effect without a restart, the replaced token is accepted for its grace, and a file
that reads empty or invalid never turns auth off."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from serverutil import ServerThread
from tritonclient.utils import InferenceServerException

from server import app
from server.bearer_token import BearerToken

OLD, NEW = "old-token-123456", "new-token-654321"


def _swap(path: Path, text: str) -> None:
    """Rewrite ``path`` the way a Kubernetes Secret volume does: a new file moved over."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_a_new_token_takes_over_and_the_old_one_lasts_its_grace(tmp_path):
    path = tmp_path / "token"
    path.write_text(OLD + "\n")
    now = [0.0]
    t = BearerToken(OLD, path, grace_s=60, clock=lambda: now[0])
    assert not t.reload()  # unchanged: nothing read
    _swap(path, NEW + "\n")
    assert not t.reload()  # changed since the last look: taken once it has stayed so
    assert t.reload()
    assert t.accepts(NEW.encode()) and t.accepts(OLD.encode())
    now[0] = 30.0
    _swap(path, "third-token-999")  # a second rotation within the first one's grace:
    assert not t.reload() and t.reload()  # OLD kept its own (it was refused at once)
    assert all(t.accepts(x.encode()) for x in (OLD, NEW, "third-token-999"))
    now[0] = 60.0
    assert not t.accepts(OLD.encode()) and t.accepts(NEW.encode())
    now[0] = 90.0
    assert not t.accepts(NEW.encode()) and t.accepts(b"third-token-999")
    assert not t.accepts(b"anything-else")


@pytest.mark.parametrize(
    "content, said", [("", "at least 8 characters"), ("short", "at least 8 characters"),
                      ("tab\tinside-token", "printable ASCII"), (None, "No such file"),
                      ("x" * 2000, "at most 1,024 characters"),  # no client could send it
                      ("x" * 5000, "more than 4096 bytes"),  # not read whole
                      ("fifo", "not a regular file")],  # its read hung the follower
)  # fmt: skip
def test_a_file_without_a_usable_token_keeps_the_current_one(tmp_path, caplog, content, said):
    # A Secret mid-update that reads empty must never turn auth off (every client let in),
    # nor put in force a token no client can send.
    path = tmp_path / "token"
    path.write_text(OLD)
    t = BearerToken(OLD, path)
    if content is None:
        path.unlink()
    elif content == "fifo":
        path.unlink()
        os.mkfifo(path)
    else:
        _swap(path, content)
    with caplog.at_level(logging.ERROR, logger="innfer.token"):
        assert not any(t.reload() for _ in range(4))  # said once per spell
    assert t.accepts(OLD.encode()) and not t.accepts(b"")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and said in errors[0].getMessage()
    assert OLD not in caplog.text  # a fingerprint, never the token
    path.unlink(missing_ok=True)  # (a FIFO: replaced by a file)
    _swap(path, NEW)  # the Secret settles: taken then
    assert not t.reload() and t.reload() and t.accepts(NEW.encode())


def test_a_running_server_follows_its_token_file(tmp_path, model_repository, monkeypatch):
    monkeypatch.setattr(app, "SECRETS_POLL_S", 0.05)
    path = tmp_path / "token"
    path.write_text(OLD)
    x = np.zeros((1, 1, 8, 8), np.float32)

    def infer(client, token):
        i = tc.InferInput("input", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        return client.infer("tiny", [i], headers={"authorization": f"Bearer {token}"})

    for grace in (300, 0):
        auth = {"bearer_token_file": str(path), "rotation_grace_s": grace}
        path.write_text(OLD)
        s = ServerThread({"repository": str(model_repository), "models": ["tiny"],
                          "auth": auth}).start()  # fmt: skip
        c = tc.InferenceServerClient(s.address)
        try:
            infer(c, OLD)
            _swap(path, NEW)
            deadline = time.monotonic() + 10
            while True:  # taken within a few polls (it was read once, at start)
                try:
                    infer(c, NEW)
                    break
                except InferenceServerException:
                    assert time.monotonic() < deadline, "the new token was never taken"
                    time.sleep(0.05)
            if grace:
                infer(c, OLD)  # clients still on the old token: served within the grace
            else:
                with pytest.raises(InferenceServerException) as e:
                    infer(c, OLD)
                assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        finally:
            c.close()
            s.stop()


def test_a_stream_opened_with_a_rotated_out_token_is_refused_from_then_on(
    tmp_path, model_repository, monkeypatch
):
    # The token was checked once, at the stream's open: a stream opened before a rotation
    # (of a leaked token, say) went on being served past the grace (review 206).
    import queue

    monkeypatch.setattr(app, "SECRETS_POLL_S", 0.05)
    path = tmp_path / "token"
    path.write_text(OLD)
    auth = {"bearer_token_file": str(path), "rotation_grace_s": 0}
    s = ServerThread({"repository": str(model_repository), "models": ["tiny"],
                      "auth": auth}).start()  # fmt: skip
    c = tc.InferenceServerClient(s.address)
    got: queue.Queue = queue.Queue()
    x = np.zeros((1, 1, 8, 8), np.float32)
    i = tc.InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    try:
        c.start_stream(lambda result, error: got.put(error),
                       headers={"authorization": f"Bearer {OLD}"})  # fmt: skip
        c.async_stream_infer("tiny", [i])
        assert got.get(timeout=10) is None  # served
        _swap(path, NEW)
        deadline = time.monotonic() + 10
        while s.server.token.accepts(OLD.encode()):
            assert time.monotonic() < deadline, "the rotation was never taken"
            time.sleep(0.05)
        c.async_stream_infer("tiny", [i])
        error = got.get(timeout=10)
        assert error is not None and "UNAUTHENTICATED" in str(error)
        assert "no longer accepted (rotated out)" in str(error)
    finally:
        c.stop_stream()
        c.close()
        s.stop()


def test_a_file_that_never_holds_still_is_said(tmp_path, caplog):
    # Rewritten at least as often as it is looked at, it was never taken - and nothing
    # said why (review 209).
    path = tmp_path / "token"
    path.write_text(OLD)
    t = BearerToken(OLD, path)
    with caplog.at_level(logging.WARNING, logger="innfer.token"):
        for i in range(4):
            _swap(path, f"token-number-{i}-xyz")
            assert not t.reload()
    said = [r for r in caplog.records if "has changed at each of 3 looks" in r.getMessage()]
    assert len(said) == 1 and t.accepts(OLD.encode())
