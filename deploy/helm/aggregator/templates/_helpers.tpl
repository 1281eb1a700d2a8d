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

{{/* More than one aggregator replica (docs/deploy.md, "Two replicas"). */}}
{{- define "aggregator.replicated" -}}
{{- if gt (int .Values.replicaCount) 1 }}true{{ end -}}
{{- end -}}

{{/* The headless Service whose per-pod DNS names the replicas advertise to each other. */}}
{{- define "aggregator.peersService" -}}
{{ include "aggregator.fullname" . }}-peers
{{- end -}}

{{/* Refuse what several replicas cannot share (values.schema.json says the same, for `helm install`). */}}
{{- define "aggregator.checkReplicas" -}}
{{- $n := int .Values.replicaCount -}}
{{- if gt $n 1 -}}
{{- if not .Values.database.existingSecret -}}
{{- fail (printf "replicaCount is %d but the state store is SQLite: more than one replica needs PostgreSQL (set database.existingSecret), because SQLite is a file on one pod's ReadWriteOnce volume" $n) -}}
{{- end -}}
{{- if not .Values.blobs.s3.bucket -}}
{{- fail (printf "replicaCount is %d but blobs are files: more than one replica needs S3 blobs (set blobs.s3.bucket), because the blob directory is on one pod's ReadWriteOnce volume" $n) -}}
{{- end -}}
{{- if .Values.persistence.existingClaim -}}
{{- fail (printf "replicaCount is %d but persistence.existingClaim is set: replicas share no volume (each keeps its reports and tracking outbox in an emptyDir); unset persistence.existingClaim" $n) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* mosquitto.conf of the chart's broker (the listener, TLS and ACL settings are fedsilo.broker's). */}}
{{- define "aggregator.mosquittoConf" -}}
per_listener_settings true
persistence true
persistence_location /mosquitto/data/
persistence_file mosquitto.db
autosave_interval 10
log_dest stdout
log_type error
log_type warning
log_type notice
max_queued_messages 10000
# The largest payload the broker accepts, from anyone: the aggregator's mqtt_max_publish_bytes (one value,
# aggregator.mqttMaxPublishBytes, 256 KiB). The limit applies to every client, the aggregator's own publishes
# included: a job offer carries the job's spec (about 2 KB for four sites, 30 KB for 1,000 sites with
# 24-character names), and a job whose signed offer would exceed it is refused at submit, since Mosquitto drops
# a larger message without a word (for MQTT 3.1.1 QoS 1 it still acknowledges it). A site's own messages are
# held to the much smaller mqtt_max_message_bytes by the aggregator, which drops and counts larger ones.
# (Mosquitto suggests max_packet_size instead; that one disconnects the sender, and the aggregator would then
# send a too-large offer again on every reconnect.)
message_size_limit {{ .Values.aggregator.mqttMaxPublishBytes | int64 }}
# Each aggregator replica's client id follows its pod's name: without this, every replaced pod would leave
# a persistent session behind that queues every site's status and events forever.
persistent_client_expiration {{ .Values.mosquitto.persistentClientExpiration }}
listener {{ .Values.mosquitto.port }} 0.0.0.0
cafile /mosquitto/tls/ca.crt
certfile /mosquitto/tls/tls.crt
keyfile /mosquitto/tls/tls.key
{{- if .Values.crl.existingSecret }}
# The federation CA's CRL (crl.existingSecret), read when the broker starts: restart it after a revocation, and
# re-sign the CRL before its next update, past which every client is refused (docs/deploy.md).
crlfile /mosquitto/crl/crl.pem
{{- end }}
require_certificate true
use_identity_as_username true
allow_anonymous false
acl_file /mosquitto/config/acl
{{- end -}}
