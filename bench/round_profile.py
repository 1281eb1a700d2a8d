"""Where one round's time goes, step by step: the work floor of a round, timed in-process on the very functions
the agent and the aggregator run (no network, no event loop, no other processes).

Next to the end-to-end s/round of `bench.latency`, the gap between the two is what the deployment adds: the
event loops and thread hand-offs, HTTP and MQTT framing, TLS, and four agents and the aggregator sharing the
machine's cores. Each step is timed as the median of several repeats.
"""

from __future__ import annotations

import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.data import SiteData
from agent.state import AgentState, Release
from agent.trainer import evaluate, train_local
from aggregator.blobs import FileBlobStore
from aggregator.strategies import FedAvg
from aggregator.validation import check_update
from federation.accounting import gaussian_epsilon
from federation.jobs import JobSpec
from federation.messages import RoundTask, UpdateEnvelope
from federation.models import build_model, get_weights, set_weights
from federation.privacy import privatize
from federation.signing import sign, verify
from federation.tensors import decode, encode, sha256_hex

Step = tuple[str, str, float]  # (side, step, seconds)


def _time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def round_steps(spec: JobSpec, data: SiteData, sites: int = 4, repeats: int = 5) -> list[Step]:
    """Seconds per step of one round: the agent's steps once (each agent runs them in parallel), the aggregator's
    per-update steps times `sites`, and its per-round steps once."""
    with tempfile.TemporaryDirectory(prefix="fedsilo-round-profile-") as tmp:
        return _round_steps(spec, data, sites, repeats, Path(tmp))


def _round_steps(spec: JobSpec, data: SiteData, sites: int, repeats: int, root: Path) -> list[Step]:
    dim, hidden = spec.features.input_dim(), spec.model.hidden
    model = build_model(spec.model.name, dim, hidden, seed=spec.seed)
    weights = get_weights(model)
    body = encode(weights)
    key = ed25519.Ed25519PrivateKey.generate()
    task = RoundTask(kind="train", job_id="bench-00000000", round=1, model_sha256=sha256_hex(body),
                     deadline=time.time() + 60, issued_at=time.time(), expires_at=time.time() + 60,
                     nonce=secrets.token_hex(16))
    signed = sign(task, key)
    delta = {k: (v * 0.01).astype(np.float32) for k, v in weights.items()}
    noisy, _ = privatize(delta, spec.privacy.clip_norm, spec.privacy.noise_multiplier)
    payload = encode(noisy)
    state = AgentState(root / "agent.db")
    blobs = FileBlobStore(root / "blobs")
    counter = iter(range(1_000_000))

    def train() -> None:
        m = build_model(spec.model.name, dim, hidden)
        set_weights(m, weights)
        train_local(m, data.x_train, data.y_train, spec.hyperparameters, seed=1)

    def release() -> None:
        env = UpdateEnvelope(job_id="bench-00000000", round=next(counter) + 1, site="cleveland", num_samples=100,
                             sha256=sha256_hex(payload), evaluation=None, train_loss=0.5, epsilon=1.0)
        state.record_release(Release(env.job_id, env.round, "heart-disease", 1.0, 1.0, payload,
                                     env.model_dump_json(), sent=False), spend={"site": 1.0})

    def blob_put() -> None:
        blobs.put(payload[:-8] + next(counter).to_bytes(8, "big"))  # a new blob each time, as every round's are

    strategy = FedAvg(spec.server_learning_rate)
    strategy.reset(weights)
    update = decode(payload)

    def fold() -> None:
        strategy.add(update, 100)

    def finalize() -> None:
        s = FedAvg(spec.server_learning_rate)
        s.reset(weights)
        s.add(update, 100)
        encode(s.apply(weights))

    agent: list[tuple[str, Callable[[], Any]]] = [
        ("verify the signed task (Ed25519)", lambda: verify(signed, key.public_key())),
        ("hash the fetched model (sha256)", lambda: sha256_hex(body)),
        ("decode the model (safetensors)", lambda: decode(body)),
        ("build the model, load weights (torch)", lambda: set_weights(build_model(spec.model.name, dim, hidden),
                                                                       weights)),
        ("evaluate on the validation split", lambda: evaluate(model, data.x_val, data.y_val)),
        ("train (1 step) incl. model build", train),
        ("clip + Gaussian noise (OS CSPRNG)", lambda: privatize(delta, spec.privacy.clip_norm,
                                                                spec.privacy.noise_multiplier)),
        ("ε accounting (RDP, uncached)", lambda: gaussian_epsilon.__wrapped__(spec.privacy.noise_multiplier, 25,
                                                                             spec.privacy.delta)),
        ("encode the update (safetensors)", lambda: encode(noisy)),
        ("hash the update (sha256)", lambda: sha256_hex(payload)),
        ("durable release log (SQLite, FULL sync)", release),
    ]
    aggregator: list[tuple[str, Callable[[], Any]]] = [
        ("validate an update (hash, decode, finite, norm)",
         lambda: check_update(payload, sha256_hex(payload), weights, spec)),
        ("store an update durably (file + fsync)", blob_put),
        ("fold into the FedAvg sum (float64)", fold),
    ]
    out: list[Step] = []
    for name, fn in agent:
        out.append(("agent", name, _time(fn, repeats)))
    for name, fn in aggregator:
        out.append(("aggregator", f"{name} × {sites}", sites * _time(fn, repeats)))
    out.append(("aggregator", "apply + encode the next model", _time(finalize, repeats)))
    out.append(("aggregator", "store the next model (file + fsync)", _time(blob_put, repeats)))
    out.append(("aggregator", "sign + publish the task (Ed25519, per site)", sites * _time(lambda: sign(task, key),
                                                                                         repeats)))
    state.close()
    return out
