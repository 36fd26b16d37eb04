"""Model delivery: a shared cache filled once by a Job at a pinned commit, read-only in the workers, on storage
the cluster can give; per-pod caches that ask for the disk they fill."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest

from tests.charts.chart import (
    CHART_DIR,
    KUBERNETES_VERSIONS,
    NAMESPACE,
    RELEASE,
    WORKER,
    container,
    containers,
    env,
    helm,
    pod_labels,
    pod_spec,
    render,
    render_profile,
    selects,
    template_args,
)
from tests.charts.test_egress import HUB, IN_CLUSTER, METADATA, _allowed

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHARED = {
    "worker.modelCache.type": "persistentVolumeClaim",
    "worker.model.revision": COMMIT,
    "worker.modelCache.persistentVolumeClaim.storageClassName": "nfs-rwx",
}
JOB_PREFIX = f"{WORKER}-download-{COMMIT[:12]}"  # then "-" and 8 hex of the Job's spec hash
MODEL_DIR = f"/var/cache/omnigate/models/Qwen/Qwen2.5-Omni-3B/{COMMIT}"


def _render_error(set_values: dict) -> str:
    result = helm(*template_args(set_values=set_values), check=False)
    assert result.returncode != 0, "helm template accepted the values"
    return result.stderr


# -- the download Job ------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["gpu-prod", "keda"])
def test_shared_cache_profiles_download_once_in_a_job_not_in_gpu_pods(profile):
    rendered = render_profile(profile)
    (job,) = rendered.all("Job")
    worker = rendered.one("Deployment", WORKER)
    assert "prefetch-model" not in [c["name"] for c in containers(worker)]
    download = container(job, "download-model")
    revision = env(download)["OMNIGATE_MODEL_REVISION"]
    assert len(revision) == 40 and job["metadata"]["name"].rsplit("-", 1)[0].endswith(revision[:12])
    # The Job writes where the workers read, in a directory named for the commit.
    assert env(download)["OMNIGATE_MODEL_DIR"].endswith(f"/{revision}")
    assert env(container(worker, "worker"))["OMNIGATE_WORKER_MODEL"] == env(download)["OMNIGATE_MODEL_DIR"]
    assert env(container(worker, "worker"))["HF_HUB_OFFLINE"] == "1"
    # Both mount the same claim.
    claim = lambda w: [v for v in pod_spec(w)["volumes"] if v["name"] == "model-cache"][0]  # noqa: E731
    assert claim(job) == claim(worker)
    # No GPU for the download.
    assert not any("nvidia.com/gpu" in str(c.get("resources")) for c in containers(job))
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)


def test_the_job_downloads_the_pinned_commit_and_writes_a_marker_the_workers_wait_for():
    rendered = render(set_values={**SHARED, "worker.model.hfTokenSecret.name": "hf"})
    (job,) = rendered.all("Job")
    assert re.fullmatch(re.escape(JOB_PREFIX) + "-[0-9a-f]{8}", job["metadata"]["name"])
    download = container(job, "download-model")
    assert env(download)["OMNIGATE_MODEL_REVISION"] == COMMIT
    assert env(download)["OMNIGATE_MODEL_DIR"] == MODEL_DIR
    marker = env(download)["OMNIGATE_MODEL_MARKER"]
    assert marker.startswith(MODEL_DIR + "/")
    script = download["command"][-1]
    assert "snapshot_download" in script and "revision=revision" in script and "marker" in script
    (token,) = [e for e in download["env"] if e["name"] == "HF_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "HF_TOKEN"}
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 4 and job["spec"]["activeDeadlineSeconds"] == 7200
    assert pod_spec(job)["automountServiceAccountToken"] is False
    worker = rendered.one("Deployment", WORKER)
    wait = container(worker, "wait-for-model")
    assert pod_spec(worker)["initContainers"] == [wait]
    assert env(wait)["OMNIGATE_MODEL_MARKER"] == marker
    assert env(wait)["OMNIGATE_DOWNLOAD_JOB"] == JOB_PREFIX


def _job_and_worker_template(values: dict) -> tuple[str, dict]:
    rendered = render(set_values={**SHARED, **values})
    (job,) = rendered.all("Job")
    return job["metadata"]["name"], rendered.one("Deployment", WORKER)["spec"]["template"]


@pytest.mark.parametrize(
    "change",
    [
        {"worker.image.tag": "0.1.1"},
        {"worker.modelDownload.resources.limits.memory": "16Gi"},
        {"worker.model.hfTokenSecret.name": "another-token"},
        {"worker.modelDownload.backoffLimit": "6"},
    ],
)
def test_any_change_to_the_job_is_a_new_job_so_helm_upgrade_is_never_refused_as_immutable(change):
    # Kubernetes refuses a change to a Job's spec.template ("field is immutable"): the name carries a hash
    # of the spec, so a changed Job is a new object (it finds the marker and exits at once).
    name, worker = _job_and_worker_template({})
    changed_name, changed_worker = _job_and_worker_template(change)
    assert changed_name != name and changed_name.startswith(JOB_PREFIX + "-")
    assert len(changed_name) <= 63
    if "image" not in str(change) and "hfToken" not in str(change):  # the Job's own settings
        assert changed_worker == worker  # do not roll the GPU workers
    assert _job_and_worker_template({})[0] == name  # stable across renders


def test_a_new_commit_is_a_new_job_and_a_new_directory():
    other = "fedcba9876543210fedcba9876543210fedcba98"
    rendered = render(set_values={**SHARED, "worker.model.revision": other})
    (job,) = rendered.all("Job")
    assert job["metadata"]["name"].startswith(f"{WORKER}-download-{other[:12]}-")
    assert not job["metadata"]["name"].startswith(JOB_PREFIX)
    assert env(container(job, "download-model"))["OMNIGATE_MODEL_DIR"].endswith(f"/{other}")


def test_per_pod_caches_and_local_models_have_no_job():
    for values in ({}, {"worker.modelCache.type": "ephemeral"}, {**SHARED, "worker.model.localPath": "/m/q"}):
        assert render(set_values=values).all("Job") == [], values


def test_job_name_fits_63_characters_with_a_long_release_name():
    rendered = render(set_values=SHARED, release="a-very-long-release-name-that-fills-the-budget")
    (job,) = rendered.all("Job")
    assert len(job["metadata"]["name"]) <= 63 and re.search(
        f"-{COMMIT[:12]}-[0-9a-f]{{8}}$", job["metadata"]["name"]
    )


# -- pinned revision -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("revision", ["main", "v1.0", "0123456789abcdef", COMMIT.upper()])
def test_shared_cache_refuses_a_revision_that_is_not_a_commit(revision):
    error = _render_error({**SHARED, "worker.model.revision": revision})
    assert f'worker.model.revision="{revision}" is not a commit' in error
    assert "40-hex commit" in error


def test_per_pod_cache_accepts_a_branch():
    worker = render(set_values={"worker.model.revision": "main"}).one("Deployment", WORKER)
    assert env(container(worker, "prefetch-model"))["OMNIGATE_MODEL_REVISION"] == "main"


# -- read-only cache -----------------------------------------------------------------------------------------


def _cache_mount(c: dict) -> dict:
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "model-cache"]
    return mount


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"worker.modelCache.type": "ephemeral"},
        SHARED,
        {"worker.model.localPath": "/var/cache/omnigate/m"},
    ],
    ids=["emptyDir", "ephemeral", "shared", "localPath"],
)
def test_workers_mount_the_cache_read_only(values):
    worker = render(set_values=values).one("Deployment", WORKER)
    main = container(worker, "worker")
    assert _cache_mount(main).get("readOnly") is True
    assert env(main)["HF_HUB_OFFLINE"] == "1"
    assert env(main)["HF_MODULES_CACHE"].startswith("/tmp/")  # remote code is copied to a writable place
    if "prefetch-model" in [c["name"] for c in containers(worker)]:
        assert not _cache_mount(container(worker, "prefetch-model")).get("readOnly")  # the one writer


@pytest.mark.parametrize("profile", ["default", "cpu-dev", "gpu-prod", "keda"])
def test_every_profile_mounts_the_cache_read_only_in_the_worker(profile):
    worker = render_profile(profile).one("Deployment", WORKER)
    assert _cache_mount(container(worker, "worker")).get("readOnly") is True


def test_a_worker_that_downloads_itself_keeps_a_writable_cache():
    worker = render(set_values={"worker.prefetch.enabled": "false"}).one("Deployment", WORKER)
    assert not _cache_mount(container(worker, "worker")).get("readOnly")


# -- storage the cluster can give ----------------------------------------------------------------------------


def test_read_write_many_without_a_storage_class_is_refused_with_what_to_set():
    error = _render_error({**SHARED, "worker.modelCache.persistentVolumeClaim.storageClassName": ""})
    assert "ReadWriteMany with an empty storageClassName" in error
    assert "worker.modelCache.persistentVolumeClaim.storageClassName" in error
    assert "existingClaim" in error and "modelCache.type=ephemeral" in error


def test_an_existing_claim_needs_no_storage_class():
    values = {
        **SHARED,
        "worker.modelCache.persistentVolumeClaim.storageClassName": "",
        "worker.modelCache.persistentVolumeClaim.existingClaim": "models",
    }
    rendered = render(set_values=values)
    assert rendered.maybe("PersistentVolumeClaim", f"{WORKER}-model-cache") is None
    volume = [v for v in pod_spec(rendered.all("Job")[0])["volumes"] if v["name"] == "model-cache"][0]
    assert volume["persistentVolumeClaim"]["claimName"] == "models"


@pytest.mark.parametrize("storage_class", ["", "gp3"])
def test_a_created_read_write_once_claim_is_refused_even_for_one_worker(storage_class):
    # The Job (CPU node) and the worker (GPU node) mount it, and a rollout surges a second worker: a disk
    # that attaches to one node at a time would leave one of them waiting for the other for good.
    values = {
        **SHARED,
        "worker.modelCache.persistentVolumeClaim.storageClassName": storage_class,
        "worker.modelCache.persistentVolumeClaim.accessModes": ["ReadWriteOnce"],
    }
    error = _render_error(values)
    assert "must include ReadWriteMany" in error and "modelCache.type=ephemeral" in error
    # An existing claim is the operator's to choose.
    existing = {**values, "worker.modelCache.persistentVolumeClaim.existingClaim": "models"}
    assert render(set_values=existing).all("Job")


def test_a_created_read_only_many_claim_is_refused_with_the_alternative():
    error = _render_error({**SHARED, "worker.modelCache.persistentVolumeClaim.accessModes": ["ReadOnlyMany"]})
    assert "ReadOnlyMany" in error and "existingClaim" in error and "worker.model.localPath" in error


@pytest.mark.parametrize("profile", ["gpu-prod", "keda"])
def test_shared_profiles_name_a_storage_class(profile):
    claim = render_profile(profile).one("PersistentVolumeClaim", f"{WORKER}-model-cache")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    assert claim["spec"]["storageClassName"]


# -- ephemeral storage of the emptyDir cache -----------------------------------------------------------------


def test_emptydir_cache_requests_the_ephemeral_storage_it_fills():
    worker = render(
        set_values={
            "worker.modelCache.emptyDir.sizeLimit": "100Gi",
            "worker.tmpSizeLimit": "4Gi",
            "worker.modelCache.emptyDir.ephemeralStorageMargin": "2Gi",
        }
    ).one("Deployment", WORKER)
    resources = container(worker, "worker")["resources"]
    assert (
        resources["requests"]["ephemeral-storage"] == resources["limits"]["ephemeral-storage"] == "108544Mi"
    )


@pytest.mark.parametrize("profile", ["default", "cpu-dev"])
def test_emptydir_profiles_request_ephemeral_storage(profile):
    resources = container(render_profile(profile).one("Deployment", WORKER), "worker")["resources"]
    assert resources["requests"]["ephemeral-storage"].endswith("Mi")


def test_an_explicit_ephemeral_storage_is_kept_and_claims_ask_for_none():
    worker = render(set_values={"worker.resources.requests.ephemeral-storage": "200Gi"}).one(
        "Deployment", WORKER
    )
    assert container(worker, "worker")["resources"]["requests"]["ephemeral-storage"] == "200Gi"
    for values in ({"worker.modelCache.type": "ephemeral"}, SHARED):
        resources = container(render(set_values=values).one("Deployment", WORKER), "worker")["resources"]
        assert "ephemeral-storage" not in resources.get("requests", {})


# -- the Job's egress ----------------------------------------------------------------------------------------


def test_the_job_reaches_dns_and_the_hub_over_https_only():
    rendered = render(set_values=SHARED)
    policy = rendered.one("NetworkPolicy", "og-omnigate-model-download-egress")
    assert policy["spec"]["policyTypes"] == ["Egress"]
    assert selects(
        policy["spec"]["podSelector"], rendered.all("Job")[0]["spec"]["template"]["metadata"]["labels"]
    )
    assert not selects(policy["spec"]["podSelector"], pod_labels(rendered.one("Deployment", WORKER)))
    for address in HUB:
        assert _allowed(policy, address, 443) and not _allowed(policy, address, 80)
    for port in (80, 443):
        assert not _allowed(policy, METADATA, port)
    for address in IN_CLUSTER:
        assert not _allowed(policy, address, 443) and not _allowed(policy, address, 6443)
    assert any(p["port"] == 53 for r in policy["spec"]["egress"] for p in r["ports"])
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(policy, version, strict=True)


def test_with_a_job_the_workers_lose_their_hub_access():
    policy = render(set_values=SHARED).one("NetworkPolicy", f"{WORKER}-egress")
    for address in HUB:
        assert not _allowed(policy, address, 443)


def test_without_a_shared_cache_there_is_no_job_policy():
    assert render().maybe("NetworkPolicy", "og-omnigate-model-download-egress") is None


# -- release notes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", ["default", "gpu-prod"])
def test_notes_point_at_the_download_job_when_there_is_one(profile):
    from tests.charts.chart import CHART_DIR, NAMESPACE, PROFILES, RELEASE

    args = ["install", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, "--dry-run=client"]
    for f in PROFILES[profile]:
        args += ["-f", str(f)]
    notes = helm(*args).stdout.split("NOTES:", 1)[1]
    has_job = f"logs -f job/{WORKER}-download-" in notes
    assert has_job == (profile == "gpu-prod")
    assert ("each one downloads" in notes) == (profile == "default")


@pytest.mark.parametrize("values", [SHARED, {}])  # the shared cache's Job; the per-pod prefetch
def test_worker_extra_env_reaches_the_download_a_mirror_or_proxy_needs_it(values):
    extra = {"worker.extraEnv": [{"name": "HF_ENDPOINT", "value": "https://hub-mirror.internal"}]}
    rendered = render(set_values={**values, **extra})
    jobs = rendered.all("Job")
    download = (
        container(jobs[0], "download-model")
        if jobs
        else container(rendered.one("Deployment", WORKER), "prefetch-model")
    )
    assert env(download)["HF_ENDPOINT"] == "https://hub-mirror.internal"
    assert (
        env(container(rendered.one("Deployment", WORKER), "worker"))["HF_ENDPOINT"]
        == "https://hub-mirror.internal"
    )


def test_the_notes_warn_when_per_pod_downloads_follow_a_branch():
    def notes(*set_args: str) -> str:
        args = ["install", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, "--dry-run=client", *set_args]
        return helm(*args).stdout.split("NOTES:", 1)[1]

    assert "worker.model.revision=main is not a commit" in notes()  # the default: per-pod caches, main
    assert "is not a commit" not in notes("--set", f"worker.model.revision={COMMIT}")
    assert "is not a commit" not in notes("--set", "worker.model.localPath=/models/q")
