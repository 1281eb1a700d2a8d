output "aggregator_cluster_name" {
  description = "Name of the aggregator's EKS cluster (aws eks update-kubeconfig --name ...)."
  value       = module.aggregator_eks.cluster_name
}

output "aggregator_cluster_endpoint" {
  description = "Kubernetes API endpoint of the aggregator's cluster."
  value       = module.aggregator_eks.cluster_endpoint
}

output "hospital_cluster_names" {
  description = "EKS cluster name of each hospital, by site."
  value       = { for h, m in module.hospital_eks : h => m.cluster_name }
}

output "hospital_cluster_endpoints" {
  description = "Kubernetes API endpoint of each hospital's cluster, by site."
  value       = { for h, m in module.hospital_eks : h => m.cluster_endpoint }
}

output "hospital_nat_public_ips" {
  description = "Egress addresses of each hospital (NAT gateway): allow them in the aggregator's and broker's loadBalancerSourceRanges."
  value       = { for h, m in module.hospital_vpc : h => m.nat_public_ips }
}

output "model_bucket" {
  description = "S3 bucket for models and experiment artifacts (tracking.sagemaker.artifactBucket)."
  value       = aws_s3_bucket.models.id
}

output "blob_url" {
  description = "The aggregator's blob_url (s3://<blob bucket>/<blob_prefix>), as the Helm release sets it."
  value       = "s3://${aws_s3_bucket.blobs.id}/${var.blob_prefix}"
}

output "blob_kms_key_arn" {
  description = "KMS key of the blob bucket (blob_s3.kms_key_id), used for every put."
  value       = aws_kms_key.blobs.arn
}

output "aggregator_role_arn" {
  description = "IAM role the aggregator's service account assumes (IRSA): model bucket, blob bucket and SageMaker Experiments."
  value       = module.aggregator_irsa.iam_role_arn
}

output "aggregator_release" {
  description = "Namespace and name of the aggregator's Helm release; its services' load balancers are the federation's endpoints (kubectl -n fedsilo get svc)."
  value       = "${helm_release.aggregator.namespace}/${helm_release.aggregator.name}"
}

output "database_endpoint" {
  description = "host:port of the aggregator's RDS PostgreSQL (private; reachable from the aggregator cluster only)."
  value       = aws_db_instance.aggregator.endpoint
}

output "database_secret" {
  description = "Namespace and name of the Kubernetes Secret holding the aggregator's database URL (key url; the chart's database.existingSecret)."
  value       = "${kubernetes_secret_v1.database.metadata[0].namespace}/${kubernetes_secret_v1.database.metadata[0].name}"
}
