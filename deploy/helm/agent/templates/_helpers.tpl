{{/* Names and labels shared by the agent chart's manifests. */}}
{{- define "agent.name" -}}fedsilo-agent{{- end -}}

{{- define "agent.fullname" -}}
{{- printf "fedsilo-agent-%s" (required "site is required: this hospital's site name" .Values.site) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
fedsilo.io/site: {{ .Values.site | quote }}
{{- end -}}

{{- define "agent.labels" -}}
{{ include "agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: agent
app.kubernetes.io/part-of: fedsilo
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "agent.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{/* host:port of the aggregator URL, as the agent's egress allowlist spells it. */}}
{{- define "agent.aggregatorEndpoint" -}}
{{- $u := urlParse .Values.aggregator.url -}}
{{- if contains ":" $u.host -}}
{{ $u.host }}
{{- else -}}
{{ $u.host }}:{{ ternary "443" "80" (eq $u.scheme "https") }}
{{- end -}}
{{- end -}}

{{/* Ports of the aggregator URL, for the NetworkPolicy. */}}
{{- define "agent.aggregatorPort" -}}
{{- include "agent.aggregatorEndpoint" . | splitList ":" | last -}}
{{- end -}}

{{- define "agent.stateClaim" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-state" (include "agent.fullname" .)) -}}
{{- end -}}
