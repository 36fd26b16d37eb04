{{/*
Names, labels and derived values shared by the templates. Names are truncated to 63 characters (the
DNS label limit of Kubernetes names and label values).
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "omnigate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The release prefix of every object: fullnameOverride, or "<release>-<chart>" (just "<release>" when the
release name already contains the chart name).
*/}}
{{- define "omnigate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Object names of the components ("-gateway" and "-worker" are kept whole: the prefix is shortened). */}}
{{- define "omnigate.gateway.fullname" -}}
{{- printf "%s-gateway" (include "omnigate.fullname" . | trunc 55 | trimSuffix "-") -}}
{{- end -}}
{{- define "omnigate.worker.fullname" -}}
{{- printf "%s-worker" (include "omnigate.fullname" . | trunc 56 | trimSuffix "-") -}}
{{- end -}}

{{/* The gateway's metrics-only ClusterIP Service, rendered when the main Service is not ClusterIP. */}}
{{- define "omnigate.gateway.metricsServiceName" -}}
{{- printf "%s-gateway-metrics" (include "omnigate.fullname" . | trunc 47 | trimSuffix "-") -}}
{{- end -}}

{{/* chart label value: name-version. */}}
{{- define "omnigate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "omnigate.labels" -}}
helm.sh/chart: {{ include "omnigate.chart" . }}
{{ include "omnigate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: omnigate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels that identify the release's pods (never change them: Deployment selectors are immutable). */}}
{{- define "omnigate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "omnigate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Component labels: call with (dict "ctx" $ "component" "gateway"). */}}
{{- define "omnigate.componentLabels" -}}
{{ include "omnigate.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}
{{- define "omnigate.componentSelectorLabels" -}}
{{ include "omnigate.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
Labels of a component's pod template: the object labels without helm.sh/chart and app.kubernetes.io/version.
A change to the pod template rolls every pod (each worker reloading its model), so it carries only what
pods must change for: a chart bump that edits an alert must not restart the fleet, and a new version
reaches the pods through the image reference. Call with (dict "ctx" $ "component" "worker").
*/}}
{{- define "omnigate.podLabels" -}}
{{ include "omnigate.componentSelectorLabels" . }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: omnigate
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
The ServiceAccount a component's pods run as: (dict "ctx" $ "component" "gateway"|"worker"). One per
component (the worker's also runs the model download), so an identity meant for the model store (a
workload-identity annotation) never reaches the internet-facing gateways; serviceAccount.name, when set, is
the one account of every pod.
*/}}
{{- define "omnigate.serviceAccountName" -}}
{{- $sa := .ctx.Values.serviceAccount -}}
{{- if $sa.name -}}
{{- $sa.name -}}
{{- else if $sa.create -}}
{{- include (printf "omnigate.%s.fullname" .component) .ctx -}}
{{- else -}}
default
{{- end -}}
{{- end -}}

{{/* An image reference from an image block: call with (dict "image" .Values.gateway.image "ctx" $). */}}
{{- define "omnigate.image" -}}
{{- $repo := .image.repository -}}
{{- if .image.registry -}}{{- $repo = printf "%s/%s" .image.registry .image.repository -}}{{- end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repo .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The gateway's worker target: the headless worker Service through gRPC's DNS resolver, which returns the
address of every ready worker pod (the gateway connects to pods, not to a virtual IP).
*/}}
{{- define "omnigate.worker.dnsName" -}}
{{- printf "%s.%s.svc.%s" (include "omnigate.worker.fullname" .) .Release.Namespace .Values.clusterDomain -}}
{{- end -}}
{{- define "omnigate.worker.target" -}}
{{- printf "dns:///%s:%d" (include "omnigate.worker.dnsName" .) (int .Values.worker.ports.grpc) -}}
{{- end -}}

{{/*
Where the worker loads the model from. A shared cache (modelCache.type=persistentVolumeClaim) is filled once
by the model download Job (templates/worker/model-download-job.yaml) at a pinned commit, under a path that
contains the commit, and the workers only read it. A per-pod cache (emptyDir, ephemeral) has no volume a Job
could fill, so each pod downloads its own copy in the prefetch-model initContainer.
*/}}
{{- define "omnigate.worker.sharedCache" -}}
{{- if and (eq .Values.worker.modelCache.type "persistentVolumeClaim") (not .Values.worker.model.localPath) -}}true{{- end -}}
{{- end -}}
{{- define "omnigate.worker.prefetchEnabled" -}}
{{- if and .Values.worker.prefetch.enabled (not .Values.worker.model.localPath) (not (include "omnigate.worker.sharedCache" .)) -}}true{{- end -}}
{{- end -}}
{{- define "omnigate.worker.prefetchDir" -}}
{{- printf "%s/models/%s" .Values.worker.modelCache.mountPath .Values.worker.model.id -}}
{{- end -}}
{{/* The shared cache's copy of the model: one directory per commit, never rewritten once complete. */}}
{{- define "omnigate.worker.downloadDir" -}}
{{- printf "%s/models/%s/%s" .Values.worker.modelCache.mountPath .Values.worker.model.id .Values.worker.model.revision -}}
{{- end -}}
{{/* Written by the Job after the last file: workers wait for it, a rerun of the Job skips the download. */}}
{{- define "omnigate.worker.downloadMarker" -}}
{{- printf "%s/.omnigate-download-complete" (include "omnigate.worker.downloadDir" .) -}}
{{- end -}}
{{/* One Job per commit: a new revision is a new Job (a Job's pod template cannot be changed in place). */}}
{{/* The download Job's name: the commit, then a hash of its spec (templates/_download_job.tpl). */}}
{{- define "omnigate.worker.downloadJobPrefix" -}}
{{- printf "%s-download-%s" (include "omnigate.worker.fullname" . | trunc 32 | trimSuffix "-") (.Values.worker.model.revision | trunc 12) -}}
{{- end -}}
{{- define "omnigate.worker.downloadJobName" -}}
{{- printf "%s-%s" (include "omnigate.worker.downloadJobPrefix" .) (include "omnigate.worker.downloadJobSpec" . | sha256sum | trunc 8) -}}
{{- end -}}
{{/* The worker runs offline on a copy it only reads: the cache is mounted read-only. */}}
{{- define "omnigate.worker.cacheReadOnly" -}}
{{- if or .Values.worker.model.localPath (include "omnigate.worker.sharedCache" .) (include "omnigate.worker.prefetchEnabled" .) -}}true{{- end -}}
{{- end -}}
{{- define "omnigate.worker.modelSource" -}}
{{- if .Values.worker.model.localPath -}}
{{- .Values.worker.model.localPath -}}
{{- else if include "omnigate.worker.sharedCache" . -}}
{{- include "omnigate.worker.downloadDir" . -}}
{{- else if include "omnigate.worker.prefetchEnabled" . -}}
{{- include "omnigate.worker.prefetchDir" . -}}
{{- else -}}
{{- .Values.worker.model.id -}}
{{- end -}}
{{- end -}}
{{/*
ephemeral-storage of the worker container with an emptyDir cache: the cache's and /tmp's size limits (both
emptyDirs count against the pod's ephemeral storage) plus worker.modelCache.emptyDir.ephemeralStorageMargin
for logs, in Mi, so the scheduler places the pod on a node whose disk can hold the model.
*/}}
{{- define "omnigate.worker.ephemeralStorage" -}}
{{- $w := .Values.worker -}}
{{- $bytes := addf (include "omnigate.quantityBytes" $w.modelCache.emptyDir.sizeLimit | float64) (include "omnigate.quantityBytes" $w.tmpSizeLimit | float64) (include "omnigate.quantityBytes" $w.modelCache.emptyDir.ephemeralStorageMargin | float64) -}}
{{- printf "%dMi" (divf $bytes 1048576.0 | ceil | int64) -}}
{{- end -}}

{{/*
terminationGracePeriodSeconds of a component: preStop sleep + the service's drain + a margin, so the
kubelet never kills a process that is still finishing requests. Call with a component's `drain` block.
*/}}
{{- define "omnigate.terminationGracePeriodSeconds" -}}
{{- add .preStopSleepSeconds .graceSeconds .terminationMarginSeconds -}}
{{- end -}}

{{/*
Prometheus label matchers of a component's series. The monitors set `job` to the component's Service
name (ServiceMonitor by default, PodMonitor through a relabeling), so every query and alert selects
exactly this release's pods. Call with (dict "ctx" $ "component" "worker").
*/}}
{{- define "omnigate.metricSelector" -}}
{{- $svc := ternary (include "omnigate.worker.fullname" .ctx) (include "omnigate.gateway.fullname" .ctx) (eq .component "worker") -}}
{{- printf "namespace=%q,job=%q" .ctx.Release.Namespace $svc -}}
{{- end -}}

{{/*
One OMNIGATE_* environment variable from a config map entry. Numbers are rendered with toJson so that
large integers do not turn into 1e+08 notation.
*/}}
{{- define "omnigate.configEnv" -}}
{{- range $key, $value := .config }}
- name: {{ printf "%s%s" $.prefix (upper $key) }}
  value: {{ ternary $value (toJson $value) (kindIs "string" $value) | quote }}
{{- end }}
{{- end -}}

{{/*
Topology spread constraints of a component, a `topologySpreadConstraints:` block or nothing: call with
(dict "ctx" $ "component" "worker" "values" .Values.worker).
*/}}
{{- define "omnigate.topologySpreadConstraints" -}}
{{- if .values.topologySpreadConstraints -}}
topologySpreadConstraints:
  {{- toYaml .values.topologySpreadConstraints | nindent 2 }}
{{- else if .values.topologySpread.enabled -}}
topologySpreadConstraints:
{{- range .values.topologySpread.topologyKeys }}
  - maxSkew: {{ $.values.topologySpread.maxSkew }}
    topologyKey: {{ . }}
    whenUnsatisfiable: {{ $.values.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "omnigate.componentSelectorLabels" (dict "ctx" $.ctx "component" $.component) | nindent 8 }}
    # Count only the pods of the same rollout, so an update does not skew the spread.
    matchLabelKeys:
      - pod-template-hash
{{- end }}
{{- end -}}
{{- end -}}

{{/*
The worker's start-up budget in seconds: the startup probe's allowance (periodSeconds x failureThreshold,
the longest model load and warm-up) plus worker.progressDeadlineMarginSeconds (scheduling, image pull and
the prefetch download, which run before the probe starts).
*/}}
{{- define "omnigate.worker.startupAllowanceSeconds" -}}
{{- mul (int .Values.worker.startupProbe.periodSeconds) (int .Values.worker.startupProbe.failureThreshold) -}}
{{- end -}}
{{- define "omnigate.worker.startupBudgetSeconds" -}}
{{- add (include "omnigate.worker.startupAllowanceSeconds" . | int) (int .Values.worker.progressDeadlineMarginSeconds) -}}
{{- end -}}

{{/*
progressDeadlineSeconds of the Deployments. The worker's defaults to its start-up budget, so a rollout is
declared failed only once a new pod has overrun everything it is allowed; with a shared cache that
includes the download Job's activeDeadlineSeconds (a new commit's workers wait for it). The gateway's
defaults to the same while its readiness follows the workers (gateway.readinessProbe.followWorkers: a
gateway is ready only once a worker is, so a first install waits for a model load), else to Kubernetes'
600 s.
*/}}
{{- define "omnigate.worker.progressDeadlineSeconds" -}}
{{- if gt (int .Values.worker.progressDeadlineSeconds) 0 -}}
{{- int .Values.worker.progressDeadlineSeconds -}}
{{- else if include "omnigate.worker.sharedCache" . -}}
{{- /* A new commit's workers wait for the download Job, which may run its whole activeDeadlineSeconds. */ -}}
{{- add (include "omnigate.worker.startupBudgetSeconds" . | int) (int .Values.worker.modelDownload.activeDeadlineSeconds) -}}
{{- else -}}
{{- include "omnigate.worker.startupBudgetSeconds" . -}}
{{- end -}}
{{- end -}}
{{/* "true" when the gateway's readiness probe follows the workers (gRPC health service ""), else "". */}}
{{- define "omnigate.gateway.readinessFollowsWorkers" -}}
{{- $r := .Values.gateway.readinessProbe -}}
{{- if and $r.enabled (eq $r.type "grpc") $r.followWorkers -}}true{{- end -}}
{{- end -}}
{{- define "omnigate.gateway.progressDeadlineSeconds" -}}
{{- $g := .Values.gateway -}}
{{- if gt (int $g.progressDeadlineSeconds) 0 -}}
{{- int $g.progressDeadlineSeconds -}}
{{- else if include "omnigate.gateway.readinessFollowsWorkers" . -}}
{{- include "omnigate.worker.progressDeadlineSeconds" . -}}
{{- else -}}
600
{{- end -}}
{{- end -}}

{{/* A PodDisruptionBudget's budget (one line) from a `pdb` block. */}}
{{- define "omnigate.pdbBudget" -}}
{{- if not (eq (toString .minAvailable) "") -}}
minAvailable: {{ .minAvailable }}
{{- else -}}
maxUnavailable: {{ .maxUnavailable }}
{{- end -}}
{{- end -}}

{{/* Bytes of a Kubernetes memory quantity ("16Gi", "512Mi", "1G", "1073741824"), as a float. */}}
{{- define "omnigate.quantityBytes" -}}
{{- $q := toString . -}}
{{- $units := dict "Ki" 1024.0 "Mi" 1048576.0 "Gi" 1073741824.0 "Ti" 1099511627776.0 "Pi" 1125899906842624.0 "k" 1000.0 "M" 1000000.0 "G" 1000000000.0 "T" 1000000000000.0 "P" 1000000000000000.0 -}}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $q -}}
{{- $unit := trimPrefix $num $q -}}
{{- if and $unit (not (hasKey $units $unit)) -}}
{{- fail (printf "memory quantity %q: unknown unit %q (use Ki, Mi, Gi, Ti, k, M, G or T)" $q $unit) -}}
{{- end -}}
{{- mulf (float64 $num) (ternary (get $units $unit) 1.0 (ne $unit "")) -}}
{{- end -}}

{{/* Seconds of a Prometheus duration ("1h30m", "90s", "500ms"), as an integer. */}}
{{- define "omnigate.durationSeconds" -}}
{{- $units := dict "ms" 0 "s" 1 "m" 60 "h" 3600 "d" 86400 "w" 604800 "y" 31536000 -}}
{{- $total := 0 -}}
{{- range regexFindAll "[0-9]+(ms|s|m|h|d|w|y)" (toString .) -1 -}}
{{- $n := regexFind "^[0-9]+" . | int -}}
{{- $total = add $total (mul $n (get $units (trimPrefix (toString $n) .))) -}}
{{- end -}}
{{- $total -}}
{{- end -}}

{{/* Cross-field checks the JSON schema cannot express; each failure says what to change. */}}
{{- define "omnigate.validate" -}}
{{- $w := .Values.worker -}}
{{- if and $w.autoscaling.enabled $w.keda.enabled -}}
{{- fail "worker.autoscaling.enabled and worker.keda.enabled are both true: KEDA creates its own HPA for the workers and two autoscalers would fight over the replica count; enable only one" -}}
{{- end -}}
{{- if and $w.keda.enabled $w.keda.scaleToZero (include "omnigate.gateway.readinessFollowsWorkers" .) -}}
{{- fail "worker.keda.scaleToZero needs gateway.readinessProbe.followWorkers=false: a gateway whose readiness follows the workers is out of rotation while there are none, so no request would reach a gateway and nothing would wake the workers up" -}}
{{- end -}}
{{- $workerTargets := add (ternary 1 0 (gt (float64 $w.autoscaling.targetInFlightRequestsPerPod) 0.0)) (ternary 1 0 (gt (float64 $w.autoscaling.targetQueueDepthPerPod) 0.0)) -}}
{{- if and $w.autoscaling.enabled (eq (int $workerTargets) 0) -}}
{{- fail "worker.autoscaling needs targetInFlightRequestsPerPod or targetQueueDepthPerPod above 0: the worker HPA would have no metric" -}}
{{- end -}}
{{- if and $w.keda.enabled (eq (int $workerTargets) 0) (not $w.keda.scaleToZero) -}}
{{- fail "worker.keda needs worker.autoscaling.targetInFlightRequestsPerPod or targetQueueDepthPerPod above 0 (or scaleToZero): the ScaledObject would have no trigger" -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled -}}
{{- fail "metrics.serviceMonitor.enabled and metrics.podMonitor.enabled are both true: every pod would be scraped twice; enable only one" -}}
{{- end -}}
{{- $maxWorkers := ternary (int $w.autoscaling.maxReplicas) (int $w.replicaCount) (or $w.autoscaling.enabled $w.keda.enabled) -}}
{{- $pvc := $w.modelCache.persistentVolumeClaim -}}
{{- if and (include "omnigate.worker.sharedCache" .) (not (regexMatch "^[0-9a-f]{40}$" (toString $w.model.revision))) -}}
{{- fail (printf "worker.model.revision=%q is not a commit: the shared model cache (modelCache.type=persistentVolumeClaim) is filled once by the download Job and read by every worker, so it must be pinned; set worker.model.revision to the model repository's 40-hex commit (the \"Files and versions\" history on the hub, or `hf api` / huggingface_hub.model_info(id, revision=...).sha)" (toString $w.model.revision)) -}}
{{- end -}}
{{- if and (eq $w.modelCache.type "persistentVolumeClaim") (not $pvc.existingClaim) (has "ReadWriteMany" $pvc.accessModes) (not $pvc.storageClassName) -}}
{{- fail "worker.modelCache.persistentVolumeClaim asks for ReadWriteMany with an empty storageClassName: the cluster's default StorageClass would be used, and the defaults of EKS, GKE and AKS are single-node block storage, so the claim and every worker would stay Pending. Set worker.modelCache.persistentVolumeClaim.storageClassName to a class that provides ReadWriteMany (EFS, Filestore, Azure Files, NFS, CephFS), or give an existing claim (worker.modelCache.persistentVolumeClaim.existingClaim), or use modelCache.type=ephemeral (a ReadWriteOnce claim per pod, each pod downloading its copy); see the operator guide, \"Model delivery\"" -}}
{{- end -}}
{{- if and (eq $w.modelCache.type "persistentVolumeClaim") (not $pvc.existingClaim) (not $w.model.localPath) (has "ReadOnlyMany" $pvc.accessModes) -}}
{{- fail "worker.modelCache.persistentVolumeClaim.accessModes has ReadOnlyMany: the download Job must write the claim the chart creates (use ReadWriteMany); for a volume filled beforehand and mounted ReadOnlyMany, give it as existingClaim and point worker.model.localPath at the model in it" -}}
{{- end -}}
{{- if and (eq $w.modelCache.type "persistentVolumeClaim") (not $pvc.existingClaim) (not $w.model.localPath) (not (has "ReadOnlyMany" $pvc.accessModes)) (not (has "ReadWriteMany" $pvc.accessModes)) -}}
{{- fail (printf "worker.modelCache.type=persistentVolumeClaim is shared by the download Job and every worker, so its accessModes must include ReadWriteMany (with a storageClassName that provides it). A ReadWriteOnce disk attaches to one node at a time: the Job (on a CPU node) could not write it while a worker holds it, and a rollout's new worker could not mount it while the old one runs, whatever the number of workers (%d here). Use modelCache.type=ephemeral (a ReadWriteOnce claim per pod, each pod downloading its copy), or an existingClaim" (int $maxWorkers)) -}}
{{- end -}}
{{- if and .Values.tls.enabled (not (and .Values.tls.workerSecretName .Values.tls.gatewaySecretName)) -}}
{{- fail "tls.enabled needs tls.workerSecretName and tls.gatewaySecretName (Secrets with tls.crt, tls.key and ca.crt)" -}}
{{- end -}}
{{- if and .Values.gateway.tls.enabled (not .Values.gateway.tls.secretName) -}}
{{- fail "gateway.tls.enabled needs gateway.tls.secretName (a Secret with tls.crt, tls.key and ca.crt)" -}}
{{- end -}}
{{- if and .Values.gateway.tls.clientAuth (not .Values.gateway.tls.enabled) -}}
{{- fail "gateway.tls.clientAuth needs gateway.tls.enabled" -}}
{{- end -}}
{{- if and .Values.gateway.tls.clientAuth .Values.tests.enabled -}}
{{- fail "gateway.tls.clientAuth requires client certificates, which the helm test pod does not have: set tests.enabled=false" -}}
{{- end -}}
{{- if and .Values.auth.existingSecret .Values.tests.enabled (not .Values.tests.apiKeySecret.name) -}}
{{- fail "auth.existingSecret makes the gateway require API keys: give the helm test pod one (tests.apiKeySecret.name and .key, a Secret holding one raw key) or set tests.enabled=false" -}}
{{- end -}}
{{- $allowance := include "omnigate.worker.startupAllowanceSeconds" . | int -}}
{{- if and (gt (int $w.progressDeadlineSeconds) 0) (le (int $w.progressDeadlineSeconds) $allowance) -}}
{{- fail (printf "worker.progressDeadlineSeconds (%d) is not above the startup probe's allowance (worker.startupProbe.periodSeconds x failureThreshold = %d s): every rollout whose workers take their allowed start-up time would be reported as failed; raise it or leave it 0 (derived)" (int $w.progressDeadlineSeconds) $allowance) -}}
{{- end -}}
{{- $g := .Values.gateway -}}
{{- if and (gt (int $g.progressDeadlineSeconds) 0) (include "omnigate.gateway.readinessFollowsWorkers" .) (le (int $g.progressDeadlineSeconds) $allowance) -}}
{{- fail (printf "gateway.progressDeadlineSeconds (%d) is not above the workers' start-up allowance (%d s): with gateway.readinessProbe.followWorkers a gateway is ready only once a worker is, so a first install would be reported as failed; raise it or leave it 0 (derived)" (int $g.progressDeadlineSeconds) $allowance) -}}
{{- end -}}
{{- $memLimit := dig "limits" "memory" "" $w.resources -}}
{{- if and $w.shm.enabled $memLimit -}}
{{- if ge (include "omnigate.quantityBytes" $w.shm.sizeLimit | float64) (include "omnigate.quantityBytes" $memLimit | float64) -}}
{{- fail (printf "worker.shm.sizeLimit (%s) is not below the worker's memory limit (%s): /dev/shm is memory-backed and counted against that limit, so a full /dev/shm would leave the worker nothing and it would be OOM-killed; lower shm.sizeLimit or raise resources.limits.memory" (toString $w.shm.sizeLimit) (toString $memLimit)) -}}
{{- end -}}
{{- end -}}
{{- $noReady := .Values.metrics.prometheusRule.noReadyWorkers -}}
{{- if and .Values.metrics.prometheusRule.enabled $noReady.enabled $noReady.for (le (include "omnigate.durationSeconds" $noReady.for | int) $allowance) -}}
{{- fail (printf "metrics.prometheusRule.noReadyWorkers.for (%s) is not longer than the workers' startup probe allowance (%d s): every first install, scale from zero or slow model load would page; make it longer or leave it empty (derived)" $noReady.for $allowance) -}}
{{- end -}}
{{- $ing := .Values.gateway.ingress -}}
{{- if and $ing.enabled (not $ing.hosts) -}}
{{- fail "gateway.ingress.enabled needs at least one entry in gateway.ingress.hosts (host may be empty for any host, with its paths)" -}}
{{- end -}}
{{- range $r := list "httpRoute" "grpcRoute" -}}
{{- if and (index $.Values.gateway $r).enabled (not (index $.Values.gateway $r).parentRefs) -}}
{{- fail (printf "gateway.%s.enabled needs gateway.%s.parentRefs: the Gateway(s) the route attaches to, e.g. [{name: public, namespace: gateway-system}]" $r $r) -}}
{{- end -}}
{{- end -}}
{{- range $c := list "gateway" "worker" -}}
{{- $v := index $.Values $c -}}
{{- $ownVolumes := ternary (list "tmp" "model-cache" "dshm" "tls") (list "tmp" "tls" "public-tls" "api-keys") (eq $c "worker") -}}
{{- range $v.extraVolumes -}}
{{- if has .name $ownVolumes -}}
{{- fail (printf "%s.extraVolumes: the name %q is one of the chart's own volumes (%s); choose another" $c .name (join ", " $ownVolumes)) -}}
{{- end -}}
{{- end -}}
{{- $ownContainers := ternary (list "worker" "prefetch-model" "wait-for-model") (list "gateway") (eq $c "worker") -}}
{{- range concat $v.initContainers $v.extraContainers -}}
{{- if has .name $ownContainers -}}
{{- fail (printf "%s.initContainers/extraContainers: the name %q is taken by the chart's own container; choose another" $c .name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $c := list "gateway" "worker" -}}
{{- $a := (index $.Values $c).autoscaling -}}
{{- if gt (int $a.minReplicas) (int $a.maxReplicas) -}}
{{- fail (printf "%s.autoscaling.minReplicas (%d) is above maxReplicas (%d)" $c (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The egress rule to the OTLP collector (tracing.otlpEndpoint's port; anywhere but the link-local range). */}}
{{- define "omnigate.networkPolicy.otlpRule" -}}
{{- with .Values.tracing.otlpEndpoint }}
{{- $host := (urlParse .).host }}
{{- $port := ternary (regexFind "[0-9]+$" $host) "4317" (contains ":" $host) }}
    # The OTLP collector (tracing.otlpEndpoint's port; anywhere but the metadata address and link-local range).
    - to:
        - ipBlock:
            cidr: 0.0.0.0/0
            except:
              - 169.254.0.0/16
      ports:
        - port: {{ $port }}
          protocol: TCP
{{- end }}
{{- end -}}

{{/* "true" when a container's resources give Guaranteed QoS: cpu and memory limits, requests equal or unset. */}}
{{- define "omnigate.guaranteedResources" -}}
{{- $limits := .limits | default dict -}}
{{- $requests := .requests | default dict -}}
{{- $ok := true -}}
{{- range $r := list "cpu" "memory" -}}
{{- if not (hasKey $limits $r) -}}
{{- $ok = false -}}
{{- else if and (hasKey $requests $r) (ne (toString (get $requests $r)) (toString (get $limits $r))) -}}
{{- $ok = false -}}
{{- end -}}
{{- end -}}
{{- if $ok -}}true{{- end -}}
{{- end -}}
