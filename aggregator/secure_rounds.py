"""The round engine's steps for a secure-aggregation job (`aggregator.secagg` holds the protocol's state).

A secure train round opens as any other; then share bundles are stored and the roster frozen once every
participant has shared or the share window closed; masked uploads are stored like updates; at quorum (or the
round's deadline) the unmask request is frozen; once `threshold` survivors have revealed, the sum is unmasked and
the round closes as any other, with the mean of the survivors' updates. Every message is durable before it is
acknowledged and every frozen decision before it is served, so a restarted aggregator resumes the round where it
stood and tells every site the same thing it was told before. Fewer than `threshold` sites at any step fail the
job with the reason, and nothing is unmasked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import structlog

from aggregator.rounds import RoundTransitions, nonce
from aggregator.runner import JobRunner, quorum_size
from aggregator.secagg import SecureRound
from aggregator.store.secagg import AGGREGATOR
from aggregator.validation import Rejection
from federation.faults import failpoint
from federation.messages import SiteEvent
from federation.secagg.errors import SecAggError
from federation.secagg.job import MASKED, masked_template, model_dim
from federation.secagg.messages import MAX_WAIT_S, MaskRoster, Reveal, ShareBundle, UnmaskRequest, UnmaskWork
from federation.tensors import decode, frame_limit

log = structlog.get_logger(__name__)
SHARE_WINDOW_MAX_S = 60.0  # sites share as soon as the task arrives, before training


def share_window(runner: JobRunner) -> float:
    return min(0.25 * runner.spec.round_deadline_s, SHARE_WINDOW_MAX_S)


def unmask_window(runner: JobRunner) -> float:
    return max(10.0, 0.25 * runner.spec.round_deadline_s)


class SecureSteps(RoundTransitions):
    # ---------------------------------------------------------------- hooks from the round transitions
    def _secure_open(self, runner: JobRunner, rnd: int) -> None:
        runner.secure = _new_round(runner, rnd)
        self._arm(runner, share_window(runner), self._share_deadline, "secure_timer")

    async def _secure_progress(self, runner: JobRunner) -> None:
        """Move the open secure round on as far as what is stored allows."""
        sr, r = runner.secure, runner.round
        if sr is None or r is None or r.state != "open":
            return
        if sr.roster is None:
            if len(sr.bundles) == len(sr.participants):
                await self._freeze_roster(runner, sr)
            return
        if sr.unmask is None:
            expected = min(quorum_size(runner), len(sr.roster.mask_keys))
            if len(sr.uploaded) >= expected:
                await self._freeze_unmask(runner, sr)
            return
        try:
            # Off the event loop: reconstructing every survivor's seed is Shamir interpolation in pure Python,
            # about 0.1 s per seed at 100 sites, and the aggregator must keep answering meanwhile (the job's lock
            # is held, so nothing else changes this round's state).
            mean = await asyncio.to_thread(sr.unmasked_mean, runner.spec)
        except SecAggError as exc:
            await self._end(runner, "failed", f"round {r.round}: {exc}; nothing was unmasked")
            return
        if mean is not None:
            runner.strategy.reset(runner.global_weights)
            runner.strategy.add(mean, 1)  # FedAvg of the one mean: the mean
            runner.reported = set(sr.uploaded)
            if runner.secure_timer is not None:
                runner.secure_timer.cancel()
            await self._close(runner, r)
            now = runner.round
            if not runner.ended and now is not None and (now.round != r.round or now.state == "closed"):
                await self._drop_round(runner, r.round)

    async def _secure_deadline(self, runner: JobRunner) -> None:
        """The round's deadline: freeze what can be frozen with what is in, or fail."""
        sr, r = runner.secure, runner.round
        if sr is None or r is None or r.state != "open":
            return
        if sr.roster is None:
            await self._share_deadline(runner)
        elif sr.unmask is None:
            await self._freeze_unmask(runner, sr)

    # ---------------------------------------------------------------- steps
    async def _share_deadline(self, runner: JobRunner) -> None:
        sr = runner.secure
        if sr is None or sr.roster is not None or runner.round is None or runner.round.state != "open":
            return
        if len(sr.bundles) < sr.threshold:
            await self._end(runner, "failed", f"round {sr.round}: only {len(sr.bundles)} of the threshold "
                            f"{sr.threshold} sites sent their shares in time ({sorted(sr.bundles)}); nothing was "
                            "masked or unmasked")
            return
        await self._freeze_roster(runner, sr)

    async def _freeze_roster(self, runner: JobRunner, sr: SecureRound) -> None:
        roster = MaskRoster(job_id=runner.job_id, round=sr.round, threshold=sr.threshold, mask_keys=sr.roster_for(),
                            num_samples={s: b.num_samples for s, b in sr.bundles.items()}, issued_at=time.time(),
                            nonce=nonce())
        signed = await self._db(self._store.put_secagg, runner.job_id, sr.round, AGGREGATOR, "roster",
                                self._sign(roster).decode(), time.time(), fence=runner.fence)
        self._load_roster(sr, signed.encode())
        failpoint("secagg_after_roster")
        log.info("secagg_roster_frozen", job=runner.job_id, round=sr.round, sites=len(sr.bundles),
                 left_out=sorted(set(sr.participants) - set(sr.bundles)))

    async def _freeze_unmask(self, runner: JobRunner, sr: SecureRound) -> None:
        survivors, dropped = sr.survivors_and_dropped()
        if len(survivors) < sr.threshold:
            await self._end(runner, "failed", f"round {sr.round}: {len(survivors)} masked updates arrived, fewer "
                            f"than the threshold {sr.threshold}; missing: {', '.join(dropped)}; nothing was unmasked")
            return
        request = UnmaskRequest(job_id=runner.job_id, round=sr.round, survivors=survivors, dropped=dropped,
                                deadline=time.time() + unmask_window(runner), issued_at=time.time(), nonce=nonce())
        signed = await self._db(self._store.put_secagg, runner.job_id, sr.round, AGGREGATOR, "unmask",
                                self._sign(request).decode(), time.time(), fence=runner.fence)
        self._load_unmask(sr, signed.encode())
        failpoint("secagg_after_unmask_request")
        assert sr.unmask is not None
        self._arm(runner, max(sr.unmask.deadline - time.time(), 0.0), self._unmask_deadline)
        log.info("secagg_unmasking", job=runner.job_id, round=sr.round, survivors=len(survivors), dropped=dropped)

    async def _unmask_deadline(self, runner: JobRunner) -> None:
        sr, r = runner.secure, runner.round
        if sr is None or r is None or r.state != "open":
            return
        await self._end(runner, "failed", f"round {sr.round}: {len(sr.reveals)} survivors revealed their shares "
                        f"before the deadline, fewer than the threshold {sr.threshold}; nothing was unmasked")

    @staticmethod
    def _load_roster(sr: SecureRound, signed: bytes) -> None:
        sr.roster_signed, sr.roster = signed, MaskRoster.model_validate(_own_signed(signed))
        sr.roster_ready.set()

    @staticmethod
    def _load_unmask(sr: SecureRound, signed: bytes) -> None:
        sr.unmask_signed, sr.unmask = signed, UnmaskRequest.model_validate(_own_signed(signed))
        sr.unmask_ready.set()

    # ---------------------------------------------------------------- site calls
    def _secure_round(self, runner: JobRunner, rnd: int) -> SecureRound:
        sr = runner.secure
        self._current(runner, rnd, "train")
        if sr is None or sr.round != rnd:
            raise Rejection("round_not_open", f"round {rnd} is not an open secure round", 409)
        return sr

    async def receive_shares(self, site: str, bundle: ShareBundle) -> dict[str, object]:
        runner = await self._runner_for(site, bundle.job_id)
        async with runner.lock:
            sr = self._secure_round(runner, bundle.round)
            if sr.check_bundle(bundle):
                await self._db(self._store.put_secagg, runner.job_id, sr.round, site, "shares",
                               bundle.model_dump_json(), time.time(), fence=runner.fence)
                sr.bundles[site] = bundle
                failpoint("secagg_after_shares")
                log.info("secagg_shares_accepted", job=runner.job_id, round=sr.round, site=site,
                         bundles=len(sr.bundles))
                await self._secure_progress(runner)
                return {"status": "accepted", "job_id": runner.job_id, "round": sr.round}
        return {"status": "duplicate", "job_id": runner.job_id, "round": bundle.round}

    async def receive_reveal(self, site: str, reveal: Reveal) -> dict[str, object]:
        runner = await self._runner_for(site, reveal.job_id)
        async with runner.lock:
            sr = self._secure_round(runner, reveal.round)
            if not sr.check_reveal(reveal):
                return {"status": "duplicate", "job_id": runner.job_id, "round": sr.round}
            await self._db(self._store.put_secagg, runner.job_id, sr.round, site, "reveal",
                           reveal.model_dump_json(), time.time(), fence=runner.fence)
            sr.reveals[site] = reveal
            failpoint("secagg_after_reveal")
            log.info("secagg_reveal_accepted", job=runner.job_id, round=sr.round, site=site,
                     reveals=len(sr.reveals))
            await self._secure_progress(runner)
        return {"status": "accepted", "job_id": reveal.job_id, "round": reveal.round}

    async def secure_roster(self, site: str, job_id: str, rnd: int, wait: float) -> bytes | None:
        """The signed roster of round `rnd`, waiting up to `wait` s for it to be frozen; None if it is not yet."""
        sr = await self._waiting_round(site, job_id, rnd)
        await _wait(sr.roster_ready, wait)
        return sr.roster_signed

    async def secure_unmask(self, site: str, job_id: str, rnd: int, wait: float) -> UnmaskWork | None:
        sr = await self._waiting_round(site, job_id, rnd)
        await _wait(sr.unmask_ready, wait)
        if sr.unmask is None or sr.unmask_signed is None:
            return None
        if site not in sr.unmask.survivors:
            raise Rejection("not_a_survivor", f"{site} is not a survivor of round {rnd}", 403)
        return UnmaskWork(request=sr.unmask_signed.decode(), inbox=sr.inbox(site))

    async def _waiting_round(self, site: str, job_id: str, rnd: int) -> SecureRound:
        runner = await self._runner_for(site, job_id)
        return self._secure_round(runner, rnd)

    # ---------------------------------------------------------------- uploads, keys, recovery
    def _check_masked_upload(self, runner: JobRunner, site: str, rnd: int, num_samples: int) -> SecureRound:
        sr = self._secure_round(runner, rnd)
        sr.check_upload(site, num_samples)
        return sr

    def _secure_update_limit(self, runner: JobRunner) -> int:
        return frame_limit(masked_template(model_dim(runner.global_weights)))

    async def _secure_key(self, runner: JobRunner, event: SiteEvent) -> list[str]:
        """Store an accepting site's share key; the reasons it cannot take part (no key) otherwise."""
        if event.share_key is None:
            return ["accepted a secure-aggregation job without a share key (an agent too old for this job?)"]
        key = await self._db(self._store.put_secagg, runner.job_id, 0, event.site, "key", event.share_key,
                             time.time(), fence=runner.fence)
        runner.share_keys[event.site] = key
        return []

    async def _secure_recover(self, runner: JobRunner, rnd: int) -> None:
        """Rebuild the open round's protocol state from the store, and its share window. The caller (the engine's
        resume) announces the round, arms its deadline (the unmask request's, once frozen) and then moves it on:
        moving it on here, before the announcement, could close it and have the old round announced after."""
        sr = runner.secure = _new_round(runner, rnd)
        for site, body in (await self._db(self._store.secagg_rows, runner.job_id, rnd, "shares")).items():
            sr.bundles[site] = ShareBundle.model_validate_json(body)
        frozen = await self._db(self._store.secagg_rows, runner.job_id, rnd, "roster")
        if AGGREGATOR in frozen:
            self._load_roster(sr, frozen[AGGREGATOR].encode())
        for u in await self._db(self._store.updates, runner.job_id, rnd):
            sr.add_masked(u.site, decode(await self._db(self._blobs.get, u.sha256))[MASKED])
        frozen = await self._db(self._store.secagg_rows, runner.job_id, rnd, "unmask")
        if AGGREGATOR in frozen:
            self._load_unmask(sr, frozen[AGGREGATOR].encode())
        for site, body in (await self._db(self._store.secagg_rows, runner.job_id, rnd, "reveal")).items():
            sr.reveals[site] = Reveal.model_validate_json(body)
        if sr.roster is None:
            remaining = runner.round.started_at + share_window(runner) - time.time() if runner.round else 0.0
            self._arm(runner, max(remaining, 0.0), self._share_deadline, "secure_timer")

    async def _drop_round(self, runner: JobRunner, rnd: int) -> None:
        try:
            await self._db(self._store.drop_secagg_round, runner.job_id, rnd, fence=runner.fence)
        except Exception:  # only storage is at stake: rows left behind are harmless
            log.warning("secagg_rows_not_dropped", job=runner.job_id, round=rnd, exc_info=True)

    async def _load_share_keys(self, runner: JobRunner) -> None:
        runner.share_keys = dict(await self._db(self._store.secagg_rows, runner.job_id, 0, "key"))


def _new_round(runner: JobRunner, rnd: int) -> SecureRound:
    """Round `rnd`'s protocol state: its participants are the accepting sites whose share keys the task lists."""
    return SecureRound(runner.job_id, rnd, runner.spec.secagg_threshold,
                       sorted(s for s in runner.active_sites if s in runner.share_keys), runner.global_weights)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=min(max(seconds, 0.0), MAX_WAIT_S))


def _own_signed(signed: bytes) -> Any:
    """The fields of a message this aggregator signed and stored itself (`federation.signing.sign`'s layout)."""
    return json.loads(signed)["message"]
