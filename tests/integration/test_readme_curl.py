"""The README's OpenAI-compatible HTTP API examples, run as they are written, against `make run`.

Starts the real `make run` (its default ports) and `make serve-demo-media`, then runs every ```bash block of
the README's "OpenAI-compatible HTTP API" section with bash and its ```python block with the project's
Python, and checks what they print and write. Skipped when one of the default ports is taken (another
`make run` on this machine, for instance): the examples name those ports.
"""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile

from tests.support.stack import REPO_DIR, start_command, stop_process_group

pytestmark = pytest.mark.slow

SECTION = "## OpenAI-compatible HTTP API"
PORTS = {50051: "gateway gRPC", 50061: "worker gRPC", 9400: "gateway metrics", 9401: "worker metrics"}
PORTS |= {8000: "HTTP API", 8088: "demo media"}
START_TIMEOUT_S = 600  # `make run` installs what is missing first


def readme_blocks() -> dict[str, list[str]]:
    text = (REPO_DIR / "README.md").read_text()
    start = text.index(f"\n{SECTION}\n")
    end = text.find("\n## ", start + len(SECTION) + 2)
    section = text[start : end if end > 0 else None]
    blocks: dict[str, list[str]] = {"bash": [], "python": []}
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S):
        blocks.setdefault(lang, []).append(body)
    return blocks


def _busy(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{process.args} exited:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not up after {timeout_s} s:\n{log.read_text(errors='replace')[-4000:]}")


@pytest.fixture(scope="module")
def make_run(tmp_path_factory):
    busy = [f"{port} ({what})" for port, what in PORTS.items() if _busy(port)]
    if busy:
        pytest.skip(f"the README examples use the default ports, and these are taken: {', '.join(busy)}")
    logs = tmp_path_factory.mktemp("make-run")
    run = start_command(["make", "run"], logs / "run.log")
    media = None
    try:
        _wait_http("http://127.0.0.1:8000/health", run, logs / "run.log", START_TIMEOUT_S)
        # Only now: both targets install what is missing first, and two pip runs must not share the venv.
        media = start_command(["make", "serve-demo-media"], logs / "media.log")
        _wait_http("http://127.0.0.1:8088/picture.png", media, logs / "media.log", START_TIMEOUT_S)
        yield logs / "run.log"
    finally:
        stop_process_group(run)
        if media is not None:
            stop_process_group(media)


def _run_bash(block: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{block}\nexit {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def test_readme_has_the_examples():
    blocks = readme_blocks()
    assert len(blocks["bash"]) == 3 and len(blocks["python"]) == 1
    assert all("curl" in block for block in blocks["bash"])


def test_readme_curl_and_sdk_examples_run_verbatim(make_run, tmp_path):
    assert "OpenAI-compatible HTTP API: http://127.0.0.1:8000/v1" in make_run.read_text(errors="replace")
    # The examples run from the repository root, where `make serve-demo-media` wrote demo-media/; here in
    # a scratch directory (they write answer.wav, hello.wav) that links to it.
    (tmp_path / "demo-media").symlink_to(REPO_DIR / "demo-media")
    health_and_models, streamed_image, speech = readme_blocks()["bash"]

    out = _run_bash(health_and_models, tmp_path).stdout.splitlines()
    assert json.loads(out[0]) == {"status": "SERVING"}
    models = json.loads(out[1])
    assert models["object"] == "list" and models["data"][0]["id"].endswith("tiny-qwen2.5-omni")

    lines = [line for line in _run_bash(streamed_image, tmp_path).stdout.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks) and len(chunks) >= 3
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}

    _run_bash(speech, tmp_path)
    samples, rate = soundfile.read(tmp_path / "answer.wav", dtype="float32")
    assert rate == 24000 and len(samples) > 0
    assert np.sqrt(np.mean(samples**2)) > 1e-3, "the spoken answer is not silent"

    (python_example,) = readme_blocks()["python"]
    result = subprocess.run(
        [sys.executable, "-c", python_example], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip(), "the streamed text was printed"
    hello, rate = soundfile.read(io.BytesIO((tmp_path / "hello.wav").read_bytes()), dtype="float32")
    assert rate == 24000 and np.sqrt(np.mean(hello**2)) > 1e-3
