"""The simulated sites of `python -m bench scale` and what it reads of the aggregator process: the job and model of
a given size, the sites' acceptances (over MQTT, each with its own certificate), the signed round tasks, one HTTPS
client per site, the blob store's settings, and the process's CPU time and memory. Shared by the plain rows
(`bench.scale`) and the secure-aggregation rows (`bench.scale_secure`)."""

from __future__ import annotations

import contextlib
import math
import os
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from federation import topics
from federation.messages import SiteEvent, canonical_json
from federation.models import Weights
from federation.signing import load_public_key, verify
from fedsilo.local import LocalFederation

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "heart-disease.yaml"
CLIP, SIGMA = 1.0, 0.5


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


def accept_all(fed: LocalFederation, job_id: str, sites: list[str],
               share_keys: Mapping[str, str] | None = None) -> None:
    """Each simulated site answers the offer over MQTT with its own certificate (the broker's ACL lets a site
    publish only on its own topics), then disconnects. A secure job's sites accept with their `share_keys`."""

    def accept(site: str) -> None:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sim-{site}", clean_session=True)
        client.tls_set_context(fed.tls("site", site).client_context())
        client.connect("127.0.0.1", fed.broker.port)
        event = SiteEvent(site=site, job_id=job_id, kind="accepted", at=time.time(),
                          share_key=share_keys[site] if share_keys is not None else None)
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
    verified like an agent verifies them: `wait(rnd)` returns once round `rnd` or a later one was announced, and
    `task(rnd)` is round `rnd`'s task as signed. The aggregator publishes one signed task to every site's topic, so
    one site's copy stands for all of them."""

    def __init__(self, fed: LocalFederation, site: str, job_id: str) -> None:
        self._key = load_public_key(fed.pki.signing_pub)
        self._latest = 0
        self._tasks: dict[int, dict[str, Any]] = {}
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
                self._tasks[int(task["round"])] = task
            self._cond.notify_all()

    def wait(self, rnd: int, within: float = 3600) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._latest >= rnd, timeout=within):
                raise TimeoutError(f"round {rnd} was not announced within {within:.0f} s")

    def task(self, rnd: int) -> dict[str, Any]:
        with self._cond:
            return self._tasks[rnd]

    def stop(self) -> None:
        self._client.loop_stop()
        self._client.disconnect()


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


async def client_sessions(fed: LocalFederation, sites: list[str], keepalive: bool) -> dict[str, aiohttp.ClientSession]:
    """One HTTPS client per site, as each agent has; with `keepalive` its connection stays open between uploads."""
    sessions = {}
    for site in sites:
        ctx: ssl.SSLContext = fed.tls("site", site).client_context()
        connector = aiohttp.TCPConnector(ssl=ctx, limit=1, force_close=not keepalive)
        sessions[site] = aiohttp.ClientSession(connector=connector)
    return sessions


S3_BUCKET = "fedsilo-bench-scale"


@contextlib.contextmanager
def blob_settings(kind: str, root: Path) -> Iterator[dict[str, Any]]:
    """The aggregator's blob settings for `kind` ("files": its default; "s3": a bucket on a moto server)."""
    if kind == "files":
        yield {}
        return
    import boto3

    from bench.blobs import moto_s3

    with moto_s3(root) as (url, key):
        boto3.client("s3", endpoint_url=url).create_bucket(
            Bucket=S3_BUCKET, CreateBucketConfiguration={"LocationConstraint": os.environ["AWS_DEFAULT_REGION"]})
        yield {"blob_url": f"s3://{S3_BUCKET}/aggregator",
               "blob_s3": {"endpoint_url": url, "kms_key_id": key, "addressing_style": "path"}}
