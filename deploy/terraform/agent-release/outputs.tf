output "release" {
  description = "Namespace/name of the agent's Helm release and its status."
  value       = "${helm_release.agent.namespace}/${helm_release.agent.name}: ${helm_release.agent.status}"
}
