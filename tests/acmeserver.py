"""Pebble, Let's Encrypt's ACME test server (Debian package ``pebble``), started for a test:
its own TLS certificate (made here, with a CA the relay is given as ``acme.ca_bundle``), its
HTTP-01 checks sent to ``http_port`` (the relay's plain listener) and its DNS lookups to the
test's DNS server (tests/dnsserver.py)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.harness import free_port, wait_until

PEBBLE = shutil.which("pebble")


class Pebble:
    def __init__(self, folder: Path, http_port: int, dns_address: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.ca_file, cert_file, key_file = _certificates(folder)
        self.port, self.management_port = free_port(), free_port()
        config = folder / "pebble.json"
        config.write_text(json.dumps({"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(cert_file), "privateKey": str(key_file),
            "httpPort": http_port, "tlsPort": free_port(),
            "ocspResponderURL": "", "externalAccountBindingRequired": False}}))
        self.log = folder / "pebble.log"
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0",
               "PEBBLE_AUTHZREUSE": "0"}
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [str(PEBBLE), "-config", str(config), "-dnsserver", dns_address],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        self.tls = ssl.create_default_context(cafile=str(self.ca_file))
        wait_until(self._up, what="pebble to answer")

    @property
    def directory(self) -> str:
        return f"https://localhost:{self.port}/dir"

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"pebble exited: {self.log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def root_pem(self) -> str:
        """The root that signs the certificates this Pebble issues (made at its start)."""
        url = f"https://localhost:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=self.tls) as response:
            return response.read().decode()

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signs for localhost and 127.0.0.1 (Pebble's listeners)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_file, cert_file, key_file = (folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_file, cert_file, key_file
