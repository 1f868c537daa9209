{{/* Names and labels. */}}
{{- define "triton-vlm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "triton-vlm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "triton-vlm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "triton-vlm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "triton-vlm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "triton-vlm.labels" -}}
helm.sh/chart: {{ include "triton-vlm.chart" . }}
{{ include "triton-vlm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference-server
{{- end }}

{{- define "triton-vlm.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding the Hugging Face token, if any. */}}
{{- define "triton-vlm.tokenSecret" -}}
{{- if .Values.huggingface.token.existingSecret }}
{{- .Values.huggingface.token.existingSecret }}
{{- else if .Values.huggingface.token.value }}
{{- printf "%s-hf-token" (include "triton-vlm.fullname" .) }}
{{- end }}
{{- end }}

{{- define "triton-vlm.claimName" -}}
{{- default (printf "%s-model-cache" (include "triton-vlm.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}
