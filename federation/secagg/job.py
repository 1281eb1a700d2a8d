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
    update-level noise (a record-level job's sites add it only where their policy requires the site unit)."""
    return quantize.plan(spec.privacy.clip_norm, dim, len(spec.sites), spec.secagg_threshold,
                         spec.privacy.noise_multiplier)


def weights(spec: JobSpec, num_samples: dict[str, int]) -> dict[str, float]:
    """Each roster site's weight in the sum: its record count over the roster's largest (at most 1, so the
    quantization's bound holds), or 1 for all (`JobSpec.secagg_weighting`). The aggregator divides the sum by the
    survivors' total weight."""
    if spec.secagg_weighting == "uniform" or not num_samples:
        return dict.fromkeys(num_samples, 1.0)
    top = max(num_samples.values())
    return {site: n / top for site, n in num_samples.items()}


def masked_template(dim: int) -> Weights:
    return {MASKED: np.zeros(dim, dtype=np.int64)}


def share_purpose(job_id: str) -> bytes:
    return b"share/" + job_id.encode()


def mask_purpose(job_id: str, rnd: int) -> bytes:
    return b"mask/%s/%d" % (job_id.encode(), rnd)
