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
      {{- if $v.store.redis.existingSecret }}
      valueFrom:
        secretKeyRef:
          name: {{ $v.store.redis.existingSecret }}
          key: {{ $v.store.redis.key }}
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
  emptyDir:
    {{- with $v.store.stateVolume.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ $v.store.stateVolume.sizeLimit }}
- name: checkout-sidecar-tmp
  emptyDir:
    sizeLimit: 16Mi
{{- end -}}
