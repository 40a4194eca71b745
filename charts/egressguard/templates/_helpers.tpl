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

{{- /*
"true" when the chart is rendered against a cluster (helm install/upgrade,
--dry-run=server), "" without one (helm template, Argo CD, --dry-run=client),
where `lookup` finds nothing. kube-system, not only the release namespace:
`helm install --create-namespace` renders before it creates the namespace.
*/ -}}
{{- define "egressguard.inCluster" -}}
{{- if or (lookup "v1" "Namespace" "" "kube-system") (lookup "v1" "Namespace" "" .Release.Namespace) }}true{{ end }}
{{- end }}

{{- /*
The operator's node selector, tolerations and affinity (values operator.placement).
*/ -}}
{{- define "egressguard.operatorPlacement" -}}
{{- $p := .Values.operator.placement | default dict }}
{{- if or .Values.operator.nodeSelector .Values.operator.tolerations }}
{{- fail "operator.nodeSelector and operator.tolerations are gone: set operator.placement (trusted: nodeSelector, with operator.placement.nodeSelector and .tolerations)" }}
{{- end }}
{{- $trusted := $p.trusted | default "controlPlane" }}
{{- $selector := dict }}
{{- $tolerations := list }}
{{- if eq $trusted "controlPlane" }}
{{- $selector = dict "node-role.kubernetes.io/control-plane" "" }}
{{- $tolerations = list
      (dict "key" "node-role.kubernetes.io/control-plane" "operator" "Exists" "effect" "NoSchedule")
      (dict "key" "node-role.kubernetes.io/master" "operator" "Exists" "effect" "NoSchedule") }}
{{- else if eq $trusted "nodeSelector" }}
{{- if not $p.nodeSelector }}
{{- fail "operator.placement.trusted=nodeSelector needs operator.placement.nodeSelector: the labels of the trusted node pool" }}
{{- end }}
{{- else if ne $trusted "any" }}
{{- fail (printf "operator.placement.trusted must be controlPlane, nodeSelector or any, not %q" $trusted) }}
{{- end }}
{{- $selector = merge (dict) $selector ($p.nodeSelector | default dict) }}
{{- $tolerations = concat $tolerations ($p.tolerations | default list) }}
{{- with $selector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
# The replicas prefer different nodes: a node lost takes one of them.
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              app.kubernetes.io/instance: {{ .Release.Name }}
              app.kubernetes.io/component: operator
{{- end }}

{{- /*
The pod-level securityContext lines every pod of the chart shares (AppArmor).
*/ -}}
{{- define "egressguard.appArmor" -}}
{{- with .Values.appArmorProfile }}
{{- if not (has . (list "RuntimeDefault" "Unconfined")) }}
{{- fail (printf "appArmorProfile: %q is not RuntimeDefault, Unconfined or \"\" (none, for kernels without AppArmor)" .) }}
{{- end }}
appArmorProfile: {type: {{ . }}}
{{- end }}
{{- end }}

{{- /*
KUBERNETES_SERVICE_HOST/PORT for clusters where the `kubernetes` Service has no
proxy (values kubernetesApi); nothing otherwise.
*/ -}}
{{- define "egressguard.apiEnv" -}}
{{- with .Values.kubernetesApi }}
{{- if or .host .port }}
{{- if not (and .host .port) }}
{{- fail "kubernetesApi: set both host and port (or neither, to use the kubernetes Service)" }}
{{- end }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .host | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .port | quote }}
{{- end }}
{{- end }}
{{- end }}
