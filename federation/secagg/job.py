"""What both sides derive alike from a secure job: its quantization, the masked update's layout, and the HKDF
purposes that keep the share keys and each round's mask seeds apart."""

from __future__ import annotations

import numpy as np

from federation.jobs import JobSpec
from federation.models import Weights
from federation.secagg import quantize

MASKED = "masked"  # the one tensor of a masked update: int64, the flattened model, values in [0, 2^32)


def model_dim(template: Weights) -> int:
    return int(sum(v.size for v in template.values()))


def job_quantization(spec: JobSpec, dim: int) -> quantize.Quantization:
    """The job's quantization, the same at every site and at the aggregator (sums need one scale). Sized for every
    site the job lists (a bound on the roster) and for the job's update-level σ, whether or not a given site adds
    update-level noise (a record-level job's sites add it only where their policy requires the site unit). With
    distributed per-patient noise, the σ is the job's per-patient one and the sensitivity one record's step."""
    p = spec.privacy
    if p.record_noise == "distributed":
        assert p.record_noise_multiplier is not None and p.record_clip_norm is not None  # PrivacySpec checks
        return quantize.plan(p.clip_norm, dim, len(spec.sites), spec.secagg_threshold, p.record_noise_multiplier,
                             unit_norm=min(record_step_norm(spec), p.clip_norm))
    return quantize.plan(p.clip_norm, dim, len(spec.sites), spec.secagg_threshold, p.noise_multiplier)


def record_step_norm(spec: JobSpec) -> float:
    """With distributed per-patient noise: the most one record moves a site's update, its clipped gradient scaled
    by learning_rate / batch_size (a site sends −lr/b × the sum of its records' clipped gradients)."""
    hp, c = spec.hyperparameters, spec.privacy.record_clip_norm
    assert c is not None
    return hp.learning_rate * c / hp.batch_size


def weights(spec: JobSpec, num_samples: dict[str, int]) -> dict[str, float]:
    """Each roster site's weight in the sum: its record count over the roster's largest (at most 1, so the
    quantization's bound holds), or 1 for all (`JobSpec.secagg_weighting`). The aggregator divides the sum by the
    survivors' total weight."""
    if spec.secagg_weighting in ("uniform", "records") or not num_samples:
        return dict.fromkeys(num_samples, 1.0)
    top = max(num_samples.values())
    return {site: n / top for site, n in num_samples.items()}


def divisor(spec: JobSpec, num_samples: dict[str, int], survivors: list[str]) -> float:
    """What the aggregator divides the survivors' sum by: their total weight, or, for gradient sums (distributed
    per-patient noise), their records over the batch size the sites scaled by, which makes the step
    −lr × the mean clipped gradient over every survivor's records."""
    if spec.secagg_weighting == "records":
        return sum(num_samples[s] for s in survivors) / spec.hyperparameters.batch_size
    w = weights(spec, num_samples)
    return sum(w[s] for s in survivors)


def masked_template(dim: int) -> Weights:
    return {MASKED: np.zeros(dim, dtype=np.int64)}


def share_purpose(job_id: str) -> bytes:
    return b"share/" + job_id.encode()


def mask_purpose(job_id: str, rnd: int) -> bytes:
    return b"mask/%s/%d" % (job_id.encode(), rnd)
