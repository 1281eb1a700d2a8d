variable "region" {
  description = "AWS region of the hospital's cluster."
  type        = string
  default     = "eu-central-1"
}

variable "cluster_name" {
  description = "The hospital's EKS cluster (output hospital_cluster_names of the parent configuration)."
  type        = string
}

variable "namespace" {
  description = "Namespace of the agent's release."
  type        = string
  default     = "fedsilo"
}

variable "values_file" {
  description = "The hospital's one values file for the agent chart (site, endpoints, TLS Secret, policy)."
  type        = string
}

variable "image_tag" {
  description = "Tag of the fedsilo agent image."
  type        = string
  default     = "0.1.0"
}
