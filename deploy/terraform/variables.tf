variable "region" {
  description = "AWS region of every cluster and of the model bucket."
  type        = string
  default     = "eu-central-1"
}

variable "name" {
  description = "Prefix of every resource name (clusters, VPCs, bucket, roles)."
  type        = string
  default     = "fedsilo"
}

variable "hospitals" {
  description = "One VPC and EKS cluster per hospital, each named after the site (the CN of its certificate)."
  type        = list(string)
  default     = ["cleveland", "hungary", "switzerland", "va-long-beach"]

  validation {
    condition     = alltrue([for h in var.hospitals : can(regex("^[a-z0-9][a-z0-9-]{0,30}$", h))])
    error_message = "Hospital names are site names: lower-case letters, digits and dashes, at most 31 characters."
  }
}

variable "kubernetes_version" {
  description = "EKS Kubernetes version of every cluster."
  type        = string
  default     = "1.33"
}

variable "aggregator_vpc_cidr" {
  description = "CIDR of the aggregator's VPC."
  type        = string
  default     = "10.10.0.0/16"
}

variable "hospital_vpc_cidr_base" {
  description = "Hospital VPCs get consecutive /16 blocks from this /8 (10.100.0.0/16, 10.101.0.0/16, ...): no overlap with the aggregator's."
  type        = string
  default     = "10.0.0.0/8"
}

variable "hospital_vpc_cidr_offset" {
  description = "Index of the first hospital's /16 inside hospital_vpc_cidr_base."
  type        = number
  default     = 100
}

variable "aggregator_node_instance_type" {
  description = "Instance type of the aggregator cluster's nodes (aggregation is memory-bound: O(model))."
  type        = string
  default     = "m6i.large"
}

variable "hospital_node_instance_type" {
  description = "Instance type of each hospital cluster's nodes (local CPU training of small tabular models)."
  type        = string
  default     = "t3.large"
}

variable "cluster_endpoint_public_access_cidrs" {
  description = "Who may reach the EKS API endpoints (the operators' addresses). Empty: private endpoints only."
  type        = list(string)
  default     = []
}

variable "aggregator_chart_values" {
  description = "Extra values files (YAML text) for the aggregator chart: TLS and signing Secrets, sites, operators, ingress."
  type        = list(string)
  default     = []
}

variable "image_tag" {
  description = "Tag of the fedsilo images the charts install."
  type        = string
  default     = "0.1.0"
}

variable "blob_prefix" {
  description = "Key prefix of the aggregator's blobs in the blob bucket (blob_url: s3://<bucket>/<prefix>); the IRSA policy grants this prefix only."
  type        = string
  default     = "aggregator"

  validation {
    condition     = can(regex("^[A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*$", var.blob_prefix))
    error_message = "A key prefix without leading, trailing or doubled slashes, of letters, digits and !_.*'()-."
  }
}

variable "blob_update_retention_days" {
  description = "Days a site's round update is kept in the blob bucket before it expires (models never expire); see docs/blobs.md."
  type        = number
  default     = 90

  validation {
    condition     = var.blob_update_retention_days >= 7
    error_message = "At least 7 days: an open round's updates (a round lasts at most a day) must outlive any outage the aggregator recovers from."
  }
}

variable "blob_noncurrent_days" {
  description = "Days an expired or overwritten blob version is kept (recoverable) before S3 deletes it for good."
  type        = number
  default     = 30

  validation {
    condition     = var.blob_noncurrent_days >= 1
    error_message = "At least one day."
  }
}

variable "tags" {
  description = "Tags added to every AWS resource."
  type        = map(string)
  default     = {}
}

variable "aggregator_replicas" {
  description = "Aggregator replicas (the chart's replicaCount). Two by default: state is in RDS PostgreSQL and blobs in S3, so each job has one writer at a time and a replica's loss moves its jobs to the other (docs/deploy.md, \"Two replicas\")."
  type        = number
  default     = 2

  validation {
    condition     = var.aggregator_replicas >= 1 && var.aggregator_replicas <= 20 && floor(var.aggregator_replicas) == var.aggregator_replicas
    error_message = "A whole number of replicas, from 1 to 20."
  }
}

variable "database_engine_version" {
  description = "PostgreSQL version of the aggregator's RDS instance: a major version (minor upgrades are automatic) or major.minor."
  type        = string
  default     = "16"

  validation {
    condition     = can(regex("^[0-9]{2}(\\.[0-9]+)?$", var.database_engine_version))
    error_message = "A PostgreSQL major version such as 16, or major.minor such as 16.8."
  }
}

variable "database_instance_class" {
  description = "RDS instance class of the aggregator's database (its load is a few rows per update and per round)."
  type        = string
  default     = "db.t4g.medium"
}

variable "database_storage_gb" {
  description = "Allocated storage of the aggregator's database, GiB (it holds rows and hashes; blobs are in S3)."
  type        = number
  default     = 20
}

variable "database_max_storage_gb" {
  description = "Storage autoscaling ceiling of the aggregator's database, GiB."
  type        = number
  default     = 100
}

variable "database_multi_az" {
  description = "A standby in a second zone with synchronous replication and automatic failover (about twice the instance cost). Two aggregator replicas in two zones keep running only if the database does too."
  type        = bool
  default     = true
}

variable "database_backup_retention_days" {
  description = "Days of automated backups (point-in-time recovery) of the aggregator's database."
  type        = number
  default     = 14

  validation {
    condition     = var.database_backup_retention_days >= 1 && var.database_backup_retention_days <= 35
    error_message = "From 1 to 35 days (RDS's range; 0 would switch backups off)."
  }
}

variable "database_deletion_protection" {
  description = "Refuse to delete the aggregator's database (set false, apply, then destroy, to tear it down)."
  type        = bool
  default     = true
}
