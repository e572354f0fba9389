"""Optional TLS on both front doors (gRPC and HTTP), from one certificate and key.

The metrics port stays plain HTTP: Prometheus scrapes it from inside the cluster.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from sloserve.errors import FieldError


@dataclass(frozen=True)
class TlsFiles:
    cert_chain: bytes  # PEM: the server certificate, then any intermediates
    private_key: bytes  # PEM
    cert_path: Path
    key_path: Path

    @classmethod
    def load(cls, cert: Path | None, key: Path | None) -> TlsFiles | None:
        """None when neither is given; FieldError (tls_cert / tls_key) when one is missing,
        unreadable, or the two do not belong together."""
        if cert is None and key is None:
            return None
        if cert is None:
            raise FieldError("tls_cert", "is required with --tls-key")
        if key is None:
            raise FieldError("tls_key", "is required with --tls-cert")
        files = cls(_read(cert, "tls_cert"), _read(key, "tls_key"), cert, key)
        files.ssl_context()  # checks now, before any port is opened, that they fit
        return files

    def ssl_context(self) -> ssl.SSLContext:
        """The HTTP server's context."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.cert_path, self.key_path)
        except ssl.SSLError as error:
            raise FieldError(
                "tls_key", f"{self.key_path} does not fit {self.cert_path}: {error}"
            ) from None
        return context

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.cert_chain)])


def _read(path: Path, field: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise FieldError(field, f"cannot read {path}: {error.strerror}") from None
    if b"-----BEGIN " not in data:
        raise FieldError(field, f"{path} is not PEM")
    return data
