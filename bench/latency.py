"""Round latency on the real deployment: how long a round takes and what it costs each hospital.

A `LocalFederation` (Mosquitto, the aggregator and four agents as separate processes, mTLS on loopback) runs the
heart-disease job with one local step for 50 rounds. Every agent reaches the broker and the aggregator through
its own counting TCP relay (`bench.wire`), so bytes are counted on the socket, TLS included; its egress
allowlist names the relay. Printed per model: median and p90 s/round (task published → round finalized, from the
aggregator's round records), CPU seconds per round of each process (from /proc), and wire bytes per site per
round next to the model's own size. With `--profile` (needs `py-spy` on PATH), one agent and the aggregator are
sampled during the run and the top functions are printed.

    python -m bench latency                  # logistic regression, then a 1M-parameter MLP; each plain and secure
    python -m bench latency --rounds 20 --models logreg
    python -m bench latency --no-secure      # without the secure-aggregation rows

Each model runs twice: plain, and with `secure_aggregation: true` (masked uploads, the shares, roster, unmask and
reveal steps of docs/secure-aggregation.md), whose wire bytes include all of those.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from bench.federated import bench_policies, example_job, site_splits
from bench.round_profile import round_steps
from bench.wire import Counter, Relay
from federation.jobs import JobSpec
from federation.models import build_model, get_weights, parameter_count
from federation.tensors import encode
from fedsilo.datasets import split_by_center
from fedsilo.local import LocalFederation
from fedsilo.progress import ENDED

MLP_HIDDEN = [37_037]  # 25 inputs: 25·37037 + 37037 + 37037 + 1 = 1,000,000 parameters
CLK_TCK = os.sysconf("SC_CLK_TCK")


class RelayedFederation(LocalFederation):
    """A `LocalFederation` whose agents dial per-site counting relays instead of the broker and aggregator."""

    def __init__(self, workdir: Path, policies: dict[str, dict[str, Any]], relay: Relay, **kw: Any) -> None:
        super().__init__(workdir, policies, **kw)
        self.relay = relay

    def agent_config(self, site: str) -> Path:
        path = super().agent_config(site)
        mqtt = self.relay.routes.get(f"{site}/mqtt") or self.relay.add(f"{site}/mqtt", self.broker.port)
        https = self.relay.routes.get(f"{site}/https") or self.relay.add(f"{site}/https", self.agg_port)
        cfg = yaml.safe_load(path.read_text())
        cfg["broker"]["port"] = mqtt.port
        cfg["aggregator_url"] = f"https://127.0.0.1:{https.port}"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        policy_file = Path(cfg["policy_file"])
        policy = yaml.safe_load(policy_file.read_text())
        policy["egress"]["allowed_endpoints"] = [f"127.0.0.1:{mqtt.port}", f"127.0.0.1:{https.port}"]
        policy_file.write_text(yaml.safe_dump(policy, sort_keys=False))
        return path

    def pids(self) -> dict[str, int]:
        out = {f"agent {s}": p.pid for s, p in self.agents.items()}
        if self.aggregator is not None:
            out["aggregator"] = self.aggregator.pid
        broker = _broker_pid(self.broker.config_file)
        if broker is not None:
            out["mosquitto"] = broker
        return out


def _broker_pid(config_file: Path) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"mosquitto") and str(config_file).encode() in cmd:
                return int(entry.name)
    return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (fields 14 and 15, after the command name)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class LatencyResult:
    label: str
    params: int
    model_bytes: int
    rounds: int
    state: str
    durations: list[float]
    wall_s: float
    cpu_per_round: dict[str, float]
    wire: dict[str, dict[str, Counter]]  # per site, per protocol ("mqtt", "https"), over the job
    connections: dict[str, int]
    idle_bytes_per_s: float
    profile: dict[str, str]

    def percentile(self, q: float) -> float:
        xs = sorted(self.durations)
        if not xs:
            return math.nan
        return xs[min(len(xs) - 1, math.ceil(q * len(xs)) - 1)]


def latency_job(model: dict[str, Any], rounds: int, secure: bool = False) -> dict[str, Any]:
    return example_job(
        name=f"latency-{model['name']}", model=model, rounds=rounds, min_sites=4, round_deadline_s=600,
        hyperparameters={"max_steps": 1}, privacy={"clip_norm": 0.3, "noise_multiplier": 1.0},
        **({"secure_aggregation": True} if secure else {}),
    )


def _wait(fed: LocalFederation, job_id: str, timeout: float) -> dict[str, Any]:
    """Poll slowly: the benchmark's own requests go straight to the aggregator and would add to its CPU."""
    deadline = time.monotonic() + timeout
    while True:
        summary = fed.client.job(job_id)
        if summary["state"] in ENDED or time.monotonic() > deadline:
            return summary
        time.sleep(1.0)


def _py_spy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """Sample `pid` (on-CPU stacks only) until interrupted; collapsed stacks go to `out`."""
    exe = shutil.which("py-spy")
    if exe is None:
        return None
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


# Where a sample's time goes: the first category matched walking from the innermost frame outwards.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("hashing (sha256)", ("sha256", "hashlib")),
    ("signing (Ed25519)", ("signing.py", "cryptography/")),
    ("noise + clipping", ("add_gaussian_noise", "privacy.py:clip", "(federation/privacy.py")),
    ("ε accounting (dp-accounting)", ("dp_accounting/", "epsilon_for")),
    ("serialization (safetensors, JSON, pydantic)", ("safetensors", "tensors.py", "json/", "pydantic", "yaml/")),
    ("TLS + sockets", ("ssl.py", "SSLSocket", "SSLObject", "sslproto.py", "socket.py")),
    ("disk (SQLite, blobs, files)", ("sqlite", "store.py", "blobs.py", "state.py", "_atomic_write", "pathlib.py",
                                     "fsync")),
    ("training + model (torch)", ("torch/", "trainer.py", "models.py")),
    ("tracking report (matplotlib, PIL)", ("tracking/", "matplotlib/", "PIL/")),
    ("HTTP + MQTT framing (aiohttp, paho)", ("aiohttp/", "paho/", "multidict", "yarl/")),
    ("event loop, threads", ("asyncio/", "selectors.py", "concurrent/", "threading.py")),
]


def categorize(stack: list[str]) -> str:
    for frame in reversed(stack):
        for name, needles in CATEGORIES:
            if any(n in frame for n in needles):
                return name
    return "other (Python)"


def profile_summary(raw: Path, n: int = 6) -> str:
    """Share of on-CPU samples per category, then the top functions by self time, from py-spy's stacks."""
    if not raw.exists():
        return "(no samples)"
    own: dict[str, int] = {}
    cats: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + k
        cat = categorize(frames)
        cats[cat] = cats.get(cat, 0) + k
    if total == 0:
        return "(no samples)"
    lines = [f"{total} on-CPU samples at 250 Hz; by category:"]
    lines += [f"  {100 * k / total:5.1f} %  {c}" for c, k in sorted(cats.items(), key=lambda kv: -kv[1])]
    lines.append("  top functions by self time:")
    lines += [f"  {100 * k / total:5.1f} %  {f}" for f, k in sorted(own.items(), key=lambda kv: -kv[1])[:n]]
    return "\n".join(lines)


def run(label: str, model: dict[str, Any], rounds: int, root: Path, profile: bool, secure: bool = False
        ) -> LatencyResult:
    files = split_by_center(root / "data")
    policies = bench_policies(files)
    for p in policies.values():
        p["models"]["max_parameters"] = 2_000_000
        p["egress"]["max_upload_bytes_per_round"] = 16 * 1024 * 1024
    job = latency_job(model, rounds, secure)
    spec = JobSpec.model_validate(job)
    weights = get_weights(build_model(spec.model.name, spec.features.input_dim(), spec.model.hidden))
    relay = Relay()
    relay.start()
    try:
        fed = RelayedFederation(root / "fed", policies, relay, log_level="INFO")
        with fed:
            pids = fed.pids()
            time.sleep(1.0)
            idle0, t_idle = relay.snapshot(), time.monotonic()
            time.sleep(4.0)
            idle = sum(c.total for c in relay.snapshot().values()) - sum(c.total for c in idle0.values())
            idle_rate = idle / (time.monotonic() - t_idle)
            cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
            wire0 = relay.snapshot()
            spies: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
            if profile:
                for name in ("aggregator", "agent cleveland"):
                    out = root / f"profile-{name.replace(' ', '-')}.txt"
                    spy = _py_spy(pids[name], out)
                    if spy is not None:
                        spies[name] = (spy, out)
                time.sleep(1.0)  # py-spy attaches
            t0 = time.monotonic()
            job_id = fed.client.submit(yaml.safe_dump(job))
            summary = _wait(fed, job_id, timeout=3600)
            wall = time.monotonic() - t0
            cpu1 = {k: cpu_seconds(p) for k, p in pids.items()}
            wire1 = relay.snapshot()
            for spy, _ in spies.values():
                spy.send_signal(signal.SIGINT)  # py-spy writes its samples on interrupt
                spy.wait(60)
    finally:
        relay.stop()
        # Model blobs and release logs run to gigabytes for the MLP; keep only logs and profiles.
        shutil.rmtree(root / "fed" / "state", ignore_errors=True)
    durations = [h["duration_s"] for h in summary["history"]
                 if 1 <= h["round"] <= rounds and h["duration_s"] is not None]
    per_site = {site: {k: wire1[f"{site}/{k}"] - wire0[f"{site}/{k}"] for k in ("mqtt", "https")} for site in files}
    conns = {site: sum(c.connections for c in per_site[site].values()) for site in files}
    return LatencyResult(
        label=label, params=parameter_count(weights), model_bytes=len(encode(weights)), rounds=rounds,
        state=summary["state"], durations=durations, wall_s=wall,
        cpu_per_round={k: (cpu1[k] - cpu0[k]) / rounds for k in pids}, wire=per_site, connections=conns,
        idle_bytes_per_s=idle_rate, profile={k: profile_summary(out) for k, (_, out) in spies.items()},
    )


def print_results(console: Console, results: list[LatencyResult]) -> None:
    table = Table(title="Round latency and cost on the real deployment (4 agents, 1 local step, mTLS on loopback)")
    for col in ("model", "params", "model B (safetensors)", "rounds", "state", "median s/round", "p90 s/round",
                "wall s", "wire B/site/round", "MQTT up/down", "HTTPS up/down", "new TCP conns/site/job"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        def per_round(kind: str, way: str, r: LatencyResult = r) -> float:
            return statistics.mean(int(getattr(w[kind], way)) for w in r.wire.values()) / r.rounds

        total = sum(per_round(k, w) for k in ("mqtt", "https") for w in ("upstream", "downstream"))
        table.add_row(r.label, f"{r.params:,}", f"{r.model_bytes:,}", str(r.rounds), r.state,
                      f"{statistics.median(r.durations):.3f}" if r.durations else "—", f"{r.percentile(0.9):.3f}",
                      f"{r.wall_s:.1f}", f"{total:,.0f}",
                      f"{per_round('mqtt', 'upstream'):,.0f} / {per_round('mqtt', 'downstream'):,.0f}",
                      f"{per_round('https', 'upstream'):,.0f} / {per_round('https', 'downstream'):,.0f}",
                      f"{statistics.mean(r.connections.values()):.1f}")
    console.print(table)
    cpu = Table(title="CPU seconds per round (user + system, from /proc, whole job ÷ rounds)")
    cpu.add_column("process")
    for r in results:
        cpu.add_column(r.label, justify="right")
    for name in results[0].cpu_per_round:
        cpu.add_row(name, *(f"{r.cpu_per_round.get(name, math.nan):.4f}" for r in results))
    console.print(cpu)
    for r in results:
        console.print(f"{r.label}: idle traffic (heartbeats, MQTT keepalive) across all sites "
                      f"{r.idle_bytes_per_s:.0f} B/s; per site per round of the job: "
                      + ", ".join(f"{s} {sum(c.total for c in w.values()) / r.rounds:,.0f}" for s, w in r.wire.items()))
        for name, text in r.profile.items():
            console.print(f"[bold]{r.label} — py-spy profile of the {name}[/bold]\n{text}")


def print_floor(console: Console, label: str, spec: JobSpec, root: Path) -> None:
    data = site_splits(split_by_center(root / "floor-data"), spec)["cleveland"]
    steps = round_steps(spec, data)
    table = Table(title=f"{label}: the work floor of one round, step by step (in-process, median of 5)")
    for col in ("side", "step", "ms"):
        table.add_column(col, justify="right" if col == "ms" else "left")
    for side, step, seconds in steps:
        table.add_row(side, step, f"{1000 * seconds:.2f}")
    agent = sum(s for side, _, s in steps if side == "agent")
    agg = sum(s for side, _, s in steps if side == "aggregator")
    table.add_row("total", "one agent (the four run in parallel) + the aggregator", f"{1000 * (agent + agg):.2f}")
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--models", nargs="+", choices=["logreg", "mlp"], default=["logreg", "mlp"])
    parser.add_argument("--profile", action="store_true", help="sample the aggregator and one agent with py-spy")
    parser.add_argument("--no-secure", action="store_true", help="skip the secure-aggregation rows")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="fedsilo-latency-"))
    models: dict[str, dict[str, Any]] = {"logreg": {"name": "logreg"}, "mlp": {"name": "mlp", "hidden": MLP_HIDDEN}}
    results = []
    for m in args.models:
        results.append(run(m, models[m], args.rounds, root / m, args.profile))
        if not args.no_secure:
            results.append(run(f"{m} + secure aggregation", models[m], args.rounds, root / f"{m}-secure",
                               args.profile, secure=True))
    console = Console(width=200)
    print_results(console, results)
    for m in args.models:
        print_floor(console, m, JobSpec.model_validate(latency_job(models[m], args.rounds)), root / m)
    print(f"logs and profiles: {root}")


if __name__ == "__main__":
    main()
