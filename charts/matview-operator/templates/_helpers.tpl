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

{{/*
The container's resources: as written, or with the memory request and limit sized for sizing.views views per
replica from the measured cost (docs/operations.md, "Memory"): 100 MiB idle plus 80 KiB per view is the
request; the limit is a third more, rounded up to 64 MiB.
*/}}
{{- define "matview-operator.resources" -}}
{{- $resources := deepCopy .Values.resources -}}
{{- $views := int .Values.sizing.views -}}
{{- if gt $views 0 -}}
{{- $expected := add 100 (div (add (mul $views 80) 1023) 1024) -}}
{{- $limit := mul (div (add (div (mul $expected 4) 3) 63) 64) 64 -}}
{{- $_ := set $resources "requests" (merge (dict "memory" (printf "%dMi" $expected)) ($resources.requests | default dict)) -}}
{{- $_ := set $resources "limits" (merge (dict "memory" (printf "%dMi" $limit)) ($resources.limits | default dict)) -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}
