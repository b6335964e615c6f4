{{- define "matview.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "matview.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "matview.labels" -}}
{{ include "matview.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "matview.serviceAccountName" -}}
{{- default (include "matview.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "matview.secretsNamespaces" -}}
{{- toYaml (default .Values.watchNamespaces .Values.rbac.secretsNamespaces) -}}
{{- end -}}
