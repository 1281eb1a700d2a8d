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

output "aggregator_role_arn" {
  description = "IAM role the aggregator's service account assumes (IRSA): model bucket and SageMaker Experiments."
  value       = module.aggregator_irsa.iam_role_arn
}

output "aggregator_release" {
  description = "Namespace and name of the aggregator's Helm release; its services' load balancers are the federation's endpoints (kubectl -n fedsilo get svc)."
  value       = "${helm_release.aggregator.namespace}/${helm_release.aggregator.name}"
}
