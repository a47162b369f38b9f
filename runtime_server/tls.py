"""The server's TLS context: certificate and key checked at start, with messages that say which."""

from __future__ import annotations

import ssl

from dpa.contract.errors import UserError
from runtime_server.config import ServerConfig

__all__ = ["server_ssl_context"]


def server_ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    """TLS 1.2+ context for ``config.tls_cert``/``tls_key``; None when the server speaks plain HTTP."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    for what, path in (("certificate", config.tls_cert), ("key", config.tls_key)):
        if not path.is_file():
            raise UserError(f"TLS {what} file {path} does not exist")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    except ssl.SSLError as exc:
        raise UserError(
            f"cannot use {config.tls_cert} with {config.tls_key} ({exc.reason or exc}): "
            "both must be PEM, and the key must match the certificate"
        ) from None
    return context
