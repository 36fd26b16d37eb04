{{/*
The download Job's spec (templates/worker/model-download-job.yaml). Its hash is part of the Job's name
("omnigate.worker.downloadJobName"): a Job's pod template cannot change, so any change makes a new Job.
*/}}
{{- define "omnigate.worker.downloadJobSpec" -}}
{{- $w := .Values.worker -}}
{{- $d := $w.modelDownload -}}
backoffLimit: {{ $d.backoffLimit }}
activeDeadlineSeconds: {{ $d.activeDeadlineSeconds }}
template:
  metadata:
    labels:
      {{- include "omnigate.podLabels" (dict "ctx" . "component" "model-download") | nindent 6 }}
  spec:
    restartPolicy: Never
    serviceAccountName: {{ include "omnigate.serviceAccountName" (dict "ctx" . "component" "worker") }}
    automountServiceAccountToken: false
    {{- with .Values.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    securityContext:
      {{- toYaml .Values.podSecurityContext | nindent 6 }}
    {{- with $d.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with $d.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    containers:
      - name: download-model
        image: {{ include "omnigate.image" (dict "image" $w.image "ctx" .) }}
        imagePullPolicy: {{ $w.image.pullPolicy }}
        securityContext:
          {{- toYaml .Values.containerSecurityContext | nindent 10 }}
        {{- if $d.command }}
        command:
          {{- toYaml $d.command | nindent 10 }}
        {{- else }}
        command:
          - python
          - -c
          - |
            import os
            from huggingface_hub import snapshot_download
            repo, revision = os.environ["OMNIGATE_MODEL_ID"], os.environ["OMNIGATE_MODEL_REVISION"]
            target, marker = os.environ["OMNIGATE_MODEL_DIR"], os.environ["OMNIGATE_MODEL_MARKER"]
            if os.path.exists(marker):
                print(f"model {repo}@{revision} already in {target}")
            else:
                snapshot_download(repo_id=repo, revision=revision, local_dir=target)
                with open(marker, "w") as f:
                    f.write(f"{repo}@{revision}\n")
                print(f"model {repo}@{revision} downloaded into {target}")
        {{- end }}
        env:
          - name: OMNIGATE_MODEL_ID
            value: {{ $w.model.id | quote }}
          - name: OMNIGATE_MODEL_REVISION
            value: {{ $w.model.revision | quote }}
          - name: OMNIGATE_MODEL_DIR
            value: {{ include "omnigate.worker.downloadDir" . | quote }}
          - name: OMNIGATE_MODEL_MARKER
            value: {{ include "omnigate.worker.downloadMarker" . | quote }}
          - name: HF_HOME
            value: {{ printf "%s/huggingface" $w.modelCache.mountPath | quote }}
          - name: HF_HUB_DISABLE_TELEMETRY
            value: "1"
          - name: HOME
            value: /tmp
          {{- with $w.model.hfTokenSecret.name }}
          - name: HF_TOKEN
            valueFrom:
              secretKeyRef:
                name: {{ . }}
                key: {{ $w.model.hfTokenSecret.key }}
          {{- end }}
          {{- with $w.extraEnv }}
          # worker.extraEnv reaches the download too (a hub mirror HF_ENDPOINT, HTTPS_PROXY, ...).
          {{- toYaml . | nindent 10 }}
          {{- end }}
        resources:
          {{- toYaml $d.resources | nindent 10 }}
        volumeMounts:
          - name: tmp
            mountPath: /tmp
          - name: model-cache
            mountPath: {{ $w.modelCache.mountPath }}
    volumes:
      - name: tmp
        emptyDir:
          sizeLimit: {{ $w.tmpSizeLimit }}
      - name: model-cache
        persistentVolumeClaim:
          claimName: {{ default (printf "%s-model-cache" (include "omnigate.worker.fullname" .)) $w.modelCache.persistentVolumeClaim.existingClaim }}
{{- end -}}
