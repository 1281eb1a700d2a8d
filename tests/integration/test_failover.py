"""Two aggregator replicas on shared PostgreSQL state and S3 blobs (moto), behind a TCP load balancer as a
Kubernetes Service would put them, with four hospital agents and Mosquitto: the replica writing the job is killed
again and again (at random moments, and once mid-finalize), the broker is restarted, and the job must finish with
every acknowledged update counted exactly once and the round counter never going backwards. Then a split brain:
the writer freezes past its lease mid-upload, the other replica takes the job over, and the frozen one's late write
is refused by the fence when it wakes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import psycopg
import pytest
import yaml

from federation.faults import EXIT_CODE
from federation.tensors import decode
from fedsilo.datasets import split_by_center
from fedsilo.local import LocalFederation, example_policy
from fedsilo.netutil import free_port
from tests.pgserver import PostgresServer
from tests.tcpproxy import TcpProxy
from tests.tracking.aws import REGION, moto_server
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
SITES = ("cleveland", "hungary", "switzerland", "va-long-beach")
BUCKET, PREFIX = "fedsilo-blobs", "aggregator"
LEASE_TTL_S = 2.0


class Cluster:
    def __init__(self, fed: LocalFederation, db_url: str, moto_url: str, ports: list[int], proxy: TcpProxy) -> None:
        self.fed, self.db_url, self.moto_url, self.ports, self.proxy = fed, db_url, moto_url, ports, proxy
        self.replicas: dict[str, tuple[subprocess.Popen[bytes], int]] = {}  # replica id -> process, port
        self.s3 = boto3.client("s3", region_name=REGION, endpoint_url=moto_url, aws_access_key_id="testing",
                               aws_secret_access_key="testing")
        self._n = 0

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION,
                "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}

    def start_replica(self, port: int, failpoint: str | None = None, wait: bool = True) -> str:
        """A new replica process (as a restarted pod is, under a new name) listening on `port`."""
        self._n += 1
        rid = f"replica-{self._n}"
        cfg = yaml.safe_load(self.fed.aggregator_config().read_text())
        cfg.update(port=port, replica_id=rid, advertise_url=f"https://127.0.0.1:{port}")
        path = self.fed.workdir / "config" / f"aggregator-{rid}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = self.env() | ({"FEDSILO_FAILPOINT": failpoint} if failpoint else {})
        proc = self.fed._spawn(f"aggregator-{rid}", "aggregator", "serve", "--config", str(path), env=env)
        self.replicas[rid] = (proc, port)
        if wait:
            self.wait_healthy(rid)
        return rid

    def wait_healthy(self, rid: str) -> None:
        proc, port = self.replicas[rid]
        ctx = self.fed.tls("operator", "operator").client_context()
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=2, context=ctx).close()
                return
            except OSError:
                assert proc.poll() is None, f"{rid} exited; see {self.fed.log(f'aggregator-{rid}')}"
                assert time.monotonic() < deadline, f"{rid} did not become healthy"
                time.sleep(0.1)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db_url) as conn:
            return list(conn.execute(sql, params).fetchall())

    def holder(self, job_id: str) -> tuple[str, int] | None:
        rows = self.query("SELECT holder, token FROM leases WHERE job_id=%s", job_id)
        return (str(rows[0][0]), int(rows[0][1])) if rows else None

    def token(self, job_id: str) -> int:
        holder = self.holder(job_id)
        return holder[1] if holder is not None else 0

    def closed_rounds(self, job_id: str) -> int:
        return int(self.query("SELECT COUNT(*) FROM rounds WHERE job_id=%s AND state='closed' AND kind='train'",
                              job_id)[0][0])

    def current_round(self, job_id: str) -> int:
        return int(self.query("SELECT round FROM jobs WHERE job_id=%s", job_id)[0][0])

    def blob(self, sha: str) -> dict[str, np.ndarray]:
        return decode(self.s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{sha}")["Body"].read())

    def log_events(self, name: str, event: str) -> list[dict[str, Any]]:
        lines = self.fed.log(name).read_text().splitlines()
        return [e for e in (json.loads(x) for x in lines if x.startswith("{")) if e.get("event") == event]

    def submit(self, rounds: int) -> str:
        job: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
        job.update(sites=list(SITES), min_sites=len(SITES), rounds=rounds, round_deadline_s=120)
        job["privacy"] = {"unit": "site", "clip_norm": 1.0, "noise_multiplier": 0.3, "delta": 1e-5}
        job["hyperparameters"]["epochs"] = 1
        return self.fed.client.submit(yaml.safe_dump(job))

    def replay(self, job_id: str, rounds: int) -> None:
        """Recompute each round's model from the stored updates: one lost or counted twice would not match."""
        rows = self.query("SELECT round, model_in, model_out FROM rounds WHERE job_id=%s AND kind='train' "
                          "ORDER BY round", job_id)
        assert [r[0] for r in rows] == list(range(1, rounds + 1))
        for rnd, model_in, model_out in rows:
            ups = self.query("SELECT sha256, num_samples FROM updates WHERE job_id=%s AND round=%s", job_id, rnd)
            assert len(ups) == len(SITES), (rnd, ups)
            start, total = self.blob(model_in), sum(n for _, n in ups)
            expected = {k: start[k].astype(np.float64) + sum(n * self.blob(s)[k] for s, n in ups) / total
                        for k in start}
            stored = self.blob(model_out)
            for k in start:
                np.testing.assert_allclose(stored[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=f"round {rnd}")

    def acknowledged(self, job_id: str) -> set[tuple[str, int]]:
        return {(s, int(e["round"])) for s in SITES for e in self.log_events(f"agent-{s}", "update_sent")
                if e.get("job") == job_id}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("failover")
    db_url = postgres.create_database("fedsilo_failover")
    files = split_by_center(root / "data")
    policies = {s: example_policy(s, {"heart-disease": files[s]}) for s in SITES}
    for p in policies.values():
        p["privacy"]["max_epsilon_per_job"] = {"site": 1e5, "record": 2}
        p["privacy"]["budgets"]["heart-disease"]["epsilon"] = {"site": 1e6, "record": 4}
        p["operations"]["max_concurrent_jobs"] = 2
    with moto_server(root) as moto_url:
        extra = {"state_url": db_url, "blob_url": f"s3://{BUCKET}/{PREFIX}",
                 "blob_s3": {"region": REGION, "endpoint_url": moto_url, "addressing_style": "path"},
                 "lease_ttl_s": LEASE_TTL_S}
        fed = LocalFederation(root, policies, heartbeat_s=1.0, aggregator_extra=extra)
        ports = [free_port(), free_port()]
        # The agents and the operator reach "the aggregator" at the federation's address: the load balancer.
        proxy = TcpProxy(ports, port=fed.agg_port).start()
        c = Cluster(fed, db_url, moto_url, ports, proxy)
        c.s3.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        try:
            fed.broker.start()
            for port in ports:
                c.start_replica(port)
            for site in SITES:
                fed.start_agent(site)
            fed.wait_sites_online(list(SITES), 120)
            yield c
        finally:
            for proc, _ in c.replicas.values():
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGCONT)
                    proc.kill()
                    proc.wait()
            fed.stop(grace=5)
            proxy.stop()


def test_the_writer_killed_again_and_again_loses_nothing(cluster: Cluster) -> None:
    rounds = 30
    rng = random.Random(18)
    job_id = cluster.submit(rounds)
    wait_for(lambda: cluster.holder(job_id) is not None and cluster.current_round(job_id) >= 1, 60, "round 1")
    seen: list[int] = []
    takeover_s: list[float] = []
    next_round_s: list[float] = []
    kills: list[str] = []
    died_mid_finalize: list[str] = []
    while len(kills) < 6:
        # Two healthy replicas before each kill; the job is paused meanwhile (a round takes a tenth of a second
        # here), so that the kills spread over the job.
        cluster.fed.client.pause(job_id)
        for rid, (proc, port) in list(cluster.replicas.items()):
            if proc.poll() is not None:  # died by itself: the finalize failpoint
                assert proc.returncode == EXIT_CODE, (rid, proc.returncode)
                died_mid_finalize.append(rid)
                cluster.replicas.pop(rid)
                cluster.start_replica(port, wait=False)
        for rid in list(cluster.replicas):
            cluster.wait_healthy(rid)
        if len(kills) == 2:
            cluster.fed.broker.restart()  # the broker restarts mid-job too; every link reconnects
        cluster.fed.client.resume(job_id)
        if cluster.current_round(job_id) > rounds - 4:
            break
        # A kill at a random moment of the next round or the one after (a round takes a fraction of a second
        # here): six kills fit in the 30 rounds with room to spare, whatever the machine's speed.
        at_least = cluster.current_round(job_id) + 1
        wait_for(partial(reached, cluster, job_id, at_least), 120, f"round {at_least}")
        time.sleep(rng.uniform(0.0, 0.2))
        holder = cluster.holder(job_id)
        assert holder is not None
        rid, token = holder
        proc, port = cluster.replicas.pop(rid)
        before = cluster.current_round(job_id)
        t_kill = time.time()
        proc.kill()
        proc.wait()
        kills.append(rid)
        # Its replacement starts at once, as a Deployment's would. The third kill's replacement dies in the middle
        # of its first finalize (the new model stored, the round not yet closed), once the job comes to it.
        cluster.start_replica(port, failpoint="finalize_after_blob:1" if len(kills) == 3 else None, wait=False)
        wait_for(partial(taken_over, cluster, job_id, token), 60, "another replica's lease")
        takeover_s.append(time.time() - t_kill)
        wait_for(partial(reached, cluster, job_id, before + 1), 90, "the next round")
        started = cluster.query("SELECT MIN(started_at) FROM rounds WHERE job_id=%s AND round>%s", job_id, before)
        next_round_s.append(float(started[0][0]) - t_kill)
        seen.append(cluster.closed_rounds(job_id))
    summary = cluster.fed.wait_job(job_id, timeout=240)
    assert summary["state"] == "finished", summary["reason"]
    assert len(kills) >= 5, kills
    assert died_mid_finalize or any(p.poll() == EXIT_CODE for p, _ in cluster.replicas.values()), \
        "no replica died mid-finalize"
    assert seen == sorted(seen), seen  # finished rounds never go backwards
    assert cluster.closed_rounds(job_id) == rounds
    stored = {(s, t["round"]) for t in summary["training"] for s in t["sites"]}
    assert cluster.acknowledged(job_id) <= stored  # no acknowledged update lost
    cluster.replay(job_id, rounds)  # and none counted twice
    print(f"\nfailover: {len(kills)} writer kills and one death mid-finalize; lease taken over in median "
          f"{statistics.median(takeover_s):.2f} s (max {max(takeover_s):.2f}); kill → next round announced median "
          f"{statistics.median(next_round_s):.2f} s (max {max(next_round_s):.2f}); lease_ttl_s {LEASE_TTL_S}")
    for rid, (proc, port) in list(cluster.replicas.items()):  # two healthy replicas for the next test
        if proc.poll() is not None:
            cluster.replicas.pop(rid)
            cluster.start_replica(port)


def test_a_writer_stopped_by_sigterm_hands_its_job_over(cluster: Cluster) -> None:
    """A rolling update: the writer is told to stop. It finishes what is in flight, then lets its lease expire at
    once (the token kept), so the other replica takes the job at its next look rather than after the TTL."""
    job_id = cluster.submit(8)
    wait_for(lambda: cluster.holder(job_id) is not None and cluster.current_round(job_id) >= 2, 60, "round 2")
    cluster.fed.client.pause(job_id)
    rid, token = cluster.holder(job_id)  # type: ignore[misc]
    proc, port = cluster.replicas.pop(rid)
    t0 = time.time()
    proc.terminate()
    assert proc.wait(timeout=30) == 0
    rows = cluster.query("SELECT holder, token, expires_at FROM leases WHERE job_id=%s", job_id)
    handed_over = rows[0][1] > token or (rows[0][0] == rid and float(rows[0][2]) == 0.0)
    assert handed_over, rows  # expired by the stopping replica (or already taken by the other one)
    wait_for(partial(taken_over, cluster, job_id, token), 30, "the other replica's lease")
    print(f"\nSIGTERM of the writer → lease taken by the other replica in {time.time() - t0:.2f} s "
          f"(lease_ttl_s {LEASE_TTL_S})")
    cluster.fed.client.resume(job_id)
    summary = cluster.fed.wait_job(job_id, timeout=120)
    assert summary["state"] == "finished", summary["reason"]
    cluster.replay(job_id, 8)
    cluster.start_replica(port)


def test_a_frozen_writer_wakes_to_a_fence(cluster: Cluster) -> None:
    """Split brain: the writer freezes mid-upload (every check passed, the update's row about to be committed) past
    its lease, the other replica takes the job over, the frozen one wakes: its commit is refused by the fence and
    its caller retries with the new writer."""
    for proc, _ in cluster.replicas.values():
        proc.terminate()
        proc.wait()
    (port_x, port_y), cluster.replicas = cluster.ports, {}
    x = cluster.start_replica(port_x, failpoint="ingest_before_commit:1:stop")
    proc_x = cluster.replicas[x][0]
    job_id = cluster.submit(6)  # x writes it
    wait_for(lambda: _stopped(proc_x.pid), 60, "the writer to freeze in its first upload")
    assert cluster.holder(job_id) is not None and cluster.holder(job_id)[0] == x  # type: ignore[index]
    cluster.proxy.backends = [port_y]  # the Service stops routing to a pod that no longer answers
    y = cluster.start_replica(port_y)
    wait_for(lambda: (h := cluster.holder(job_id)) is not None and h[0] == y, 30, "the takeover")
    os.kill(proc_x.pid, signal.SIGCONT)
    wait_for(lambda: any("no longer current" in e.get("reason", "")
                         for e in cluster.log_events(f"aggregator-{x}", "write_refused_by_fence")), 30, "the fence")
    cluster.proxy.backends = [port_x, port_y]
    summary = cluster.fed.wait_job(job_id, timeout=120)
    assert summary["state"] == "finished", summary["reason"]
    cluster.replay(job_id, 6)


def reached(cluster: Cluster, job_id: str, rnd: int) -> bool:
    return cluster.current_round(job_id) >= rnd


def taken_over(cluster: Cluster, job_id: str, token: int) -> bool:
    return cluster.token(job_id) > token


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "T"
