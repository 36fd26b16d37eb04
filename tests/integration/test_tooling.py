"""Standard tooling works against the services: grpcurl (reflection, health, a call) and the omnigate CLI."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from tests.support import media_factory

pytestmark = pytest.mark.slow

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
OMNIGATE = str(Path(sys.executable).parent / "omnigate")


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def test_grpcurl_lists_services_and_health_is_serving(omni_stack):
    listed = _run(GRPCURL, "-plaintext", omni_stack.gateway.target, "list")
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    assert "omnigate.gateway.v1.GatewayService" in services and "grpc.health.v1.Health" in services
    health = _run(GRPCURL, "-plaintext", omni_stack.gateway.target, "grpc.health.v1.Health/Check")
    assert json.loads(health.stdout)["status"] == "SERVING"
    worker = _run(GRPCURL, "-plaintext", omni_stack.worker.target, "list")
    assert "omnigate.worker.v1.WorkerService" in worker.stdout.split()


def test_grpcurl_generate_streams_json_events(omni_stack):
    request = {
        "messages": [{"role": "user", "content": [{"text": "Hello"}]}],
        "parameters": {"max_new_tokens": 4},
        "generation_mode": "GENERATION_MODE_TEXT",
    }
    out = _run(
        GRPCURL,
        "-plaintext",
        "-d",
        json.dumps(request),
        omni_stack.gateway.target,
        "omnigate.gateway.v1.GatewayService/Generate",
    )
    assert out.returncode == 0, out.stderr
    decoder = json.JSONDecoder()
    events, text = [], out.stdout.strip()
    while text:
        event, end = decoder.raw_decode(text)
        events.append(event)
        text = text[end:].strip()
    assert "text" in events[0] and "summary" in events[-1]
    summary = events[-1]["summary"]
    assert 1 <= int(summary.get("outputTokens", summary.get("output_tokens", 0))) <= 4, summary


def test_cli_streams_text_for_an_audio_url(omni_stack, media_server):
    url = media_server.serve("/cli/sound.wav", media_factory.make_wav(seconds=1.0))
    out = _run(
        OMNIGATE,
        "generate",
        "--gateway",
        omni_stack.gateway.target,
        "--audio",
        url,
        "--text",
        "What do you hear in this audio?",
        "--max-new-tokens",
        "20",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_cli_writes_speech_wav_for_a_local_video(omni_stack, tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(media_factory.make_mp4(seconds=2.0, fps=10, w=64, h=48, with_audio=True))
    output = tmp_path / "answer.wav"
    out = _run(
        OMNIGATE,
        "--gateway",
        omni_stack.gateway.target,
        "generate",
        "--video",
        str(video),
        "--text",
        "Describe this video.",
        "--fps",
        "1",
        "--load-audio-from-video",
        "--generation-mode",
        "audio",
        "--max-new-tokens",
        "6",
        "--output",
        str(output),
    )
    assert out.returncode == 0, out.stderr
    with wave.open(io.BytesIO(output.read_bytes())) as w:
        assert w.getframerate() == 24000 and w.getnchannels() == 1
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
    assert len(samples) > 0 and np.sqrt(np.mean(samples**2)) > 1e-3


def test_cli_writes_png_from_an_image_model(janus_stack, tmp_path):
    output = tmp_path / "picture.png"
    out = _run(
        OMNIGATE,
        "generate",
        "--gateway",
        janus_stack.gateway.target,
        "--text",
        "A red square",
        "--generation-mode",
        "image",
        "--output",
        str(output),
    )
    assert out.returncode == 0, out.stderr
    image = PIL.Image.open(output)
    assert image.format == "PNG" and image.mode == "RGB"


def test_cli_health_models_and_errors(omni_stack):
    health = _run(OMNIGATE, "health", "--gateway", omni_stack.gateway.target)
    assert health.returncode == 0 and health.stdout.strip() == "SERVING"
    models = json.loads(_run(OMNIGATE, "models", "--gateway", omni_stack.gateway.target).stdout)
    assert set(models["input_modalities"]) == {"text", "image", "audio", "video"}
    assert models["output_audio_sample_rate"] == 24000
    bad = _run(
        OMNIGATE,
        "generate",
        "--gateway",
        omni_stack.gateway.target,
        "--text",
        "hi",
        "--generation-mode",
        "image",
    )
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "cannot generate image" in bad.stderr
    missing = _run(
        OMNIGATE, "generate", "--gateway", omni_stack.gateway.target, "--audio", "/no/such/file.wav"
    )
    assert missing.returncode == 2 and "no/such/file.wav" in missing.stderr
