"""The secure-aggregation rows of `python -m bench scale --secure`: the plain rows' aggregator process and simulated
sites (`bench.scale_sites`), with the job switched to `secure_aggregation: true` and FedAvg, and every simulated site
running the whole protocol for real (`bench.secagg_site.SecureSite`): it accepts with its X25519 share key; each
round it posts its share bundle (fresh mask key and self-mask seed, split t-of-n with Shamir, a share pair sealed
to every participant), waits on the signed roster (long poll), masks its update against every other roster site,
uploads it on the usual update path, waits on the signed unmask request and posts its reveal. The complete graph's
O(n²) cost is what these rows show.

Per configuration, in round 2 (round 1 pays the TLS handshakes), from the aggregator's own state: the share phase
(round opened and task published → roster frozen), the upload phase (roster → unmask request frozen, at quorum) and
the unmask phase (request → round closed, at the threshold's reveal: reconstructing every survivor's seed, and each
dropped site's mask key and its pair masks with every survivor); the aggregator's CPU seconds for the round and its
peak RSS; the bodies each site sent (bundle, masked upload, reveal) beside what a plain upload of the same model
sends; and each site's own CPU for its bundle, its mask and its reveal, measured on the thread that computed it.

The clients share this machine with the aggregator, and their Shamir splits (pycryptodome, pure Python) hold the
GIL: the share phase here is every site's bundle computed one after another, where real sites compute theirs at
once; the per-site CPU columns say how much of a phase that is. Each site's update is a fixed random vector
clipped to 0.9·C, quantized once with the job's quantization (`federation.secagg.job.job_quantization`) and reused
every round; no noise is added: the protocol's cost does not depend on the values, and an agent's discrete
Gaussian share costs only that agent's CPU (not counted in the mask column here).

With `--dropout F` a second row has a fraction F of the sites (at least one) share their keys, then never upload:
the unmask phase then rebuilds their mask keys and takes out their pair masks with every survivor.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import numpy as np
import yaml

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
from bench.secagg_site import SecureSite, masked_upload
from federation.jobs import JobSpec
from federation.messages import ENVELOPE_HEADER, RoundTask, update_path
from federation.models import build_model, get_weights
from federation.secagg import quantize
from federation.secagg.job import job_quantization, model_dim
from federation.secagg.messages import (
    MAX_WAIT_S,
    MaskRoster,
    Reveal,
    UnmaskRequest,
    UnmaskWork,
    reveal_path,
    roster_path,
    shares_path,
    unmask_path,
)
from federation.signing import load_public_key, verify
from federation.tensors import encode
from fedsilo.local import LocalFederation

T = TypeVar("T")
DROPOUT = 0.05
KINDS = ("bundle", "masked", "reveal")
# Answers that mean "the round closed already" to a site asking for unmask work or revealing: the threshold's
# reveals were in first.
CLOSED = ("late_update", "round_not_open")


@dataclass
class SecureResult:
    sites: int
    params: int
    threshold: int
    dropped: int  # as the aggregator's unmask request names them
    share_s: float  # round opened (task published) → roster frozen
    upload_s: float  # roster frozen → unmask request frozen
    unmask_s: float  # unmask request frozen → round closed
    updates_per_s: float  # masked uploads stored per second in the upload phase
    cpu_s: float  # the aggregator's CPU seconds for round 2
    peak_rss_mb: float
    kb: dict[str, float]  # per site and round, the bodies sent: bundle, masked, reveal; plain: a plain upload's
    site_ms: dict[str, float]  # per site and round, its own CPU: bundle, masked (mask), reveal
    cancel_s: float
    blobs: str = "files"


@dataclass
class Tally:
    """What a round's sites sent and spent, per message kind: body sizes (bytes) and CPU (seconds)."""

    sizes: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    cpu: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, body: bytes, cpu: float) -> None:
        self.sizes[kind].append(len(body))
        self.cpu[kind].append(cpu)

    def mean_kb(self, kind: str) -> float:
        return float(np.mean(self.sizes[kind])) / 1e3 if self.sizes[kind] else 0.0

    def mean_ms(self, kind: str) -> float:
        return float(np.mean(self.cpu[kind])) * 1e3 if self.cpu[kind] else 0.0


async def timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    """`fn(*args)` on a worker thread, with the CPU time that thread spent on it (not moved by other threads)."""

    def run() -> tuple[T, float]:
        t0 = time.thread_time()
        out = fn(*args)
        return out, time.thread_time() - t0

    return await asyncio.to_thread(run)


class SecureSites:
    """The simulated sites of one secure job: each one's keys, HTTPS client and fixed plaintext update."""

    def __init__(self, fed: LocalFederation, sites: dict[str, SecureSite], values: dict[str, np.ndarray],
                 sessions: dict[str, aiohttp.ClientSession], threshold: int, dropping: set[str],
                 concurrency: int) -> None:
        self.url, self.sites, self.values, self.sessions = fed.url, sites, values, sessions
        self.threshold, self.dropping = threshold, dropping
        self.key = load_public_key(fed.pki.signing_pub)
        self.gate = asyncio.Semaphore(concurrency)  # bodies in flight at once; the long polls wait outside it

    async def play(self, task: RoundTask) -> Tally:
        """One round, every site at once, from the task to its reveal."""
        tally = Tally()
        await asyncio.gather(*(self._site(s, task, tally) for s in self.sites.values()))
        return tally

    async def _site(self, site: SecureSite, task: RoundTask, tally: Tally) -> None:
        name, job_id, rnd = site.name, task.job_id, task.round
        bundle, cpu = await timed(site.bundle, task, self.threshold)
        body = bundle.model_dump_json().encode()
        tally.add("bundle", body, cpu)
        status, answer = await self._post(name, shares_path(job_id, rnd), body)
        if status == 409 and json.loads(answer).get("error") == "roster_frozen":
            raise RuntimeError(f"{name}: the share window closed before its bundle was in (this process computes "
                               "every site's bundle in turn): fewer sites, or a faster machine")
        _expect(name, "shares", status, answer)
        signed = _expect(name, "roster", *await self._long_poll(name, roster_path(job_id, rnd)))
        if name in self.dropping:
            return  # in the roster, never uploads: the unmask phase rebuilds its mask key from the others' shares
        masked, cpu = await timed(self._mask, site, signed)
        body, env = masked_upload(job_id, rnd, name, masked)
        tally.add("masked", body, cpu)
        _expect(name, "upload", *await self._post(name, update_path(job_id, rnd), body,
                                                  {ENVELOPE_HEADER: env.model_dump_json()}))
        status, work = await self._long_poll(name, unmask_path(job_id, rnd))
        if _closed(status, work):
            return
        _expect(name, "unmask work", status, work)
        reveal, cpu = await timed(self._reveal, site, work, task.share_keys or {})
        body = reveal.model_dump_json().encode()
        tally.add("reveal", body, cpu)
        status, answer = await self._post(name, reveal_path(job_id, rnd), body)
        if not _closed(status, answer):  # a reveal past the threshold's finds the round closed
            _expect(name, "reveal", status, answer)

    def _mask(self, site: SecureSite, signed: bytes) -> np.ndarray:
        roster = MaskRoster.model_validate(verify(signed, self.key))
        return site.mask(roster, self.values[site.name])

    def _reveal(self, site: SecureSite, raw: bytes, share_keys: dict[str, str]) -> Reveal:
        work = UnmaskWork.model_validate_json(raw)
        verify(work.request.encode(), self.key)
        return site.reveal(work, share_keys)

    async def _post(self, site: str, path: str, body: bytes, headers: dict[str, str] | None = None) \
            -> tuple[int, bytes]:
        async with self.gate, self.sessions[site].post(self.url + path, data=body, headers=headers or {}) as resp:
            return resp.status, await resp.read()

    async def _long_poll(self, site: str, path: str) -> tuple[int, bytes]:
        """GET `path?wait=` until it is no longer 202 (pending)."""
        while True:
            async with self.sessions[site].get(f"{self.url}{path}?wait={MAX_WAIT_S}") as resp:
                body = await resp.read()
                if resp.status != 202:
                    return resp.status, body


def _closed(status: int, body: bytes) -> bool:
    return status == 409 and json.loads(body).get("error") in CLOSED


def _expect(site: str, what: str, status: int, body: bytes) -> bytes:
    if status != 200:
        raise RuntimeError(f"{site} {what}: {status} {body[:500]!r}")
    return body


def secure_job_for(sites: list[str], hidden: list[int], dropped: int) -> dict[str, Any]:
    """The plain rows' job made secure, with the default threshold for a majority of the sites (min_sites), and a
    quorum of the sites that upload, so the unmask request is frozen at the last upload, not at the deadline."""
    n = len(sites)
    job = job_for(sites, hidden)
    job.update(secure_aggregation=True, aggregation="fedavg", min_sites=n // 2 + 1,
               quorum=(n - dropped - 0.5) / n)  # ceil(quorum · n) = n − dropped
    return job


def fixed_update(q: quantize.Quantization, rng: np.random.Generator) -> np.ndarray:
    """A site's quantized update (residues mod 2^32): a random vector clipped to 0.9·C, without noise."""
    vec = rng.normal(0, 1, q.dim)
    vec *= 0.9 * q.clip_norm / float(np.linalg.norm(vec))
    return quantize.encode_mod(quantize.quantize(vec, q))


def dropped_count(n_sites: int, fraction: float) -> int:
    return max(1, round(fraction * n_sites)) if fraction > 0 else 0


def phases(fed: LocalFederation, job_id: str, rnd: int) -> dict[str, float]:
    """Round `rnd`'s protocol steps as the aggregator stored them (wall-clock seconds since the epoch), its masked
    uploads, and how many sites its unmask request names as dropped."""
    db = sqlite3.connect(fed.workdir / "state" / "aggregator.db")
    try:
        opened, closed = db.execute("SELECT started_at, closed_at FROM rounds WHERE job_id=? AND round=?",
                                    (job_id, rnd)).fetchone()
        frozen = {kind: (at, body) for kind, at, body in db.execute(
            "SELECT kind, at, body FROM secagg WHERE job_id=? AND round=? AND site=''", (job_id, rnd))}
        first, last, count = db.execute(
            "SELECT MIN(received_at), MAX(received_at), COUNT(*) FROM updates WHERE job_id=? AND round=?",
            (job_id, rnd)).fetchone()
    finally:
        db.close()
    request = UnmaskRequest.model_validate(json.loads(frozen["unmask"][1])["message"])
    return {"opened": opened, "roster": frozen["roster"][0], "unmask": frozen["unmask"][0], "closed": closed,
            "first": first, "last": last, "uploads": count, "dropped": len(request.dropped)}


def run_secure(n_sites: int, params: int, concurrency: int, dropout: float = 0.0,
               blobs: str = "files") -> SecureResult:
    names = [f"sim-{i:04d}" for i in range(n_sites)]
    dropping = set(names[n_sites - dropped_count(n_sites, dropout):]) if dropout > 0 else set()
    hidden = hidden_for(params)
    job = secure_job_for(names, hidden, len(dropping))
    spec = JobSpec.model_validate(job)
    if n_sites - len(dropping) < spec.secagg_threshold:
        raise ValueError(f"{len(dropping)} of {n_sites} sites dropping leaves fewer than the threshold "
                         f"{spec.secagg_threshold}")
    template = get_weights(build_model("mlp", spec.features.input_dim(), hidden))
    q = job_quantization(spec, model_dim(template))
    rng = np.random.default_rng(0)
    values = {n: fixed_update(q, rng) for n in names}
    sites = {n: SecureSite(n) for n in names}
    tallies: dict[int, Tally] = {}
    cpu: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="fedsilo-scale-secure-") as tmp:
        root = Path(tmp)
        with blob_settings(blobs, root) as extra, \
                LocalFederation(root, {}, extra_identities=tuple(names), log_level="WARNING",
                                aggregator_extra=extra) as fed:
            assert fed.aggregator is not None
            pid = fed.aggregator.pid
            job_id = fed.client.submit(yaml.safe_dump(job))
            tasks = TaskWatch(fed, names[0], job_id)
            accept_all(fed, job_id, names, {n: s.share_key for n, s in sites.items()})

            async def drive() -> None:
                sessions = await client_sessions(fed, names, keepalive=True)
                try:
                    simulated = SecureSites(fed, sites, values, sessions, spec.secagg_threshold, dropping,
                                            concurrency)
                    for rnd in (1, 2):
                        await asyncio.to_thread(tasks.wait, rnd)
                        cpu[rnd] = cpu_s(pid)
                        tallies[rnd] = await simulated.play(RoundTask.model_validate(tasks.task(rnd)))
                    await asyncio.to_thread(tasks.wait, 3)  # round 2 closed: round 3 is open
                    cpu[3] = cpu_s(pid)
                finally:
                    for s in sessions.values():
                        await s.close()

            try:
                asyncio.run(drive())
            finally:
                tasks.stop()
            at = phases(fed, job_id, 2)
            rss = rss_mb(pid, "VmHWM")
            t0 = time.perf_counter()
            fed.client.cancel(job_id)  # the job is in round 3, every site taking part
            cancel_s = time.perf_counter() - t0
    tally = tallies[2]
    kb = {k: tally.mean_kb(k) for k in KINDS} | {"plain": len(encode(privatized_like(template, 0))) / 1e3}
    return SecureResult(
        sites=n_sites, params=model_dim(template), threshold=spec.secagg_threshold, dropped=int(at["dropped"]),
        share_s=at["roster"] - at["opened"], upload_s=at["unmask"] - at["roster"],
        unmask_s=at["closed"] - at["unmask"],
        updates_per_s=(at["uploads"] - 1) / max(at["last"] - at["first"], 1e-9), cpu_s=cpu[3] - cpu[2],
        peak_rss_mb=rss, kb=kb, site_ms={k: tally.mean_ms(k) for k in KINDS}, cancel_s=cancel_s, blobs=blobs)


def print_secure_table(results: list[SecureResult]) -> None:
    print(f"\nsecure aggregation (complete graph, threshold t, round 2), {os.cpu_count()} CPUs — phases from the "
          "aggregator's state; KB: bodies one site sends per round (plain: a plain upload of the same model); "
          "site ms: one site's own CPU (bundle, mask, reveal), the sites computed in this one process")
    head = (f"{'row':>6} {'blobs':>5} {'sites':>6} {'params':>11} {'t':>4} {'dropped':>7} {'share s':>8} "
            f"{'upload s':>8} {'unmask s':>8} {'round s':>8} {'updates/s':>9} {'CPU s/round':>11} "
            f"{'peak RSS MB':>11} {'bundle KB':>9} {'masked KB':>9} {'reveal KB':>9} {'secure KB':>9} "
            f"{'plain KB':>8} {'bundle ms':>9} {'mask ms':>7} {'reveal ms':>9} {'cancel s':>8}")
    print(head)
    print("-" * len(head))
    for r in results:
        total = sum(r.kb[k] for k in KINDS)
        print(f"{'secure':>6} {r.blobs:>5} {r.sites:>6} {r.params:>11,} {r.threshold:>4} {r.dropped:>7} "
              f"{r.share_s:>8.2f} {r.upload_s:>8.2f} {r.unmask_s:>8.2f} "
              f"{r.share_s + r.upload_s + r.unmask_s:>8.2f} {r.updates_per_s:>9.1f} {r.cpu_s:>11.2f} "
              f"{r.peak_rss_mb:>11.0f} {r.kb['bundle']:>9.1f} {r.kb['masked']:>9.1f} {r.kb['reveal']:>9.1f} "
              f"{total:>9.1f} {r.kb['plain']:>8.1f} {r.site_ms['bundle']:>9.1f} {r.site_ms['masked']:>7.1f} "
              f"{r.site_ms['reveal']:>9.1f} {r.cancel_s:>8.3f}")
