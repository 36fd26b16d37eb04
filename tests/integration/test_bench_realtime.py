"""`make bench-realtime` (bench/realtime.py) runs end to end on the tiny model and reports what it claims:
the time from the VAD's commit to the first audio at the client, and barge-ins that cancel the answer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support.stack import MODELS_DIR, REPO_DIR

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_two_turns_report_first_audio_after_the_commit_and_a_cancelled_barge_in(tmp_path):
    assert (MODELS_DIR / "tiny-qwen2.5-omni" / "config.json").exists(), "run `make models` first"
    out = tmp_path / "realtime.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.realtime", "--turns", "2", "--out", str(out)],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["turns"] == 2 and result["turns_with_audio"] == 2, result
    first_audio = result["commit_to_first_audio"]
    assert first_audio["n"] == 2 and 0 < first_audio["p50_s"] < 60, first_audio
    # what the user hears includes the VAD's 500 ms of silence before the commit
    assert result["speech_end_to_first_audio"]["p50_s"] > 0.5, result
    assert result["barge_in_statuses"] == ["cancelled"], result
    assert result["barge_in_to_cancelled"]["n"] == 1
    assert result["gateway_barge_in_detection_to_cancel_mean_s"] is not None
