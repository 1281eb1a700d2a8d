"""The on-disk workspace of a local federation: PKI, one policy and one config per site, the aggregator's config,
the broker's config and ACL, and where logs, state, reports and pid files go.

Written once (by `fedsilo local init`, by `fedsilo demo`, or by a `LocalFederation` built in a test or a benchmark)
and read by every later command, so that `up`, `status` and `down` never regenerate what a person may have
reviewed and edited. Its manifest, `federation.yaml`, is written last: a directory without it holds no federation.

    federation.yaml            sites, data files, ports (the manifest)
    operator.env               FEDSILO_AGGREGATOR, FEDSILO_CA, FEDSILO_CERT, FEDSILO_KEY, FEDSILO_REPORT_DIR
    pki/                       CA, certificates, job-signing key, console tokens (all 0600)
    config/                    aggregator.yaml, agent-<site>.yaml, policy-<site>.yaml
    broker/                    mosquitto.conf, acl, Mosquitto's persistence and log
    logs/ state/ reports/      JSON logs per process; SQLite state and blobs; one report per job
    run/                       <process>.pid while it runs
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, ValidationError

from federation.jobs import SITE_NAME
from federation.schema import Frozen, field_errors
from fedsilo.broker import BrokerTLS, acl_for, mosquitto_config, run_as
from fedsilo.certs import Pki, local_pki
from fedsilo.errors import FedsiloError
from fedsilo.netutil import free_port
from fedsilo.processes import ProcessTable

MANIFEST = "federation.yaml"
HOST = "127.0.0.1"
# `federation.jobs.SiteName`, without importing the model zoo (and torch) into `fedsilo local status|down`.
SiteName = Annotated[str, Field(pattern=SITE_NAME.pattern)]


class LocalError(FedsiloError):
    """A local federation cannot be set up, started or stopped as asked; the message says why and what to do."""


class Ports(Frozen):
    broker: int = Field(ge=1, le=65535)
    aggregator: int = Field(ge=1, le=65535)
    # Each agent's liveness/readiness/metrics port.
    status: dict[str, int] = Field(default_factory=dict)


class Manifest(Frozen):
    """`federation.yaml`: what the workspace holds. Everything else in it is derived from this and the policies."""

    sites: list[SiteName] = Field(max_length=1000)
    # Identities with a site certificate and broker ACL entry but no agent (participants played by tests).
    participants: list[SiteName] = Field(default_factory=list, max_length=100_000)
    ports: Ports
    heartbeat_s: float = Field(default=2.0, gt=0)
    log_level: str = "INFO"
    # Each site's data file, as given to `fedsilo local init` (its policy holds the same path).
    data: dict[str, Path] = Field(default_factory=dict)
    job_file: Path | None = None


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    # ------------------------------------------------------------------ layout
    @property
    def manifest_file(self) -> Path:
        return self.root / MANIFEST

    @property
    def pki(self) -> Pki:
        return Pki(self.root / "pki")

    @property
    def tokens_file(self) -> Path:
        return self.root / "pki" / "console-tokens.yaml"

    @property
    def config_dir(self) -> Path:
        return self.root / "config"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def acl_file(self) -> Path:
        return self.broker_dir / "acl"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def report_dir(self) -> Path:
        return self.root / "reports"

    @property
    def operator_env(self) -> Path:
        return self.root / "operator.env"

    @property
    def processes(self) -> ProcessTable:
        return ProcessTable(self.root / "run")

    @property
    def aggregator_config(self) -> Path:
        return self.config_dir / "aggregator.yaml"

    def agent_config(self, site: str) -> Path:
        return self.config_dir / f"agent-{site}.yaml"

    def policy_file(self, site: str) -> Path:
        return self.config_dir / f"policy-{site}.yaml"

    def broker_tls(self) -> BrokerTLS:
        broker = self.pki.issued("broker", "broker")
        crl = self.pki.crl  # `local_pki` writes it (an empty one for a workspace made before revocation existed)
        return BrokerTLS(self.pki.ca_cert, broker.cert, broker.key, crlfile=crl if crl.exists() else None)

    # ------------------------------------------------------------------ reading
    def exists(self) -> bool:
        return self.manifest_file.is_file()

    def load(self) -> Manifest:
        if not self.exists():
            raise LocalError(f"no local federation in {self.root} (no {MANIFEST}): create one with "
                             "`fedsilo local init`")
        try:
            data: Any = yaml.safe_load(self.manifest_file.read_text())
            return Manifest.model_validate(data)
        except ValidationError as exc:
            bad = "; ".join(f"{f}: {m}" for f, m in field_errors(exc))
            raise LocalError(f"{self.manifest_file} is not a valid manifest: {bad}") from None
        except (OSError, yaml.YAMLError) as exc:
            raise LocalError(f"cannot read {self.manifest_file}: {exc}") from None

    def tokens(self) -> dict[str, tuple[str, str]]:
        """Console bearer tokens: name -> (role, token)."""
        if not self.tokens_file.exists():
            return {}
        data: Any = yaml.safe_load(self.tokens_file.read_text()) or {}
        return {name: (str(t["role"]), str(t["token"])) for name, t in data.items()}

    def operator_exports(self, manifest: Manifest | None = None) -> dict[str, str]:
        """What an operator's shell needs to use the `fedsilo` commands against this federation."""
        manifest = manifest or self.load()
        operator = self.pki.issued("operator", "operator")
        return {
            "FEDSILO_AGGREGATOR": f"https://{HOST}:{manifest.ports.aggregator}",
            "FEDSILO_CA": str(self.pki.ca_cert),
            "FEDSILO_CERT": str(operator.cert),
            "FEDSILO_KEY": str(operator.key),
            "FEDSILO_REPORT_DIR": str(self.report_dir),
        }


# ---------------------------------------------------------------------- ports
def port_in_use(port: int, host: str = HOST) -> bool:
    """Whether another process holds `port` as our servers would bind it (with SO_REUSEADDR, as aiohttp and
    Mosquitto do: connections of a server just stopped, in TIME_WAIT, do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def allocate_ports(sites: Iterable[str], broker: int | None = None, aggregator: int | None = None) -> Ports:
    """The ports asked for (refused if in use) and free loopback ports for the rest."""
    for what, port in (("broker", broker), ("aggregator", aggregator)):
        if port is not None and port_in_use(port):
            raise LocalError(f"port {port} on {HOST} (asked for the {what}) is in use by another process: "
                             "free it or choose another port")
    taken = {p for p in (broker, aggregator) if p is not None}

    def fresh() -> int:
        while True:
            port = free_port(HOST)
            if port not in taken:
                taken.add(port)
                return port

    return Ports(broker=broker or fresh(), aggregator=aggregator or fresh(), status={s: fresh() for s in sites})


def ports_in_use(manifest: Manifest) -> list[str]:
    """Each of the workspace's ports some other process holds, named with what it is for."""
    wanted = [("broker", manifest.ports.broker), ("aggregator", manifest.ports.aggregator),
              *((f"agent {s} (status)", p) for s, p in manifest.ports.status.items() if s in manifest.sites)]
    return [f"{port} ({what})" for what, port in wanted if port_in_use(port)]


# ---------------------------------------------------------------------- writing
def _dump(path: Path, data: Any, header: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    os.replace(tmp, path)


def _secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _tls(pki: Pki, role: str, name: str) -> dict[str, str]:
    issued = pki.issued(role, name)
    return {"ca_file": str(pki.ca_cert), "cert_file": str(issued.cert), "key_file": str(issued.key)}


def write_workspace(
    ws: Workspace,
    manifest: Manifest,
    policies: dict[str, dict[str, Any]],
    *,
    aggregator_extra: dict[str, Any] | None = None,
    policy_headers: dict[str, str] | None = None,
) -> dict[str, tuple[str, str]]:
    """Write everything the federation of `manifest` needs into `ws`, the manifest last; return the console tokens.

    `policies` maps each site to its policy as a dict; an empty `egress.allowed_endpoints` is filled with this
    federation's broker and aggregator. The PKI is created once and reused (certificates still missing are
    issued); every other file is rewritten. Callers check first that nothing is running and that they may
    overwrite."""
    if list(policies) != manifest.sites:
        raise ValueError("policies and manifest disagree on the sites")
    ws.manifest_file.unlink(missing_ok=True)  # until the end, the directory holds no (complete) federation
    for d in (ws.config_dir, ws.logs_dir, ws.state_dir, ws.broker_dir):
        d.mkdir(parents=True, exist_ok=True)
    pki = local_pki(ws.pki.root, [*manifest.sites, *manifest.participants])
    ports = manifest.ports
    agg_url = f"https://{HOST}:{ports.aggregator}"
    endpoints = [f"{HOST}:{ports.broker}", f"{HOST}:{ports.aggregator}"]

    from aggregator.auth import new_token

    tokens = ws.tokens()  # kept like the rest of the PKI, so console sign-ins survive `init --force`
    if set(tokens) != {"ops-admin", "ops-viewer"}:
        tokens = {name: (role, new_token()[0]) for name, role in (("ops-admin", "admin"), ("ops-viewer", "viewer"))}
        _secret(ws.tokens_file, yaml.safe_dump({n: {"role": r, "token": t} for n, (r, t) in tokens.items()}))
    # The aggregator keeps only each token's sha256 (`aggregator.auth`).
    operators = [{"name": n, "role": r, "token_sha256": hashlib.sha256(t.encode()).hexdigest()}
                 for n, (r, t) in tokens.items()]

    ws.acl_file.write_text(acl_for([*manifest.sites, *manifest.participants]))
    tls = ws.broker_tls()
    (ws.broker_dir / "mosquitto.conf").write_text(mosquitto_config(
        host=HOST, port=ports.broker, persistence_dir=ws.broker_dir, log_dest=f"file {ws.broker_dir / 'mosquitto.log'}",
        tls=tls, acl_file=ws.acl_file, run_as=run_as(tls.keyfile), autosave_interval=1,
    ))

    _dump(ws.aggregator_config, {
        "host": HOST, "port": ports.aggregator,
        "state_url": f"sqlite:///{ws.state_dir / 'aggregator.db'}",
        "blob_url": f"file://{ws.state_dir / 'blobs'}",
        "report_dir": str(ws.report_dir),
        "broker": {"host": HOST, "port": ports.broker},
        "tls": _tls(pki, "aggregator", "aggregator"),
        "signing_key": str(pki.signing_key),
        "crl_file": str(pki.crl),
        "operators": operators,
        "log_json": True,
        **(aggregator_extra or {}),
    })
    for site, given in policies.items():
        policy = dict(given)
        egress = dict(policy["egress"])
        if not egress.get("allowed_endpoints"):
            egress["allowed_endpoints"] = endpoints
        policy["egress"] = egress
        _dump(ws.policy_file(site), policy, (policy_headers or {}).get(site, ""))
        _dump(ws.agent_config(site), {
            "site": site,
            "policy_file": str(ws.policy_file(site)),
            "aggregator_public_key": str(pki.signing_pub),
            "tls": _tls(pki, "site", site),
            "broker": {"host": HOST, "port": ports.broker},
            "aggregator_url": agg_url,
            "state_dir": str(ws.state_dir / f"agent-{site}"),
            "heartbeat_s": manifest.heartbeat_s,
            "status_host": HOST,
            "status_port": ports.status[site],
            "log_json": True,
        })
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in ws.operator_exports(manifest).items())
    ws.operator_env.write_text("# Operator settings for this local federation: `source` this file.\n" + exports)
    _dump(ws.manifest_file, manifest.model_dump(mode="json"),
          "# A local federation (fedsilo local init|up|status|down). Regenerate with `fedsilo local init --force`.\n")
    return tokens


def clear_state(ws: Workspace) -> None:
    """Forget every job, ledger and audit entry (the demo starts each run from a clean federation)."""
    if ws.state_dir.exists():
        shutil.rmtree(ws.state_dir)
