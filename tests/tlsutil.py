"""A throw-away PKI for TLS tests: one CA and server certificates for 127.0.0.1 and localhost.

Made with `cryptography` in the test run (nothing is checked in); certificates carry the serial
the test chooses, so a test can tell which one the broker served.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import socket
import ssl
import threading
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Pki:
    """A CA in `directory`; `issue` writes a server certificate and key next to it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.ca_cert = (
            x509.CertificateBuilder()
            .subject_name(_name("broker test CA"))
            .issuer_name(_name("broker test CA"))
            .public_key(self.ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        self.ca_path = directory / "ca.pem"
        self.ca_path.write_bytes(self.ca_cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, serial: int, name: str = "server") -> tuple[Path, Path, str]:
        """A certificate for 127.0.0.1/localhost: (cert path, key path, base64 SPKI sha256)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("localhost"))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        cert_path = self.dir / f"{name}.crt"
        key_path = self.dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cert_path, key_path, base64.b64encode(hashlib.sha256(spki).digest()).decode()

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only this CA and checks the host name."""
        return ssl.create_default_context(cafile=str(self.ca_path))


class ThreadSafeTls:
    """A TLS client socket two threads may use at once, for websockets' sync client (it reads in
    a background thread while the caller sends).

    OpenSSL forbids SSL_read and SSL_write on one SSL object at the same time, and an
    `ssl.SSLSocket` shared that way does exactly that: under CPU load about one opening handshake
    in 250 hung until the client's timeout (0 in 3,600 with one thread or asyncio). Here the TLS
    state is an SSLObject used under a lock, and socket I/O happens outside it; every record read
    is decrypted at once, so no plaintext waits where the reader's selector cannot see it.
    """

    def __init__(
        self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str, timeout: float
    ) -> None:
        self.sock = sock
        self.family = sock.family
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_hostname=server_hostname)
        self._lock = threading.Lock()  # the SSLObject and its BIOs
        self._send_lock = threading.Lock()  # ciphertext leaves in the order it was made
        sock.settimeout(timeout)
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_pending()
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("EOF during the TLS handshake") from None
                self._in.write(data)
        self._send_pending()
        sock.settimeout(None)

    def _send_pending(self) -> None:
        with self._send_lock:
            with self._lock:
                data = self._out.read()
            if data:
                self.sock.sendall(data)

    def sendall(self, data: bytes) -> None:
        with self._send_lock:
            with self._lock:
                self._tls.write(data)
                out = self._out.read()
            self.sock.sendall(out)

    def recv(self, bufsize: int) -> bytes:
        while True:
            chunks = []
            with self._lock:
                try:
                    while chunk := self._tls.read(1 << 16):
                        chunks.append(chunk)
                    return b"".join(chunks)  # then the peer's close_notify
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    return b"".join(chunks)
                pending = self._out.pending
            if pending:
                self._send_pending()  # TLS's own answers (a key update)
            if chunks:
                return b"".join(chunks)
            data = self.sock.recv(65536)
            if not data:
                return b""
            with self._lock:
                self._in.write(data)

    def version(self) -> str | None:
        return self._tls.version()

    def getpeercert(self, binary_form: bool = False) -> Any:
        return self._tls.getpeercert(binary_form)

    def fileno(self) -> int:
        return self.sock.fileno()

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def setsockopt(self, *args: Any) -> None:
        self.sock.setsockopt(*args)

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()

    def getsockname(self) -> Any:
        return self.sock.getsockname()

    def getpeername(self) -> Any:
        return self.sock.getpeername()
