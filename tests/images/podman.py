"""Building and running the images with podman on a machine with no registry access and no Docker engine.

No base image can be pulled here, so the tests make one: a minimal Debian bookworm root filesystem with
python3 (debootstrap), imported into podman's storage. It stays there, so later runs skip the ~40 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[2]
CONTAINERS_CONF = REPO_DIR / "charts" / "tools" / "containers.conf"
BASE_IMAGE = "localhost/omnigate-test-base:bookworm"
DEBIAN_MIRROR = os.environ.get("OMNIGATE_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def missing_reason() -> str | None:
    """Why images cannot be built here, or None. `make test` installs the tools (.ci/system-tools) and runs
    the image tests with the rest.

    (They once ran only in a pytest process of their own: inside the full run, podman builds were seen
    hanging on a plain COPY with buildah's copier spinning at 100 % CPU. Most likely that was the real-time
    scheduling policy the test media's AV1 encoder gave the whole test run, which every process started
    later inherited; media_factory now restores it and tests/conftest.py fails the step that changes it.
    Builds after media-encoding tests in one process were seen to run normally since.)
    """
    for tool in ("podman", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (`make test` installs podman, buildah, runc and debootstrap as root)"
    if os.geteuid() != 0:
        return "building a debootstrap base image needs root"
    return None


def env() -> dict[str, str]:
    """A small, explicit environment for podman.

    Inside the full test run (after other tests imported torch, started servers, ...), podman builds
    were seen hanging with buildah's copier processes spinning at 100 % CPU on a plain `COPY`; with a
    clean environment and a session of their own they behave as when run by hand.
    """
    conf = Path(os.environ.get("CONTAINERS_CONF", CONTAINERS_CONF)).resolve()  # podman's helpers chdir
    keep = ("PATH", "HOME", "LANG", "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY")
    return {**{k: os.environ[k] for k in keep if k in os.environ}, "CONTAINERS_CONF": str(conf)}


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
        env=env(),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def image_exists(ref: str) -> bool:
    return podman("image", "exists", ref, check=False).returncode == 0


def ensure_base_image() -> float:
    """Makes BASE_IMAGE unless it exists; returns the seconds it took (0 when it was there)."""
    if image_exists(BASE_IMAGE):
        return 0.0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="omnigate-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-venv,ca-certificates",
                "bookworm",
                str(rootfs),
                DEBIAN_MIRROR,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        # What an image does not need: package caches and lists, documentation, translations.
        for path in (
            "var/cache/apt/archives",
            "var/lib/apt/lists",
            "usr/share/doc",
            "usr/share/man",
            "usr/share/locale",
            "usr/share/info",
        ):
            shutil.rmtree(rootfs / path, ignore_errors=True)
            (rootfs / path).mkdir(parents=True, exist_ok=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["podman", "import", "--change", 'CMD ["/bin/bash"]', "-", BASE_IMAGE],
            stdin=tar.stdout,
            check=True,
            capture_output=True,
            timeout=300,
            env=env(),
            start_new_session=True,
        )
        tar.wait(timeout=60)
    return time.monotonic() - started


def pip_cert_args() -> list[str]:
    """The host's CA bundle as the build secret `pip_cert` (pip inside the build trusts the same CAs)."""
    for candidate in (os.environ.get("PIP_CERT"), "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return ["--secret", f"id=pip_cert,src={candidate}"]
    return []


def stage_context(dest: Path) -> Path:
    """A copy of what .dockerignore lets into the build context (pyproject.toml, protos/, services/).

    Building from this snapshot instead of the working tree keeps the build away from files that other
    processes create and delete meanwhile (test caches, __pycache__ in .venv): buildah's context copier
    was seen spinning for minutes on such a tree.
    """
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copy2(REPO_DIR / "pyproject.toml", dest / "pyproject.toml")
    shutil.copy2(REPO_DIR / ".dockerignore", dest / ".dockerignore")
    shutil.copytree(REPO_DIR / "protos", dest / "protos", ignore=ignore)
    shutil.copytree(REPO_DIR / "services", dest / "services", ignore=ignore)
    for generated in ("gateway", "worker"):  # made again from protos/ in the build
        shutil.rmtree(dest / "services" / "shared" / "omnigate" / generated, ignore_errors=True)
    return dest


def build(dockerfile: str, tag: str, build_args: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    args = ["build", "--network=host", "--pull=never", "-f", str(REPO_DIR / dockerfile), "-t", tag]
    for key, value in build_args.items():
        args += ["--build-arg", f"{key}={value}"]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="omnigate-context-") as tmp:
        context = stage_context(Path(tmp))
        result = podman(*args, *pip_cert_args(), str(context), check=False, timeout=900)
    return time.monotonic() - started, result


def inspect(ref: str) -> dict:
    import json

    (info,) = json.loads(podman("image", "inspect", ref).stdout)
    return info
