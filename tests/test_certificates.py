"""The TLS certificate followed as its files change (server/certificates.py): a renewed
certificate is served on new connections without a restart, connections open at the change
keep theirs, and files that do not load together keep the certificate in force."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from serverutil import ServerThread
from tritonclient.utils import InferenceServerException

from server import app

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl here")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Two CAs, each with a server certificate for 127.0.0.1 (``server-<ca>.crt/.key``)."""
    d = tmp_path_factory.mktemp("pki")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for ca in ("ca1", "ca2"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
                 "-out", f"{ca}.crt", "-days", "2", "-subj", f"/CN={ca}", cwd=d)  # fmt: skip
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"server-{ca}.key", "-out",
                 f"server-{ca}.csr", "-subj", "/CN=server", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"server-{ca}.csr", "-CA", f"{ca}.crt", "-CAkey",
                 f"{ca}.key", "-CAcreateserial", "-out", f"server-{ca}.crt", "-days", "2",
                 "-extfile", "san.cnf", cwd=d)  # fmt: skip
    return d


def _put(src: Path, dst: Path) -> None:
    """Copy ``src`` over ``dst`` as a Secret volume swaps it (a new file moved over)."""
    tmp = dst.with_name(dst.name + ".new")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _works(address: str, ca: Path) -> bool:
    c = tc.InferenceServerClient(address, ssl=True, root_certificates=str(ca))
    try:
        x = np.zeros((1, 1, 8, 8), np.float32)
        i = tc.InferInput("input", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        return c.infer("tiny", [i], client_timeout=5).as_numpy("logits").shape == (1, 10)
    except InferenceServerException:
        return False
    finally:
        c.close()


def test_a_renewed_certificate_is_served_without_a_restart(
    pki, tmp_path, model_repository, monkeypatch, caplog
):
    monkeypatch.setattr(app, "SECRETS_POLL_S", 0.05)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    _put(pki / "server-ca1.crt", cert)
    _put(pki / "server-ca1.key", key)
    tls = {"cert": str(cert), "key": str(key)}
    s = ServerThread({"repository": str(model_repository), "models": ["tiny"], "tls": tls})
    s.start()
    held = tc.InferenceServerClient(s.address, ssl=True, root_certificates=str(pki / "ca1.crt"))
    try:
        assert _works(s.address, pki / "ca1.crt") and not _works(s.address, pki / "ca2.crt")
        assert held.is_model_ready("tiny")  # its connection opens on the old certificate
        # Half a renewal (the certificate without its key): the one in force stays.
        with caplog.at_level(logging.ERROR, logger="innfer.certificates"):
            _put(pki / "server-ca2.crt", cert)
            time.sleep(0.5)
        assert "do not load" in caplog.text and "does not match" in caplog.text
        assert _works(s.address, pki / "ca1.crt")
        _put(pki / "server-ca2.key", key)  # the renewal completes
        deadline = time.monotonic() + 10
        while not _works(s.address, pki / "ca2.crt"):
            assert time.monotonic() < deadline, "the renewed certificate was never served"
            time.sleep(0.05)
        assert not _works(s.address, pki / "ca1.crt")  # new connections: the new one only
        assert held.is_model_ready("tiny")  # an open connection keeps its own
        assert s.server.certificates.renewals == 1
    finally:
        held.close()
        s.stop()


def _https_works(port: int, ca: Path) -> bool:
    """A REST call over HTTPS verified against ``ca`` (a fresh connection: a handshake)."""
    import ssl
    import urllib.request

    context = ssl.create_default_context(cafile=str(ca))
    url = f"https://127.0.0.1:{port}/v2/models/tiny/ready"
    try:
        with urllib.request.urlopen(url, context=context, timeout=5) as r:
            return r.status == 200
    except OSError:  # (urllib's URLError wraps the failed verification)
        return False


def test_the_rest_port_serves_https_and_follows_a_renewal(pki, tmp_path, model_repository,
                                                          monkeypatch):  # fmt: skip
    monkeypatch.setattr(app, "SECRETS_POLL_S", 0.05)
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    _put(pki / "server-ca1.crt", cert)
    _put(pki / "server-ca1.key", key)
    s = ServerThread({"repository": str(model_repository), "models": ["tiny"], "http_port": 0,
                      "tls": {"cert": str(cert), "key": str(key)}})  # fmt: skip
    s.start()
    port = s.server.rest.port
    try:
        assert _https_works(port, pki / "ca1.crt") and not _https_works(port, pki / "ca2.crt")
        _put(pki / "server-ca2.crt", cert)  # half a renewal: the pair in force stays
        time.sleep(0.5)
        assert _https_works(port, pki / "ca1.crt")
        _put(pki / "server-ca2.key", key)
        deadline = time.monotonic() + 10
        while not _https_works(port, pki / "ca2.crt"):
            assert time.monotonic() < deadline, "the renewed certificate was never served"
            time.sleep(0.05)
        assert not _https_works(port, pki / "ca1.crt")
    finally:
        s.stop()


def test_a_renewal_to_a_certificate_out_of_its_dates_or_no_file_keeps_the_one_in_force(
    pki, tmp_path, caplog
):
    # Put in force, an expired renewal failed every new handshake (review 206); a FIFO in
    # a file's place hung OpenSSL's read, and with it the follower.
    from server.certificates import Certificates
    from server.config import TLSConfig
    from server.config import check_cert_dates as _check_dates

    cert = pki / "server-ca1.crt"
    _check_dates(cert, time.time())  # valid now (2 days)
    with pytest.raises(ValueError, match="expired on"):
        _check_dates(cert, time.time() + 3 * 86400)
    with pytest.raises(ValueError, match="is not valid before"):
        _check_dates(cert, time.time() - 86400)

    tls_cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    _put(cert, tls_cert)
    _put(pki / "server-ca1.key", key)
    certs = Certificates(TLSConfig(cert=tls_cert, key=key))
    tls_cert.unlink()
    os.mkfifo(tls_cert)
    with caplog.at_level(logging.ERROR, logger="innfer.certificates"):
        assert certs.read() is None
    assert "is not a regular file" in caplog.text


def test_files_rewritten_between_their_check_and_their_read_are_looked_at_again(
    pki, tmp_path, monkeypatch
):
    # The pair checked was read again from disk: a renewal landing in between put an
    # unchecked pair in force (review 209).
    from server.certificates import Certificates
    from server.config import TLSConfig

    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    _put(pki / "server-ca1.crt", cert)
    _put(pki / "server-ca1.key", key)
    certs = Certificates(TLSConfig(cert=cert, key=key))
    _put(pki / "server-ca2.crt", cert)
    _put(pki / "server-ca2.key", key)
    real = Certificates._configuration

    def configuration(self):
        got = real(self)
        _put(pki / "server-ca1.crt", cert)  # the next renewal's first file, mid-read
        return got

    monkeypatch.setattr(Certificates, "_configuration", configuration)
    assert certs.read() is None  # not put in force: looked at again next time
    monkeypatch.setattr(Certificates, "_configuration", real)
    _put(pki / "server-ca1.key", key)  # that renewal completes
    assert certs.read() is not None


def test_a_certificate_not_valid_now_is_refused_at_start(pki, tmp_path, monkeypatch):
    # An expired (or not yet valid) certificate passed `config check` and the server's start
    # ("ready"), then failed every handshake; only a renewal's dates were checked (review
    # helper-277).
    import server.config as config_module
    from runtime.configspec import ConfigError
    from server.config import ServerConfig

    tls = {"cert": str(pki / "server-ca1.crt"), "key": str(pki / "server-ca1.key")}
    ServerConfig.from_dict({"repository": str(tmp_path), "tls": tls})  # valid now
    real = time.time
    for shift, said in ((3 * 86400, "expired on"), (-86400, "is not valid before")):
        monkeypatch.setattr(config_module.time, "time", lambda s=shift: real() + s)
        with pytest.raises(ConfigError, match=rf"tls\.cert.*a certificate valid now.*{said}"):
            ServerConfig.from_dict({"repository": str(tmp_path), "tls": tls})
        monkeypatch.undo()
