{{/* Names and labels shared by the aggregator chart's manifests. */}}
{{- define "aggregator.fullname" -}}
{{- if contains "fedsilo" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-fedsilo" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "aggregator.selectorLabels" -}}
app.kubernetes.io/name: fedsilo-aggregator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "aggregator.labels" -}}
{{ include "aggregator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: aggregator
app.kubernetes.io/part-of: fedsilo
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "aggregator.mosquittoSelectorLabels" -}}
app.kubernetes.io/name: fedsilo-mosquitto
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "aggregator.mosquittoLabels" -}}
{{ include "aggregator.mosquittoSelectorLabels" . }}
app.kubernetes.io/version: {{ .Values.mosquitto.image.tag | quote }}
app.kubernetes.io/component: broker
app.kubernetes.io/part-of: fedsilo
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "aggregator.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "aggregator.mosquittoImage" -}}
{{- $i := .Values.mosquitto.image -}}
{{- if $i.digest -}}
{{ $i.repository }}@{{ $i.digest }}
{{- else -}}
{{ $i.repository }}:{{ $i.tag }}
{{- end -}}
{{- end -}}

{{- define "aggregator.stateClaim" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-state" (include "aggregator.fullname" .)) -}}
{{- end -}}

{{/* The broker the aggregator connects to: the chart's Mosquitto, or an external one. */}}
{{- define "aggregator.brokerHost" -}}
{{- if .Values.mosquitto.enabled -}}
{{ include "aggregator.fullname" . }}-mosquitto
{{- else -}}
{{ required "broker.host is required when mosquitto.enabled is false" .Values.broker.host }}
{{- end -}}
{{- end -}}

{{/* The Mosquitto ACL: exactly what fedsilo.broker.acl_for(sites) writes (tests/deploy check it). */}}
{{- define "aggregator.acl" -}}
user aggregator
topic readwrite fedsilo/v1/sites/#
{{ range $site := .Values.sites | uniq | sortAlpha }}
user {{ $site }}
topic read fedsilo/v1/sites/{{ $site }}/offers/#
topic read fedsilo/v1/sites/{{ $site }}/tasks/#
topic write fedsilo/v1/sites/{{ $site }}/status
topic write fedsilo/v1/sites/{{ $site }}/events
{{ end -}}
{{- end -}}
