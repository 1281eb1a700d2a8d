"""Aggregator configuration (YAML file or defaults): where it listens, keeps state, and finds the broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from aggregator.auth import OperatorToken
from aggregator.tracking.config import TrackingConfig
from federation.schema import Frozen
from federation.transport import BrokerConfig, TLSConfig


class AggregatorConfig(Frozen):
    # Address and port of the HTTPS API, console and /metrics.
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)
    # State store: sqlite:///REL or sqlite:////ABS (as SQLAlchemy), or postgresql://user@host/db.
    state_url: str = "sqlite:////var/fedsilo/aggregator/state.db"
    # Blob store for models and updates: file:///ABS or file://REL.
    blob_url: str = "file:///var/fedsilo/aggregator/blobs"
    # Each finished job's report (HTML, metrics, plots, final model) goes to <report_dir>/<job id>/.
    report_dir: Path = Path("/var/fedsilo/aggregator/reports")
    # The MQTT broker jobs and tasks are published on.
    broker: BrokerConfig = BrokerConfig(port=8883)
    # Server certificate and key, and the CA that site and operator client certificates must chain to.
    # Also used to connect to the broker unless `broker.tls` is given. Required to serve.
    tls: TLSConfig | None = None
    # Ed25519 key every job offer and round task is signed with; sites pin its public half.
    signing_key: Path | None = None
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    # How long an idle HTTPS connection stays open. Each costs ≈0.4 MB (asyncio's 256 KiB TLS read buffer and
    # OpenSSL's): with thousands of sites, shorten it (or terminate TLS at the ingress) to trade memory for
    # handshakes; `bench/scale.py` measures both.
    http_keepalive_s: float = Field(default=75.0, ge=0, le=3600)
    # A site whose heartbeats stop for this long is shown offline (agents send one every few seconds).
    site_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    tracking: TrackingConfig = TrackingConfig()
    # Operator bearer tokens (sha256 only) for the console and scripts; operator certificates also work.
    operators: tuple[OperatorToken, ...] = ()
    # On SIGTERM, how long requests in flight may take to finish before their connections are closed. An update
    # cut off is not acknowledged, so its agent sends it again; an acknowledged one is already durable.
    shutdown_grace_s: float = Field(default=1.0, ge=0, le=60)
    # JSON log lines (None: JSON unless stderr is a terminal).
    log_json: bool | None = None

    @classmethod
    def load(cls, path: Path | None) -> AggregatorConfig:
        if path is None:
            return cls()
        data: Any = yaml.safe_load(path.read_text()) or {}
        return cls.model_validate(data)
