{{/*
Helpers of the checkout-sidecar chart.

The public ones ("checkout-sidecar.container", ".volumes", ".podLabels",
".terminationGracePeriodSeconds") are for your own pod spec, and take the root
context of either this chart or a parent chart that has checkout-sidecar as a
dependency (its values are then read from .Values "checkout-sidecar"). Names depend
on the release and the values only, never on .Chart, so a parent chart's include
and this chart's own objects agree on them.
*/}}

{{/* This chart's values, from its own context or from a parent chart's. */}}
{{- define "checkout-sidecar.values" -}}
{{- if hasKey .Values "checkout-sidecar" -}}
{{- toJson (index .Values "checkout-sidecar") -}}
{{- else -}}
{{- toJson .Values -}}
{{- end -}}
{{- end -}}

{{- define "checkout-sidecar.name" -}}
{{- $v := include "checkout-sidecar.values" . | fromJson -}}
{{- default "checkout-sidecar" $v.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-checkout-sidecar, or the release name when it already says so. */}}
{{- define "checkout-sidecar.fullname" -}}
{{- $v := include "checkout-sidecar.values" . | fromJson -}}
{{- if $v.fullnameOverride -}}
{{- $v.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "checkout-sidecar.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "checkout-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "checkout-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of this chart's own objects. */}}
{{- define "checkout-sidecar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "checkout-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Put this label on a pod that carries the sidecar: the admin Service selects it. */}}
{{- define "checkout-sidecar.podLabels" -}}
checkout-sidecar.io/sidecar: {{ include "checkout-sidecar.fullname" . }}
{{- end -}}

{{- define "checkout-sidecar.adminSecretName" -}}
{{- $v := include "checkout-sidecar.values" . | fromJson -}}
{{- $v.admin.token.existingSecret | default (printf "%s-admin" (include "checkout-sidecar.fullname" .)) -}}
{{- end -}}

{{/*
The pod's terminationGracePeriodSeconds, checked against the sidecar's shutdown: on
SIGTERM it drains for drainDelay, then gives in-flight work grace, then exits within
one more second. A kubelet that kills it sooner cuts checkouts short.
*/}}
{{- define "checkout-sidecar.terminationGracePeriodSeconds" -}}
{{- $v := include "checkout-sidecar.values" . | fromJson -}}
{{- $period := int $v.terminationGracePeriodSeconds -}}
{{- $drain := int $v.shutdown.drainDelay -}}
{{- $grace := int $v.shutdown.grace -}}
{{- if le $period (add $drain $grace) -}}
{{- include "checkout-sidecar.fail" (printf "terminationGracePeriodSeconds (%d) must exceed shutdown.drainDelay + shutdown.grace (%d + %d = %d seconds): the kubelet would kill the sidecar while checkouts are finishing" $period $drain $grace (add $drain $grace)) -}}
{{- end -}}
{{- $period -}}
{{- end -}}

{{/*
Refuse the values with a message. `helm lint` only logs a template's fail and goes
on, so an unparsable line follows it, which lint reports as an error; `helm template`
and `helm install` stop at the fail and never render that line.
*/}}
{{- define "checkout-sidecar.fail" -}}
{{- fail . -}}
{{ printf "\nchart-values-error: %s: [" (quote .) }}
{{- end -}}

{{/* Checks across values that values.schema.json cannot express (from this chart's
own templates: it reads the chart's files). */}}
{{- define "checkout-sidecar.validate" -}}
{{- $v := include "checkout-sidecar.values" . | fromJson -}}
{{- $_ := include "checkout-sidecar.terminationGracePeriodSeconds" . -}}
{{- with include "checkout-sidecar.storeProblem" . -}}
{{- include "checkout-sidecar.fail" . -}}
{{- end -}}
{{- if eq (int $v.sidecar.port) (int $v.sidecar.adminPort) -}}
{{- include "checkout-sidecar.fail" (printf "sidecar.port and sidecar.adminPort must differ (both %d)" (int $v.sidecar.port)) -}}
{{- end -}}
{{- if and $v.serviceMonitor.enabled (not $v.service.enabled) -}}
{{- include "checkout-sidecar.fail" "serviceMonitor.enabled needs service.enabled: the ServiceMonitor scrapes the admin Service" -}}
{{- end -}}
{{- $config := include "checkout-sidecar.configSource" . -}}
{{- if not (trim $config) -}}
{{- include "checkout-sidecar.fail" "the sidecar config is empty: set config, or restore files/sidecar.yaml" -}}
{{- end -}}
{{- if regexMatch "(?m)^shutdown[ \\t]*:" $config -}}
{{- include "checkout-sidecar.fail" "config has a top-level shutdown: section; set shutdown.drainDelay and shutdown.grace in the values instead (the chart writes them, and checks terminationGracePeriodSeconds against them)" -}}
{{- end -}}
{{- end -}}

{{/*
The store, as the chart sees it. A URL from a Secret (store.existingSecret) cannot be
read while rendering: the chart takes it for a shared store (PostgreSQL or Redis).
sqlite:// and memory:// are pod-local, and so is unix:// (a Redis on a unix socket
runs in the pod): every pod would keep its own journal and idempotency records.
*/}}
{{- define "checkout-sidecar.storeScheme" -}}
{{- $v := include "checkout-sidecar.values" . | fromJson -}}
{{- if $v.store.existingSecret -}}
secret
{{- else -}}
{{- splitList "://" $v.store.url | first | lower -}}
{{- end -}}
{{- end -}}

{{- define "checkout-sidecar.podLocalStore" -}}
{{- if has (include "checkout-sidecar.storeScheme" .) (list "sqlite" "memory" "unix") -}}
true
{{- end -}}
{{- end -}}

{{/*
What is wrong with the store values, or nothing: a pod-local store for several
replicas (unless store.allowPodLocalWithReplicas), a password in store.url, a SQLite
file off the state volume. The message names the fix.
*/}}
{{- define "checkout-sidecar.storeProblem" -}}
{{- $v := include "checkout-sidecar.values" . | fromJson -}}
{{- $replicas := int $v.app.replicaCount -}}
{{- $scheme := include "checkout-sidecar.storeScheme" . -}}
{{- if and (gt $replicas 1) (include "checkout-sidecar.podLocalStore" .) (not $v.store.allowPodLocalWithReplicas) -}}
{{- printf "app.replicaCount is %d but store.url (%s) is pod-local: each pod would keep its own checkout journal and idempotency records, so a client retry that lands on another pod is not recognised and a rescheduled pod's unfinished checkouts are lost with its volume. Use a shared store: PostgreSQL, or Redis with AOF and Sentinel (store.existingSecret naming a Secret with the postgresql:// or redis+sentinel:// URL under store.secretKey); or set app.replicaCount: 1 with SQLite on a persistent volume (store.persistence.enabled: true). To run pod-local stores in several pods on purpose, set store.allowPodLocalWithReplicas: true" $replicas (splitList "?" $v.store.url | first) -}}
{{- else if and (ne $scheme "secret") (regexMatch "^[^:/]+://[^/?#]*:[^/?#]*@|[?&]password=[^&]" $v.store.url) -}}
store.url holds a password, which would be written into the pod spec: put the URL in a Secret and set store.existingSecret (and store.secretKey, default url); the chart passes it to the sidecar as SIDECAR_STORE
{{- else if and (eq $scheme "sqlite") (not (regexMatch "^sqlite:////?var/lib/checkout-sidecar/[^/?#]+([?#].*)?$" $v.store.url)) -}}
{{- printf "store.url (%s) must name a file on the state volume, sqlite:///var/lib/checkout-sidecar/<file>.db: the root filesystem is read-only and only that directory outlives the container" $v.store.url -}}
{{- else if and (gt $replicas 1) (eq $scheme "sqlite") $v.store.persistence.existingClaim -}}
{{- printf "store.persistence.existingClaim (%s) cannot hold the SQLite files of %d pods: one claim would be one file shared by every pod. Use a shared store, or app.replicaCount: 1" $v.store.persistence.existingClaim $replicas -}}
{{- end -}}
{{- end -}}

{{/*
The pods' replica count (app.replicaCount), refused with a pod-local store when it is
above 1. Your own Deployment can take it: replicas: {{ include "checkout-sidecar.replicas" . }}
*/}}
{{- define "checkout-sidecar.replicas" -}}
{{- with include "checkout-sidecar.storeProblem" . -}}
{{- include "checkout-sidecar.fail" . -}}
{{- end -}}
{{- $v := include "checkout-sidecar.values" . | fromJson -}}
{{- int $v.app.replicaCount -}}
{{- end -}}

{{/*
The claim that holds /var/lib/checkout-sidecar, or nothing for an emptyDir: a single
pod's SQLite file with store.persistence.enabled.
*/}}
{{- define "checkout-sidecar.stateClaim" -}}
{{- $v := include "checkout-sidecar.values" . | fromJson -}}
{{- if and (eq (include "checkout-sidecar.storeScheme" .) "sqlite") $v.store.persistence.enabled (le (int $v.app.replicaCount) 1) -}}
{{- $v.store.persistence.existingClaim | default (printf "%s-state" (include "checkout-sidecar.fullname" .)) -}}
{{- end -}}
{{- end -}}

{{/*
The Deployment strategy of pods with the sidecar: Recreate when a claim holds the
SQLite file (a ReadWriteOnce volume attaches to one node, and one process at a time
writes the file), RollingUpdate otherwise.

  strategy:
    {{- include "checkout-sidecar.strategy" . | nindent 4 }}
*/}}
{{- define "checkout-sidecar.strategy" -}}
{{- if include "checkout-sidecar.stateClaim" . -}}
type: Recreate
{{- else -}}
type: RollingUpdate
{{- end -}}
{{- end -}}

{{/* The sidecar YAML as given: .Values.config, or the chart's copy of config/sidecar.yaml. */}}
{{- define "checkout-sidecar.configSource" -}}
{{- .Values.config | default (.Files.Get "files/sidecar.yaml") -}}
{{- end -}}

{{/* The sidecar YAML with the shutdown timing of the values appended. */}}
{{- define "checkout-sidecar.config" -}}
{{ include "checkout-sidecar.configSource" . | trimSuffix "\n" }}

# Written by the chart from .Values.shutdown (terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}).
shutdown:
  drain_delay: {{ int .Values.shutdown.drainDelay }}s
  grace: {{ int .Values.shutdown.grace }}s
{{- end -}}

{{/*
The sidecar container, as one item of a containers: (or, with sidecar.native,
initContainers:) list:

  containers:
    - name: my-app
      ...
    {{- include "checkout-sidecar.container" . | nindent 4 }}
*/}}
{{- define "checkout-sidecar.container" -}}
{{- $v := include "checkout-sidecar.values" . | fromJson -}}
{{- $s := $v.sidecar -}}
- name: {{ $s.containerName }}
  image: {{ printf "%s:%s" $v.image.repository $v.image.tag | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- if $s.native }}
  restartPolicy: Always
  {{- end }}
  args: ["run", "--config", "/etc/checkout-sidecar/sidecar.yaml"]
  ports:
    - name: sidecar-proxy
      containerPort: {{ int $s.port }}
      protocol: TCP
    - name: sidecar-admin
      containerPort: {{ int $s.adminPort }}
      protocol: TCP
  env:
    - name: SIDECAR_LISTEN
      value: {{ printf "%s:%d" $s.listenHost (int $s.port) | quote }}
    - name: SIDECAR_ADMIN_LISTEN
      value: {{ printf "0.0.0.0:%d" (int $s.adminPort) | quote }}
    - name: SIDECAR_ADMIN_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ include "checkout-sidecar.adminSecretName" . }}
          key: {{ $v.admin.token.key }}
    - name: SIDECAR_STORE
      {{- if $v.store.existingSecret }}
      valueFrom:
        secretKeyRef:
          name: {{ $v.store.existingSecret }}
          key: {{ $v.store.secretKey }}
      {{- else }}
      value: {{ $v.store.url | quote }}
      {{- end }}
    - name: LOG_LEVEL
      value: {{ $s.logLevel | quote }}
    {{- range $name, $url := $s.upstreams }}
    - name: {{ printf "%s_UPSTREAM" (upper $name | replace "-" "_") }}
      value: {{ $url | quote }}
    {{- end }}
    {{- with $s.ordersCallback }}
    - name: ORDERS_CALLBACK
      value: {{ . | quote }}
    {{- end }}
    {{- with $s.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  startupProbe:
    httpGet: {path: /healthz, port: sidecar-admin}
    {{- toYaml $s.probes.startup | nindent 4 }}
  livenessProbe:
    httpGet: {path: /healthz, port: sidecar-admin}
    {{- toYaml $s.probes.liveness | nindent 4 }}
  readinessProbe:
    httpGet: {path: /readyz, port: sidecar-admin}
    {{- toYaml $s.probes.readiness | nindent 4 }}
  {{- with $s.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $s.securityContext | nindent 4 }}
  volumeMounts:
    - name: checkout-sidecar-config
      mountPath: /etc/checkout-sidecar
      readOnly: true
    - name: checkout-sidecar-state
      mountPath: /var/lib/checkout-sidecar
    - name: checkout-sidecar-tmp
      mountPath: /tmp
    {{- range (($v.tls | default dict).mounts | default list) }}
    - name: checkout-sidecar-tls-{{ .name }}
      mountPath: {{ include "checkout-sidecar.tlsMountPath" . }}
      readOnly: true
    {{- end }}
{{- end -}}

{{/*
Where a `tls.mounts` entry is mounted: its mountPath, else
/var/run/secrets/checkout-sidecar/<name>. The config's `tls:` sections name files
there (ca_file, cert_file, key_file).
*/}}
{{- define "checkout-sidecar.tlsMountPath" -}}
{{- .mountPath | default (printf "/var/run/secrets/checkout-sidecar/%s" .name) -}}
{{- end -}}

{{/*
The volumes the sidecar container mounts, as items of the pod's volumes: list. The
config is mounted as a directory (no subPath), so ConfigMap updates reach the file
and the sidecar reloads them.
*/}}
{{- define "checkout-sidecar.volumes" -}}
{{- $v := include "checkout-sidecar.values" . | fromJson -}}
- name: checkout-sidecar-config
  configMap:
    name: {{ include "checkout-sidecar.fullname" . }}
- name: checkout-sidecar-state
  {{- with include "checkout-sidecar.stateClaim" . }}
  persistentVolumeClaim:
    claimName: {{ . }}
  {{- else }}
  emptyDir:
    {{- with $v.store.stateVolume.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ $v.store.stateVolume.sizeLimit }}
  {{- end }}
- name: checkout-sidecar-tmp
  emptyDir:
    sizeLimit: 16Mi
{{- /*
Certificates for TLS to upstreams: whole Secrets or ConfigMaps (no subPath), so a
renewal (cert-manager rewrites the Secret, the kubelet swaps the files) reaches the
sidecar, which re-reads them without a restart. Readable by the pod's fsGroup only.
*/}}
{{- range (($v.tls | default dict).mounts | default list) }}
- name: checkout-sidecar-tls-{{ .name }}
  {{- if .secret }}
  secret:
    secretName: {{ .secret }}
    defaultMode: 0440
  {{- else }}
  configMap:
    name: {{ .configMap }}
    defaultMode: 0440
  {{- end }}
{{- end }}
{{- end -}}
