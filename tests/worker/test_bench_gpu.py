"""`make bench-gpu` (bench/gpu.py) runs end to end on the tiny model on CPU and reports every section.

The numbers themselves are never checked against targets (a benchmark reports; it does not fail on speed):
this checks that one quick run writes all of them, finite and positive, and exits 0.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.support.stack import MODELS_DIR, REPO_DIR


def positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def load_bench():
    from bench import gpu

    return gpu


@pytest.mark.parametrize(
    ("chunks", "underrun"),
    [
        ([], 0.0),
        ([(5.0, 0.5)], 0.0),  # a late first chunk is time to first audio, not an underrun
        ([(1.0, 0.5), (1.2, 1.0), (2.5, 1.0)], 0.0),  # each chunk arrives before the audio before it ends
        ([(1.0, 0.5), (1.2, 1.0), (3.0, 1.0)], 0.5),  # playing ends at 2.5; the third arrives at 3.0
        ([(0.0, 1.0), (2.0, 1.0), (3.5, 1.0)], 1.5),  # 1.0 s waiting, then plays 2-3, waits 0.5 s again
    ],
)
def test_playback_underrun(chunks, underrun):
    assert load_bench().playback_underrun(chunks) == pytest.approx(underrun)


def test_quick_run_reports_every_section(tmp_path):
    assert (MODELS_DIR / "tiny-qwen2.5-omni" / "config.json").exists(), "run `make models` first"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu",
            "--quick",
            "--size",
            "tiny",
            "--device",
            "cpu",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_DIR,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())

    assert result["partial"] is False and result["section_errors"] == {}
    conditions = result["conditions"]
    assert conditions["size"] == "tiny" and conditions["device"] == "cpu" and conditions["dtype"] == "float32"
    assert conditions["output_tokens"] == 8 and conditions["levels"] == "1,4"
    for key in ("device_name", "torch", "transformers", "commit"):
        assert conditions[key]

    baseline = result["baseline"]
    assert baseline["requests"] == 5 and baseline["output_tokens"] == 5 * 8  # fixed length: min = max
    for key in ("output_tokens_per_s", "e2e_p50_s", "e2e_p95_s", "ms_per_token"):
        assert positive(baseline[key]), key

    levels = {level["concurrency"]: level for level in result["levels"]}
    assert set(levels) == {1, 4}
    for level in levels.values():
        assert level["errors"] == 0 and level["requests"] >= 5
        assert level["output_tokens"] == 8 * level["requests"]
        for key in (
            "output_tokens_per_s",
            "e2e_p50_s",
            "e2e_p95_s",
            "ttft_p50_s",
            "ttft_p95_s",
            "itl_p50_s",
            "itl_p95_s",
            "itl_request_mean_p50_s",
        ):
            assert positive(level[key]), (level["concurrency"], key)
        assert level["ttft_p50_s"] <= level["e2e_p50_s"]
        assert level["itl_observations"] == 7 * level["requests"]  # one per token after the first
    assert positive(result["ratios"]["throughput"]["value"]) and positive(result["ratios"]["latency_at_1"])

    assert positive(result["copy_bandwidth_bytes_per_s"])
    steps = {step["batch"]: step for step in result["decode_steps"]}
    assert set(steps) == {1, 2, 4}
    for batch, step in steps.items():
        assert step["rows"] == batch and step["context"] > 0
        for key in ("median_ms", "weight_bytes", "kv_bytes", "floor_ms", "over_floor"):
            assert positive(step[key]), (batch, key)
    # KV bytes grow with rows x context
    assert steps[4]["kv_bytes"] * steps[1]["context"] == 4 * steps[1]["kv_bytes"] * steps[4]["context"]
    assert result["decode_step_metric"], "the scheduler's decode-step histogram saw no step"
    assert "CUDA only" in result["sdpa"]

    memory = result["memory"]
    assert memory["measure"] == "rss_bytes"
    labels = [sample["label"] for sample in memory["samples"]]
    assert len(labels) == 4 and labels[0].startswith("start") and "1/3" in labels[1] and "end" in labels[2]
    assert all(positive(sample["rss_bytes"]) for sample in memory["samples"])
    assert math.isfinite(memory["growth_pct"]) and math.isfinite(memory["growth_first_to_last_pct"])
    assert memory["soak"]["errors"] == 0 and memory["soak"]["requests"] > 0

    speech = result["speech"]
    assert speech["conditions"]["pipelined"], speech["conditions"]["decode_runner"]
    assert speech["conditions"]["output_tokens"] == 16 and speech["conditions"]["levels"] == [1, 4]
    assert speech["conditions"]["settings"]["speech_chunk_codes"] > 0
    speech_levels = {level["concurrency"]: level for level in speech["levels"]}
    assert set(speech_levels) == {1, 4}
    for concurrency, level in speech_levels.items():
        assert level["errors"] == 0 and level["requests"] == 2 * concurrency
        assert level["output_tokens"] == 16 * level["requests"]  # the thinker's reply has its fixed length
        assert level["chunks"] >= level["requests"]
        for key in (
            "audio_s",
            "audio_s_per_s",
            "ttfa_p50_s",
            "ttfa_p90_s",
            "e2e_p50_s",
            "rtf_p50",
            "rtf_max",
        ):
            assert positive(level[key]), (concurrency, key)
        # each request's summary counts the audio its stream carried
        assert level["summary_audio_s"] == pytest.approx(level["audio_s"], rel=1e-6)
        assert level["ttfa_p50_s"] <= level["ttfa_p90_s"] and level["ttfa_p50_s"] <= level["e2e_p50_s"]
        assert level["rtf_p50"] <= level["rtf_max"]
        assert 0 <= level["underrun_max_s"] <= level["underrun_total_s"]
    alone = speech["one_at_a_time"]
    assert alone["concurrency"] == 4 and alone["requests"] == 4 and alone["errors"] == 0
    assert alone["output_tokens"] == 4 * 16
    for key in ("audio_s", "audio_s_per_s", "ttfa_p50_s", "ttfa_own_p50_s", "rtf_max"):
        assert positive(alone[key]), key
    assert alone["ttfa_p50_s"] >= alone["ttfa_own_p50_s"]  # queued requests wait for the ones before them
    assert alone["underrun_total_s"] >= 0
    assert speech["throughput_ratio"]["level"] == 4 and positive(speech["throughput_ratio"]["value"])

    table = (tmp_path / "gpu.md").read_text()
    for heading in (
        "## Baseline",
        "## Omnigate engine",
        "## Speech",
        "## Decode step per batch size",
        "## Memory",
    ):
        assert heading in table
    assert "| 4 | 8 | 0 |" in table  # concurrency 4: 8 requests, no error
    assert "| 4, one at a time (generate) | 4 | 0 |" in table
    assert "(targets are for the GPU)" in table and "PASS" not in table and "FAIL" not in table
    assert table.strip() in run.stdout  # the table is printed too
