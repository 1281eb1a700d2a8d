"""Transport settings shared by both sides: broker address and TLS material for MQTT and HTTPS."""

from __future__ import annotations

import ssl
from pathlib import Path

from pydantic import Field

from federation.schema import Frozen


class TLSConfig(Frozen):
    """CA to trust, and this party's own certificate and key (for mutual TLS)."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
        if self.cert_file is not None:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file) if self.key_file else None)
        return ctx

    def server_context(self, require_client_cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca_file))
        if self.cert_file is None:
            raise ValueError("a TLS server needs cert_file and key_file")
        ctx.load_cert_chain(str(self.cert_file), str(self.key_file) if self.key_file else None)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        return ctx


class BrokerConfig(Frozen):
    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    tls: TLSConfig | None = None
    keepalive_s: int = Field(default=15, ge=5, le=3600)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=10.0, gt=0)
