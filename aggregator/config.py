"""Aggregator configuration (YAML file or defaults): where it listens, keeps state, and finds the broker."""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field, model_validator

from aggregator.auth import OperatorToken
from aggregator.blobs_s3 import S3BlobConfig
from aggregator.tracking.config import TrackingConfig
from federation.schema import Frozen
from federation.transport import BrokerConfig, TLSConfig
from federation.yamlfile import load_yaml, read_text, validate_text


class AggregatorConfig(Frozen):
    # Address and port of the HTTPS API, console and /metrics.
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)
    # State store: sqlite:///REL or sqlite:////ABS (as SQLAlchemy), or postgresql://user@host/db.
    state_url: str = "sqlite:////var/fedsilo/aggregator/state.db"
    # Blob store for models and updates: file:///ABS, file://REL, or s3://BUCKET/PREFIX (settings in blob_s3).
    blob_url: str = "file:///var/fedsilo/aggregator/blobs"
    blob_s3: S3BlobConfig = S3BlobConfig()
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
    # The largest model a job may ask for, federation-wide (each site's policy may allow less): counted from the
    # job's model and shape, before anything is built.
    max_model_parameters: int = Field(default=10_000_000, ge=1, le=1_000_000_000)
    # How long an idle HTTPS connection stays open. Each costs ≈0.4 MB (asyncio's 256 KiB TLS read buffer and
    # OpenSSL's): with thousands of sites, shorten it (or terminate TLS at the ingress) to trade memory for
    # handshakes; `bench/scale.py` measures both.
    http_keepalive_s: float = Field(default=75.0, ge=0, le=3600)
    # A connection that has not sent a whole request's headers within `http_keepalive_s` is closed (aiohttp arms
    # that timer when the connection opens); a request body must arrive within this many seconds (408 otherwise):
    # a client trickling bytes cannot hold a connection and its buffers for long.
    http_body_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    # A site whose heartbeats stop for this long is shown offline (agents send one every few seconds).
    site_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    # What one site may send over MQTT (status heartbeats, job answers): the largest message, and a token bucket of
    # `mqtt_site_burst` messages refilled at `mqtt_site_rate_per_s`. Beyond, messages are dropped and counted
    # (`fedsilo_site_messages_rejected`). An agent sends a heartbeat every few seconds and one answer per job.
    # At most mqtt_max_publish_bytes, the broker's own limit: the broker never drops what the aggregator accepts.
    mqtt_max_message_bytes: int = Field(default=16_384, ge=1024, le=16 << 20)
    # The largest message the aggregator publishes (a signed job offer carries the whole job: its site list, its
    # features, a prior). A job whose offer is larger is refused at submit (`offer_too_large`), because the broker's
    # `message_size_limit` is this (the Helm chart and `fedsilo broker config` set it so: 256 KiB,
    # `fedsilo.broker.MESSAGE_SIZE_LIMIT`) and Mosquitto drops a larger message without telling its sender.
    mqtt_max_publish_bytes: int = Field(default=262_144, ge=16_384, le=16 << 20)
    mqtt_site_rate_per_s: float = Field(default=2.0, gt=0, le=1000)
    mqtt_site_burst: int = Field(default=20, ge=1, le=10_000)
    # Serve /metrics on a listener of its own (plain HTTP, e.g. only inside the cluster) instead of the HTTPS API's
    # port, where it then answers 404. None: on the API's port, like /healthz, without a client certificate.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    tracking: TrackingConfig = TrackingConfig()
    # This replica's name, unique among the aggregator's replicas and stable across its restarts (the pod name on
    # Kubernetes): jobs are leased to it by name, so a restarted replica takes its own jobs back at once.
    replica_id: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128,
                            pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
    # Where the other replicas reach this one to forward a job's requests (None: https://<host>:<port>); its TLS
    # certificate must be valid for that name.
    advertise_url: str | None = None
    # A replica that has not renewed a job's lease for this long loses the job to another replica (see
    # aggregator/leases.py): the takeover time after a crash is about this plus a quarter of it.
    lease_ttl_s: float = Field(default=3.0, gt=0.2, le=300)
    # The federation CA's certificate revocation list (`fedsilo certs revoke` writes it as crl.pem in the PKI
    # directory). A client certificate whose serial it lists is refused (403 certificate_revoked) on every request;
    # the file is re-read when it changes, without a restart. It must be signed by the CA in `tls.ca_file`.
    # None: no certificate is checked for revocation.
    crl_file: Path | None = None
    # Operator bearer tokens (sha256 only) for the console and scripts; operator certificates also work. These are
    # read once, at start: tokens that must be revoked or expire without a restart belong in `operators_file`.
    operators: tuple[OperatorToken, ...] = ()
    # A YAML file of more tokens (`operators: [{name, role, token_sha256, expires_at, revoked}]`, as
    # `fedsilo operator token --file` writes it), re-read whenever it changes: a token added, revoked, expired or
    # removed there is honoured on the next request. None: only `operators`.
    operators_file: Path | None = None
    # On SIGTERM, how long requests in flight may take to finish before their connections are closed. An update
    # cut off is not acknowledged, so its agent sends it again; an acknowledged one is already durable.
    shutdown_grace_s: float = Field(default=1.0, ge=0, le=60)
    # JSON log lines (None: JSON unless stderr is a terminal).
    log_json: bool | None = None

    @model_validator(mode="after")
    def _sizes_agree(self) -> AggregatorConfig:
        if self.mqtt_max_message_bytes > self.mqtt_max_publish_bytes:
            raise ValueError(f"mqtt_max_message_bytes {self.mqtt_max_message_bytes} exceeds mqtt_max_publish_bytes "
                             f"{self.mqtt_max_publish_bytes}, the broker's limit: the broker would drop what the "
                             "aggregator accepts")
        return self

    @classmethod
    def load(cls, path: Path | None) -> AggregatorConfig:
        if path is None:
            return cls()
        # A key given twice, a syntax error or a bad value: ConfigFileError, one line naming the file and line.
        text = read_text(path)
        if load_yaml(text, str(path)) is None:
            return cls()
        return validate_text(cls, text, str(path), "aggregator config")
