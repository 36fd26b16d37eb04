"""Pod templates change only when pods must: a chart release that edits an alert does not restart the fleet."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

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
)


def _render_chart(chart_dir, files=()) -> dict:
    args = ["template", RELEASE, str(chart_dir), "--namespace", NAMESPACE]
    for f in files:
        args += ["-f", str(f)]
    docs = [d for d in yaml.safe_load_all(helm(*args).stdout) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def _chart_copy(tmp_path, **fields) -> tuple:
    """A copy of the chart with Chart.yaml fields replaced (version: "0.9.9", ...)."""
    copy = tmp_path / "omnigate"
    shutil.copytree(CHART_DIR, copy)
    chart_yaml = (copy / "Chart.yaml").read_text()
    for field, value in fields.items():
        chart_yaml, n = re.subn(rf"^{field}: .*$", f"{field}: {value}", chart_yaml, flags=re.M)
        assert n == 1, field
    (copy / "Chart.yaml").write_text(chart_yaml)
    return copy


@pytest.mark.parametrize("profile", ["default", "gpu-prod", "keda"])
def test_bumping_only_the_chart_version_leaves_the_pod_templates_unchanged(profile, tmp_path):
    before = _render_chart(CHART_DIR, PROFILES[profile])
    after = _render_chart(_chart_copy(tmp_path, version="99.1.0"), PROFILES[profile])
    for name in (WORKER, GATEWAY):
        old, new = before[("Deployment", name)], after[("Deployment", name)]
        # The objects themselves do carry the new chart label (the test would be vacuous otherwise) ...
        assert old["metadata"]["labels"]["helm.sh/chart"] != new["metadata"]["labels"]["helm.sh/chart"]
        # ... but the pod template, whose every change rolls the pods (each worker reloading its model), does not.
        assert old["spec"]["template"] == new["spec"]["template"], name


def test_a_new_app_version_with_a_pinned_image_does_not_roll_the_workers(tmp_path):
    pinned = tmp_path / "pinned.yaml"
    pinned.write_text(
        yaml.safe_dump({"worker": {"image": {"tag": "1.0.0"}}, "gateway": {"image": {"tag": "1.0.0"}}})
    )
    before = _render_chart(CHART_DIR, [pinned])
    after = _render_chart(_chart_copy(tmp_path, appVersion='"9.9.9"'), [pinned])
    assert (
        before[("Deployment", WORKER)]["spec"]["template"]
        == after[("Deployment", WORKER)]["spec"]["template"]
    )


@pytest.mark.parametrize("profile", PROFILES)
def test_pod_labels_keep_the_selector_labels_and_drop_the_version_labels(profile):
    rendered = render_profile(profile)
    for name in (WORKER, GATEWAY):
        deployment = rendered.one("Deployment", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert "helm.sh/chart" not in labels
        assert "app.kubernetes.io/version" not in labels
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert labels["app.kubernetes.io/part-of"] == "omnigate"


def test_common_labels_still_reach_the_pods():
    rendered = render(set_values={"commonLabels": {"team": "ml-serving"}})
    for name in (WORKER, GATEWAY):
        assert (
            rendered.one("Deployment", name)["spec"]["template"]["metadata"]["labels"]["team"] == "ml-serving"
        )
