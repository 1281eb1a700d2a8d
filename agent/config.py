"""Agent configuration: who this site is, its policy, which broker and aggregator it talks to, whose
signature it trusts. What the site allows lives in the policy file, not here."""

from __future__ import annotations

from pathlib import Path

from pydantic import AnyHttpUrl, Field

from federation.jobs import SiteName
from federation.schema import Frozen
from federation.transport import BrokerConfig, TLSConfig
from federation.yamlfile import validate_file


class AgentConfig(Frozen):
    # This site's name: the CN of its certificate, its MQTT username and topics, its name in jobs.
    site: SiteName
    # The site policy (YAML): what this site allows; everything else is refused.
    policy_file: Path
    # The aggregator's Ed25519 job-signing public key: offers and tasks not signed by it are refused.
    aggregator_public_key: Path
    # CA of the aggregator's and broker's certificates, and this site's client certificate and key.
    tls: TLSConfig
    # The MQTT broker (mutual TLS with `tls` unless `broker.tls` is given); must be on the policy's egress allowlist.
    broker: BrokerConfig = BrokerConfig(port=8883)
    # Where models are fetched and updates sent (HTTPS, mutual TLS); must be on the policy's egress allowlist.
    aggregator_url: AnyHttpUrl = AnyHttpUrl("https://127.0.0.1:8443")
    # The agent's SQLite state (decisions, privacy ledger, releases) and its audit log.
    state_dir: Path = Path("/var/fedsilo/agent")
    # Seconds between status messages; the aggregator shows a site offline after its `site_timeout_s` without one.
    heartbeat_s: float = Field(default=10.0, gt=0)
    # Liveness, readiness and Prometheus metrics for the hospital's own cluster, on this address and port
    # (status_port None: off).
    status_host: str = "0.0.0.0"
    status_port: int | None = Field(default=9100, ge=0, le=65535)
    # PyTorch threads for local training.
    torch_threads: int = Field(default=1, ge=1, le=64)
    # On SIGTERM, how long a request to the status port in flight may take to finish before the agent exits.
    shutdown_grace_s: float = Field(default=0.5, ge=0, le=60)
    # JSON log lines (None: JSON unless stderr is a terminal).
    log_json: bool | None = None

    @property
    def audit_log(self) -> Path:
        return self.state_dir / "audit.log"

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        """Read the config file: duplicate keys refused, strict types; any problem raises `ConfigFileError`, one
        line naming the file and line."""
        return validate_file(cls, path, "agent config", strict=True)
