{{/* Names */}}
{{- define "specd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "specd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "specd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels: call with (dict "root" $ "component" "router") */}}
{{- define "specd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "specd.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "specd.labels" -}}
helm.sh/chart: {{ include "specd.chart" .root }}
{{ include "specd.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: specd
{{- end -}}

{{/* Every pod of this release (the specd roles, etcd and the test pod). */}}
{{- define "specd.releaseSelector" -}}
app.kubernetes.io/name: {{ include "specd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "specd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "specd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "specd.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* A number as the binary reads it: whole numbers without an exponent (YAML numbers arrive as floats). */}}
{{- define "specd.num" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) -}}
{{- int64 . -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end -}}

{{/* One "--flag=value" argument, or nothing when value is null: (list "flag-name" value) */}}
{{- define "specd.flag" -}}
{{- $value := index . 1 -}}
{{- if not (kindIs "invalid" $value) }}
- {{ printf "--%s=%s" (index . 0) (include "specd.num" $value) | quote }}
{{- end -}}
{{- end -}}

{{/* Ports of the roles' gRPC servers (the binary's defaults). */}}
{{- define "specd.grpcPort" -}}
{{- get (dict "router" 50051 "drafter" 50071 "target" 50061 "trainer" 50081) . -}}
{{- end -}}

{{/* The grpc.health.v1 service each role turns SERVING once its model is loaded and it is registered. */}}
{{- define "specd.healthService" -}}
{{- get (dict "router" "specd.v1.Generation" "drafter" "specd.internal.v1.Drafter" "target" "specd.internal.v1.Target" "trainer" "specd.internal.v1.Trainer") . -}}
{{- end -}}

{{/* etcd */}}
{{- define "specd.etcdName" -}}
{{- printf "%s-etcd" (include "specd.fullname" .) -}}
{{- end -}}

{{- define "specd.etcdHeadless" -}}
{{- printf "%s-etcd-headless" (include "specd.fullname" .) -}}
{{- end -}}

{{/* The FQDN of etcd member i: (list $ i) */}}
{{- define "specd.etcdMemberHost" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%d.%s.%s.svc.%s" (include "specd.etcdName" $root) (int (index . 1)) (include "specd.etcdHeadless" $root) $root.Release.Namespace $root.Values.clusterDomain -}}
{{- end -}}

{{/* Comma-separated client endpoints (--etcd). */}}
{{- define "specd.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $root := . -}}
{{- $eps := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $eps = append $eps (printf "http://%s:%d" (include "specd.etcdMemberHost" (list $root $i)) (int $root.Values.etcd.clientPort)) -}}
{{- end -}}
{{- join "," $eps -}}
{{- else -}}
{{- join "," .Values.etcd.externalEndpoints -}}
{{- end -}}
{{- end -}}

{{/* terminationGracePeriodSeconds: the preStop sleep, the whole drain, and a margin. */}}
{{- define "specd.gracePeriod" -}}
{{- $c := .Values.common -}}
{{- $sleep := ternary 0 (int $c.preStopSleepSeconds) (eq $c.preStopMode "none") -}}
{{- add $sleep (int $c.drainSecs) (int $c.graceMarginSeconds) -}}
{{- end -}}

{{- define "specd.preStop" -}}
{{- $c := .Values.common -}}
{{- if eq $c.preStopMode "sleep" }}
lifecycle:
  preStop:
    sleep:
      seconds: {{ int $c.preStopSleepSeconds }}
{{- else if eq $c.preStopMode "exec" }}
lifecycle:
  preStop:
    exec:
      command: ["/bin/sleep", {{ int $c.preStopSleepSeconds | toString | quote }}]
{{- end -}}
{{- end -}}

{{/* Anti-affinity for a component: (dict "root" $ "component" "router" "mode" "soft" "affinity" {}) */}}
{{- define "specd.affinity" -}}
{{- if .affinity }}
affinity:
  {{- toYaml .affinity | nindent 2 }}
{{- else if eq .mode "soft" }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "specd.selectorLabels" . | nindent 14 }}
{{- else if eq .mode "hard" }}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "specd.selectorLabels" . | nindent 12 }}
{{- end -}}
{{- end -}}

{{/* The model volume: an emptyDir per pod, or the claim. */}}
{{- define "specd.modelClaim" -}}
{{- default (printf "%s-models" (include "specd.fullname" .)) .Values.modelStore.pvc.existingClaim -}}
{{- end -}}

{{- define "specd.trainerPriorityClass" -}}
{{- if .Values.trainer.priorityClassName -}}
{{- .Values.trainer.priorityClassName -}}
{{- else if .Values.priorityClass.create -}}
{{- default (printf "%s-trainer" (include "specd.fullname" .)) .Values.priorityClass.trainer.name -}}
{{- end -}}
{{- end -}}

{{/*
The pod template of a specd role. Call with
(dict "root" $ "role" "target" "values" .Values.target "args" (list ...) "volumes" (list) "mounts" (list))
*/}}
{{- define "specd.podTemplate" -}}
{{- $root := .root -}}
{{- $v := .values -}}
{{- $role := .role -}}
{{- $port := int (include "specd.grpcPort" $role) -}}
{{- $c := $root.Values.common -}}
{{- $ms := $root.Values.modelStore -}}
metadata:
  labels:
    {{- include "specd.selectorLabels" (dict "root" $root "component" $role) | nindent 4 }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "specd.serviceAccountName" $root }}
  automountServiceAccountToken: false
  # Service links would put SPECD_*-looking variables (SPECD_ETCD_PORT, ...) beside the binary's own.
  enableServiceLinks: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- with .priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ include "specd.gracePeriod" $root }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with include "specd.affinity" (dict "root" $root "component" $role "mode" $v.podAntiAffinity "affinity" $v.affinity) | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $ms.fetch.enabled }}
  initContainers:
    - name: fetch-models
      image: {{ include "specd.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command: ["/usr/local/bin/specd"]
      args: ["models", "fetch", {{ default $root.Values.model.preset $ms.fetch.which | quote }}]
      env:
        # The verified files land here, where --models-dir points.
        - name: SPECD_MODEL_CACHE
          value: {{ $ms.mountPath | quote }}
        - name: HOME
          value: /tmp
        - name: PIP_NO_CACHE_DIR
          value: "1"
      resources:
        {{- toYaml $ms.fetch.resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: models
          mountPath: {{ $ms.mountPath }}
        - name: tmp
          mountPath: /tmp
        # The fetch script links the files it checked here (next to it, in the image's /opt/specd).
        - name: fetch-links
          mountPath: {{ $ms.fetch.linkDir }}
  {{- end }}
  containers:
    - name: {{ $role }}
      image: {{ include "specd.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command: ["/usr/local/bin/specd"]
      {{- /* A flag in extraArgs replaces the chart's own (the binary refuses a flag given twice). */}}
      {{- $overridden := dict }}
      {{- range $v.extraArgs }}
      {{- $_ := set $overridden (regexReplaceAll "=.*$" . "") true }}
      {{- end }}
      args:
        - {{ $role }}
        {{- range .args }}
        {{- if not (hasKey $overridden (regexReplaceAll "=.*$" . "")) }}
        - {{ . | quote }}
        {{- end }}
        {{- end }}
        {{- range $v.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      envFrom:
        - configMapRef:
            name: {{ include "specd.fullname" $root }}
      env:
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        {{- with $c.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: grpc
          containerPort: {{ $port }}
          protocol: TCP
        {{- if eq $role "router" }}
        - name: http
          containerPort: 8080
          protocol: TCP
        {{- else if $root.Values.metrics.enabled }}
        - name: metrics
          containerPort: {{ int $root.Values.metrics.port }}
          protocol: TCP
        {{- end }}
      # Model loading: the gRPC server turns SERVING once the model is loaded and registered in etcd.
      startupProbe:
        grpc:
          port: {{ $port }}
          service: {{ include "specd.healthService" $role }}
        periodSeconds: {{ $v.probes.startup.periodSeconds }}
        failureThreshold: {{ $v.probes.startup.failureThreshold }}
        timeoutSeconds: {{ $v.probes.startup.timeoutSeconds }}
      # NOT_SERVING while draining after SIGTERM.
      readinessProbe:
        grpc:
          port: {{ $port }}
          service: {{ include "specd.healthService" $role }}
        periodSeconds: {{ $v.probes.readiness.periodSeconds }}
        failureThreshold: {{ $v.probes.readiness.failureThreshold }}
        timeoutSeconds: {{ $v.probes.readiness.timeoutSeconds }}
      # The listener stays open through the drain, so a draining pod is not killed before its deadline
      # (a grpc liveness probe would fail on NOT_SERVING).
      livenessProbe:
        tcpSocket:
          port: {{ $port }}
        periodSeconds: {{ $v.probes.liveness.periodSeconds }}
        failureThreshold: {{ $v.probes.liveness.failureThreshold }}
        timeoutSeconds: {{ $v.probes.liveness.timeoutSeconds }}
      {{- with include "specd.preStop" $root | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      resources:
        {{- toYaml $v.resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: models
          mountPath: {{ $ms.mountPath }}
          readOnly: true
        - name: tmp
          mountPath: /tmp
        {{- range .mounts }}
        - {{ toYaml . | nindent 10 | trim }}
        {{- end }}
  volumes:
    - name: models
      {{- if eq $ms.type "pvc" }}
      persistentVolumeClaim:
        claimName: {{ include "specd.modelClaim" $root }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ $ms.emptyDir.sizeLimit }}
      {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: 1Gi
    {{- if $ms.fetch.enabled }}
    - name: fetch-links
      emptyDir:
        sizeLimit: 1Mi
    {{- end }}
    {{- range .volumes }}
    - {{ toYaml . | nindent 6 | trim }}
    {{- end }}
{{- end -}}
