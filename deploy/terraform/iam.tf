# IAM roles for service accounts. The aggregator: the model bucket, SageMaker Experiments and (blobs.tf) the blob
# bucket, nothing else.
# The agents: none (their clusters have no OIDC provider; an agent needs no AWS permission).

data "aws_iam_policy_document" "aggregator" {
  statement {
    sid       = "ModelBucket"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:ListBucket"]
    resources = [aws_s3_bucket.models.arn, "${aws_s3_bucket.models.arn}/*"]
  }
  statement {
    sid       = "ModelBucketKey"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.models.arn]
  }
  statement {
    sid = "SageMakerExperiments"
    actions = [
      "sagemaker:CreateExperiment", "sagemaker:DescribeExperiment", "sagemaker:UpdateExperiment",
      "sagemaker:CreateTrial", "sagemaker:DescribeTrial", "sagemaker:UpdateTrial",
      "sagemaker:CreateTrialComponent", "sagemaker:DescribeTrialComponent", "sagemaker:UpdateTrialComponent",
      "sagemaker:AssociateTrialComponent", "sagemaker:BatchPutMetrics", "sagemaker:AddTags",
      "sagemaker:Search",
    ]
    resources = [
      "arn:aws:sagemaker:${var.region}:${data.aws_caller_identity.current.account_id}:experiment/${var.name}-*",
      "arn:aws:sagemaker:${var.region}:${data.aws_caller_identity.current.account_id}:experiment-trial/*",
      "arn:aws:sagemaker:${var.region}:${data.aws_caller_identity.current.account_id}:experiment-trial-component/*",
    ]
  }
}

resource "aws_iam_policy" "aggregator" {
  name_prefix = "${var.name}-aggregator-"
  description = "fedsilo aggregator: model bucket and SageMaker Experiments"
  policy      = data.aws_iam_policy_document.aggregator.json
}

module "aggregator_irsa" {
  #checkov:skip=CKV_TF_1:Registry modules are pinned to an exact release (version = "x.y.z"); the registry serves that release immutably, so a commit hash adds nothing.
  source  = "terraform-aws-modules/iam/aws//modules/iam-role-for-service-accounts-eks"
  version = "5.58.0"

  role_name_prefix = "${var.name}-aggregator-"
  role_policy_arns = { aggregator = aws_iam_policy.aggregator.arn, blobs = aws_iam_policy.aggregator_blobs.arn }
  oidc_providers = {
    aggregator = {
      provider_arn               = module.aggregator_eks.oidc_provider_arn
      namespace_service_accounts = ["fedsilo:fedsilo"]
    }
  }
}
