"""Secure aggregation at the aggregator, against participants whose plaintext the test knows: the real aggregator
process, broker and mutual TLS; the sites are test doubles running the protocol (`tests.secure_participants`).

The aggregator must recover the exact sum of the survivors' integer vectors (after one site drops out once masked,
too), refuse every message that does not fit what the round froze, and fail a round that keeps fewer than the
threshold of sites without unmasking anything."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from federation.jobs import JobSpec
from federation.secagg import masking, quantize
from federation.secagg.job import job_quantization, model_dim
from federation.secagg.messages import MaskRoster
from federation.tensors import decode
from fedsilo.local import LocalFederation
from tests.secure_participants import SecureParticipant
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "heart-disease.yaml"
NAMES = ("ann", "bob", "cid", "dan")
RECORDS = {"ann": 40, "bob": 10, "cid": 25, "dan": 30}  # the weights of a sample-weighted sum: n / 40


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    with LocalFederation(tmp_path_factory.mktemp("secagg"), {}, extra_identities=NAMES) as f:
        yield f


def job_text(rounds: int, deadline_s: float = 6.0) -> str:
    job: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    job.update(sites=list(NAMES), min_sites=3, rounds=rounds, round_deadline_s=deadline_s, accept_deadline_s=30,
               secure_aggregation={"weighting": "samples"}, server_learning_rate=1.0, aggregation="fedavg")
    job["privacy"] = {"unit": "site", "clip_norm": 1.0, "noise_multiplier": 1.0}
    return yaml.safe_dump(job)


def stored(fed: LocalFederation, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(fed.workdir / "state" / "aggregator.db")
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def model(fed: LocalFederation, sha: str) -> dict[str, np.ndarray]:
    return decode((fed.workdir / "state" / "blobs" / sha[:2] / sha).read_bytes())


def plaintext(q: quantize.Quantization, rng: np.random.Generator) -> np.ndarray:
    """A site's quantized update: any integers within the clip bound (the noise is the site's business)."""
    vec = rng.normal(0, 1, q.dim)
    vec *= min(1.0, 0.9 * q.clip_norm / float(np.linalg.norm(vec)))
    return quantize.encode_mod(quantize.quantize(vec, q))


def expected_model(start: dict[str, np.ndarray], total: np.ndarray, q: quantize.Quantization,
                   weight: float) -> dict[str, np.ndarray]:
    """The sum of the survivors' (already weighted) vectors over their total weight, added to the model."""
    mean = quantize.unflatten(quantize.decode_sum(total, q, 1) / weight, start)
    return {k: (start[k].astype(np.float64) + mean[k].astype(np.float64)).astype(np.float32) for k in start}


def test_the_aggregator_unmasks_exactly_the_sum_and_refuses_what_does_not_fit(fed: LocalFederation) -> None:
    text = job_text(rounds=2)
    spec = JobSpec.from_yaml(text)
    job_id = fed.client.submit(text)
    sites = {n: SecureParticipant(fed, n) for n in NAMES}
    rng = np.random.default_rng(3)

    async def run() -> None:
        for p in sites.values():
            await p.accept(job_id)
        try:
            for rnd, dropping in ((1, None), (2, "dan")):
                await one_round(rnd, dropping)
        finally:
            for p in sites.values():
                await p.leave()

    async def one_round(rnd: int, dropping: str | None) -> None:
        tasks = {n: await p.task(rnd) for n, p in sites.items()}
        start = model(fed, tasks["ann"].model_sha256 or "")
        q = job_quantization(spec, model_dim(start))
        bundles = {n: p.bundle(tasks[n], spec.secagg_threshold, RECORDS[n]) for n, p in sites.items()}
        if rnd == 1:
            # A bundle that leaves out a participant, and one for a round that is not open, are refused.
            partial = bundles["ann"].model_copy(update={"shares": dict(list(bundles["ann"].shares.items())[:2])})
            assert sites["ann"].post_bundle(partial)[1]["error"] == "shares_mismatch"
            ahead = bundles["ann"].model_copy(update={"round": 2})
            assert sites["ann"].call("POST", f"/api/v1/jobs/{job_id}/rounds/1/secagg/shares",
                                     ahead.model_dump_json().encode())[0] == 403  # its round is not the URL's
        acks = {}
        for n, p in sites.items():  # the last to share waits for the roster its shares complete
            status, acks[n] = await asyncio.to_thread(p.post_bundle, bundles[n], 5 if n == NAMES[-1] else 0)
            assert status == 200, acks[n]
        assert [n for n, ack in acks.items() if "roster" in ack] == [NAMES[-1]]
        # The same site cannot change its shares once they are in.
        accepted = sites["bob"].mask_private[rnd], sites["bob"].seed[rnd]
        other = sites["bob"].bundle(tasks["bob"], spec.secagg_threshold, RECORDS["bob"])
        assert sites["bob"].post_bundle(other)[1]["error"] == "duplicate_conflict"
        sites["bob"].mask_private[rnd], sites["bob"].seed[rnd] = accepted  # mask with what was accepted
        rosters = {n: await asyncio.to_thread(p.roster, job_id, rnd) for n, p in sites.items()}
        answered = MaskRoster.model_validate(json.loads(acks[NAMES[-1]]["roster"])["message"])
        assert answered == rosters[NAMES[-1]]  # the roster the GET serves, signed alike
        assert all(set(r.mask_keys) == set(NAMES) and r.num_samples == RECORDS for r in rosters.values())
        survivors = [n for n in NAMES if n != dropping]
        plain = {n: plaintext(q, rng) for n in survivors}
        total = np.zeros(q.dim, dtype=np.int64)
        masked = {n: sites[n].mask(rosters[n], plain[n]) for n in survivors}
        # The envelope must claim the record count the shares did: it is the update's weight in the sum.
        assert sites["ann"].upload(job_id, rnd, masked["ann"], num_samples=41)[1]["error"] == "num_samples_mismatch"
        for n in survivors:
            status, ack = await asyncio.to_thread(sites[n].upload, job_id, rnd, masked[n], RECORDS[n])
            assert status == 200, ack
            total = masking.add_mod(total, plain[n])
        works = {}
        for n in survivors:
            status, work = await asyncio.to_thread(sites[n].unmask_work, job_id, rnd, 30)
            assert status == 200, work
            works[n] = work
        if dropping is not None:
            # The dropped site is told it is not a survivor; its late upload is refused.
            assert sites[dropping].unmask_work(job_id, rnd, 0)[1]["error"] == "not_a_survivor"
            masked_late = sites[dropping].mask(rosters[dropping], plaintext(q, rng))
            assert sites[dropping].upload(job_id, rnd, masked_late, RECORDS[dropping])[0] == 409
        share_keys = tasks["ann"].share_keys or {}
        reveals = {n: sites[n].reveal(works[n], share_keys) for n in survivors}
        if dropping is not None:
            both = reveals["ann"].model_dump()
            both["self_mask_shares"][dropping] = next(iter(both["mask_key_shares"].values()))
            status, err = sites["ann"].post_reveal(both)
            assert (status, err["error"]) == (400, "malformed_reveal"), err  # both kinds for one site: never
        # A share of a site the request did not name is refused.
        stranger = reveals["ann"].model_copy(update={"self_mask_shares": {
            **reveals["ann"].self_mask_shares, "zed": next(iter(reveals["ann"].self_mask_shares.values()))}})
        assert sites["ann"].post_reveal(stranger)[1]["error"] == "reveal_mismatch"
        answers = [await asyncio.to_thread(sites[n].post_reveal, reveals[n]) for n in survivors]
        # The round closes at the threshold's reveal: a reveal after it is told the round is over.
        assert [a[0] for a in answers[:spec.secagg_threshold]] == [200] * spec.secagg_threshold, answers
        assert all(a[1].get("error") == "late_update" for a in answers[spec.secagg_threshold:]), answers
        # ...which is the protocol's normal course when more than the threshold survive: not a rejection on record.
        assert stored(fed, "SELECT reason, detail FROM rejections WHERE job_id=? AND round=? AND detail LIKE "
                           "'%is closed%'", job_id, rnd) == []
        wait_for(lambda: bool(stored(fed, "SELECT 1 FROM rounds WHERE job_id=? AND round=? AND state='closed'",
                                     job_id, rnd)), 30, f"round {rnd} closed")
        (out,) = stored(fed, "SELECT model_out FROM rounds WHERE job_id=? AND round=?", job_id, rnd)[0]
        weight = sum(RECORDS[n] / max(RECORDS.values()) for n in survivors)
        got, want = model(fed, out), expected_model(start, total, q, weight)
        assert all(np.array_equal(got[k], want[k]) for k in want), f"round {rnd}: not the exact sum"
        # The closed round's sealed shares and reveals are gone; the signed roster and request stay on record.
        wait_for(lambda: stored(fed, "SELECT DISTINCT kind FROM secagg WHERE job_id=? AND round=? ORDER BY kind",
                                job_id, rnd) == [("roster",), ("unmask",)], 10, f"round {rnd}'s shares dropped")

    asyncio.run(run())
    summary = fed.wait_job(job_id, timeout=60)  # the final evaluation closes at its deadline: no evaluators here
    assert summary["state"] == "finished", summary["reason"]
    assert {h["round"]: h["sites_reporting"] for h in summary["history"]} == {1: 4, 2: 3}


def test_a_round_with_fewer_survivors_than_the_threshold_fails_and_unmasks_nothing(fed: LocalFederation) -> None:
    text = job_text(rounds=2, deadline_s=4.0)
    spec = JobSpec.from_yaml(text)
    job_id = fed.client.submit(text)
    sites = {n: SecureParticipant(fed, n) for n in NAMES}

    async def run() -> None:
        for p in sites.values():
            await p.accept(job_id)
        try:
            tasks = {n: await p.task(1) for n, p in sites.items()}
            for n, p in sites.items():
                assert (await asyncio.to_thread(p.post_bundle, p.bundle(tasks[n], spec.secagg_threshold,
                                                                         RECORDS[n])))[0] == 200
            start = model(fed, tasks["ann"].model_sha256 or "")
            q = job_quantization(spec, model_dim(start))
            for n in ("ann", "bob"):  # cid and dan drop after the roster: 2 survivors, threshold 3
                roster = await asyncio.to_thread(sites[n].roster, job_id, 1)
                masked = sites[n].mask(roster, plaintext(q, np.random.default_rng(1)))
                assert (await asyncio.to_thread(sites[n].upload, job_id, 1, masked, RECORDS[n]))[0] == 200
        finally:
            for p in sites.values():
                await p.leave()

    asyncio.run(run())
    summary = fed.wait_job(job_id, timeout=60)
    assert summary["state"] == "failed"
    assert "fewer than the threshold 3" in summary["reason"] and "nothing was unmasked" in summary["reason"]
    assert stored(fed, "SELECT model_out FROM rounds WHERE job_id=? AND round=1", job_id) == [(None,)]
    assert stored(fed, "SELECT COUNT(*) FROM secagg WHERE job_id=? AND kind='reveal'", job_id) == [(0,)]
