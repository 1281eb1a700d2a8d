"""How far one aggregator goes: N simulated sites upload privatized updates of a P-parameter model to a real
aggregator process (mTLS on loopback, SQLite state, blobs on disk or in S3) and we measure what it sustains.

Per configuration: updates/s and MB/s ingested in a steady round (the second; the first pays the TLS handshakes),
the round's finalize time (last update acknowledged → next model committed), the aggregator's peak RSS, and how
long the operator's cancel of the running job takes to answer. The clients learn that a round opened the way an
agent does, from the signed task on a site's MQTT topic (verified with the job-signing key), never by polling.
Then, for each model size, the minimum server work per update measured in-process on the same primitives the
ingest path runs (sha256, safetensors decode, validation, durable blob write, FedAvg fold): the ratio of the
observed time per update to that floor is the share left to Python, HTTP and TLS overhead.

    python -m bench scale                       # the default matrix
    python -m bench scale --sites 100 --params 1e6
    python -m bench scale --blobs both --sites 100 --params 1e4 --params 1e6   # files and S3 side by side
    python -m bench scale --secure --sites 100 --params 1e4   # plus secure-aggregation rows (bench/scale_secure.py)

With `--blobs s3` the aggregator keeps its blobs in S3 (`blob_url: s3://...`, SSE-KMS) on a moto server process on
loopback, as the tests run it: the cost of S3's client (botocore, SigV4, HTTP, the sha256 check on every read) next
to fsynced files, not AWS's network latency (docs/blobs.md). Needs the test extras (moto).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml

from aggregator.blobs import FileBlobStore
from aggregator.strategies import FedAvg
from aggregator.validation import check_update
from bench.scale_secure import DROPOUT, print_secure_table, run_secure
from bench.scale_sites import (
    TaskWatch,
    accept_all,
    blob_settings,
    client_sessions,
    cpu_s,
    hidden_for,
    job_for,
    privatized_like,
    rss_mb,
)
from federation.jobs import JobSpec
from federation.messages import ENVELOPE_HEADER, EvalMetrics, UpdateEnvelope, update_path
from federation.models import Weights, build_model, get_weights
from federation.tensors import encode, sha256_hex
from fedsilo.local import LocalFederation

# 1,000 sites × 10^7 parameters is 40 GB per round through one 2-core machine's loopback and disk: left out of
# the default matrix (run it with --sites 1000 --params 1e7 on a machine with the disk for it).
DEFAULT = [(100, 10**4), (1000, 10**4), (100, 10**6), (1000, 10**6), (100, 10**7)]
# With --secure every site's share bundle is computed in this one process, one at a time (Shamir splits, O(sites · t)
# each: ≈ 0.2 s at 100 sites): beyond a few hundred sites they outlast the round's share window (60 s).
SECURE_DEFAULT = [(20, 10**4), (100, 10**4)]


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
    blobs: str = "files"  # where the aggregator keeps blobs: files (fsynced) or s3 (moto on loopback)


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


def run_one(n_sites: int, params: int, concurrency: int, keepalive: bool = True, blobs: str = "files") -> Result:
    sites = [f"sim-{i:04d}" for i in range(n_sites)]
    hidden = hidden_for(params)
    spec = JobSpec.model_validate(job_for(sites, hidden))
    template = get_weights(build_model("mlp", spec.features.input_dim(), hidden))
    n_params = sum(v.size for v in template.values())
    with tempfile.TemporaryDirectory(prefix="fedsilo-scale-") as tmp:
        root = Path(tmp)
        with blob_settings(blobs, root) as extra, \
                LocalFederation(root, {}, extra_identities=tuple(sites), log_level="WARNING",
                                aggregator_extra=extra) as fed:
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
                  observed_ms=1000 / rate, cpu_ms=(cpu[3] - cpu[2]) * 1000 / n_sites, cancel_s=cancel_s, blobs=blobs)


def print_table(results: list[Result]) -> None:
    print(f"\nfedsilo scale benchmark — one aggregator process, mTLS on loopback, SQLite state, "
          f"{os.cpu_count()} CPUs (clients on the same machine; the floor is timed with fsynced files)")
    head = (f"{'blobs':>5} {'sites':>6} {'params':>11} {'update MB':>9} {'updates/s':>10} {'MB/s':>7} "
            f"{'finalize s':>10} "
            f"{'peak RSS MB':>11} {'floor ms/upd':>12} {'observed ms/upd':>15} {'overhead':>8} {'CPU ms/upd':>10} "
            f"{'cancel s':>8}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r.blobs:>5} {r.sites:>6} {r.params:>11,} {r.update_mb:>9.2f} {r.updates_per_s:>10.1f} "
              f"{r.mb_per_s:>7.1f} "
              f"{r.finalize_s:>10.3f} {r.peak_rss_mb:>11.0f} {r.floor_ms:>12.2f} {r.observed_ms:>15.2f} "
              f"{r.observed_ms / r.floor_ms:>7.1f}× {r.cpu_ms:>10.2f} {r.cancel_s:>8.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, action="append", help="number of simulated sites (repeatable)")
    parser.add_argument("--params", type=float, action="append", help="model parameters, e.g. 1e6 (repeatable)")
    parser.add_argument("--concurrency", type=int, default=8, help="uploads in flight at once")
    parser.add_argument("--no-keepalive", action="store_true", help="a new TLS connection for every upload")
    parser.add_argument("--blobs", choices=("files", "s3", "both"), default="files",
                        help="the aggregator's blob store: files on disk, S3 on a moto server, or both in turn")
    parser.add_argument("--secure", action="store_true",
                        help="also a secure-aggregation job per configuration, every site running the protocol")
    parser.add_argument("--dropout", type=float, default=DROPOUT,
                        help="with --secure, a further secure row in which this fraction of the sites (at least "
                             "one) drops after the roster; 0: none (default %(default)s)")
    parser.add_argument("--no-plain", action="store_true", help="with --secure, only the secure rows")
    args = parser.parse_args(argv)
    if args.no_plain and not args.secure:
        parser.error("--no-plain needs --secure")
    matrix = SECURE_DEFAULT if args.secure else DEFAULT
    if args.sites or args.params:
        matrix = [(s, int(p)) for p in (args.params or [1e4]) for s in (args.sites or [100])]
    dropouts = ([0.0, args.dropout] if args.dropout > 0 else [0.0]) if args.secure else []
    results, secure = [], []
    stores = ("files", "s3") if args.blobs == "both" else (args.blobs,)
    for n_sites, params in matrix:
        for store in stores:
            if not args.no_plain:
                print(f"running {n_sites} sites × {params:,} parameters, blobs in {store} ...", flush=True)
                results.append(run_one(n_sites, params, args.concurrency, keepalive=not args.no_keepalive,
                                       blobs=store))
            for dropout in dropouts:
                print(f"running {n_sites} sites × {params:,} parameters, secure aggregation, dropout {dropout:g}, "
                      f"blobs in {store} ...", flush=True)
                secure.append(run_secure(n_sites, params, args.concurrency, dropout, blobs=store))
    if results:
        print_table(results)
    if secure:
        print_secure_table(secure)


if __name__ == "__main__":
    main()
