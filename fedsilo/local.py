"""A whole federation on one machine: a private Mosquitto, the aggregator and one agent process per site.

One launcher for `fedsilo local up|status|down`, `fedsilo demo`, the integration tests and the benchmarks, so all
of them run the real thing: separate OS processes talking MQTT and HTTPS over loopback with mutual TLS, a per-site
broker ACL, signed jobs, and each agent governed by its own site policy and seeing only its own data file. The
files it runs from are a `Workspace` (`fedsilo/workspace.py`); the processes it starts are recorded by pid file, so
a later command (`status`, `down`) finds them again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from federation.transport import TLSConfig
from fedsilo.broker import MosquittoBroker
from fedsilo.certs import Pki
from fedsilo.client import AggregatorClient, ClientError
from fedsilo.processes import Recorded, Stopped
from fedsilo.progress import ENDED
from fedsilo.workspace import (
    HOST,
    LocalError,
    Manifest,
    Workspace,
    allocate_ports,
    ports_in_use,
    write_workspace,
)

EXAMPLE_POLICIES = Path(__file__).resolve().parent.parent / "policies" / "examples"
# How long `stop` waits after SIGTERM before SIGKILL. The services stop in well under 2 s (README, "The CLI").
STOP_GRACE_S = 10.0


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
        """Write a workspace for these sites into `workdir` (PKI reused, everything else rewritten) and open it.

        `policies` maps each site to its policy (as a dict); an empty `egress.allowed_endpoints` is filled with
        this federation's broker and aggregator. `extra_identities` get site certificates and ACL entries without
        an agent (participants played by tests)."""
        ws = Workspace(workdir)
        manifest = Manifest(sites=list(policies), participants=list(extra_identities),
                            ports=allocate_ports(policies), heartbeat_s=heartbeat_s, log_level=log_level)
        write_workspace(ws, manifest, policies, aggregator_extra=aggregator_extra)
        self._attach(ws, manifest, policies, detach=False)

    @classmethod
    def open(cls, root: Path, *, detach: bool = False) -> LocalFederation:
        """The federation of an existing workspace, as written (nothing is regenerated). With `detach` the
        processes it starts run in sessions of their own and outlive this Python process (`fedsilo local up`)."""
        ws = Workspace(root)
        manifest = ws.load()
        policies = {s: yaml.safe_load(ws.policy_file(s).read_text()) for s in manifest.sites}
        fed = cls.__new__(cls)
        fed._attach(ws, manifest, policies, detach=detach)
        return fed

    def _attach(self, ws: Workspace, manifest: Manifest, policies: dict[str, dict[str, Any]], detach: bool) -> None:
        self.workspace = ws
        self.workdir = ws.root
        self.manifest = manifest
        self.policies = policies
        self.sites = list(manifest.sites)
        self.heartbeat_s = manifest.heartbeat_s
        self.log_level = manifest.log_level
        self.detach = detach
        self.processes = ws.processes
        self.pki: Pki = ws.pki
        self.broker = MosquittoBroker(ws.broker_dir, manifest.ports.broker, tls=ws.broker_tls(), acl_file=ws.acl_file,
                                      processes=self.processes, detach=detach, write_config=False)
        self.agg_port = manifest.ports.aggregator
        self.url = f"https://{HOST}:{self.agg_port}"
        self.client = AggregatorClient(self.url, self.tls("operator", "operator").client_context())
        # Bearer tokens for the console and for role tests: name -> (role, token).
        self.tokens: dict[str, tuple[str, str]] = ws.tokens()
        self.aggregator: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.status_ports: dict[str, int] = dict(manifest.ports.status)

    def tls(self, role: str, name: str) -> TLSConfig:
        issued = self.pki.issued(role, name)
        return TLSConfig(ca_file=self.pki.ca_cert, cert_file=issued.cert, key_file=issued.key)

    # ---------------------------------------------------------------- configs
    @property
    def report_dir(self) -> Path:
        return self.workspace.report_dir

    def aggregator_config(self) -> Path:
        return self.workspace.aggregator_config

    def agent_config(self, site: str) -> Path:
        return self.workspace.agent_config(site)

    # ---------------------------------------------------------------- processes
    def _spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.workspace.logs_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = {**os.environ, "FEDSILO_LOG_LEVEL": self.log_level, "PYTHONUNBUFFERED": "1", **(env or {})}
        # Logs name jobs, sites and datasets: the owner's only, whatever the caller's umask.
        with os.fdopen(os.open(self.log(name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedsilo", *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                stdin=subprocess.DEVNULL, start_new_session=self.detach,
            )
        self.processes.record(name, proc.pid)
        return proc

    def running(self) -> list[Recorded]:
        """This workspace's processes that are alive (whoever started them)."""
        return self.processes.running()

    def start(self, timeout: float = 60.0) -> None:
        """Broker, aggregator, then every agent; return once every site is online. Refused while any of this
        workspace's processes runs or a port it needs is taken; on any failure whatever started is stopped."""
        running = self.running()
        if running:
            raise LocalError(f"the federation in {self.workdir} is already running ("
                             + ", ".join(f"{r.name} pid {r.pid}" for r in running)
                             + "): stop it first with `fedsilo local down`")
        taken = ports_in_use(self.manifest)
        if taken:
            raise LocalError(f"port(s) {', '.join(taken)} on {HOST} are in use by another process; free them, or "
                             "give the federation new ports with `fedsilo local init --force`")
        try:
            self.broker.start()
            self.start_aggregator(timeout)
            for site in self.sites:
                self.start_agent(site)
            self.wait_sites_online(list(self.sites), timeout)
        except BaseException:
            self.stop(grace=2.0)
            raise

    def start_aggregator(self, timeout: float = 60.0, env: dict[str, str] | None = None, wait: bool = True) -> None:
        config = str(self.aggregator_config())
        self.aggregator = self._spawn("aggregator", "aggregator", "serve", "--config", config, env=env)
        deadline = time.monotonic() + timeout
        while wait and not self.client.healthy():
            if self.aggregator.poll() is not None:
                code = self.aggregator.returncode
                raise LocalError(f"the aggregator exited with {code}; see {self.log('aggregator')}")
            if time.monotonic() > deadline:
                raise LocalError(f"the aggregator did not become healthy within {timeout:g}s; see "
                                 f"{self.log('aggregator')}")
            time.sleep(0.1)

    def start_agent(self, site: str, env: dict[str, str] | None = None) -> None:
        config = str(self.agent_config(site))
        self.agents[site] = self._spawn(f"agent-{site}", "agent", "run", "--config", config, env=env)

    def stop_aggregator(self, kill: bool = False, grace: float = STOP_GRACE_S) -> Stopped | None:
        proc, self.aggregator = self.aggregator, None
        return self.processes.stop("aggregator", grace, proc, kill)

    def stop_agent(self, site: str, kill: bool = False, grace: float = STOP_GRACE_S) -> Stopped | None:
        return self.processes.stop(f"agent-{site}", grace, self.agents.pop(site, None), kill)

    def stop(self, grace: float = STOP_GRACE_S) -> list[Stopped]:
        """SIGTERM the agents, the aggregator and the broker (in that order), SIGKILL any still up after `grace`
        seconds; return how each stopped. The workspace is left as it is, ready to start again."""
        stopped = [self.stop_agent(site, grace=grace) for site in dict.fromkeys([*self.agents, *self.sites])]
        stopped.append(self.stop_aggregator(grace=grace))
        for rec in self.processes.recorded():  # agents of sites no longer in the manifest, if any
            if rec.name != "broker":
                stopped.append(self.processes.stop(rec.name, grace))
        if self.broker.running:
            pid, t0 = self.broker.pid, time.monotonic()
            self.broker.stop(grace)
            stopped.append(Stopped("broker", pid or 0, time.monotonic() - t0, "SIGTERM"))
        else:
            stopped.append(self.processes.stop("broker", grace))
        return [s for s in stopped if s is not None and s.how != "gone"]

    def log(self, name: str) -> Path:
        return self.workspace.logs_dir / f"{name}.log"

    # ---------------------------------------------------------------- waiting
    def wait_sites_online(self, sites: list[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                online = {s["site"] for s in self.client.sites() if s["state"] == "online"}
            except ClientError:
                online = set()
            if set(sites) <= online:
                return
            for site, proc in self.agents.items():
                if proc.poll() is not None:
                    raise LocalError(f"agent {site} exited with {proc.returncode}; see {self.log('agent-' + site)}")
            if time.monotonic() > deadline:
                raise LocalError(f"sites not online after {timeout:g}s: {sorted(set(sites) - online)}; see the "
                                 f"agents' logs in {self.workspace.logs_dir}")
            time.sleep(0.1)

    def wait_job(self, job_id: str, timeout: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            summary = self.client.job(job_id, per_site=False)
            if summary["state"] in ENDED and summary["report"] == "written":
                return self.client.job(job_id)
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {summary['state']} after {timeout}s")
            time.sleep(0.1)

    def __enter__(self) -> LocalFederation:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

