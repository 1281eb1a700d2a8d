"""Participants with a valid certificate who send what no honest agent would: a real broker, a real aggregator and
two real hospital agents, beside `mallory` (invited to the job, played by the test) and `eve` (in no job).

Each class of hostile input is refused with a reason, costs the aggregator a bounded amount (time and memory are
measured and printed, not asserted), and leaves an aggregator that still serves, parses as strict JSON, and starts
again; the three severe findings of the review are reproduced exactly as reported.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from safetensors.numpy import save

from federation import topics
from federation.messages import ENVELOPE_HEADER, update_path
from federation.models import build_model, get_weights
from federation.tensors import encode, sha256_hex
from fedsilo.datasets import split_by_center
from fedsilo.local import LocalFederation, example_policy
from tests.participants import Mallory
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
TEMPLATE = get_weights(build_model("logreg", 25))
GOOD = encode({k: np.full_like(v, 0.01) for k, v in TEMPLATE.items()})


def strict(text: str | bytes) -> Any:
    """Parse as a strict JSON client (a browser's JSON.parse) would: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} in a response")

    return json.loads(text, parse_constant=refuse)


def get(fed: LocalFederation, path: str) -> Any:
    """An operator GET, its answer parsed strictly."""
    ctx = fed.tls("operator", "operator").client_context()
    with urllib.request.urlopen(urllib.request.Request(fed.url + path), timeout=30, context=ctx) as resp:
        return strict(resp.read())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def post_raw(fed: LocalFederation, as_site: str | None, job_id: str, rnd: int, envelope: dict[str, Any] | str,
             body: bytes, timeout: float = 60) -> tuple[int, dict[str, Any], float]:
    """An upload with any envelope (a dict is sent as Python's json writes it, NaN and Infinity included) and
    any body; `as_site` None sends no client certificate. Returns status, answer and seconds taken."""
    req = urllib.request.Request(fed.url + update_path(job_id, rnd), data=body, method="POST")
    req.add_header(ENVELOPE_HEADER, envelope if isinstance(envelope, str) else json.dumps(envelope))
    if as_site is None:
        ctx = ssl.create_default_context(cafile=str(fed.pki.ca_cert))
    else:
        ctx = fed.tls("site", as_site).client_context()
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            return resp.status, strict(resp.read()), time.monotonic() - t0
    except urllib.error.HTTPError as exc:
        return exc.code, strict(exc.read()), time.monotonic() - t0


def envelope(job_id: str, rnd: int, body: bytes, **changes: Any) -> dict[str, Any]:
    env: dict[str, Any] = {"job_id": job_id, "round": rnd, "site": "mallory", "num_samples": 50,
                           "sha256": sha256_hex(body), "evaluation": {"n": 30, "loss": 0.7, "auc": 0.5},
                           "train_loss": 0.7, "epsilon": 1.0}
    return env | changes


def publisher(fed: LocalFederation, site: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"hostile-{site}", clean_session=True)
    client.tls_set_context(fed.tls("site", site).client_context())
    client.connect("127.0.0.1", fed.broker.port)
    client.loop_start()
    return client


def metric(fed: LocalFederation, line_start: str) -> float:
    text = bytes(fed.client.request("GET", "/metrics")).decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("hostile")
    files = split_by_center(root / "data")
    policies = {s: example_policy(s, {"heart-disease": files[s]}) for s in ("cleveland", "hungary")}
    for p in policies.values():
        p["privacy"]["min_noise_multiplier"] = 0.05
        p["privacy"]["max_epsilon_per_job"] = 1e4
        p["privacy"]["budgets"]["heart-disease"]["epsilon"] = 1e5
        p["operations"]["max_concurrent_jobs"] = 4
    with LocalFederation(root, policies, extra_identities=("mallory", "eve"), heartbeat_s=1.0) as f:
        yield f


@pytest.fixture(scope="module")
def job(fed: LocalFederation) -> str:
    """A job in its first round with mallory taking part (she never uploads a good update, so it waits)."""
    data = yaml.safe_load(EXAMPLE.read_text())
    data.update(rounds=2, sites=["cleveland", "hungary", "mallory"], min_sites=2, round_deadline_s=600, quorum=1.0)
    data["privacy"] = {"unit": "site", "clip_norm": 1.0, "noise_multiplier": 0.1, "delta": 1e-5}
    job_id = fed.client.submit(yaml.safe_dump(data))

    async def join() -> None:
        mallory = Mallory(fed)
        link = await mallory.join(job_id)
        await mallory.wait_task(1)
        await link.stop()  # her uploads go over HTTPS; she needs no more tasks

    asyncio.run(join())
    return job_id


def test_the_severe_findings_are_refused_and_the_aggregator_restarts(fed: LocalFederation, job: str) -> None:
    # 1. A sample count too large to store or sum: refused at the boundary, before anything is stored.
    status, answer, _ = post_raw(fed, "mallory", job, 1, envelope(job, 1, GOOD, num_samples=9223372036854775807),
                                 GOOD)
    assert status == 400 and answer["error"] == "malformed_envelope" and "num_samples" in answer["detail"]
    # An evaluation of AUC 1e308 (or 50, or a negative loss), and ε Infinity: the same.
    for bad in ({"evaluation": {"n": 30, "auc": 1e308}}, {"evaluation": {"n": 30, "auc": 50.0}},
                {"evaluation": {"n": 30, "loss": -3.0}}, {"epsilon": float("inf")}, {"train_loss": float("nan")},
                {"num_samples": True}):
        status, answer, _ = post_raw(fed, "mallory", job, 1, envelope(job, 1, GOOD, **bad), GOOD)
        assert (status, answer["error"]) == (400, "malformed_envelope"), bad
    # The job is readable and every answer parses as strict JSON; the aggregator starts again.
    get(fed, f"/api/v1/jobs/{job}")
    fed.stop_aggregator()
    fed.start_aggregator()
    assert fed.client.job(job)["state"] == "running"

    # 2. A flood of status messages from a site in no job, one of them claiming to be seen at Infinity.
    eve = publisher(fed, "eve")
    before = metric(fed, 'fedsilo_site_messages_rejected_total{reason="rate_limited",site="eve"}')
    t0 = time.monotonic()
    eve.publish(topics.status("eve"), b'{"site": "eve", "state": "online", "at": Infinity}', qos=0)
    for i in range(10_000):
        eve.publish(topics.status("eve"), json.dumps({"site": "eve", "state": "online", "at": i}).encode(), qos=0)
    latencies = []
    for _ in range(10):  # the store-backed API while the flood is handled
        t = time.monotonic()
        get(fed, "/api/v1/sites")
        latencies.append(time.monotonic() - t)
    wait_for(lambda: metric(fed, 'fedsilo_site_messages_rejected_total{reason="rate_limited",site="eve"}')
             >= before + 9000, what="the flood to be dropped")
    print(f"\n10,001 status messages from eve: dropped in {time.monotonic() - t0:.2f} s; /api/v1/sites during the "
          f"flood: median {sorted(latencies)[5] * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
    assert metric(fed, 'fedsilo_site_messages_rejected_total{reason="malformed",site="eve"}') >= 1  # Infinity
    wait_for(lambda: any(s["site"] == "eve" for s in fed.client.sites()), what="eve's heartbeat stored")
    [row] = [s for s in get(fed, "/api/v1/sites") if s["site"] == "eve"]
    assert abs(row["at"] - time.time()) < 60  # the aggregator's receive time, never the sender's clock
    # An 11 MB status: dropped before parsing (the broker refuses it first where its limit is set).
    eve.publish(topics.status("eve"), b" " * (11 << 20), qos=1).wait_for_publish(10)
    eve.loop_stop()
    eve.disconnect()
    get(fed, "/api/v1/sites")


def test_oversized_safetensors_headers_are_refused_before_parsing(fed: LocalFederation, job: str) -> None:
    pid = fed.aggregator.pid if fed.aggregator is not None else 0
    good = {k: np.full_like(v, 0.01) for k, v in TEMPLATE.items()}
    bombs = {
        "60 MB of metadata beside valid tensors": save(good, metadata={"x": "y" * (60 << 20)}),
        "a million zero-size tensors": save({**good, **{f"t{i}": np.zeros((0,), np.float32)
                                                        for i in range(1_000_000)}}),
    }
    for what, body in bombs.items():
        rss0 = rss_mb(pid)
        status, answer, took = post_raw(fed, "mallory", job, 1, envelope(job, 1, body), body, timeout=120)
        print(f"\n{what} ({len(body) / 1e6:.0f} MB): {status} {answer['error']} in {took:.2f} s, aggregator RSS "
              f"{rss0:.0f} → {rss_mb(pid):.0f} MB")
        assert (status, answer["error"]) == (413, "too_large")  # announced larger than the job's layout allows
        assert len(answer["detail"]) <= 500
    # A header too long for the layout, in a body no longer than the layout's (its tensor data cut short): refused
    # from the header's length alone, before it is parsed.
    full = save(good, metadata={"x": "y" * 1050})
    small = full[: 8 + int.from_bytes(full[:8], "little")]
    status, answer, _ = post_raw(fed, "mallory", job, 1, envelope(job, 1, small), small)
    assert (status, answer["error"]) == (400, "oversized_header")
    rejections = fed.client.job(job)["rejections"]
    assert all(len(r["detail"]) <= 500 for r in rejections)


def test_requests_that_name_no_job_of_theirs_write_no_row(fed: LocalFederation, job: str) -> None:
    rows_before = len(get(fed, "/api/v1/rejections"))
    unauth_before = metric(fed, 'fedsilo_updates_rejected_total{reason="no_identity",site="unknown"}')
    t0 = time.monotonic()
    for i in range(200):
        status, answer, _ = post_raw(fed, None, f"job-{i}", 1, envelope(job, 1, GOOD), GOOD)
        assert (status, answer["error"]) == (401, "no_identity")
    for i in range(50):  # eve, certified but in no job; and jobs that do not exist
        target = job if i % 2 else f"nope-{i}"
        status, answer, _ = post_raw(fed, "eve", target, 1, envelope(target, 1, GOOD, site="eve"), GOOD)
        assert (status, answer["error"]) in ((403, "site_not_in_job"), (404, "unknown_job"))
    print(f"\n250 uploads from outsiders answered in {time.monotonic() - t0:.2f} s")
    assert metric(fed, 'fedsilo_updates_rejected_total{reason="no_identity",site="unknown"}') == unauth_before + 200
    assert len(get(fed, "/api/v1/rejections")) == rows_before  # not one row written


def test_a_model_too_large_is_refused_before_anything_is_built(fed: LocalFederation) -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    data.update(model={"name": "mlp", "hidden": [8192, 8192]}, sites=["cleveland"], min_sites=1)
    pid = fed.aggregator.pid if fed.aggregator is not None else 0
    rss0 = rss_mb(pid)
    with pytest.raises(Exception, match="model_too_large"):
        fed.client.submit(yaml.safe_dump(data))
    print(f"\na 67M-parameter job refused; aggregator RSS {rss0:.0f} → {rss_mb(pid):.0f} MB")


def test_a_job_whose_offer_the_broker_would_drop_is_refused_at_submit(fed: LocalFederation) -> None:
    """Mosquitto drops a message over its message_size_limit without telling the sender: such a job would wait
    for answers that never come. It is refused at once instead, with the sizes."""
    data = yaml.safe_load(EXAMPLE.read_text())
    data.update(sites=["cleveland"], min_sites=1, tags={"note": "x" * 300_000})
    with pytest.raises(Exception, match="offer_too_large"):
        fed.client.submit(yaml.safe_dump(data))


def test_a_job_giving_a_key_twice_is_refused_not_read_as_the_last(fed: LocalFederation) -> None:
    text = EXAMPLE.read_text() + "\nrounds: 1000\n"  # the example already says `rounds: 10`
    with pytest.raises(Exception, match=r"unparseable_job.*'rounds'"):
        fed.client.submit(text)


def test_every_api_answer_is_strict_json(fed: LocalFederation, job: str) -> None:
    for path in ("/api/v1/jobs", f"/api/v1/jobs/{job}", f"/api/v1/jobs/{job}?sites=none", "/api/v1/sites",
                 "/api/v1/rejections", "/api/v1/decisions", "/api/v1/quarantine", "/api/v1/me", "/healthz",
                 "/openapi.json"):
        get(fed, path)


def test_bad_stored_rows_are_quarantined_and_the_aggregator_starts(fed: LocalFederation, job: str) -> None:
    """Rows an older version, an operator's hand or a bug could have left: each kind planted, then a restart."""
    fed.stop_aggregator()
    db = sqlite3.connect(fed.workdir / "state" / "aggregator.db")
    with db:
        db.execute("INSERT INTO updates VALUES (?,?,?,?,?,?,?,?,?)",
                   (job, 1, "mallory", sha256_hex(GOOD), 2**62, 0.5, 1.0, time.time(), 1))
        db.execute("INSERT INTO evaluations VALUES (?,?,?,?,?,?)", (job, 0, "mallory", 30, 0.5, 1e308))
        db.execute("INSERT INTO sites VALUES (?,?,?,?) ON CONFLICT (site) DO UPDATE SET at=excluded.at",
                   ("eve", "online", float("inf"), "{}"))
    db.close()
    fed.start_aggregator()
    summary = fed.wait_job(job, timeout=60)
    assert summary["state"] == "failed" and "quarantined" in summary["reason"]
    assert "num_samples" in summary["reason"] and "auc" in summary["reason"]
    quarantined = get(fed, "/api/v1/quarantine")
    assert {(q["table_name"], q["row_key"]) for q in quarantined} >= {
        ("updates", f"{job}/1/mallory"), ("evaluations", f"{job}/0/mallory"), ("sites", "eve")}
    assert metric(fed, "fedsilo_quarantined_rows_total") >= 3
    get(fed, "/api/v1/sites")


def test_a_sites_report_after_its_job_ended_is_kept_once_and_only_for_an_invited_site(fed: LocalFederation) -> None:
    """A round a site stopped at its deadline is reported as the job fails at that same deadline: the report still
    says why the round went missing. A repeat is not a second row; a site the job never invited writes none."""
    data = yaml.safe_load(EXAMPLE.read_text())
    data.update(rounds=1, sites=["mallory"], min_sites=1, round_deadline_s=2, accept_deadline_s=30)
    data["privacy"] = {"unit": "site", "clip_norm": 1.0, "noise_multiplier": 0.1, "delta": 1e-5}
    job_id = fed.client.submit(yaml.safe_dump(data))

    def report(site: str, why: str) -> None:
        client = publisher(fed, site)
        event = {"site": site, "job_id": job_id, "kind": "error", "round": 1, "reasons": [why], "at": time.time()}
        client.publish(topics.events(site), json.dumps(event), qos=1).wait_for_publish(10)
        client.loop_stop()
        client.disconnect()

    async def take_part() -> None:
        mallory = Mallory(fed)
        link = await mallory.join(job_id)
        await mallory.wait_task(1)
        await link.stop()  # and never uploads: the round reaches its deadline with nothing

    asyncio.run(take_part())
    assert fed.wait_job(job_id, timeout=60)["state"] == "failed"
    report("eve", "not in this job")
    report("mallory", "stopped at the round's deadline")
    report("mallory", "stopped at the round's deadline")
    report("mallory", "last")

    def site_errors() -> list[tuple[str, str]]:
        return sorted((r["site"], r["detail"]) for r in get(fed, f"/api/v1/rejections?job_id={job_id}")
                      if r["reason"] == "site_error")

    wait_for(lambda: ("mallory", "last") in site_errors(), within=30, what="mallory's last report")
    time.sleep(1.0)  # the reports before it are handled by then too
    assert site_errors() == [("mallory", "last"), ("mallory", "stopped at the round's deadline")]
