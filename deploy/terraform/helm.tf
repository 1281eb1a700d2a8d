# The aggregator chart on the aggregator's cluster. Terraform cannot create one provider per element of a
# list, so each hospital's agent release is its own small configuration (agent-release/, applied once per
# hospital with that hospital's values file; see README.md).

data "aws_eks_cluster_auth" "aggregator" {
  name = module.aggregator_eks.cluster_name
}

provider "helm" {
  kubernetes {
    host                   = module.aggregator_eks.cluster_endpoint
    cluster_ca_certificate = base64decode(module.aggregator_eks.cluster_certificate_authority_data)
    token                  = data.aws_eks_cluster_auth.aggregator.token
  }
}

resource "helm_release" "aggregator" {
  name             = "fedsilo"
  namespace        = "fedsilo"
  create_namespace = true
  chart            = "${path.module}/../helm/aggregator"
  wait             = true
  timeout          = 600

  values = concat([yamlencode({
    image          = { tag = var.image_tag }
    sites          = var.hospitals
    serviceAccount = { roleArn = module.aggregator_irsa.iam_role_arn }
    blobs = {
      s3 = {
        bucket   = aws_s3_bucket.blobs.id
        prefix   = var.blob_prefix
        region   = var.region
        kmsKeyId = aws_kms_key.blobs.arn
      }
    }
    tracking = {
      sagemaker = {
        enabled          = true
        region           = var.region
        experimentPrefix = "${var.name}-heart-disease"
        artifactBucket   = aws_s3_bucket.models.id
      }
    }
    service   = { type = "LoadBalancer", annotations = { "service.beta.kubernetes.io/aws-load-balancer-type" = "nlb" } }
    mosquitto = { service = { type = "LoadBalancer", annotations = { "service.beta.kubernetes.io/aws-load-balancer-type" = "nlb" } } }
  })], var.aggregator_chart_values)
}
