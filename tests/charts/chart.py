"""Rendering the Omnigate chart with the project's own helm, and reading the rendered objects."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_DIR = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_DIR / "charts" / "omnigate"
TOOLS_DIR = REPO_DIR / ".tools"
HELM = TOOLS_DIR / "bin" / "helm"
CRD_MODULES = TOOLS_DIR / "crd-models" / "node_modules"
TESTS_DIR = Path(__file__).resolve().parent

RELEASE = "og"
NAMESPACE = "serving"
GATEWAY = f"{RELEASE}-omnigate-gateway"
WORKER = f"{RELEASE}-omnigate-worker"

# The supported profiles: the chart's defaults and the example value files.
PROFILES = {
    "default": [],
    "cpu-dev": [CHART_DIR / "examples" / "cpu-dev.yaml"],
    "gpu-prod": [CHART_DIR / "examples" / "gpu-prod.yaml"],
    "keda": [CHART_DIR / "examples" / "keda.yaml"],
}
KUBERNETES_VERSIONS = ["1.30.0", "1.35.0"]
CUSTOM_API_GROUPS = ("monitoring.coreos.com/", "keda.sh/", "gateway.networking.k8s.io/")


def missing_tools_reason() -> str | None:
    """Why the chart tests cannot run, or None. The tools come from `make chart-tools`."""
    if not HELM.exists():
        return f"helm is not installed in {HELM.parent} (run `make chart-tools`)"
    return None


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, check=check, timeout=120)


def _set_args(values: dict | None) -> list[str]:
    """--set for strings (helm's own parsing: "true", "4"), --set-json for other values (floats, lists)."""
    args: list[str] = []
    for key, value in (values or {}).items():
        if isinstance(value, str):
            args += ["--set", f"{key}={value}"]
        else:
            args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


def template_args(files=(), set_values=None, release=RELEASE, namespace=NAMESPACE) -> list[str]:
    args = ["template", release, str(CHART_DIR), "--namespace", namespace]
    for f in files:
        args += ["-f", str(f)]
    return args + _set_args(set_values)


@dataclass(frozen=True)
class Rendered:
    """The objects of one `helm template`, with lookups by kind and name."""

    docs: tuple

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str) -> dict:
        found = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
        return found[0]

    def maybe(self, kind: str, name: str) -> dict | None:
        found = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        return found[0] if found else None


def render(files=(), set_values=None, release=RELEASE, namespace=NAMESPACE) -> Rendered:
    out = helm(*template_args(files, set_values, release, namespace)).stdout
    return Rendered(tuple(d for d in yaml.safe_load_all(out) if d))


@functools.cache
def render_profile(profile: str) -> Rendered:
    return render(PROFILES[profile])


# -- pod helpers ----------------------------------------------------------------------------------------


def pod_spec(workload: dict) -> dict:
    return workload["spec"] if workload["kind"] == "Pod" else workload["spec"]["template"]["spec"]


def containers(workload: dict, init: bool = True) -> list[dict]:
    spec = pod_spec(workload)
    return list(spec.get("initContainers", []) if init else []) + list(spec["containers"])


def container(workload: dict, name: str) -> dict:
    (found,) = [c for c in containers(workload) if c["name"] == name]
    return found


def env(container_: dict) -> dict[str, str]:
    """A container's literal environment (valueFrom entries map to None)."""
    return {e["name"]: e.get("value") for e in container_.get("env", [])}


def selects(selector: dict, labels: dict) -> bool:
    """Whether a LabelSelector (matchLabels only, as the chart renders) selects objects with these labels."""
    assert set(selector) <= {"matchLabels"}, f"unexpected selector fields {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def which(name: str) -> str | None:
    return shutil.which(name)
