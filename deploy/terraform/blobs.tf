# The aggregator's blob store (blob_url: s3://<bucket>/<blob_prefix>): every global model and every site's round
# update, content-addressed (<blob_prefix>/<sha256>). The aggregator tags each object fedsilo-kind=model or
# fedsilo-kind=update (aggregator/blobs_s3.py); the lifecycle rule below expires updates by that tag and never
# touches models. Private, encrypted with a key of its own, versioned, written once, TLS only.

resource "aws_kms_key" "blobs" {
  description             = "${var.name}: encrypts the aggregator's blob bucket (models and round updates)"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms_account_admin.json
}

resource "aws_kms_alias" "blobs" {
  name          = "alias/${var.name}-blobs"
  target_key_id = aws_kms_key.blobs.key_id
}

resource "aws_s3_bucket" "blobs" {
  #checkov:skip=CKV_AWS_18:Access logging needs a second bucket; the aggregator logs every stored update and round, and CloudTrail data events can record object access.
  #checkov:skip=CKV_AWS_144:Cross-region replication doubles storage cost; a lost region stops the federation anyway, and versioning protects against overwrites and deletes.
  #checkov:skip=CKV2_AWS_62:Nothing consumes bucket events in this topology.
  bucket_prefix = "${var.name}-blobs-"
  force_destroy = false
}

resource "aws_s3_bucket_ownership_controls" "blobs" {
  bucket = aws_s3_bucket.blobs.id
  rule {
    object_ownership = "BucketOwnerEnforced" # ACLs off: the bucket policy and IAM alone decide access
  }
}

resource "aws_s3_bucket_versioning" "blobs" {
  bucket = aws_s3_bucket.blobs.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "blobs" {
  bucket = aws_s3_bucket.blobs.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.blobs.arn
    }
    bucket_key_enabled = true # one KMS data key per bucket key period, not one KMS call per object
  }
}

resource "aws_s3_bucket_public_access_block" "blobs" {
  bucket                  = aws_s3_bucket.blobs.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# What expires, and when (docs/blobs.md):
# - a round update (tag fedsilo-kind=update) blob_update_retention_days after it was stored. Crash recovery reads
#   only the updates of a job's open round (a round lasts at most a day: round_deadline_s <= 86400); the rest are
#   kept for audit (recomputing a round's model from its updates). Expiry puts a delete marker in front of the
#   object; the bytes become a noncurrent version,
# - deleted after blob_noncurrent_days more (so an update is gone for good after retention + noncurrent days),
#   and the delete marker left alone then is removed.
# Models (fedsilo-kind=model) never expire: each round's global model is the job's record and the next round's
# input. State rows keep every update's sha256 after its bytes are gone.
resource "aws_s3_bucket_lifecycle_configuration" "blobs" {
  bucket     = aws_s3_bucket.blobs.id
  depends_on = [aws_s3_bucket_versioning.blobs]

  rule {
    id     = "expire-round-updates"
    status = "Enabled"
    filter {
      tag {
        key   = "fedsilo-kind"
        value = "update"
      }
    }
    expiration {
      days = var.blob_update_retention_days
    }
  }

  rule {
    id     = "purge-noncurrent-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.blob_noncurrent_days
    }
    expiration {
      expired_object_delete_marker = true
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

data "aws_iam_policy_document" "blobs_bucket" {
  statement {
    sid     = "TLSOnly"
    effect  = "Deny"
    actions = ["s3:*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    resources = [aws_s3_bucket.blobs.arn, "${aws_s3_bucket.blobs.arn}/*"]
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
  # Content-addressed objects are written once: a PutObject without If-None-Match (which the aggregator always
  # sends) is refused, so nothing, whoever holds write access, replaces a stored model or update in place. The
  # aggregator never uploads in parts, so multipart uploads (also s3:PutObject) are refused with the rest.
  statement {
    sid     = "WriteOnce"
    effect  = "Deny"
    actions = ["s3:PutObject"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    resources = ["${aws_s3_bucket.blobs.arn}/*"]
    condition {
      test     = "Null"
      variable = "s3:if-none-match"
      values   = ["true"]
    }
  }
}

resource "aws_s3_bucket_policy" "blobs" {
  bucket = aws_s3_bucket.blobs.id
  policy = data.aws_iam_policy_document.blobs_bucket.json
}

# The aggregator's access (IRSA, iam.tf): read and write objects under the prefix, tag them, list the bucket (its
# start-up check, and a 404 rather than a 403 for an absent key), and use the bucket's key. No delete: only the
# lifecycle rule removes anything.
data "aws_iam_policy_document" "aggregator_blobs" {
  statement {
    sid       = "BlobObjects"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:PutObjectTagging"]
    resources = ["${aws_s3_bucket.blobs.arn}/${var.blob_prefix}/*"]
  }
  statement {
    sid       = "BlobBucket"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.blobs.arn]
  }
  statement {
    sid       = "BlobKey"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [aws_kms_key.blobs.arn]
  }
}

resource "aws_iam_policy" "aggregator_blobs" {
  name_prefix = "${var.name}-aggregator-blobs-"
  description = "fedsilo aggregator: its blob bucket and that bucket's key, nothing else"
  policy      = data.aws_iam_policy_document.aggregator_blobs.json
}
