"""The shared suite every BlobStore implementation must pass (files, and S3 on a real moto server process),
then what only S3 has: key layout and kind tags, SSE-KMS, URL checks, and a faulty endpoint in front of moto
(throttling, 5xx, a body cut short, a conflicting write, a stall) that the store retries through, until its
budget is spent and it raises an error that names the object."""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aggregator.blobs import BlobCorrupted, BlobStore, BlobStoreError, FileBlobStore, open_blobs
from aggregator.blobs_s3 import S3BlobConfig, S3BlobStore, parse_url
from tests.s3proxy import FaultyS3Proxy
from tests.tracking.aws import REGION, moto_server

_buckets = itertools.count()


@dataclass
class Backend:
    store: BlobStore
    reopen: Callable[[], BlobStore]
    corrupt: Callable[[str, bytes], None]  # replace a stored blob's bytes behind the store's back
    writes: Callable[[str], object]  # changes whenever the stored object is written again
    where: Callable[[str], str]  # where a blob lies, as an error names it


@dataclass
class Moto:
    url: str
    admin: Any  # a plain boto3 S3 client, straight to moto: creates buckets, reads what the store wrote
    kms: Any

    def bucket(self) -> str:
        name = f"fedsilo-blobs-{next(_buckets)}"
        self.admin.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
        self.admin.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    def versions(self, bucket: str, key: str) -> list[str]:
        listed = self.admin.list_object_versions(Bucket=bucket, Prefix=key)
        return [v["VersionId"] for v in listed.get("Versions", []) if v["Key"] == key]


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    """A moto server process for the module; credentials and region through the standard chain (environment)."""
    import boto3

    with moto_server(tmp_path_factory.mktemp("moto")) as url, pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("AWS_"):
                mp.delenv(name)
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": "/dev/null",
                            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}.items():
            mp.setenv(name, value)
        yield Moto(url, boto3.client("s3", endpoint_url=url), boto3.client("kms", endpoint_url=url))


def s3_config(endpoint: str, **kw: Any) -> S3BlobConfig:
    return S3BlobConfig(region=REGION, endpoint_url=endpoint, **kw)


def file_backend(root: Path) -> Backend:
    def path(sha: str) -> Path:
        return root / sha[:2] / sha

    def writes(sha: str) -> object:
        st = path(sha).stat()
        return st.st_ino, st.st_mtime_ns

    def corrupt(sha: str, data: bytes) -> None:
        path(sha).write_bytes(data)

    return Backend(FileBlobStore(root), lambda: FileBlobStore(root), corrupt, writes, lambda sha: str(path(sha)))


def s3_backend(moto: Moto) -> Backend:
    bucket = moto.bucket()
    url = f"s3://{bucket}/aggregator/blobs"
    store = S3BlobStore(url, s3_config(moto.url))

    def corrupt(sha: str, data: bytes) -> None:
        moto.admin.put_object(Bucket=bucket, Key=store.key(sha), Body=data)

    return Backend(store, lambda: S3BlobStore(url, s3_config(moto.url)), corrupt,
                   lambda sha: moto.versions(bucket, store.key(sha)), lambda sha: f"s3://{bucket}/{store.key(sha)}")


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "file":
        return file_backend(tmp_path / "blobs")
    return s3_backend(request.getfixturevalue("moto"))


# ------------------------------------------------------------------------------------------- the shared suite
@pytest.mark.parametrize("size", [0, 5, 3 * 1024 * 1024 + 7])
def test_a_blob_is_named_by_its_sha256_and_read_back(backend: Backend, size: int) -> None:
    data = secrets.token_bytes(size)
    sha = hashlib.sha256(data).hexdigest()
    assert not backend.store.exists(sha)
    assert backend.store.put(data, "update") == sha
    assert backend.store.exists(sha) and backend.store.get(sha) == data


def test_absent_and_malformed_names_are_key_errors(backend: Backend) -> None:
    backend.store.put(b"hello")
    for name in ("0" * 64, "../../etc/passwd", hashlib.sha256(b"hello").hexdigest().upper(), "", "ab"):
        with pytest.raises(KeyError):
            backend.store.get(name)
        assert not backend.store.exists(name)


@pytest.mark.parametrize("kind", ["model", "update"])
def test_putting_bytes_already_stored_is_a_no_op(backend: Backend, kind: Any) -> None:
    sha = backend.store.put(b"weights", kind)
    before = backend.writes(sha)
    assert backend.store.put(b"weights", kind) == sha
    assert backend.reopen().put(b"weights", kind) == sha
    assert backend.writes(sha) == before, "a repeated put wrote the object again"


def test_concurrent_puts_of_the_same_bytes(backend: Backend) -> None:
    data = secrets.token_bytes(256 * 1024)
    with ThreadPoolExecutor(8) as pool:
        shas = set(pool.map(lambda _: backend.store.put(data, "update"), range(8)))
    assert shas == {hashlib.sha256(data).hexdigest()}
    assert backend.store.get(shas.pop()) == data


@pytest.mark.parametrize("damage", ["flipped", "truncated", "replaced"])
def test_a_corrupted_blob_is_an_error_naming_where_it_lies(backend: Backend, damage: str) -> None:
    data = secrets.token_bytes(4096)
    sha = backend.store.put(data)
    bad = {"flipped": data[:100] + bytes([data[100] ^ 1]) + data[101:], "truncated": data[:2048],
           "replaced": b"something else"}[damage]
    backend.corrupt(sha, bad)
    with pytest.raises(BlobCorrupted) as err:
        backend.store.get(sha)
    assert backend.where(sha) in str(err.value) and "corrupted" in str(err.value)
    assert backend.store.exists(sha), "the damaged object is still there, for an operator to look at"


def test_blobs_survive_reopening_the_store(backend: Backend) -> None:
    model, update = backend.store.put(b"model", "model"), backend.store.put(b"update", "update")
    again = backend.reopen()
    assert again.get(model) == b"model" and again.get(update) == b"update"


# ------------------------------------------------------------------------------------------------ files only
def test_file_store_leaves_no_temporary_files(tmp_path: Path) -> None:
    blobs = FileBlobStore(tmp_path)
    sha = blobs.put(b"hello")
    assert (tmp_path / sha[:2] / sha).read_bytes() == b"hello"
    assert not list(tmp_path.rglob(".tmp-*"))


# ---------------------------------------------------------------------------------------------------- S3 only
def test_open_blobs_picks_the_store_from_the_url(moto: Moto, tmp_path: Path) -> None:
    assert isinstance(open_blobs(f"file://{tmp_path}"), FileBlobStore)
    bucket = moto.bucket()
    store = open_blobs(f"s3://{bucket}/fedsilo/", s3_config(moto.url))
    assert isinstance(store, S3BlobStore) and store.location == f"s3://{bucket}/fedsilo"
    with pytest.raises(ValueError, match="expected file:///PATH or s3://BUCKET/PREFIX"):
        open_blobs("gs://bucket/prefix")


@pytest.mark.parametrize(("url", "message"), [
    ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
    ("s3://ab/x", "not a valid S3 bucket name"),
    ("s3://AKIA:secret@bucket-name/x", "no credentials"),
    ("s3://bucket-name/x?region=eu-west-1", "settings go under blob_s3"),
    ("s3://bucket-name/a//b", "not a usable key prefix"),
    ("s3://bucket-name/a/../b", "not a usable key prefix"),
    ("s3://bucket-name/a b", "not a usable key prefix"),
])
def test_bad_s3_urls_are_refused_before_any_request(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_url(url)


def test_key_layout_and_kind_tags(moto: Moto) -> None:
    """One content-addressed namespace under the prefix; the kind is a tag, and a model never expires."""
    bucket = moto.bucket()
    store = S3BlobStore(f"s3://{bucket}/agg/blobs", s3_config(moto.url))
    model, update = store.put(b"a model", "model"), store.put(b"an update", "update")
    listed = moto.admin.list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted([f"agg/blobs/{model}", f"agg/blobs/{update}"])
    assert (store.kind(model), store.kind(update)) == ("model", "update")
    store.put(b"a model", "update")  # the same bytes again, as an update: still a model
    assert store.kind(model) == "model"
    store.put(b"an update", "model")  # an update's bytes become a model: re-tagged, so it never expires
    assert store.kind(update) == "model"
    assert len(moto.versions(bucket, f"agg/blobs/{update}")) == 1, "re-tagging wrote no new version"


def test_concurrent_conditional_puts_all_succeed_with_one_blob(moto: Moto) -> None:
    """Eight replicas' retries of one upload at once: every put succeeds with the same address (a racing writer's
    412 or 409 is the no-op, not an error) and the blob reads back whole. Whether the losers also left no second
    version is S3's guarantee for conditional writes; moto's server checks and writes without a lock, so under
    load it can keep two, and versions are not counted here (the shared suite counts them for a sequential retry)."""
    bucket = moto.bucket()
    store = S3BlobStore(f"s3://{bucket}", s3_config(moto.url))
    data = secrets.token_bytes(1024 * 1024)
    with ThreadPoolExecutor(8) as pool:
        (sha,) = set(pool.map(lambda _: store.put(data, "update"), range(8)))
    assert store.get(sha) == data
    assert {moto.admin.get_object(Bucket=bucket, Key=sha, VersionId=v)["Body"].read() == data
            for v in moto.versions(bucket, sha)} == {True}


def test_sse_kms_with_the_configured_key(moto: Moto) -> None:
    key = moto.kms.create_key(Description="fedsilo blobs")["KeyMetadata"]["Arn"]
    bucket = moto.bucket()
    encrypted = S3BlobStore(f"s3://{bucket}/enc", s3_config(moto.url, kms_key_id=key))
    sha = encrypted.put(b"secret weights")
    head = moto.admin.head_object(Bucket=bucket, Key=f"enc/{sha}")
    assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == key
    plain = S3BlobStore(f"s3://{bucket}/plain", s3_config(moto.url))
    sha = plain.put(b"other weights")
    assert "SSEKMSKeyId" not in moto.admin.head_object(Bucket=bucket, Key=f"plain/{sha}")


def test_a_missing_bucket_fails_at_open_with_the_reason(moto: Moto) -> None:
    with pytest.raises(BlobStoreError, match=r"open of s3://fedsilo-no-such-bucket .*HTTP 404.*bucket does not exist"):
        S3BlobStore("s3://fedsilo-no-such-bucket/x", s3_config(moto.url))


# ------------------------------------------------------------------------------------------ a faulty endpoint
@pytest.fixture
def proxy(moto: Moto) -> Iterator[FaultyS3Proxy]:
    p = FaultyS3Proxy(moto.url, stall_s=1.5).start()
    yield p
    p.stop()


def faulty_store(moto: Moto, proxy: FaultyS3Proxy, **kw: Any) -> tuple[S3BlobStore, str]:
    bucket = moto.bucket()
    store = S3BlobStore(f"s3://{bucket}/b", s3_config(proxy.url, **kw))
    proxy.reset()  # count from here: opening the store sent a HeadBucket
    return store, bucket


def test_throttling_and_server_errors_are_retried(moto: Moto, proxy: FaultyS3Proxy) -> None:
    store, _ = faulty_store(moto, proxy, max_attempts=4)
    proxy.inject("slowdown", times=2, method="PUT")
    sha = store.put(b"an update", "update")
    assert proxy.requests["PUT"] == 3 and proxy.faulted == 2
    proxy.inject("internal", times=3, method="GET")
    assert store.get(sha) == b"an update"
    assert proxy.requests["GET"] == 4 and proxy.faulted == 5


def test_past_its_retry_budget_the_store_raises_and_stores_nothing(moto: Moto, proxy: FaultyS3Proxy) -> None:
    store, bucket = faulty_store(moto, proxy, max_attempts=3)
    data = b"an update that must not be acknowledged"
    sha = hashlib.sha256(data).hexdigest()
    proxy.always("slowdown", method="PUT")
    with pytest.raises(BlobStoreError) as err:
        store.put(data, "update")
    message = str(err.value)
    assert f"s3://{bucket}/b/{sha}" in message and "SlowDown (503)" in message and "after 3 attempts" in message
    assert proxy.requests["PUT"] == 3, "the budget bounds the attempts"
    assert not store.exists(sha)
    proxy.always(None)
    assert store.put(data, "update") == sha and store.get(sha) == data


def test_a_body_cut_short_is_read_again(moto: Moto, proxy: FaultyS3Proxy) -> None:
    store, bucket = faulty_store(moto, proxy, max_attempts=3, backoff_base_s=0.01)
    data = secrets.token_bytes(64 * 1024)
    sha = store.put(data)
    proxy.inject("truncate", method="GET")
    assert store.get(sha) == data and store.retries == 1
    proxy.always("truncate", method="GET")
    with pytest.raises(BlobStoreError, match=rf"s3://{bucket}/b/{sha} failed after 3 attempts: the response broke"):
        store.get(sha)
    assert proxy.requests["GET"] == 2 + 3


def test_a_conflicting_conditional_write_is_retried(moto: Moto, proxy: FaultyS3Proxy) -> None:
    store, _ = faulty_store(moto, proxy, max_attempts=3, backoff_base_s=0.01)
    proxy.inject("conflict", method="PUT")
    sha = store.put(b"model", "model")
    assert store.retries == 1 and proxy.requests["PUT"] == 2 and store.get(sha) == b"model"


def test_a_stalled_request_times_out_and_is_retried(moto: Moto, proxy: FaultyS3Proxy) -> None:
    store, _ = faulty_store(moto, proxy, max_attempts=2, read_timeout_s=0.3)
    sha = store.put(b"model")
    proxy.inject("stall", method="GET")
    assert store.get(sha) == b"model" and proxy.requests["GET"] == 2
    proxy.always("stall", method="GET")
    with pytest.raises(BlobStoreError, match="Read timeout"):
        store.get(sha)
