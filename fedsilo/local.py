"""A whole federation on one machine: a private Mosquitto, the aggregator and one agent process per site.

Used by `fedsilo demo`, the integration tests and the benchmarks, so all three run the real thing: separate
OS processes talking MQTT and HTTPS over loopback with mutual TLS, a per-site broker ACL, signed jobs, and
each agent governed by its own site policy and seeing only its own data file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from aggregator.auth import new_token
from federation.transport import TLSConfig
from fedsilo.broker import BrokerTLS, MosquittoBroker, acl_for
from fedsilo.certs import Pki, local_pki
from fedsilo.client import AggregatorClient
from fedsilo.netutil import free_port
from fedsilo.progress import ENDED

EXAMPLE_POLICIES = Path(__file__).resolve().parent.parent / "policies" / "examples"


def example_policy(site: str, datasets: dict[str, Path]) -> dict[str, Any]:
    """`policies/examples/<site>.yaml` pointed at local data files (endpoints are set by the federation)."""
    policy: dict[str, Any] = yaml.safe_load((EXAMPLE_POLICIES / f"{site}.yaml").read_text())
    for name, path in datasets.items():
        policy["datasets"][name]["path"] = str(path.resolve())
    policy["egress"]["allowed_endpoints"] = []
    return policy


class LocalFederation:
    def __init__(
        self,
        workdir: Path,
        policies: dict[str, dict[str, Any]],
        *,
        extra_identities: tuple[str, ...] = (),
        heartbeat_s: float = 2.0,
        log_level: str = "INFO",
        aggregator_extra: dict[str, Any] | None = None,
    ) -> None:
        """`policies` maps each site to its policy (as a dict); an empty `egress.allowed_endpoints` is filled
        with this federation's broker and aggregator. `extra_identities` get site certificates and ACL
        entries without an agent (participants played by tests)."""
        self.workdir = workdir.resolve()
        self.policies = policies
        self.sites = list(policies)
        self.heartbeat_s = heartbeat_s
        self.log_level = log_level
        self._agg_extra = aggregator_extra or {}
        for sub in ("config", "logs", "state"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        self.pki: Pki = local_pki(self.workdir / "pki", [*self.sites, *extra_identities])
        acl = self.workdir / "config" / "broker.acl"
        acl.write_text(acl_for([*self.sites, *extra_identities]))
        broker_id = self.pki.issued("broker", "broker")
        self.broker = MosquittoBroker(
            self.workdir / "broker", tls=BrokerTLS(self.pki.ca_cert, broker_id.cert, broker_id.key), acl_file=acl
        )
        self.agg_port = free_port()
        self.url = f"https://127.0.0.1:{self.agg_port}"
        self.client = AggregatorClient(self.url, self.tls("operator", "operator").client_context())
        # Bearer tokens for the console and for role tests: name -> (role, token).
        self.tokens: dict[str, tuple[str, str]] = {}
        self._token_config = []
        for name, role in (("ops-admin", "admin"), ("ops-viewer", "viewer")):
            token, digest = new_token()
            self.tokens[name] = (role, token)
            self._token_config.append({"name": name, "role": role, "token_sha256": digest})
        self.aggregator: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.status_ports: dict[str, int] = {}

    def tls(self, role: str, name: str) -> TLSConfig:
        issued = self.pki.issued(role, name)
        return TLSConfig(ca_file=self.pki.ca_cert, cert_file=issued.cert, key_file=issued.key)

    def _tls_dict(self, role: str, name: str) -> dict[str, str]:
        return {k: str(v) for k, v in self.tls(role, name).model_dump().items()}

    # ---------------------------------------------------------------- configs
    @property
    def report_dir(self) -> Path:
        return self.workdir / "reports"

    def aggregator_config(self) -> Path:
        cfg = {
            "host": "127.0.0.1", "port": self.agg_port,
            "state_url": f"sqlite:///{self.workdir / 'state' / 'aggregator.db'}",
            "blob_url": f"file://{self.workdir / 'state' / 'blobs'}",
            "report_dir": str(self.report_dir),
            "broker": {"host": "127.0.0.1", "port": self.broker.port},
            "tls": self._tls_dict("aggregator", "aggregator"),
            "signing_key": str(self.pki.signing_key),
            "operators": self._token_config,
            "log_json": True,
            **self._agg_extra,
        }
        path = self.workdir / "config" / "aggregator.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def agent_config(self, site: str) -> Path:
        policy = dict(self.policies[site])
        egress = dict(policy["egress"])
        if not egress.get("allowed_endpoints"):
            egress["allowed_endpoints"] = [f"127.0.0.1:{self.broker.port}", f"127.0.0.1:{self.agg_port}"]
        policy["egress"] = egress
        policy_file = self.workdir / "config" / f"policy-{site}.yaml"
        policy_file.write_text(yaml.safe_dump(policy, sort_keys=False))
        cfg = {
            "site": site,
            "policy_file": str(policy_file),
            "aggregator_public_key": str(self.pki.signing_pub),
            "tls": self._tls_dict("site", site),
            "broker": {"host": "127.0.0.1", "port": self.broker.port},
            "aggregator_url": self.url,
            "state_dir": str(self.workdir / "state" / f"agent-{site}"),
            "heartbeat_s": self.heartbeat_s,
            "status_host": "127.0.0.1",
            "status_port": self.status_ports.setdefault(site, free_port()),
            "log_json": True,
        }
        path = self.workdir / "config" / f"agent-{site}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    # ---------------------------------------------------------------- processes
    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.workdir / "logs" / f"{name}.log").open("ab")
        env = {**os.environ, "FEDSILO_LOG_LEVEL": self.log_level, "PYTHONUNBUFFERED": "1", **(env or {})}
        return subprocess.Popen(
            [sys.executable, "-m", "fedsilo", *args], stdout=log, stderr=subprocess.STDOUT, env=env,
            stdin=subprocess.DEVNULL,
        )

    def start(self, timeout: float = 60.0) -> None:
        self.broker.start()
        self.start_aggregator(timeout)
        for site in self.sites:
            self.start_agent(site)
        self.wait_sites_online(list(self.sites), timeout)

    def start_aggregator(self, timeout: float = 60.0, env: dict[str, str] | None = None, wait: bool = True) -> None:
        config = str(self.aggregator_config())
        self.aggregator = self._spawn("aggregator", "aggregator", "serve", "--config", config, env=env)
        deadline = time.monotonic() + timeout
        while wait and not self.client.healthy():
            if self.aggregator.poll() is not None:
                code = self.aggregator.returncode
                raise RuntimeError(f"the aggregator exited with {code}; see {self.log('aggregator')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the aggregator did not become healthy; see {self.log('aggregator')}")
            time.sleep(0.1)

    def start_agent(self, site: str, env: dict[str, str] | None = None) -> None:
        config = str(self.agent_config(site))
        self.agents[site] = self._spawn(f"agent-{site}", "agent", "run", "--config", config, env=env)

    def stop_aggregator(self, kill: bool = False) -> None:
        if self.aggregator is not None:
            _stop(self.aggregator, kill)
            self.aggregator = None

    def stop_agent(self, site: str, kill: bool = False) -> None:
        proc = self.agents.pop(site, None)
        if proc is not None:
            _stop(proc, kill)

    def stop(self) -> None:
        for site in list(self.agents):
            self.stop_agent(site)
        self.stop_aggregator()
        self.broker.stop()

    def log(self, name: str) -> Path:
        return self.workdir / "logs" / f"{name}.log"

    # ---------------------------------------------------------------- waiting
    def wait_sites_online(self, sites: list[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            online = {s["site"] for s in self.client.sites() if s["state"] == "online"}
            if set(sites) <= online:
                return
            for site, proc in self.agents.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"agent {site} exited with {proc.returncode}; see {self.log('agent-' + site)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"sites not online after {timeout}s: {sorted(set(sites) - online)}")
            time.sleep(0.1)

    def wait_job(self, job_id: str, timeout: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            summary = self.client.job(job_id)
            if summary["state"] in ENDED and summary["report"] == "written":
                return summary
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {summary['state']} after {timeout}s")
            time.sleep(0.1)

    def __enter__(self) -> LocalFederation:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _stop(proc: subprocess.Popen[bytes], kill: bool) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
