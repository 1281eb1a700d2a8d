"""How far one aggregator goes: N simulated sites upload privatized updates of a P-parameter model to a real
aggregator process (mTLS on loopback, SQLite state, blobs on disk) and we measure what it sustains.

Per configuration: updates/s and MB/s ingested in a steady round (the second; the first pays the TLS handshakes),
the round's finalize time (last update acknowledged → next model committed), the aggregator's peak RSS, and how
long the operator's cancel of the running job takes to answer. The clients learn that a round opened the way an
agent does, from the signed task on a site's MQTT topic (verified with the job-signing key), never by polling.
Then, for each model size, the minimum server work per update measured in-process on the same primitives the
ingest path runs (sha256, safetensors decode, validation, durable blob write, FedAvg fold): the ratio of the
observed time per update to that floor is the share left to Python, HTTP and TLS overhead.

    python -m bench scale                       # the default matrix
    python -m bench scale --sites 100 --params 1e6
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sqlite3
import ssl
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.blobs import FileBlobStore
from aggregator.strategies import FedAvg
from aggregator.validation import check_update
from federation import topics
from federation.jobs import JobSpec
from federation.messages import ENVELOPE_HEADER, EvalMetrics, SiteEvent, UpdateEnvelope, canonical_json, update_path
from federation.models import Weights, build_model, get_weights
from federation.signing import load_public_key, verify
from federation.tensors import encode, sha256_hex
from fedsilo.local import LocalFederation

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "heart-disease.yaml"
CLIP, SIGMA = 1.0, 0.5
# 1,000 sites × 10^7 parameters is 40 GB per round through one 2-core machine's loopback and disk: left out of
# the default matrix (run it with --sites 1000 --params 1e7 on a machine with the disk for it).
DEFAULT = [(100, 10**4), (1000, 10**4), (100, 10**6), (1000, 10**6), (100, 10**7)]


def hidden_for(params: int, input_dim: int = 25) -> list[int]:
    """An MLP width (one or two hidden layers) whose parameter count is close to `params`."""
    one = max(1, round((params - 1) / (input_dim + 2)))
    if one <= 65_536:
        return [one]
    # two layers of width h: h·(input_dim + h + 3) + 1 ≈ params
    h = int((-(input_dim + 3) + math.sqrt((input_dim + 3) ** 2 + 4 * (params - 1))) / 2)
    return [h, h]


def job_for(sites: list[str], hidden: list[int]) -> dict[str, Any]:
    job: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    job.update(name="scale", sites=sites, min_sites=len(sites), rounds=3, round_deadline_s=3600,
               accept_deadline_s=600, model={"name": "mlp", "hidden": hidden})
    # Update-level DP: every upload carries N(0, (σC)²) noise on each parameter, the largest a valid update gets
    # (a per-patient job's clipped, un-noised update is smaller and cheaper to check).
    job["privacy"] = {"unit": "site", "clip_norm": CLIP, "noise_multiplier": SIGMA, "delta": 1e-5}
    return job


def privatized_like(template: Weights, seed: int) -> Weights:
    """What a site sends: a clipped delta plus N(0, (σC)²) noise — here noise only, which has the same size."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0.0, SIGMA * CLIP, size=v.shape).astype(np.float32) for k, v in template.items()}


@dataclass
class Result:
    sites: int
    params: int
    update_mb: float
    updates_per_s: float
    mb_per_s: float
    finalize_s: float
    peak_rss_mb: float
    floor_ms: float  # minimum server work per update (in-process primitives)
    observed_ms: float  # wall time per update ingested
    cpu_ms: float  # the aggregator's CPU time per update in round 2 (ingest and finalize)
    cancel_s: float  # the operator's cancel of the running job, request to answer


def accept_all(fed: LocalFederation, job_id: str, sites: list[str]) -> None:
    """Each simulated site answers the offer over MQTT with its own certificate (the broker's ACL lets a site
    publish only on its own topics), then disconnects."""

    def accept(site: str) -> None:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{site}", clean_session=True)
        client.tls_set_context(fed.tls("site", site).client_context())
        client.connect("127.0.0.1", fed.broker.port)
        event = SiteEvent(site=site, job_id=job_id, kind="accepted", at=time.time())
        info = client.publish(topics.events(site), canonical_json(event), qos=1)  # queued until CONNACK
        deadline = time.monotonic() + 30
        while not info.is_published():  # drive the network loop in this thread: no per-client thread to join
            if time.monotonic() > deadline:
                raise TimeoutError(f"{site}: the broker did not acknowledge the acceptance")
            client.loop(0.05)
        client.disconnect()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(accept, sites))


class TaskWatch:
    """The round tasks one simulated site receives over MQTT (its own topic; the broker's ACL allows no other),
    verified like an agent verifies them: `wait(rnd)` returns once round `rnd` or a later one was announced."""

    def __init__(self, fed: LocalFederation, site: str, job_id: str) -> None:
        self._key = load_public_key(fed.pki.signing_pub)
        self._latest = 0
        self._cond = threading.Condition()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{site}", clean_session=True)
        self._client.tls_set_context(fed.tls("site", site).client_context())
        self._client.on_connect = lambda c, *_: c.subscribe(topics.tasks(site, job_id), qos=1)
        self._client.on_message = self._on_message
        self._client.connect("127.0.0.1", fed.broker.port)
        self._client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if not msg.payload:
            return
        task = verify(bytes(msg.payload), self._key)
        with self._cond:
            if task["kind"] in ("train", "evaluate"):
                self._latest = max(self._latest, int(task["round"]))
            self._cond.notify_all()

    def wait(self, rnd: int, within: float = 3600) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._latest >= rnd, timeout=within):
                raise TimeoutError(f"round {rnd} was not announced within {within:.0f} s")

    def stop(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


async def upload_round(fed: LocalFederation, job_id: str, rnd: int, sites: list[str], template: Weights,
                       sessions: dict[str, aiohttp.ClientSession], concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, site: str) -> None:
        async with gate:
            body = await asyncio.to_thread(lambda: encode(privatized_like(template, rnd * 100_003 + i)))
            env = UpdateEnvelope(job_id=job_id, round=rnd, site=site, num_samples=100, sha256=sha256_hex(body),
                                 evaluation=EvalMetrics(n=50, loss=0.6, auc=0.7), train_loss=0.6, epsilon=1.0)
            async with sessions[site].post(fed.url + update_path(job_id, rnd), data=body,
                                           headers={ENVELOPE_HEADER: env.model_dump_json()}) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"{site} round {rnd}: {resp.status} {await resp.text()}")

    await asyncio.gather(*(one(i, s) for i, s in enumerate(sites)))


def round_timing(fed: LocalFederation, job_id: str, rnd: int) -> tuple[float, float, float]:
    """(first update received, last update received, round closed) from the aggregator's own state."""
    db = sqlite3.connect(fed.workdir / "state" / "aggregator.db")
    try:
        first, last = db.execute("SELECT MIN(received_at), MAX(received_at) FROM updates WHERE job_id=? AND round=?",
                                 (job_id, rnd)).fetchone()
        (closed,) = db.execute("SELECT closed_at FROM rounds WHERE job_id=? AND round=? AND kind='train'",
                               (job_id, rnd)).fetchone()
        return float(first), float(last), float(closed)
    finally:
        db.close()


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far: unlike wall time, barely moved by other load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of /proc/<pid>/status in MB: resident now (VmRSS) or its peak so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def floor_ms(spec: JobSpec, template: Weights, workdir: Path, repeats: int = 5) -> float:
    """The least the server must do per update, timed in-process: hash, decode+validate, durable write, fold."""
    body = encode(privatized_like(template, 1))
    blobs = FileBlobStore(workdir / "floor-blobs")
    strategy = FedAvg()
    strategy.reset(template)
    best = math.inf
    for i in range(repeats):
        t0 = time.perf_counter()
        sha = sha256_hex(body)
        update = check_update(body, sha, template, spec)
        blobs.put(body[:-1] + bytes([i]) if i else body)  # a new blob each time: the write is not deduplicated
        strategy.add(update, 100)
        best = min(best, time.perf_counter() - t0)
    return best * 1000


async def client_sessions(fed: LocalFederation, sites: list[str], keepalive: bool) -> dict[str, aiohttp.ClientSession]:
    """One HTTPS client per site, as each agent has; with `keepalive` its connection stays open between uploads."""
    sessions = {}
    for site in sites:
        ctx: ssl.SSLContext = fed.tls("site", site).client_context()
        connector = aiohttp.TCPConnector(ssl=ctx, limit=1, force_close=not keepalive)
        sessions[site] = aiohttp.ClientSession(connector=connector)
    return sessions


def run_one(n_sites: int, params: int, concurrency: int, keepalive: bool = True) -> Result:
    sites = [f"sim-{i:04d}" for i in range(n_sites)]
    hidden = hidden_for(params)
    spec = JobSpec.model_validate(job_for(sites, hidden))
    template = get_weights(build_model("mlp", spec.features.input_dim(), hidden))
    n_params = sum(v.size for v in template.values())
    with tempfile.TemporaryDirectory(prefix="fedsilo-scale-") as tmp:
        root = Path(tmp)
        with LocalFederation(root, {}, extra_identities=tuple(sites), log_level="WARNING") as fed:
            assert fed.aggregator is not None
            pid = fed.aggregator.pid
            stages = {"started": rss_mb(pid)}
            job_id = fed.client.submit(yaml.safe_dump(job_for(sites, hidden)))
            tasks = TaskWatch(fed, sites[0], job_id)
            cpu: dict[int, float] = {}
            accept_all(fed, job_id, sites)
            stages["accepted"] = rss_mb(pid)

            async def drive() -> None:
                sessions = await client_sessions(fed, sites, keepalive)
                try:
                    for rnd in (1, 2):
                        await asyncio.to_thread(tasks.wait, rnd)
                        cpu[rnd] = cpu_s(pid)
                        await upload_round(fed, job_id, rnd, sites, template, sessions, concurrency)
                        stages[f"round {rnd}"] = rss_mb(pid)
                    await asyncio.to_thread(tasks.wait, 3)  # round 2 closed: round 3 is open
                    cpu[3] = cpu_s(pid)
                finally:
                    for s in sessions.values():
                        await s.close()

            try:
                asyncio.run(drive())
            finally:
                tasks.stop()
            first, last, closed = round_timing(fed, job_id, 2)
            rss = rss_mb(pid, "VmHWM")
            print("  aggregator RSS MB by stage: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))
            t0 = time.perf_counter()
            fed.client.cancel(job_id)  # the job is in round 3, every site taking part
            cancel_s = time.perf_counter() - t0
        floor = floor_ms(spec, template, root)
    update_mb = n_params * 4 / 1e6
    span = max(last - first, 1e-9)
    rate = (n_sites - 1) / span
    return Result(sites=n_sites, params=n_params, update_mb=update_mb, updates_per_s=rate,
                  mb_per_s=rate * update_mb, finalize_s=closed - last, peak_rss_mb=rss, floor_ms=floor,
                  observed_ms=1000 / rate, cpu_ms=(cpu[3] - cpu[2]) * 1000 / n_sites, cancel_s=cancel_s)


def print_table(results: list[Result]) -> None:
    print(f"\nfedsilo scale benchmark — one aggregator process, mTLS on loopback, SQLite + files, "
          f"{os.cpu_count()} CPUs (clients on the same machine)")
    head = (f"{'sites':>6} {'params':>11} {'update MB':>9} {'updates/s':>10} {'MB/s':>7} {'finalize s':>10} "
            f"{'peak RSS MB':>11} {'floor ms/upd':>12} {'observed ms/upd':>15} {'overhead':>8} {'CPU ms/upd':>10} "
            f"{'cancel s':>8}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r.sites:>6} {r.params:>11,} {r.update_mb:>9.2f} {r.updates_per_s:>10.1f} {r.mb_per_s:>7.1f} "
              f"{r.finalize_s:>10.3f} {r.peak_rss_mb:>11.0f} {r.floor_ms:>12.2f} {r.observed_ms:>15.2f} "
              f"{r.observed_ms / r.floor_ms:>7.1f}× {r.cpu_ms:>10.2f} {r.cancel_s:>8.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, action="append", help="number of simulated sites (repeatable)")
    parser.add_argument("--params", type=float, action="append", help="model parameters, e.g. 1e6 (repeatable)")
    parser.add_argument("--concurrency", type=int, default=8, help="uploads in flight at once")
    parser.add_argument("--no-keepalive", action="store_true", help="a new TLS connection for every upload")
    args = parser.parse_args(argv)
    matrix = DEFAULT
    if args.sites or args.params:
        matrix = [(s, int(p)) for p in (args.params or [1e4]) for s in (args.sites or [100])]
    results = []
    for n_sites, params in matrix:
        print(f"running {n_sites} sites × {params:,} parameters ...", flush=True)
        results.append(run_one(n_sites, params, args.concurrency, keepalive=not args.no_keepalive))
    print_table(results)


if __name__ == "__main__":
    main()
