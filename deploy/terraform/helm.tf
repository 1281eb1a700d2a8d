# The aggregator chart on the aggregator's cluster: aggregator_replicas replicas on the RDS database (its URL in
# the Kubernetes Secret of database.tf, never a Helm value) and the blob bucket (through the IRSA role of
# iam.tf). Terraform cannot create one provider per element of a list, so each hospital's agent release is its
# own small configuration (agent-release/, applied once per hospital with that hospital's values file; see
# README.md).

data "aws_eks_cluster_auth" "aggregator" {
  name = module.aggregator_eks.cluster_name
}

provider "kubernetes" {
  host                   = module.aggregator_eks.cluster_endpoint
  cluster_ca_certificate = base64decode(module.aggregator_eks.cluster_certificate_authority_data)
  token                  = data.aws_eks_cluster_auth.aggregator.token
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
  namespace        = kubernetes_namespace_v1.fedsilo.metadata[0].name
  create_namespace = false
  chart            = "${path.module}/../helm/aggregator"
  wait             = true
  timeout          = 600

  values = concat([yamlencode({
    image          = { tag = var.image_tag }
    replicaCount   = var.aggregator_replicas
    sites          = var.hospitals
    serviceAccount = { roleArn = module.aggregator_irsa.iam_role_arn }
    database       = { existingSecret = kubernetes_secret_v1.database.metadata[0].name, key = "url" }
    networkPolicy = {
      enabled       = true
      databaseCidrs = module.aggregator_vpc.database_subnets_cidr_blocks
      databasePort  = aws_db_instance.aggregator.port
    }
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
        experimentPrefix = var.name # experiments `<name>-<job id>`, one per job, whatever its use case
        artifactBucket   = aws_s3_bucket.models.id
      }
    }
    service   = { type = "LoadBalancer", annotations = { "service.beta.kubernetes.io/aws-load-balancer-type" = "nlb" } }
    mosquitto = { service = { type = "LoadBalancer", annotations = { "service.beta.kubernetes.io/aws-load-balancer-type" = "nlb" } } }
  })], var.aggregator_chart_values)
}
