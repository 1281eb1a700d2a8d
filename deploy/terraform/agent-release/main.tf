# One hospital's agent release, applied against that hospital's cluster (created by the parent configuration):
#   terraform -chdir=deploy/terraform/agent-release workspace select -or-create cleveland
#   terraform -chdir=deploy/terraform/agent-release apply -var cluster_name=fedsilo-cleveland \
#     -var values_file=../../helm/agent/ci/cleveland-values.yaml

terraform {
  required_version = ">= 1.6.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.95"
    }
    helm = {
      source  = "hashicorp/helm"
      version = "~> 2.17"
    }
  }
}

provider "aws" {
  region = var.region
}

data "aws_eks_cluster" "hospital" {
  name = var.cluster_name
}

data "aws_eks_cluster_auth" "hospital" {
  name = var.cluster_name
}

provider "helm" {
  kubernetes {
    host                   = data.aws_eks_cluster.hospital.endpoint
    cluster_ca_certificate = base64decode(data.aws_eks_cluster.hospital.certificate_authority[0].data)
    token                  = data.aws_eks_cluster_auth.hospital.token
  }
}

resource "helm_release" "agent" {
  name             = "fedsilo-agent"
  namespace        = var.namespace
  create_namespace = true
  chart            = "${path.module}/../../helm/agent"
  wait             = true
  timeout          = 600
  values           = [file(var.values_file), yamlencode({ image = { tag = var.image_tag } })]
}
