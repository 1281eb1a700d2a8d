# The reference topology: the aggregator's VPC and EKS cluster, and one VPC and EKS cluster per hospital.
# Hospitals never share a network with the aggregator or with each other: agents reach the aggregator and
# the broker over their public (TLS, client-certificate) endpoints only.

data "aws_availability_zones" "available" {
  #checkov:skip=CKV_AWS_394:Only the first two zones are used (local.azs); zones AWS adds later come after them and change nothing.
  state = "available"
}

locals {
  azs = slice(data.aws_availability_zones.available.names, 0, 2)
  hospital_cidrs = {
    for i, h in var.hospitals : h => cidrsubnet(var.hospital_vpc_cidr_base, 8, var.hospital_vpc_cidr_offset + i)
  }
  public_endpoint = length(var.cluster_endpoint_public_access_cidrs) > 0
}

# ------------------------------------------------------------------------------------------------- aggregator
module "aggregator_vpc" {
  #checkov:skip=CKV_TF_1:Registry modules are pinned to an exact release (version = "x.y.z"); the registry serves that release immutably, so a commit hash adds nothing.
  source  = "terraform-aws-modules/vpc/aws"
  version = "5.21.0"

  name            = "${var.name}-aggregator"
  cidr            = var.aggregator_vpc_cidr
  azs             = local.azs
  private_subnets = [for i, _ in local.azs : cidrsubnet(var.aggregator_vpc_cidr, 4, i)]
  public_subnets  = [for i, _ in local.azs : cidrsubnet(var.aggregator_vpc_cidr, 8, 200 + i)]
  # The database's own subnets (database.tf): no route out of the VPC.
  database_subnets                   = [for i, _ in local.azs : cidrsubnet(var.aggregator_vpc_cidr, 8, 100 + i)]
  create_database_subnet_group       = true
  create_database_subnet_route_table = true

  enable_nat_gateway                   = true
  single_nat_gateway                   = true
  enable_flow_log                      = true
  create_flow_log_cloudwatch_log_group = true
  create_flow_log_cloudwatch_iam_role  = true

  public_subnet_tags  = { "kubernetes.io/role/elb" = 1 }
  private_subnet_tags = { "kubernetes.io/role/internal-elb" = 1 }
}

module "aggregator_eks" {
  #checkov:skip=CKV_TF_1:Registry modules are pinned to an exact release (version = "x.y.z"); the registry serves that release immutably, so a commit hash adds nothing.
  source  = "terraform-aws-modules/eks/aws"
  version = "20.37.2"

  cluster_name                             = "${var.name}-aggregator"
  cluster_version                          = var.kubernetes_version
  vpc_id                                   = module.aggregator_vpc.vpc_id
  subnet_ids                               = module.aggregator_vpc.private_subnets
  cluster_endpoint_public_access           = local.public_endpoint
  cluster_endpoint_public_access_cidrs     = var.cluster_endpoint_public_access_cidrs
  enable_cluster_creator_admin_permissions = true
  enable_irsa                              = true

  # At least two nodes in the two zones, so that two aggregator replicas can spread over zones and nodes.
  eks_managed_node_groups = {
    default = {
      instance_types = [var.aggregator_node_instance_type]
      min_size       = max(2, var.aggregator_replicas)
      max_size       = max(3, var.aggregator_replicas + 1)
      desired_size   = max(2, var.aggregator_replicas)
    }
  }
}

# ------------------------------------------------------------------------------------------------- hospitals
module "hospital_vpc" {
  #checkov:skip=CKV_TF_1:Registry modules are pinned to an exact release (version = "x.y.z"); the registry serves that release immutably, so a commit hash adds nothing.
  source   = "terraform-aws-modules/vpc/aws"
  version  = "5.21.0"
  for_each = local.hospital_cidrs

  name            = "${var.name}-${each.key}"
  cidr            = each.value
  azs             = local.azs
  private_subnets = [for i, _ in local.azs : cidrsubnet(each.value, 4, i)]
  public_subnets  = [for i, _ in local.azs : cidrsubnet(each.value, 8, 200 + i)]

  # Egress through one NAT gateway: the hospital's only way out, to the broker and the aggregator.
  enable_nat_gateway                   = true
  single_nat_gateway                   = true
  enable_flow_log                      = true
  create_flow_log_cloudwatch_log_group = true
  create_flow_log_cloudwatch_iam_role  = true

  private_subnet_tags = { "kubernetes.io/role/internal-elb" = 1 }
}

module "hospital_eks" {
  #checkov:skip=CKV_TF_1:Registry modules are pinned to an exact release (version = "x.y.z"); the registry serves that release immutably, so a commit hash adds nothing.
  source   = "terraform-aws-modules/eks/aws"
  version  = "20.37.2"
  for_each = local.hospital_cidrs

  cluster_name                             = "${var.name}-${each.key}"
  cluster_version                          = var.kubernetes_version
  vpc_id                                   = module.hospital_vpc[each.key].vpc_id
  subnet_ids                               = module.hospital_vpc[each.key].private_subnets
  cluster_endpoint_public_access           = local.public_endpoint
  cluster_endpoint_public_access_cidrs     = var.cluster_endpoint_public_access_cidrs
  enable_cluster_creator_admin_permissions = true
  # The agent needs no AWS permission at all: no OIDC provider, no IRSA role.
  enable_irsa = false

  eks_managed_node_groups = {
    default = {
      instance_types = [var.hospital_node_instance_type]
      min_size       = 1
      max_size       = 2
      desired_size   = 1
    }
  }
}
