{{/* Names, labels and the pieces the workload templates share. */}}

{{- define "broker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "broker.fullname" -}}
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

{{- define "broker.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "broker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: broker
broker.io/profile: {{ .Values.profile }}
{{- end }}

{{/* Labels of the chart's own NATS (profile cluster). */}}
{{- define "broker.natsLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "broker.name" . }}-nats
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: nats
{{- end }}

{{- define "broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "broker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "broker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "broker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Refuses values that would deploy something broken, with a message naming the value.
Every template that renders a workload includes it.
*/}}
{{- define "broker.validate" -}}
{{- $v := .Values }}
{{- if not (has $v.profile (list "single" "ha" "cluster")) }}
{{- fail (printf "profile: must be \"single\", \"ha\" or \"cluster\", not %q" (toString $v.profile)) }}
{{- end }}
{{- if not (has $v.storage.type (list "sqlite" "postgres" "memory" "nats")) }}
{{- fail (printf "storage.type: must be sqlite, postgres, nats or memory, not %q" (toString $v.storage.type)) }}
{{- end }}
{{- if and (eq $v.storage.type "nats") (ne $v.profile "cluster") }}
{{- fail "storage.type nats: use profile cluster (every replica active on JetStream)" }}
{{- end }}
{{- if eq $v.profile "ha" }}
{{- if ne $v.storage.type "postgres" }}
{{- fail (printf "profile ha: replicas share their state through PostgreSQL; storage.type is %q (set storage.type=postgres and storage.postgres.url or storage.postgres.existingSecret)" $v.storage.type) }}
{{- end }}
{{- if lt (int $v.replicaCount) 2 }}
{{- fail (printf "profile ha: replicaCount must be at least 2, not %d (use profile single for one broker)" (int $v.replicaCount)) }}
{{- end }}
{{- if and $v.autoscaling.enabled (lt (int $v.autoscaling.minReplicas) 2) }}
{{- fail "profile ha: autoscaling.minReplicas must be at least 2" }}
{{- end }}
{{- else if eq $v.profile "cluster" }}
{{- if ne $v.storage.type "nats" }}
{{- fail (printf "profile cluster: replicas share their state through NATS JetStream; storage.type is %q (set storage.type=nats)" $v.storage.type) }}
{{- end }}
{{- if lt (int $v.replicaCount) 2 }}
{{- fail (printf "profile cluster: replicaCount must be at least 2, not %d (use profile single for one broker)" (int $v.replicaCount)) }}
{{- end }}
{{- if and $v.autoscaling.enabled (lt (int $v.autoscaling.minReplicas) 2) }}
{{- fail "profile cluster: autoscaling.minReplicas must be at least 2" }}
{{- end }}
{{- if and (not $v.storage.nats.url) (not $v.storage.nats.existingSecret) (not $v.nats.enabled) }}
{{- fail "storage.type nats: set storage.nats.url or storage.nats.existingSecret, or nats.enabled for the chart's own JetStream" }}
{{- end }}
{{- if and $v.storage.nats.url (not (regexMatch "^(nats|tls)://" $v.storage.nats.url)) }}
{{- fail "storage.nats.url: must start with nats:// or tls://" }}
{{- end }}
{{- if and $v.nats.enabled (lt (int $v.nats.replicas) 3) }}
{{- fail "nats.replicas: a JetStream cluster needs at least 3 servers" }}
{{- end }}
{{- else if $v.autoscaling.enabled }}
{{- fail "autoscaling.enabled: only the ha and cluster profiles can scale; the single profile runs one broker" }}
{{- end }}
{{- if eq $v.storage.type "postgres" }}
{{- if and (not $v.storage.postgres.url) (not $v.storage.postgres.existingSecret) }}
{{- fail "storage.type postgres: set storage.postgres.url or storage.postgres.existingSecret" }}
{{- end }}
{{- if and $v.storage.postgres.url (not (regexMatch "^postgres(ql)?://" $v.storage.postgres.url)) }}
{{- fail "storage.postgres.url: must start with postgres:// or postgresql://" }}
{{- end }}
{{- end }}
{{- $cfg := $v.config | default dict }}
{{- if hasKey $cfg "storage" }}
{{- fail "config.storage: set storage.type / storage.postgres instead; the chart writes storage.url" }}
{{- end }}
{{- range $key := list "listen" "shutdown_timeout" }}
{{- if hasKey (get $cfg "server" | default dict) $key }}
{{- fail (printf "config.server.%s: the chart sets it (service.port is fixed at the container's 8080; see shutdownTimeoutSeconds)" $key) }}
{{- end }}
{{- end }}
{{- if lt (int $v.shutdownTimeoutSeconds) 1 }}
{{- fail "shutdownTimeoutSeconds: must be at least 1" }}
{{- end }}
{{- end }}

{{/* Name of the Secret the chart creates for `value` secrets. */}}
{{- define "broker.secretName" -}}
{{- include "broker.fullname" . }}
{{- end }}

{{/* Whether the chart's own Secret has anything in it. */}}
{{- define "broker.ownSecret" -}}
{{- $any := false }}
{{- range $name, $s := .Values.secrets }}
{{- if and $s.value (not $s.existingSecret) }}{{ $any = true }}{{ end }}
{{- end }}
{{- if and (eq .Values.storage.type "postgres") .Values.storage.postgres.url (not .Values.storage.postgres.existingSecret) }}{{ $any = true }}{{ end }}
{{- if $any }}true{{ end }}
{{- end }}

{{/*
One environment variable from a secret spec: (dict "ctx" $ "env" NAME "spec" $spec).
Renders nothing when the spec is empty.
*/}}
{{- define "broker.secretEnv" -}}
{{- $s := .spec }}
{{- if $s.existingSecret }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ $s.existingSecret }}
      key: {{ $s.key }}
{{- else if $s.value }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "broker.secretName" .ctx }}
      key: {{ $s.key }}
{{- end }}
{{- end }}

{{/* Whether a secret spec is set. */}}
{{- define "broker.secretSet" -}}
{{- if or .existingSecret .value }}true{{ end }}
{{- end }}

{{/* The broker's config file: the user's config plus what the chart owns. */}}
{{- define "broker.config" -}}
{{- $v := .Values }}
{{- $cfg := deepCopy ($v.config | default dict) }}
{{- $server := get $cfg "server" | default dict }}
{{- $_ := set $server "listen" "0.0.0.0:8080" }}
{{- $_ := set $server "shutdown_timeout" (printf "%ds" (int $v.shutdownTimeoutSeconds)) }}
{{- $_ := set $cfg "server" $server }}
{{- $url := "memory://" }}
{{- if eq $v.storage.type "sqlite" }}{{ $url = "sqlite:///var/lib/broker/broker.db" }}{{ end }}
{{- if eq $v.storage.type "postgres" }}
{{- /* The real URL (with its password) comes from BROKER__STORAGE__URL, out of a Secret. */}}
{{- $url = "postgres://set-by-BROKER__STORAGE__URL" }}
{{- end }}
{{- if eq $v.storage.type "nats" }}
{{- if $v.storage.nats.existingSecret }}
{{- /* The real URL (credentials in it) comes from BROKER__STORAGE__URL, out of a Secret. */}}
{{- $url = "nats://set-by-BROKER__STORAGE__URL:4222" }}
{{- else if $v.storage.nats.url }}
{{- $url = $v.storage.nats.url }}
{{- else }}
{{- $url = printf "nats://%s-nats:4222" (include "broker.fullname" .) }}
{{- end }}
{{- $nats := dict "prefix" $v.storage.nats.prefix "replicas" (int $v.storage.nats.replicas) }}
{{- if $v.storage.nats.credentialsSecret }}
{{- $_ := set $nats "credentials" "/etc/broker-nats/nats.creds" }}
{{- end }}
{{- $_ := set $cfg "storage" (dict "url" $url "nats" $nats) }}
{{- else }}
{{- $_ := set $cfg "storage" (dict "url" $url) }}
{{- end }}
{{- if include "broker.secretSet" $v.secrets.adminToken }}
{{- $admin := get $cfg "admin" | default dict }}
{{- $_ := set $admin "token" "env:BROKER_ADMIN_TOKEN" }}
{{- $_ := set $cfg "admin" $admin }}
{{- end }}
{{- $ws := get $cfg "ws" | default dict }}
{{- if include "broker.secretSet" $v.secrets.jwtSecret }}
{{- $_ := set $ws "jwt_secrets" (prepend (get $ws "jwt_secrets" | default list) "env:BROKER_JWT_SECRET") }}
{{- end }}
{{- if include "broker.secretSet" $v.secrets.notifySecret }}
{{- $_ := set $ws "notify_secrets" (prepend (get $ws "notify_secrets" | default list) "env:BROKER_NOTIFY_SECRET") }}
{{- end }}
{{- if $ws }}{{ $_ := set $cfg "ws" $ws }}{{ end }}
{{- if and (hasKey $cfg "pusher") (include "broker.secretSet" $v.secrets.pusherSecret) }}
{{- $pusher := get $cfg "pusher" | default dict }}
{{- $_ := set $pusher "secret" "env:BROKER_PUSHER_SECRET" }}
{{- $_ := set $cfg "pusher" $pusher }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* The pod template shared by the StatefulSet (single) and the Deployment (ha). */}}
{{- define "broker.podTemplate" -}}
{{- $v := .Values }}
metadata:
  labels:
    {{- include "broker.selectorLabels" . | nindent 4 }}
    broker.io/profile: {{ $v.profile }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    {{- if $v.rollOnConfigChange }}
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
    {{- end }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "broker.serviceAccountName" . }}
  {{- /* ha: the broker labels its own pod with its role through the API. */}}
  automountServiceAccountToken: {{ or (eq $v.profile "ha") $v.serviceAccount.automountServiceAccountToken }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ add (int $v.shutdownTimeoutSeconds) (int $v.preStopSleepSeconds) 5 }}
  containers:
    - name: broker
      image: "{{ $v.image.repository }}:{{ $v.image.tag | default .Chart.AppVersion }}"
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args: ["serve", "--config", "/etc/broker/broker.yaml"]
      env:
        - name: BROKER_LOG
          value: {{ $v.log.level | quote }}
        - name: BROKER_LOG_FORMAT
          value: {{ $v.log.format | quote }}
        {{- if eq $v.profile "ha" }}
        # The broker labels its pod broker.io/role=active|standby; the Service selects active.
        - name: BROKER_K8S_ROLE_LABEL
          value: broker.io/role
        - name: BROKER_K8S_POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        {{- end }}
        {{- if eq $v.storage.type "postgres" }}
        - name: BROKER__STORAGE__URL
          valueFrom:
            secretKeyRef:
              name: {{ $v.storage.postgres.existingSecret | default (include "broker.secretName" .) }}
              key: {{ $v.storage.postgres.existingSecretKey }}
        {{- end }}
        {{- if and (eq $v.storage.type "nats") $v.storage.nats.existingSecret }}
        - name: BROKER__STORAGE__URL
          valueFrom:
            secretKeyRef:
              name: {{ $v.storage.nats.existingSecret }}
              key: {{ $v.storage.nats.existingSecretKey }}
        {{- end }}
        {{- include "broker.secretEnv" (dict "ctx" . "env" "BROKER_ADMIN_TOKEN" "spec" $v.secrets.adminToken) | nindent 8 }}
        {{- include "broker.secretEnv" (dict "ctx" . "env" "BROKER_JWT_SECRET" "spec" $v.secrets.jwtSecret) | nindent 8 }}
        {{- include "broker.secretEnv" (dict "ctx" . "env" "BROKER_NOTIFY_SECRET" "spec" $v.secrets.notifySecret) | nindent 8 }}
        {{- if hasKey ($v.config | default dict) "pusher" }}
        {{- include "broker.secretEnv" (dict "ctx" . "env" "BROKER_PUSHER_SECRET" "spec" $v.secrets.pusherSecret) | nindent 8 }}
        {{- end }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: http
          containerPort: 8080
          protocol: TCP
      startupProbe:
        httpGet: {path: /healthz, port: http}
        periodSeconds: {{ $v.probes.startup.periodSeconds }}
        failureThreshold: {{ $v.probes.startup.failureThreshold }}
      livenessProbe:
        httpGet: {path: /healthz, port: http}
        periodSeconds: {{ $v.probes.liveness.periodSeconds }}
        timeoutSeconds: {{ $v.probes.liveness.timeoutSeconds }}
        failureThreshold: {{ $v.probes.liveness.failureThreshold }}
      readinessProbe:
        {{- if eq $v.profile "ha" }}
        # A standby is ready (it gets no traffic: the Service selects broker.io/role=active).
        httpGet: {path: "/readyz?standby=ok", port: http}
        {{- else }}
        httpGet: {path: /readyz, port: http}
        {{- end }}
        periodSeconds: {{ $v.probes.readiness.periodSeconds }}
        timeoutSeconds: {{ $v.probes.readiness.timeoutSeconds }}
        failureThreshold: {{ $v.probes.readiness.failureThreshold }}
      {{- if gt (int $v.preStopSleepSeconds) 0 }}
      lifecycle:
        preStop:
          sleep:
            seconds: {{ int $v.preStopSleepSeconds }}
      {{- end }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      resources:
        {{- toYaml $v.resources | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/broker
          readOnly: true
        - name: data
          mountPath: /var/lib/broker
        - name: tmp
          mountPath: /tmp
        {{- if and (eq $v.storage.type "nats") $v.storage.nats.credentialsSecret }}
        - name: nats-credentials
          mountPath: /etc/broker-nats
          readOnly: true
        {{- end }}
        {{- with $v.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "broker.fullname" . }}
    - name: tmp
      emptyDir: {}
    {{- if or (ne $v.profile "single") (not $v.persistence.enabled) }}
    - name: data
      emptyDir: {}
    {{- end }}
    {{- if and (eq $v.storage.type "nats") $v.storage.nats.credentialsSecret }}
    - name: nats-credentials
      secret:
        secretName: {{ $v.storage.nats.credentialsSecret }}
        items:
          - key: nats.creds
            path: nats.creds
    {{- end }}
    {{- with $v.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $v.affinity }}
  affinity:
    {{- toYaml $v.affinity | nindent 4 }}
  {{- else if ne $v.profile "single" }}
  affinity:
    podAntiAffinity:
      preferredDuringSchedulingIgnoredDuringExecution:
        - weight: 100
          podAffinityTerm:
            topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels:
                {{- include "broker.selectorLabels" . | nindent 16 }}
  {{- end }}
  {{- with $v.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
