"""The chart lints, renders, and validates against the Kubernetes and CRD schemas; bad values are refused."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from tests.charts.chart import (
    CHART_DIR,
    CRD_MODULES,
    CUSTOM_API_GROUPS,
    KUBERNETES_VERSIONS,
    PROFILES,
    REPO_DIR,
    TESTS_DIR,
    helm,
    render_profile,
    template_args,
)

BAD_VALUES = sorted((TESTS_DIR / "bad-values").glob("*.yaml"))


@pytest.mark.parametrize("profile", PROFILES)
def test_helm_lint_strict_passes(profile):
    args = ["lint", "--strict", str(CHART_DIR)]
    for f in PROFILES[profile]:
        args += ["-f", str(f)]
    result = helm(*args, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("profile", PROFILES)
def test_rendered_objects_validate_strictly_against_kubernetes(profile, version):
    docs = render_profile(profile).docs
    builtin = [d for d in docs if not d["apiVersion"].startswith(CUSTOM_API_GROUPS)]
    assert {"Deployment", "Service", "NetworkPolicy", "Pod"} <= {d["kind"] for d in builtin}
    for doc in builtin:
        # Raises ValidationError on unknown fields, wrong types and missing required fields.
        kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validation_catches_a_broken_manifest():
    """The schema check above can fail: a typo in a probe is an error."""
    worker = json.loads(json.dumps(render_profile("default").one("Deployment", "og-omnigate-worker")))
    worker["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {"port": 50061}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(worker, KUBERNETES_VERSIONS[0], strict=True)


def _custom_resources(docs) -> list[dict]:
    return [d for d in docs if d["apiVersion"].startswith(CUSTOM_API_GROUPS)]


def _crd_check(docs: list[dict], tmp_path) -> list[str]:
    """Errors of the CRD schema check (ajv, through kubernetes-models) and of the type check (tsc)."""
    if shutil.which("node") is None or not CRD_MODULES.is_dir():
        pytest.skip("node and the CRD models are needed (`make chart-tools` installs the models with npm)")
    result = subprocess.run(
        ["node", str(TESTS_DIR / "validate_crds.mjs"), str(CRD_MODULES)],
        input=json.dumps(docs),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    errors = [f"{r['kind']}/{r['name']}: {r['error']}" for r in json.loads(result.stdout) if not r["ok"]]

    # tsc: object literals typed with the models' interfaces, so that unknown fields are errors too (the
    # CRD schemas accept them and the API server would silently prune them).
    sources = {
        "ServiceMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor",
        "PodMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor",
        "PrometheusRule": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule",
        "ScaledObject": "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject",
        "HTTPRoute": "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/HTTPRoute",
        "GRPCRoute": "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/GRPCRoute",
    }
    lines = [f'import type {{ I{k} }} from "{CRD_MODULES / v}.js";' for k, v in sources.items()]
    lines += [f"export const doc{i}: I{d['kind']} = {json.dumps(d)};" for i, d in enumerate(docs)]
    source = tmp_path / "custom_resources.ts"
    source.write_text("\n".join(lines) + "\n")
    tsc = subprocess.run(
        [
            str(CRD_MODULES / ".bin" / "tsc"),
            "--noEmit",
            "--strict",
            "--skipLibCheck",
            "--target",
            "es2022",
            "--module",
            "nodenext",
            "--moduleResolution",
            "nodenext",
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors += [line for line in tsc.stdout.splitlines() if "error TS" in line]
    return errors


def test_custom_resources_validate_against_their_crds(tmp_path):
    docs = []
    for profile in PROFILES:
        docs += _custom_resources(render_profile(profile).docs)
    # The PodMonitor variant too (the profiles use ServiceMonitors).
    docs += _custom_resources(
        _render_set({"metrics.podMonitor.enabled": "true", "metrics.prometheusRule.enabled": "true"})
    )
    # The Gateway API routes (off in every profile).
    docs += _custom_resources(
        _render_set(
            {
                "gateway.httpRoute": {"enabled": True, "parentRefs": [{"name": "public", "namespace": "gw"}]},
                "gateway.grpcRoute": {
                    "enabled": True,
                    "parentRefs": [{"name": "public", "sectionName": "grpc"}],
                    "hostnames": ["api.example.com"],
                },
            }
        )
    )
    assert {d["kind"] for d in docs} == {
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "ScaledObject",
        "HTTPRoute",
        "GRPCRoute",
    }
    assert _crd_check(docs, tmp_path) == []


def test_crd_validation_catches_wrong_types_and_unknown_fields(tmp_path):
    """The CRD checks above can fail: a wrong type and an unknown field are both reported."""
    (scaled,) = render_profile("keda").all("ScaledObject")
    (monitor, *_) = render_profile("gpu-prod").all("ServiceMonitor")
    wrong_type = json.loads(json.dumps(scaled))
    wrong_type["spec"]["minReplicaCount"] = "zero"
    unknown_field = json.loads(json.dumps(monitor))
    unknown_field["spec"]["endpoints"][0]["intervall"] = "15s"
    errors = _crd_check([wrong_type, unknown_field], tmp_path)
    assert any("minReplicaCount" in e for e in errors), errors
    assert any("intervall" in e for e in errors), errors


def _render_set(values: dict) -> list[dict]:
    out = helm(*template_args(set_values=values)).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _expected_error(path) -> str:
    match = re.search(r"^# expect: (.+)$", path.read_text(), re.M)
    assert match, f"{path.name} needs an `# expect: <part of the error>` line"
    return match.group(1).strip()


@pytest.mark.parametrize("values_file", BAD_VALUES, ids=[p.stem for p in BAD_VALUES])
def test_invalid_values_are_rejected(values_file):
    expected = _expected_error(values_file)
    lint = helm("lint", "--strict", str(CHART_DIR), "-f", str(values_file), check=False)
    # Schema errors fail the lint. Cross-field checks are template `fail`s, which helm lint only logs
    # (lint tolerates `fail`); `helm template` and `helm install` stop on them.
    assert lint.returncode != 0 or expected in lint.stderr, f"helm lint accepted {values_file.name}"
    template = helm(*template_args([values_file]), check=False)
    assert template.returncode != 0, f"helm template accepted {values_file.name}"
    assert expected in template.stderr, template.stderr


def test_there_are_several_bad_value_files():
    assert len(BAD_VALUES) >= 8


def test_config_schema_matches_the_services_settings():
    """values.schema.json accepts exactly the OMNIGATE_* settings the services have (`make chart-schema`)."""
    result = subprocess.run(
        [sys.executable, str(REPO_DIR / "charts" / "tools" / "sync_config_schema.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_every_value_is_documented():
    """Every value of values.yaml has a comment above it, or sits inside a block that has one."""
    lines = [(n, line) for n, line in enumerate((CHART_DIR / "values.yaml").read_text().splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    key_re = re.compile(r"^(\s*)(- )?([A-Za-z0-9_.\"'/-]+):(.*)$")
    undocumented = []
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    for i, (number, line) in enumerate(lines):
        match = key_re.match(line)
        if not match or line.lstrip().startswith("#"):
            continue
        indent = len(match.group(1)) + (2 if match.group(2) else 0)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        previous = lines[i - 1][1].strip() if i else ""
        documented = previous.startswith("#") or any(doc for _, doc in stack)
        following = next((text for _, text in lines[i + 1 :] if not text.lstrip().startswith("#")), "")
        nested_keys = bool(key_re.match(following)) and (len(following) - len(following.lstrip()) > indent)
        is_leaf = match.group(4).strip() != "" or not nested_keys
        if is_leaf and not documented:
            undocumented.append(f"line {number}: {line.strip()}")
        stack.append((indent, documented))
    assert undocumented == []
