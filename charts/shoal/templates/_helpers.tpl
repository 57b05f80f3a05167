{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "shoal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The operator's resource name: <release>-shoal-operator, or shoal-operator for a release named shoal. */}}
{{- define "shoal.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if eq .Release.Name (include "shoal.name" .) }}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s-operator" .Release.Name (include "shoal.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "shoal.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "shoal.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: shoal
{{- end }}

{{- define "shoal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shoal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "shoal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "shoal.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create=false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "shoal.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The URL edge agents dial: the Service's cluster DNS name unless agentApi.url says otherwise. */}}
{{- define "shoal.agentApiUrl" -}}
{{- if .Values.agentApi.url }}
{{- .Values.agentApi.url }}
{{- else }}
{{- printf "https://%s.%s.svc:%d" (include "shoal.fullname" .) .Release.Namespace (int .Values.agentApi.port) }}
{{- end }}
{{- end }}

{{/* The agent API's TLS Secret: agentApi.tls.secretName, or <fullname>-tls. */}}
{{- define "shoal.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "shoal.fullname" .)) .Values.agentApi.tls.secretName }}
{{- end }}

{{- define "shoal.pvcName" -}}
{{- default (printf "%s-artifacts" (include "shoal.fullname" .)) .Values.artifactStore.existingClaim }}
{{- end }}

{{/* True ("true") when the artifact store can be mounted by pods on several nodes at once. */}}
{{- define "shoal.sharedStore" -}}
{{- if or .Values.artifactStore.existingClaim (has "ReadWriteMany" .Values.artifactStore.accessModes) }}true{{ end }}
{{- end }}

{{/*
RBAC rules on namespaced resources: a ClusterRole for a cluster-wide install, a Role
in watchNamespace otherwise. Every verb here is one the operator's code calls.
*/}}
{{- define "shoal.namespacedRules" -}}
# Model, EdgePool and ModelRollout controllers and the agent API's cluster view watch all three kinds.
- apiGroups: ["shoal.dev"]
  resources: ["models", "edgepools", "modelrollouts"]
  verbs: ["list", "watch"]
# The rollout controller removes the shoal.dev/action annotation after a promote or abort.
- apiGroups: ["shoal.dev"]
  resources: ["modelrollouts"]
  verbs: ["patch"]
# Each controller writes its kind's status (server-side apply / merge patch on the status subresource).
- apiGroups: ["shoal.dev"]
  resources: ["models/status", "edgepools/status", "modelrollouts/status"]
  verbs: ["patch"]
# The agent DaemonSet, ServiceAccount and Service carry an EdgePool controller ownerReference with blockOwnerDeletion (OwnerReferencesPermissionEnforcement checks this).
- apiGroups: ["shoal.dev"]
  resources: ["edgepools/finalizers"]
  verbs: ["update"]
# The agent API watches agent pods (label shoal.dev/pool, metadata only) so that a deleted pod's token is not accepted from its cache.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Model sources and validation datasets of kind configMap are read from the Model's namespace.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get"]
{{- if .Values.agentApi.tls.caKey }}
# With agentApi.tls.caKey: one ConfigMap shoal-agent-<pool>-ca per EdgePool holds the agent API's CA for its agents (server-side applied).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "patch"]
{{- end }}
# One agent DaemonSet shoal-agent-<pool> per EdgePool: server-side applied (an apply that creates needs create too), watched for its ready counts.
- apiGroups: ["apps"]
  resources: ["daemonsets"]
  verbs: ["list", "watch", "create", "patch"]
# One agent ServiceAccount shoal-agent-<pool> per EdgePool, server-side applied (create + patch); its projected token has audience shoal.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["create", "patch"]
# One agent Service shoal-agent-<pool> per EdgePool (internalTrafficPolicy Local), server-side applied (create + patch); the garbage collector deletes it with its pool.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "patch"]
# Kubernetes Events on ModelRollout transitions (the recorder creates an Event, then patches a repeated one's series).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{- define "shoal.clusterRules" -}}
# EdgePools select nodes by label; the agent API maps each agent to its node's labels (metadata only).
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list", "watch"]
# Edge agents authenticate with projected ServiceAccount tokens, checked with a TokenReview.
- apiGroups: ["authentication.k8s.io"]
  resources: ["tokenreviews"]
  verbs: ["create"]
# Before any TokenReview, tokens are checked against the service-account issuer's public keys (OIDC discovery).
- nonResourceURLs: ["/.well-known/openid-configuration", "/openid/v1/jwks"]
  verbs: ["get"]
{{- end }}
