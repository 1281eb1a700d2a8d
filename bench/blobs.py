"""Blob store cost, files against S3: put, repeated put (the idempotent no-op), get (hash checked), and puts from
several threads at once, per blob size (the update sizes of `bench scale`: 10^4, 10^6 and 10^7 float32
parameters).

The S3 store runs against moto's server process on loopback (`moto_server`, as the tests run it), with SSE-KMS
through moto's KMS: what it measures is the client's work (botocore, SigV4 signing, HTTP, the sha256 checks) plus
moto's, never AWS's network or service latency. Against real S3 in the same region add roughly 10–30 ms per
request and the instance's network bandwidth; the files store fsyncs to whatever disk is under the temp dir.
Needs the test extras (`make install-test`: moto, and boto3 through the `aws` extra).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aggregator.blobs import BlobStore, FileBlobStore
from aggregator.blobs_s3 import S3BlobConfig, S3BlobStore
from federation import logs

REGION = "eu-west-1"
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": REGION,
                    "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}


@dataclass
class Row:
    store: str
    size_mb: float
    put_ms: float
    put_again_ms: float
    get_ms: float
    threads: int
    parallel_puts_per_s: float

    @property
    def put_mb_s(self) -> float:
        return self.size_mb / (self.put_ms / 1e3)

    @property
    def get_mb_s(self) -> float:
        return self.size_mb / (self.get_ms / 1e3)


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def measure(name: str, store: BlobStore, size: int, repeats: int, threads: int) -> Row:
    blobs = [os.urandom(size) for _ in range(repeats)]
    pending = iter(blobs)
    put_ms = _median_ms(lambda: store.put(next(pending), "update"), repeats)  # a new blob each time
    shas = [store.put(b, "update") for b in blobs[:1]]
    put_again_ms = _median_ms(lambda: store.put(blobs[0], "update"), repeats)
    get_ms = _median_ms(lambda: store.get(shas[0]), repeats)
    # Uploads arriving together: at least one per thread, up to 4 each, at most ~256 MB in flight.
    count = max(threads, min(4 * threads, (256 << 20) // max(size, 1)))
    fresh = [os.urandom(size) for _ in range(count)]
    with ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda b: store.put(b, "update"), fresh))
        wall = time.perf_counter() - t0
    return Row(name, size / 1e6, put_ms, put_again_ms, get_ms, threads, count / wall)


@contextmanager
def moto_s3(log_dir: Path) -> Iterator[tuple[str, str]]:
    """moto's server on a free port with fake credentials in this process's environment; yields (endpoint,
    KMS key ARN)."""
    import boto3

    from tests.tracking.aws import moto_server  # the tests' helper: one way to start moto in this repository

    saved = {k: os.environ.get(k) for k in FAKE_CREDENTIALS}
    os.environ.update(FAKE_CREDENTIALS)
    try:
        with moto_server(log_dir) as url:
            key = boto3.client("kms", endpoint_url=url).create_key()["KeyMetadata"]["Arn"]
            yield url, key
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(sizes_mb: list[float], repeats: int, threads: int) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-blobs-") as tmp, moto_s3(Path(tmp)) as (url, key):
        import boto3

        s3 = boto3.client("s3", endpoint_url=url)
        for i, mb in enumerate(sizes_mb):
            size = int(mb * 1e6)
            reps = max(3, min(repeats, int(repeats * 4 / max(mb, 4))))  # fewer repeats of the large blobs
            files = FileBlobStore(Path(tmp) / f"files-{i}")
            rows.append(measure("files (fsync)", files, size, reps, threads))
            bucket = f"fedsilo-bench-{i}"
            s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
            s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
            store = S3BlobStore(f"s3://{bucket}/aggregator",
                                S3BlobConfig(region=REGION, endpoint_url=url, kms_key_id=key,
                                             max_pool_connections=max(threads, 10)))
            rows.append(measure("S3 (moto, loopback)", store, size, reps, threads))
    return rows


def median_rows(runs: list[list[Row]]) -> list[Row]:
    """Cell by cell, the median over whole runs: the machine's other work shows up as run-to-run noise."""
    out = []
    for same in zip(*runs, strict=True):
        first = same[0]
        out.append(Row(first.store, first.size_mb, put_ms=statistics.median(r.put_ms for r in same),
                       put_again_ms=statistics.median(r.put_again_ms for r in same),
                       get_ms=statistics.median(r.get_ms for r in same), threads=first.threads,
                       parallel_puts_per_s=statistics.median(r.parallel_puts_per_s for r in same)))
    return out


def print_table(rows: list[Row]) -> None:
    threads = rows[0].threads if rows else 0
    head = (f"| store | blob MB | put ms | put MB/s | repeated put ms | get ms | get MB/s | puts/s, {threads} threads "
            f"| MB/s, {threads} threads |")
    print(head)
    print("|" + "---|" * head.count(" | ") + "---|")
    for r in rows:
        print(f"| {r.store} | {r.size_mb:.2f} | {r.put_ms:.2f} | {r.put_mb_s:.0f} | {r.put_again_ms:.2f} | "
              f"{r.get_ms:.2f} | {r.get_mb_s:.0f} | {r.parallel_puts_per_s:.1f} | "
              f"{r.parallel_puts_per_s * r.size_mb:.0f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench blobs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[0.04, 4.0, 40.0],
                        help="blob sizes in MB (default: updates of 10^4, 10^6, 10^7 float32 parameters)")
    parser.add_argument("--repeats", type=int, default=21, help="timed repeats per operation (median reported)")
    parser.add_argument("--threads", type=int, default=8, help="threads putting at once")
    parser.add_argument("--runs", type=int, default=1, help="whole runs; each cell is the median over them")
    args = parser.parse_args(argv)
    logs.configure(level="WARNING")  # retries and corruption still show, on stderr
    print(f"fedsilo blob stores: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
          f"S3 is moto's server on loopback (SSE-KMS through moto's KMS), not AWS; median of {args.runs} run(s)",
          flush=True)
    print_table(median_rows([run(args.sizes_mb, args.repeats, args.threads) for _ in range(args.runs)]))


if __name__ == "__main__":
    main()
