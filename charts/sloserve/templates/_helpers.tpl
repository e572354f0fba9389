{{/* Names and labels shared by the templates. */}}

{{- define "sloserve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sloserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sloserve.operatorName" -}}
{{- printf "%s-operator" (include "sloserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sloserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sloserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "sloserve.labels" -}}
{{ include "sloserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "sloserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sloserve.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "sloserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
What the operator may do, and nothing more. It reads and updates SLOServices (kopf keeps
its progress in annotations; status and /scale are subresources), creates and repairs their
children (never deletes them: owner references let the garbage collector do that), and posts
Events. It holds get/list/watch on Endpoints and EndpointSlices only because it grants them to
each gateway's Role, and RBAC refuses to grant what the granter lacks.
*/}}
{{- define "sloserve.rules" -}}
- apiGroups: ["sloserve.io"]
  resources: ["sloservices"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["sloserve.io"]
  resources: ["sloservices/status", "sloservices/scale"]
  verbs: ["get", "patch"]
- apiGroups: ["sloserve.io"]
  resources: ["sloservices/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services", "configmaps", "serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["endpoints"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
