"""The server's TLS certificate, key and client CA followed as their files change: a
certificate that cert-manager (or anyone) renews in place is served on new connections
within ``server.app.SECRETS_POLL_S`` (5 s), without a restart. Before, the files were read
once at start: a pod served its certificate until it expired, then every handshake failed.

gRPC asks ``fetch`` on each new connection's handshake (on its own threads): it hands over
a configuration read since, once, or None (keep the one in force). Connections open at the
change keep theirs. Invariant: only files that load as the start-up check loads them
(``TLSConfig.validate``: the chain, the key that matches it, the CA) are put in force -
a renewal caught half written, or a key that does not match, keeps the current ones and
is said once per spell.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
import threading
import time

import grpc

from runtime.configspec import ConfigError, Where
from server.config import TLSConfig, check_cert_dates

log = logging.getLogger("innfer.certificates")


class Certificates:
    """The server's TLS credentials, renewed as their files are.

    Example:
        >>> certs = Certificates(tls)  # doctest: +SKIP
        >>> server.add_secure_port(address, certs.credentials())  # doctest: +SKIP
        >>> certs.read()  # off the event loop: a renewal, if the files changed  # doctest: +SKIP
    """

    def __init__(self, tls: TLSConfig) -> None:
        self.tls = tls
        self._seen = self._stamps()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()
        self._said: str | None = None
        self._ssl: ssl.SSLContext | None = None  # the REST port's, where it serves
        self.renewals = 0

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port`` whose certificate follows ``offer``."""
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(),
            self._fetch,
            require_client_authentication=self.tls.client_ca is not None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        """An ``ssl.SSLContext`` for the REST port that hands each handshake the context of
        the files in force: ``read`` makes a renewal's (a fresh context, loaded whole - the
        port keeps the object it was given, and reloading that one in place could leave a
        new certificate beside the old key where the files changed mid-read)."""
        self._ssl = self._new_ssl()
        front = self._new_ssl()
        front.sni_callback = self._in_force  # (called on every ClientHello, SNI or none)
        if self.tls.client_ca is not None:
            # A resumed session skips the client's certificate: one signed by a client CA
            # since renewed away got in with its ticket. No tickets (TLS 1.2's server-side
            # session cache, which Python cannot turn off, still resumes until it expires).
            front.options |= ssl.OP_NO_TICKET
            front.num_tickets = 0
        return front

    def _new_ssl(self) -> ssl.SSLContext:
        tls = self.tls
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.cert, tls.key)
        if tls.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(tls.client_ca)
        return context

    def _in_force(self, connection, _server_name, _context) -> None:
        current = self._ssl
        if current is not None and connection.context is not current:
            connection.context = current

    def read(self) -> grpc.ServerCertificateConfiguration | None:
        """A configuration of the files if any changed and they load, else None (blocking:
        run it off the event loop)."""
        stamps = self._stamps()
        if stamps == self._seen:
            return None
        try:
            self._check_files()
            self.tls.validate(Where("tls"))
            check_cert_dates(self.tls.cert, time.time())
            configuration = self._configuration()
            renewed = None if self._ssl is None else self._new_ssl()
            if self._stamps() != stamps:  # rewritten between the check and the read: the
                return None  # pair read may not be the pair checked - looked at next time
        except (ConfigError, OSError, ValueError) as exc:
            problem = str(exc)
            if problem != self._said:
                log.error("tls: the renewed files do not load (%s); the certificate in force "
                          "stays until they do", problem)  # fmt: skip
                self._said = problem
            return None
        self._seen, self._said = stamps, None
        if renewed is not None:
            self._ssl = renewed  # the REST port's next handshake (gRPC's: at offer)
        return configuration

    def offer(self, configuration: grpc.ServerCertificateConfiguration) -> None:
        """Serve ``configuration`` from the next handshake on."""
        with self._lock:
            self._pending = configuration
        self.renewals += 1
        log.warning("tls: renewed files (%s) are served on new connections",
                    ", ".join(str(p) for p in self._paths() if p is not None))  # fmt: skip

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # gRPC's handshake threads: the renewal handed over once (the lock: an offer
        # landing between the read and the clear was lost for good)
        with self._lock:
            configuration, self._pending = self._pending, None
        return configuration

    def _paths(self) -> tuple:
        return (self.tls.cert, self.tls.key, self.tls.client_ca)

    def _check_files(self) -> None:
        """Regular files only: OpenSSL's read of a FIFO in a file's place hangs."""
        for path in self._paths():
            if path is not None and not stat.S_ISREG(os.stat(path).st_mode):
                raise ValueError(f"{path} is not a regular file")

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        tls = self.tls
        return grpc.ssl_server_certificate_configuration(
            [(tls.key.read_bytes(), tls.cert.read_bytes())],
            root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
        )

    def _stamps(self) -> tuple:
        """What tells rewritten files (a Secret's swap changes the inode)."""
        out = []
        for path in self._paths():
            try:
                st = os.stat(path) if path is not None else None
            except OSError:
                st = None
            out.append(None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)
