"""TLS server contexts that choose their certificate by SNI, and take new certificates while
running: connections already open keep the one they started with, new ones get the new one.

One :class:`CertificateSet` per process feeds the tracker's TLS listener (``http.tls_listen``)
and, with ``smtp.tls_acme``, STARTTLS: :meth:`CertificateSet.server_context` is the context
to listen with; its SNI callback switches each connection to the context of the host it
names (the default host's when it names none, or one without a certificate).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable
from pathlib import Path

from relay.certs.plan import Certificate


def base_context() -> ssl.SSLContext:
    """A server context for TLS 1.2 and later with Python's default ciphers."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def load_pem(context: ssl.SSLContext, chain_pem: str, key_pem: str) -> None:
    """``load_cert_chain`` from memory: it reads files only, so the PEM goes through an
    anonymous in-memory file (never written to disk)."""
    fd = os.memfd_create("relay-certificate", os.MFD_CLOEXEC)
    try:
        data = (key_pem + "\n" + chain_pem).encode()
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class CertificateSet:
    """Contexts by host name: certificates from the store (:meth:`update`) and an optional
    certificate of the operator's own for one host (files, read at start), which the store's
    never replace."""

    def __init__(self, static: tuple[str, Path, Path] | None = None) -> None:
        self._contexts: dict[str, ssl.SSLContext] = {}
        self._loaded: dict[str, tuple[str, str]] = {}
        self._static_host: str | None = None
        if static is not None:
            host, cert, key = static
            self._static_host = host.lower()
            self._contexts[self._static_host] = base_context()
            self._contexts[self._static_host].load_cert_chain(cert, key)

    def server_context(self, default_host: str | None) -> ssl.SSLContext:
        """A context to listen with: each connection gets the certificate of the host its
        client names, else ``default_host``'s (no SNI, or a name without a certificate)."""
        context = base_context()
        default = (default_host or "").lower()

        def choose(connection: ssl.SSLObject, name: str | None,
                   _context: ssl.SSLContext) -> int | None:
            chosen = self.context_for(name) or self._contexts.get(default)
            if chosen is None:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            connection.context = chosen
            return None

        context.sni_callback = choose
        return context

    def update(self, certificates: Iterable[Certificate]) -> list[str]:
        """Take the certificates of the store that are new or changed; returns their hosts."""
        changed = []
        for cert in certificates:
            if cert.cert_pem is None or cert.key_pem is None or cert.host == self._static_host:
                continue
            if self._loaded.get(cert.host) == (cert.cert_pem, cert.key_pem):
                continue
            context = base_context()
            load_pem(context, cert.cert_pem, cert.key_pem)
            self._contexts[cert.host] = context
            self._loaded[cert.host] = (cert.cert_pem, cert.key_pem)
            changed.append(cert.host)
        return changed

    def has(self, host: str) -> bool:
        return host.lower() in self._contexts

    def context_for(self, name: str | None) -> ssl.SSLContext | None:
        return None if name is None else self._contexts.get(name.lower().rstrip("."))
