"""Rollout deadlines follow the workers' start-up budget, so a slow model load is not a failed rollout."""

from __future__ import annotations

import re

import pytest

from tests.charts.chart import (
    CHART_DIR,
    GATEWAY,
    NAMESPACE,
    PROFILES,
    RELEASE,
    WORKER,
    helm,
    render,
    render_profile,
    template_args,
)


@pytest.mark.parametrize("profile", PROFILES)
def test_worker_rollout_deadline_covers_the_startup_probe_and_a_margin(profile):
    rendered = render_profile(profile)
    worker = rendered.one("Deployment", WORKER)
    startup = next(c for c in worker["spec"]["template"]["spec"]["containers"] if c["name"] == "worker")[
        "startupProbe"
    ]
    allowance = startup["periodSeconds"] * startup["failureThreshold"]
    # Kubernetes' default (600 s) would fail any rollout whose model load takes longer than 10 minutes.
    # With a shared cache, a new commit's workers also wait for the download Job (its activeDeadlineSeconds).
    jobs = rendered.all("Job")
    download = jobs[0]["spec"]["activeDeadlineSeconds"] if jobs else 0
    assert worker["spec"]["progressDeadlineSeconds"] == allowance + 600 + download
    gateway = rendered.one("Deployment", GATEWAY)
    readiness = next(c for c in gateway["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway")[
        "readinessProbe"
    ]
    if readiness.get("grpc", {}).get("service", "") == "":  # a gateway is ready only once a worker is
        assert gateway["spec"]["progressDeadlineSeconds"] == worker["spec"]["progressDeadlineSeconds"]
    else:
        assert gateway["spec"]["progressDeadlineSeconds"] == 600


def test_default_deadline_is_forty_minutes_and_follows_the_probe_and_margin():
    assert render_profile("default").one("Deployment", WORKER)["spec"]["progressDeadlineSeconds"] == 2400
    rendered = render(
        set_values={
            "worker.startupProbe.periodSeconds": 20,
            "worker.startupProbe.failureThreshold": 270,  # 90 minutes for a very large model
            "worker.progressDeadlineMarginSeconds": 1200,
        }
    )
    assert rendered.one("Deployment", WORKER)["spec"]["progressDeadlineSeconds"] == 5400 + 1200
    # A gateway is ready without a worker (its readiness does not follow them): Kubernetes' default.
    assert rendered.one("Deployment", GATEWAY)["spec"]["progressDeadlineSeconds"] == 600
    rendered = render(
        set_values={
            "worker.startupProbe.periodSeconds": 20,
            "worker.startupProbe.failureThreshold": 270,
            "worker.progressDeadlineMarginSeconds": 1200,
            "gateway.readinessProbe.followWorkers": "true",
        }
    )
    assert rendered.one("Deployment", GATEWAY)["spec"]["progressDeadlineSeconds"] == 5400 + 1200


def test_deadlines_can_be_set_explicitly():
    rendered = render(
        set_values={"worker.progressDeadlineSeconds": 7200, "gateway.progressDeadlineSeconds": 3600}
    )
    assert rendered.one("Deployment", WORKER)["spec"]["progressDeadlineSeconds"] == 7200
    assert rendered.one("Deployment", GATEWAY)["spec"]["progressDeadlineSeconds"] == 3600


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"worker.progressDeadlineSeconds": 600},
            "worker.progressDeadlineSeconds (600) is not above the startup probe's allowance",
        ),
        (
            {"gateway.progressDeadlineSeconds": 900, "gateway.readinessProbe.followWorkers": "true"},
            "gateway.progressDeadlineSeconds (900) is not above the workers' start-up allowance",
        ),
    ],
)
def test_a_deadline_shorter_than_the_startup_allowance_is_refused(values, message):
    result = helm(*template_args(set_values=values), check=False)
    assert result.returncode != 0
    assert message in result.stderr


@pytest.mark.parametrize(
    "values",
    [
        {},  # the default: readiness does not follow the workers
        {"gateway.readinessProbe.type": "tcpSocket"},
        {"gateway.readinessProbe.type": "tcpSocket", "gateway.readinessProbe.followWorkers": "true"},
        {"gateway.readinessProbe.enabled": "false", "gateway.readinessProbe.followWorkers": "true"},
    ],
)
def test_a_short_gateway_deadline_is_fine_when_readiness_does_not_wait_for_workers(values):
    rendered = render(set_values={"gateway.progressDeadlineSeconds": 300, **values})
    assert rendered.one("Deployment", GATEWAY)["spec"]["progressDeadlineSeconds"] == 300


def _notes(*set_args: str) -> str:
    args = ["install", RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, "--dry-run=client", *set_args]
    return helm(*args).stdout.split("NOTES:", 1)[1]


def test_notes_wait_for_the_rollout_until_done_or_past_its_deadline():
    # No --timeout: it would count the whole rollout (which grows with the pods), where Kubernetes' deadline
    # counts time without progress; kubectl fails on its own once the deadline has passed.
    notes = _notes()
    assert f"rollout status deployment/{WORKER}\n" in notes
    assert f"rollout status deployment/{GATEWAY}\n" in notes
    assert "rollout status" in notes and not re.search(r"rollout status \S+ --timeout", notes)
    assert "(2400 s for the workers, 600 s for the gateways)" in notes
    assert "ready as soon as they listen" in notes
    notes = _notes("--set", "gateway.readinessProbe.followWorkers=true")
    assert "(2400 s for the workers, 2400 s for the gateways)" in notes
    assert "ready only while a worker is" in notes


def test_a_shared_cache_adds_the_download_jobs_deadline_to_the_workers():
    shared = {
        "worker.modelCache.type": "persistentVolumeClaim",
        "worker.model.revision": "0123456789abcdef0123456789abcdef01234567",
        "worker.modelCache.persistentVolumeClaim.storageClassName": "nfs-rwx",
        "worker.modelDownload.activeDeadlineSeconds": 3600,
    }
    rendered = render(set_values=shared)
    assert rendered.one("Deployment", WORKER)["spec"]["progressDeadlineSeconds"] == 2400 + 3600
