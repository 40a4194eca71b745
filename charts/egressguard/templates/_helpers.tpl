{{- define "egressguard.labels" -}}
app.kubernetes.io/part-of: egressguard
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{- define "egressguard.operatorName" -}}{{ .Release.Name }}-operator{{- end }}
{{- define "egressguard.shaperName" -}}{{ .Release.Name }}-node-shaper{{- end }}

{{- define "egressguard.image" -}}
{{ .image.repository }}:{{ .image.tag | default .appVersion }}
{{- end }}
