"""The operator guide's commands work word for word with the chart's defaults and profiles.

Every ``helm`` and ``kubectl`` line of the guide's code blocks is read from docs/operator-guide.md and
checked as far as it can be without a cluster:

- ``helm install``: run as written (with ``--dry-run=client``), ``my-values.yaml`` being each profile;
- ``helm upgrade --reuse-values``: rendered over each profile's values (what the release holds);
- ``kubectl rollout status``: the Deployment exists, and a ``--timeout`` is not shorter than its
  ``progressDeadlineSeconds`` (else kubectl gives up on a rollout Kubernetes still calls healthy);
- ``kubectl scale``: the Deployment exists and no autoscaler owns its count in the profile;
- ``kubectl create secret``: run as written (``--dry-run=client -o yaml``); the keys file it makes must
  parse with the gateway's own parser, and the helm test key must be one of its keys;
- ``helm test``: the release has a test hook.

A helm or kubectl command the guide gains that this file does not know fails the test.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess

import pytest
import yaml

from omnigate_gateway.auth import parse_keys
from tests.charts.chart import CHART_DIR, HELM, PROFILES, REPO_DIR, TOOLS_DIR, Rendered, helm, pod_spec

GUIDE = REPO_DIR / "docs" / "operator-guide.md"
RELEASE = "omnigate"  # the guide's release and namespace
NAMESPACE = "omnigate"
DURATION = re.compile(r"^(\d+)(s|m|h)$")


def _guide_commands() -> list[str]:
    """The guide's shell lines inside ``` blocks, continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"^ *```[a-z]*\n(.*?)^ *```", GUIDE.read_text(), re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                commands.append(line)
    return commands


COMMANDS = _guide_commands()


def _ours(prefix: str) -> list[str]:
    return [c for c in COMMANDS if c.startswith(prefix)]


def _profile_args(profile: str) -> list[str]:
    return [arg for f in PROFILES[profile] for arg in ("-f", str(f))]


def _render(args: list[str]) -> Rendered:
    out = helm("template", *args).stdout
    return Rendered(tuple(d for d in yaml.safe_load_all(out) if d))


def _installed(profile: str) -> Rendered:
    return _render([RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, *_profile_args(profile)])


def test_the_guide_has_the_commands_an_operator_needs_and_no_unchecked_one():
    known = ("helm install ", "helm upgrade ", "helm test ", "kubectl -n omnigate ")
    for command in COMMANDS:
        if command.startswith(("helm", "kubectl")):
            assert command.startswith(known), f"a guide command this test does not check: {command}"
    kubectl = [c.split()[3] for c in _ours("kubectl -n omnigate ")]
    assert {"rollout", "scale", "create"} <= set(kubectl), kubectl
    assert _ours("helm install ") and _ours("helm upgrade ") and _ours("helm test ")


# Each install command; one naming `my-values.yaml` (the operator's copy of a profile) with each profile.
INSTALLS = [
    (command, profile)
    for command in _ours("helm install ")
    for profile in (PROFILES if "my-values.yaml" in command.split() else [None])
]


@pytest.mark.parametrize(("command", "profile"), INSTALLS)
def test_helm_install_runs_as_written(command, profile):
    args = command.split()[1:]
    if profile is not None:
        i = args.index("my-values.yaml")
        args[i - 1 : i + 1] = _profile_args(profile)
    result = subprocess.run(
        [str(HELM), *args, "--dry-run=client"], cwd=REPO_DIR, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert f'release "{RELEASE}"' in result.stdout and "rollout status" in result.stdout


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("command", _ours("helm upgrade "))
def test_helm_upgrade_with_reused_values_renders_over_each_profile(command, profile):
    args = command.split()[2:]
    assert args[:4] == [RELEASE, "charts/omnigate", "-n", NAMESPACE] and "--reuse-values" in args, command
    sets = [a for i, a in enumerate(args) if i and args[i - 1] == "--set"]
    set_args = [x for s in sets for x in ("--set", s)]
    rendered = _render(
        [RELEASE, str(CHART_DIR), "--namespace", NAMESPACE, *_profile_args(profile), *set_args]
    )
    if "auth.existingSecret=omnigate-api-keys" in sets:  # the keys reach the gateway and the helm test pod
        gateway = rendered.one("Deployment", f"{RELEASE}-gateway")
        secrets = [v["secret"]["secretName"] for v in pod_spec(gateway)["volumes"] if "secret" in v]
        assert "omnigate-api-keys" in secrets
        (test_pod,) = rendered.all("Pod")
        key_refs = [
            e["valueFrom"]["secretKeyRef"]
            for c in pod_spec(test_pod)["containers"]
            for e in c.get("env", [])
            if e["name"] == "OMNIGATE_API_KEY"
        ]
        assert key_refs == [{"name": "omnigate-test-key", "key": "api-key"}]


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("command", _ours("kubectl -n omnigate rollout status "))
def test_rollout_status_waits_as_long_as_the_rollout_may_take(command, profile):
    (target,) = [a for a in command.split() if a.startswith("deployment/")]
    deployment = _installed(profile).one("Deployment", target.split("/", 1)[1])
    assert deployment["spec"]["progressDeadlineSeconds"] > 0
    # Without --timeout kubectl waits until the rollout is done or Kubernetes declares it stuck (past
    # progressDeadlineSeconds); a timeout counts the whole rollout, so it would have to cover all of it.
    for timeout in [a.split("=", 1)[1] for a in command.split() if a.startswith("--timeout=")]:
        number, unit = DURATION.fullmatch(timeout).groups()  # type: ignore[union-attr]
        seconds = int(number) * {"s": 1, "m": 60, "h": 3600}[unit]
        assert seconds >= deployment["spec"]["progressDeadlineSeconds"], (profile, deployment["spec"])


@pytest.mark.parametrize("command", _ours("kubectl -n omnigate scale "))
def test_kubectl_scale_names_a_deployment_whose_count_no_autoscaler_owns_by_default(command):
    (target,) = [a for a in command.split() if a.startswith("deployment/")]
    installed = _installed("default")
    name = target.split("/", 1)[1]
    installed.one("Deployment", name)
    owners = [h["spec"]["scaleTargetRef"]["name"] for h in installed.all("HorizontalPodAutoscaler")]
    assert name not in owners


def test_the_api_key_secrets_are_made_as_written_and_parse_with_the_gateways_parser():
    lines = [c for c in COMMANDS if c.startswith(("TEST_KEY=", "kubectl -n omnigate create secret"))]
    assert len(lines) == 3, lines
    script = "\n".join(
        line + " --dry-run=client -o yaml && echo ---" if line.startswith("kubectl") else line
        for line in lines
    )
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PATH": f"{TOOLS_DIR / 'bin'}:{os.environ['PATH']}"},
    )
    assert result.returncode == 0, result.stderr
    secrets = {d["metadata"]["name"]: d for d in yaml.safe_load_all(result.stdout) if d}
    keys_file = base64.b64decode(secrets["omnigate-api-keys"]["data"]["api-keys"]).decode()
    keys, problems = parse_keys(keys_file)
    assert problems == [] and len(keys) == 3, problems
    test_key = base64.b64decode(secrets["omnigate-test-key"]["data"]["api-key"]).decode()
    # The helm test pod's key is the gateway's key "helm-test" (the parser keys them by their digest).
    (probe,) = parse_keys(f"probe:{test_key}")[0]
    assert keys[probe].name == "helm-test"


@pytest.mark.parametrize("command", _ours("helm test "))
def test_helm_test_has_a_test_hook_to_run(command):
    assert command.split()[2:4] == [RELEASE, "-n"]
    hooks = [p for p in _installed("default").all("Pod") if p["metadata"]["annotations"].get("helm.sh/hook")]
    assert [p["metadata"]["annotations"]["helm.sh/hook"] for p in hooks] == ["test"]
