"""Blobs in Amazon S3 or an S3-compatible store (`blob_url: s3://bucket/prefix`), through boto3.

Layout: one content-addressed namespace, `<prefix>/<sha256>`, for models and updates alike; what a blob is goes
into an object tag (`fedsilo-kind`: `model` or `update`), which the bucket's lifecycle rule filters on to expire
old round updates (deploy/terraform/blobs.tf). So every reader (API, recovery, reports) still names a blob by its
hash alone, and the same bytes are stored once. Where a model's bytes were first stored as an update, the model's
put re-tags the object: a model never expires.

Idempotent put: a conditional write (`If-None-Match: *`), not a HEAD before the PUT. It is one request instead of
two per new blob, and atomic: two writers of the same bytes cannot both create the object, so a versioned bucket
gets no second version. S3 answers 412 when the object exists, which is the no-op; the price is that a repeated
put sends its bytes again, and repeats are rare (the engine checks its state row before it stores an update).
A store that ignores the header overwrites identical bytes, which is harmless to content (the bucket policy in
deploy/terraform refuses a PutObject without it, so on AWS every object is written once).

Retries: botocore's own (`retry_mode` standard or adaptive: throttling such as 503 SlowDown, 500/502/503/504,
connection errors and timeouts, with exponential backoff and jitter) up to `max_attempts` per request. Our bounded
backoff covers what botocore's does not: a response body that breaks off while being read (botocore's retries end
when the headers arrive) and 409 ConditionalRequestConflict (a concurrent conditional write of the same key).
Timeouts are bounded by `connect_timeout_s` and `read_timeout_s` per attempt. Credentials come from the standard
AWS chain: IRSA on EKS (the web-identity token the pod identity webhook mounts), environment, profile, instance
role; never from this config.
"""

from __future__ import annotations

import base64
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar
from urllib.parse import quote, urlsplit

import structlog
from pydantic import Field

from aggregator.blobs import BlobKind, BlobStore, BlobStoreError, check_sha, verified
from federation.schema import Frozen
from federation.tensors import sha256_hex

log = structlog.get_logger(__name__)
T = TypeVar("T")

KIND_TAG = "fedsilo-kind"
# S3's bucket naming rules (general purpose buckets): 3–63 lower-case letters, digits, dots and hyphens.
BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
PREFIX = re.compile(r"^[A-Za-z0-9!_.*'()/-]{0,512}$")


class S3BlobConfig(Frozen):
    """Settings of the S3 blob store (`blob_s3:` in the aggregator's config); the bucket and prefix are in
    `blob_url`. Credentials are never set here: the standard AWS chain provides them (IRSA on EKS)."""

    # The bucket's region; None: AWS_REGION / AWS_DEFAULT_REGION / the profile's.
    region: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    # An S3-compatible store (MinIO, Ceph RGW) or an interface VPC endpoint; None: AWS's regional endpoint.
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$")
    # SSE-KMS with this key (key ARN, id or alias/...) on every put; None: the bucket's default encryption.
    kms_key_id: str | None = Field(default=None, min_length=1, max_length=2048)
    # "path" for stores without virtual-hosted bucket names (many S3-compatible ones); "auto" lets botocore pick.
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    # botocore's retry mode: "standard" (exponential backoff with jitter) or "adaptive" (standard plus a
    # client-side rate limiter that slows down after throttling; botocore still calls it experimental).
    retry_mode: Literal["standard", "adaptive"] = "standard"
    # Attempts per request inside botocore, the first included; also the budget of our own retries.
    max_attempts: int = Field(default=5, ge=1, le=20)
    # Our own backoff (body read cut off, conflicting conditional write): full jitter, doubling from base to max.
    backoff_base_s: float = Field(default=0.1, gt=0, le=60)
    backoff_max_s: float = Field(default=5.0, gt=0, le=600)
    connect_timeout_s: float = Field(default=5.0, gt=0, le=120)
    # Per socket read, not per request: a 40 MB update streams for longer without tripping it.
    read_timeout_s: float = Field(default=30.0, gt=0, le=600)
    # Connections kept to S3: at least the number of threads that call the store at once.
    max_pool_connections: int = Field(default=16, ge=1, le=256)


def parse_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix without slashes at either end); a clear error for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise ValueError(f"not an S3 blob URL: {url!r}; expected s3://BUCKET/PREFIX")
    if parts.username is not None or parts.password is not None or parts.port is not None:
        raise ValueError(f"{url!r}: an S3 blob URL carries no credentials or port; credentials come from the "
                         "standard AWS chain (IRSA on EKS), an endpoint from blob_s3.endpoint_url")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: no query or fragment; settings go under blob_s3")
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if not BUCKET.match(bucket) or ".." in bucket:
        raise ValueError(f"{url!r}: {bucket!r} is not a valid S3 bucket name (3-63 lower-case letters, digits, "
                         "dots and hyphens)")
    if not PREFIX.match(prefix) or "//" in prefix or any(p in (".", "..") for p in prefix.split("/")):
        raise ValueError(f"{url!r}: {prefix!r} is not a usable key prefix (letters, digits and !_.*'()/- "
                         "in non-empty segments, at most 512 characters)")
    return bucket, prefix


class S3BlobStore(BlobStore):
    """Thread-safe: boto3 clients are, and the engine calls the store from its own thread(s)."""

    def __init__(self, url: str, config: S3BlobConfig | None = None) -> None:
        try:
            import boto3
            import botocore.config
            import botocore.exceptions as bce
        except ImportError as exc:
            raise RuntimeError("the S3 blob store needs the `aws` extra: pip install 'fedsilo[aws]'") from exc
        self._bucket, self._prefix = parse_url(url)
        self._cfg = c = config or S3BlobConfig()
        self._bce = bce
        self._client: Any = boto3.session.Session(region_name=c.region).client(
            "s3",
            endpoint_url=c.endpoint_url,
            config=botocore.config.Config(
                retries={"mode": c.retry_mode, "total_max_attempts": c.max_attempts},
                connect_timeout=c.connect_timeout_s,
                read_timeout=c.read_timeout_s,
                max_pool_connections=c.max_pool_connections,
                s3={"addressing_style": c.addressing_style},
                tcp_keepalive=True,
                # Every read is hashed here (sha256 against the key); botocore's own pass would double that cost.
                response_checksum_validation="when_required",
            ),
        )
        self._sse: dict[str, str] = (
            {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": c.kms_key_id} if c.kms_key_id else {}
        )
        self._lock = threading.Lock()
        self.retries = 0  # own retries taken (body cut off, conflicting write): for logs and tests
        # Fail at start-up, with the reason, rather than at the first upload a site sends.
        self._call("open", "", lambda: self._client.head_bucket(Bucket=self._bucket))
        log.info("s3_blobs_ready", bucket=self._bucket, prefix=self._prefix, region=self._client.meta.region_name,
                 endpoint=c.endpoint_url, sse_kms=bool(c.kms_key_id), retry_mode=c.retry_mode,
                 max_attempts=c.max_attempts)

    @property
    def location(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}" if self._prefix else f"s3://{self._bucket}"

    def key(self, sha: str) -> str:
        check_sha(sha)
        return f"{self._prefix}/{sha}" if self._prefix else sha

    # ------------------------------------------------------------------------------------------------ blobs
    def put(self, data: bytes, kind: BlobKind = "model") -> str:
        sha = sha256_hex(data)
        key = self.key(sha)
        args = {
            "Bucket": self._bucket, "Key": key, "Body": data, "IfNoneMatch": "*",
            # S3 checks the body against this (400 BadDigest) and keeps it with the object.
            "ChecksumSHA256": base64.b64encode(bytes.fromhex(sha)).decode(),
            "ContentType": "application/octet-stream",
            "Tagging": f"{KIND_TAG}={quote(kind)}",
            **self._sse,
        }
        try:
            self._retried("put", key, self._call("put", key, lambda: self._client.put_object(**args)))
        except _Exists:
            if kind == "model":  # the same bytes may be there as an update, which would expire
                tags = {"TagSet": [{"Key": KIND_TAG, "Value": "model"}]}
                self._call("tag", key, lambda: self._client.put_object_tagging(
                    Bucket=self._bucket, Key=key, Tagging=tags))
        return sha

    def get(self, sha: str) -> bytes:
        key = self.key(sha)

        def fetch() -> bytes:
            resp = self._client.get_object(Bucket=self._bucket, Key=key)
            self._retried("get", key, resp)
            body = resp["Body"]
            try:
                return bytes(body.read())
            except (self._bce.ResponseStreamingError, self._bce.IncompleteReadError, self._bce.ReadTimeoutError) as exc:
                raise _BodyBroke(exc) from exc  # past botocore's retries, which end when the headers arrive
            finally:
                body.close()

        return verified(self._call("get", key, fetch), sha, f"s3://{self._bucket}/{key}")

    def exists(self, sha: str) -> bool:
        try:
            key = self.key(sha)
        except KeyError:
            return False
        try:
            self._call("head", key, lambda: self._client.head_object(Bucket=self._bucket, Key=key))
        except KeyError:
            return False
        return True

    def kind(self, sha: str) -> str | None:
        """The object's `fedsilo-kind` tag (what the lifecycle rule reads); None without one."""
        key = self.key(sha)
        tags = self._call("tags", key, lambda: self._client.get_object_tagging(Bucket=self._bucket, Key=key))
        return next((t["Value"] for t in tags["TagSet"] if t["Key"] == KIND_TAG), None)

    # ----------------------------------------------------------------------------------------------- calls
    def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        """One store operation: botocore retries each request; we retry, with our own bounded backoff, what it
        does not; every failure becomes KeyError (absent), `_Exists` (conditional write refused) or
        BlobStoreError naming the object."""
        bce = self._bce
        where = f"s3://{self._bucket}/{key}" if key else f"s3://{self._bucket}"
        attempts = self._cfg.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except bce.ClientError as exc:
                err, meta = exc.response.get("Error", {}), exc.response.get("ResponseMetadata", {})
                code, status = str(err.get("Code", "")), int(meta.get("HTTPStatusCode", 0))
                if code in ("NoSuchKey", "NotFound") or (status == 404 and key):
                    raise KeyError(key) from None
                if code == "PreconditionFailed" or status == 412:
                    raise _Exists(key) from None
                if code == "ConditionalRequestConflict" and attempt < attempts:
                    self._backoff(op, where, attempt, code)
                    continue
                tried = int(meta.get("RetryAttempts", 0)) + 1
                raise BlobStoreError(_explain(op, where, code or str(status), status, str(err.get("Message", "")),
                                              attempt if code == "ConditionalRequestConflict" else tried)) from exc
            except _BodyBroke as exc:  # read it again, from the start
                if attempt == attempts:
                    raise BlobStoreError(f"S3 {op} of {where} failed after {attempt} attempts: the response "
                                         f"broke off ({exc})") from exc
                self._backoff(op, where, attempt, type(exc.__cause__).__name__)
            except bce.NoCredentialsError as exc:
                raise BlobStoreError(f"S3 {op} of {where}: no AWS credentials found (IRSA role, environment, "
                                     "profile or instance role)") from exc
            except bce.BotoCoreError as exc:
                raise BlobStoreError(f"S3 {op} of {where} failed after {attempts} attempts: {exc}") from exc
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _retried(self, op: str, key: str, resp: dict[str, Any]) -> None:
        """botocore retries silently: say so when a call needed it (throttling shows up here first)."""
        retries = int(resp.get("ResponseMetadata", {}).get("RetryAttempts", 0))
        if retries:
            log.warning("s3_retried", op=op, where=f"s3://{self._bucket}/{key}", retries=retries)

    def _backoff(self, op: str, where: str, attempt: int, reason: str) -> None:
        c = self._cfg
        delay = random.uniform(0, min(c.backoff_max_s, c.backoff_base_s * 2 ** (attempt - 1)))
        with self._lock:
            self.retries += 1
        log.warning("s3_retry", op=op, where=where, attempt=attempt, reason=reason, delay_s=round(delay, 3))
        time.sleep(delay)


class _Exists(Exception):
    """A conditional write found the object already there: the put is a no-op."""


class _BodyBroke(Exception):
    """The response body broke off or stalled while being read."""


def _explain(op: str, where: str, code: str, status: int, message: str, tried: int) -> str:
    hint = ""
    if status == 403:
        hint = ("; check that the aggregator's role (IRSA) allows s3:GetObject, s3:PutObject, s3:PutObjectTagging "
                "and s3:ListBucket on the bucket and kms:GenerateDataKey, kms:Decrypt on its key")
    elif op == "open" and status == 404:
        hint = "; the bucket does not exist (deploy/terraform creates it)"
    what = f"{code} ({status})" if code and code != str(status) else f"HTTP {status}"
    return (f"S3 {op} of {where} failed after {tried} attempt{'s' * (tried != 1)}: {what}"
            f"{': ' + message if message else ''}{hint}")
