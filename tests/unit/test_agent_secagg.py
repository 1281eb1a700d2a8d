"""The site's secure-aggregation state (`agent.secagg`) and masked releases: shares open only for their recipient,
in their round, from their sender; a site never reveals two splits of one round; the privacy engine charges a
masked round once; and four sites' masked updates, one dropping out, unmask to exactly the survivors' sum."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml

from agent.privacy import AlreadyReleasedError, PrivacyEngine
from agent.privacy_policy import BudgetPolicy, PrivacyPolicy, SitePrivacy, plan_privacy
from agent.secagg import ExcludedError, RevealOutcome, SecAggRefusedError, SecureRound, ShareKeys, reveal
from agent.state import AgentState
from federation.jobs import JobSpec
from federation.messages import EvalMetrics
from federation.secagg import keys, masking, quantize, shamir
from federation.secagg.errors import SecAggError
from federation.secagg.job import job_quantization
from federation.secagg.messages import Reveal, UnmaskWork, unb64
from federation.tensors import decode
from tests.secagg_sites import (
    EXAMPLE,
    JOB,
    SITES,
    SPEC,
    THRESHOLD,
    any_mask_keys,
    inbox,
    request,
    roster,
    roster_of,
    rounds,
    share_keys,
    site_plan,
    task_keys,
)

A, B, C, D = SITES
BIG = BudgetPolicy(epsilon=1e9)
EVAL = EvalMetrics(n=100, loss=0.6, auc=0.7)
DIM = 26  # the heart-disease logreg: 25 inputs and a bias


def delta(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"0.weight": rng.normal(0, 0.02, (1, 25)).astype(np.float32), "0.bias": np.full((1,), 0.01, np.float32)}


def open_inbox(recipient: str, ks: dict[str, ShareKeys], box: dict[str, str], survivors: list[str],
               dropped: list[str], rnd: int = 1, previous: tuple[list[str], list[str]] | None = None) -> RevealOutcome:
    """`reveal` as `recipient` for a request naming `survivors` and `dropped` (the roster holds every site)."""
    return reveal(recipient, ks[recipient].private(JOB), task_keys(ks), UnmaskWork(request="-", inbox=box),
                  request(survivors, dropped, rnd), roster_of(any_mask_keys(), rnd), previous)


def test_the_share_key_is_derived_from_an_owner_only_secret_and_survives_a_restart(tmp_path: Path) -> None:
    first = ShareKeys(tmp_path / "secagg.key")
    key = first.public(JOB)
    assert stat.S_IMODE(os.stat(tmp_path / "secagg.key").st_mode) == 0o600
    assert ShareKeys(tmp_path / "secagg.key").public(JOB) == key  # a restarted agent repeats the same key
    assert first.public("job-other") != key  # one key per job
    assert ShareKeys(tmp_path / "elsewhere.key").public(JOB) != key
    (tmp_path / "bad.key").write_bytes(b"short")
    with pytest.raises(SecAggError, match="refusing to replace it"):
        ShareKeys(tmp_path / "bad.key").public(JOB)
    assert (tmp_path / "bad.key").read_bytes() == b"short"


def test_shares_open_only_for_their_recipient_in_their_round_from_their_sender(tmp_path: Path) -> None:
    ks = share_keys(tmp_path)
    bundle = rounds(ks)[A].bundle()
    assert sorted(bundle.shares) == SITES and bundle.site == A
    # Each recipient opens its own share of A's secrets; the split is fine for all four.
    for recipient in SITES:
        out = open_inbox(recipient, ks, {A: bundle.shares[recipient]}, SITES, [])
        assert out.unopened == {} and list(out.reveal.self_mask_shares) == [A]
    # B's share handed to C does not open (and is left out, not revealed).
    out = open_inbox(C, ks, {A: bundle.shares[B]}, SITES, [])
    assert list(out.unopened) == [A] and out.reveal.self_mask_shares == {}
    # Replayed into round 2: fails to open.
    out = open_inbox(B, ks, {A: bundle.shares[B]}, SITES, [], rnd=2)
    assert list(out.unopened) == [A] and out.reveal.self_mask_shares == {}
    # Presented as from D (a reordered inbox): fails to open, and A's own entry still opens.
    out = open_inbox(B, ks, {D: bundle.shares[B], A: bundle.shares[B]}, SITES, [])
    assert list(out.unopened) == [D] and list(out.reveal.self_mask_shares) == [A]


def test_a_reveal_is_one_kind_of_share_per_site_from_the_right_half(tmp_path: Path) -> None:
    ks = share_keys(tmp_path)
    secure = rounds(ks)
    bundles = {s: r.bundle() for s, r in secure.items()}
    out = open_inbox(B, ks, inbox(bundles, B), [A, B, C], [D])
    assert sorted(out.reveal.self_mask_shares) == [A, B, C] and list(out.reveal.mask_key_shares) == [D]
    # The mask-key half of D's share is a Shamir share of D's mask private key: with two more it gives D's key.
    d_shares = [unb64(open_inbox(s, ks, inbox(bundles, s), [A, B, C], [D]).reveal.mask_key_shares[D])
                for s in (A, B, C)]
    assert keys.public_key(shamir.combine(d_shares, THRESHOLD)) == unb64(bundles[D].mask_key)
    seed_shares = [unb64(open_inbox(s, ks, inbox(bundles, s), [A, B, C], [D]).reveal.self_mask_shares[A])
                   for s in (A, B, C)]
    assert hashlib.sha256(shamir.combine(seed_shares, THRESHOLD)).hexdigest() == bundles[A].seed_commitment


@pytest.mark.parametrize(("survivors", "dropped", "why"), [
    ([A, C, D], [B], "does not list this site as a survivor"),
    ([A, B], [C, D], "2 survivors, below the threshold 3"),
    ([A, B, C, "mallory"], [D], "outside the round's roster"),
])
def test_reveal_refuses_requests_that_could_expose_an_update(tmp_path: Path, survivors: list[str],
                                                            dropped: list[str], why: str) -> None:
    ks = share_keys(tmp_path)
    with pytest.raises(SecAggRefusedError, match=why):
        open_inbox(B, ks, {}, survivors, dropped)


def test_reveal_refuses_a_second_split_of_the_same_round(tmp_path: Path) -> None:
    ks = share_keys(tmp_path)
    bundles = {s: r.bundle() for s, r in rounds(ks).items()}
    first = ([A, B, C], [D])
    again = open_inbox(B, ks, inbox(bundles, B), *first, previous=first)  # the same split again: fine
    assert list(again.reveal.mask_key_shares) == [D]
    with pytest.raises(SecAggRefusedError, match="could give the aggregator both kinds of share of one site"):
        open_inbox(B, ks, inbox(bundles, B), [B, C, D], [A], previous=first)
    with pytest.raises(SecAggRefusedError, match="a different split"):
        open_inbox(B, ks, inbox(bundles, B), [A, B, C, D], [], previous=first)
    with pytest.raises(ValueError, match="both kinds of share"):  # and the message itself can never carry both
        Reveal(job_id=JOB, round=1, site=B, self_mask_shares={D: "A" * 48}, mask_key_shares={D: "A" * 48})


def test_a_site_masks_only_against_a_roster_it_is_in_with_its_own_key(tmp_path: Path) -> None:
    ks = share_keys(tmp_path)
    secure = rounds(ks)
    bundles = {s: r.bundle() for s, r in secure.items()}
    values = np.arange(DIM, dtype=np.int64)
    without_a = roster({s: b for s, b in bundles.items() if s != A})
    with pytest.raises(ExcludedError, match="not in round 1's roster"):
        secure[A].mask(values, without_a)
    stale = roster({**bundles, A: SecureRound(A, JOB, 1, THRESHOLD, ks[A].private(JOB), task_keys(ks), SITES)
                    .bundle()})
    with pytest.raises(ExcludedError, match="another mask key for this site"):
        secure[A].mask(values, stale)
    with pytest.raises(SecAggRefusedError, match="2 sites"):
        secure[A].mask(values, roster({s: bundles[s] for s in (A, B)}))
    with pytest.raises(SecAggRefusedError, match="round 2"):
        secure[A].mask(values, roster(bundles, rnd=2))


def test_a_task_with_a_wrong_or_foreign_share_key_is_refused(tmp_path: Path) -> None:
    ks = share_keys(tmp_path)
    published = task_keys(ks)
    with pytest.raises(SecAggRefusedError, match="another share key for this site"):
        SecureRound(A, JOB, 1, THRESHOLD, ks[A].private(JOB), {**published, A: published[B]}, SITES)
    with pytest.raises(SecAggRefusedError, match="not in the job"):
        SecureRound(A, JOB, 1, THRESHOLD, ks[A].private(JOB), {**published, "mallory": published[B]}, SITES)


def test_a_masked_release_is_charged_once_logs_the_masked_bytes_and_reports_epsilon_alone(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "agent.db")
    engine = PrivacyEngine(state)
    plan = site_plan()
    seen: list[np.ndarray] = []

    def masker(values: np.ndarray) -> np.ndarray:
        seen.append(values.copy())
        return masking.add_mod(values, np.full_like(values, 12345))

    up = engine.privatize(A, JOB, 1, SPEC, plan, delta(0), 200, EVAL, 0.5, budget=BIG, masker=masker)
    assert len(seen) == 1 and seen[0].shape == (DIM,) and seen[0].dtype == np.int64
    masked = decode(up.payload)["masked"]
    assert masked.dtype == np.int64 and np.array_equal(masked, (seen[0] + 12345) % masking.MODULUS)
    logged, pending = state.release(JOB, 1), engine.pending(JOB, 1)
    # The log keeps the masked bytes: a resend after a crash is identical.
    assert logged is not None and pending is not None and logged.payload == pending.payload == up.payload
    site_spend = next(u for u in up.envelope.privacy if u.unit == "site")
    assert site_spend.epsilon is not None and site_spend.epsilon == pytest.approx(plan.epsilon(1)["site"])
    assert site_spend.epsilon_alone is not None and site_spend.epsilon_alone > site_spend.epsilon
    assert state.job_spend(JOB) == {"site": pytest.approx(site_spend.epsilon)}
    with pytest.raises(AlreadyReleasedError):
        engine.privatize(A, JOB, 1, SPEC, plan, delta(0), 200, EVAL, 0.5, budget=BIG, masker=masker)
    assert len(seen) == 1 and state.releases_for(JOB) == 1


def test_a_masker_that_refuses_leaves_nothing_released_or_charged(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "agent.db")

    def excluded(_: np.ndarray) -> np.ndarray:
        raise ExcludedError("not in the roster")

    with pytest.raises(ExcludedError):
        PrivacyEngine(state).privatize(A, JOB, 1, SPEC, site_plan(), delta(0), 200, EVAL, 0.5, budget=BIG,
                                       masker=excluded)
    assert state.release(JOB, 1) is None and state.job_spend(JOB) == {}


def test_the_secure_site_epsilon_is_the_sums_and_alone_is_weaker() -> None:
    plan = site_plan()
    plain = SitePrivacy(("site",), None, plan.update_noise, plan.clip_norm, plan.delta)
    assert plan.quantization is not None and plan.quantization.dim == DIM
    eps, alone = plan.epsilon(SPEC.rounds)["site"], plan.epsilon_alone(SPEC.rounds)
    assert alone is not None and eps < alone
    assert eps >= plain.epsilon(SPEC.rounds)["site"]  # quantization and the discrete noise cost a little, never gain
    assert plain.epsilon_alone(SPEC.rounds) is None


def test_four_sites_mask_one_drops_and_the_survivors_sum_is_exact(tmp_path: Path) -> None:
    """The whole protocol in process: four sites share and mask through the privacy engine, D drops out after
    masking (its upload never arrives), the survivors reveal, the test (as aggregator) reconstructs and unmasks."""
    ks = share_keys(tmp_path)
    secure = rounds(ks)
    bundles = {s: r.bundle() for s, r in secure.items()}
    frozen = roster(bundles)
    plan = site_plan()
    plaintext: dict[str, np.ndarray] = {}
    uploads: dict[str, np.ndarray] = {}
    for i, s in enumerate(SITES):
        def masker(values: np.ndarray, s: str = s) -> np.ndarray:
            plaintext[s] = values.copy()
            return secure[s].mask(values, frozen)

        engine = PrivacyEngine(AgentState(tmp_path / s / "agent.db"))
        up = engine.privatize(s, JOB, 1, SPEC, plan, delta(i), 200, EVAL, 0.5, budget=BIG, masker=masker)
        uploads[s] = decode(up.payload)["masked"]
    survivors, dropped = [A, B, C], [D]
    total = np.zeros(DIM, np.int64)
    for s in survivors:
        total = masking.add_mod(total, uploads[s])
    reveals = [open_inbox(s, ks, inbox(bundles, s), survivors, dropped).reveal for s in survivors]
    assert all(r.site == s for r, s in zip(reveals, survivors, strict=True))
    self_seeds = []
    for s in survivors:
        seed = shamir.combine([unb64(r.self_mask_shares[s]) for r in reveals], THRESHOLD)
        assert hashlib.sha256(seed).hexdigest() == bundles[s].seed_commitment
        self_seeds.append(seed)
    d_private = shamir.combine([unb64(r.mask_key_shares[D]) for r in reveals], THRESHOLD)
    assert keys.public_key(d_private) == unb64(frozen.mask_keys[D])
    purpose = b"mask/%s/%d" % (JOB.encode(), 1)
    pairs = [(masking.pair_sign(s, D), keys.agree(d_private, unb64(frozen.mask_keys[s]), purpose)) for s in survivors]
    unmasked = masking.unmask(total, self_seeds, pairs)
    expected = np.zeros(DIM, np.int64)
    for s in survivors:
        expected = masking.add_mod(expected, plaintext[s])
    assert np.array_equal(unmasked, expected)
    # Each masked upload alone looks nothing like its plaintext; the sum decodes to the survivors' mean update.
    assert not np.array_equal(uploads[A], plaintext[A])
    q = plan.quantization
    assert q is not None
    mean = quantize.decode_sum(unmasked, q, len(survivors))
    truth = np.mean([quantize.flatten(delta(i)) for i in range(3)], axis=0)
    noise_std = q.site_sigma * np.sqrt(len(survivors)) / q.scale / len(survivors)
    assert np.max(np.abs(mean - truth)) < 8 * noise_std + 2 / q.scale


def test_a_record_level_secure_job_masks_its_update_with_no_extra_noise(tmp_path: Path) -> None:
    """DP-SGD gave the guarantee during training; the masked release is the quantized clipped update alone. The job's
    update-level σ (what a site whose policy requires the site unit would add) sizes the shared scale only."""
    job = yaml.safe_load(EXAMPLE.read_text())
    spec = JobSpec.model_validate({**job, "privacy": {**job["privacy"], "noise_multiplier": 0.5},
                                   "secure_aggregation": {"threshold": 3}})
    plan = plan_privacy(spec, PrivacyPolicy(min_noise_multiplier=0.0, max_clip_norm=1.0, max_epsilon_per_job=10.0,
                                            budgets={}), 200)
    q = plan.quantization
    assert plan.units == ("record",) and plan.record is not None and q is not None and q.site_sigma > 0
    assert q == job_quantization(spec, DIM)  # the aggregator's scale
    up = PrivacyEngine(AgentState(tmp_path / "agent.db")).privatize(
        A, JOB, 1, spec, plan, delta(3), 200, EVAL, 0.5, budget=BIG, masker=lambda v: v)
    released = quantize.decode_sum(decode(up.payload)["masked"], q, 1)
    assert np.max(np.abs(released - quantize.flatten(delta(3)))) <= 1 / q.scale
    assert [u.unit for u in up.envelope.privacy] == ["record"] and up.envelope.privacy[0].epsilon_alone is None
