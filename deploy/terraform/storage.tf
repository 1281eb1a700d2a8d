# The model bucket: SageMaker Experiments artifacts (final global models) and reports. Private, encrypted with
# a customer-managed key, versioned, TLS only.

data "aws_caller_identity" "current" {}

# The key policy of every customer-managed key here: the account administers it (IAM policies then grant its use,
# e.g. the aggregator's IRSA role in iam.tf and blobs.tf).
data "aws_iam_policy_document" "kms_account_admin" {
  #checkov:skip=CKV_AWS_111:A KMS key policy, not an IAM policy: its "*" resource is the key it is attached to, and only the account's own root principal is named.
  #checkov:skip=CKV_AWS_356:A KMS key policy: "*" is the key itself (AWS requires it so in key policies).
  #checkov:skip=CKV_AWS_109:A KMS key policy: the account administers its own key; IAM policies grant its use.
  statement {
    sid       = "AccountAdministers"
    effect    = "Allow"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:aws:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }
}

resource "aws_kms_key" "models" {
  description             = "${var.name}: encrypts the model bucket"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms_account_admin.json
}

resource "aws_s3_bucket" "models" {
  #checkov:skip=CKV_AWS_18:Access logging needs a second bucket; the aggregator's own audit trail and CloudTrail data events cover model access in this reference set-up.
  #checkov:skip=CKV_AWS_144:Cross-region replication doubles storage cost; models can be retrained, and versioning protects against overwrites.
  #checkov:skip=CKV2_AWS_62:Nothing consumes bucket events in this topology.
  bucket_prefix = "${var.name}-models-"
  force_destroy = false
}

resource "aws_s3_bucket_versioning" "models" {
  bucket = aws_s3_bucket.models.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "models" {
  bucket = aws_s3_bucket.models.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.models.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_public_access_block" "models" {
  bucket                  = aws_s3_bucket.models.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_lifecycle_configuration" "models" {
  bucket = aws_s3_bucket.models.id
  rule {
    id     = "expire-old-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = 90
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

resource "aws_s3_bucket_policy" "models" {
  bucket = aws_s3_bucket.models.id
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "TLSOnly"
      Effect    = "Deny"
      Principal = "*"
      Action    = "s3:*"
      Resource  = [aws_s3_bucket.models.arn, "${aws_s3_bucket.models.arn}/*"]
      Condition = { Bool = { "aws:SecureTransport" = "false" } }
    }]
  })
}
