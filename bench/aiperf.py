"""AIPerf, NVIDIA's benchmark client for OpenAI-compatible servers, against the gateway's HTTP API.

    python -m bench.aiperf [--requests 200] [--concurrency 8] [--input-tokens 128] [--output-tokens 64]
                           [--endpoint chat|completions] [--url URL] [--output bench/results/aiperf.json]
    python -m bench.aiperf --install-only    (what `make aiperf-tools` runs)

Starts a worker and a gateway on loopback (tests/stack.py, the default tiny Qwen2.5-Omni), unless ``--url``
names the HTTP API of a gateway already running (``make run``'s is http://127.0.0.1:8000), and runs AIPerf's
streamed benchmark the way its documentation suggests for a fixed output length: synthetic prompts of
``--input-tokens`` tokens, ``--extra-inputs ignore_eos:true`` with ``--output-tokens`` as the length,
``--use-server-token-count`` (token counts from the server's ``usage``) and, on the chat endpoint,
``--per-chunk-usage`` (vLLM's ``stream_options.continuous_usage_stats``). It also collects both services'
Prometheus metrics (``--server-metrics``).

AIPerf runs from a virtual environment of its own (``.tools/aiperf-venv``, created on first use by
``ensure_aiperf``: ``pip install aiperf==0.13.0``), so that its pins (transformers, fastapi, ...) never touch
the project's. Nothing goes to the internet: ``HF_HUB_OFFLINE=1`` and the served model's own tokenizer.
(AIPerf 0.13 in offline mode loads a tokenizer only from the Hugging Face cache, by repo id: a local path
fails in ``snapshot_download``; ``tokenizer_cache`` links the model's files into a private cache under the
made-up id ``omnigate/<model dir>``.)

Checks, which end the run with exit status 1 when one fails: no request failed, and every request's output
length as AIPerf counted it (the server's usage) is ``--output-tokens`` (``ignore_eos``); with a stack of its
own, also that it equals the gateway's own count for that request (its access line, found by the
``X-Request-ID`` AIPerf sends) and that the prompt length equals the worker's. In every case, also that the
output and prompt tokens AIPerf counted in all equal what the gateway's and the worker's token counters
(``omnigate_gateway_generated_tokens_total``, ``omnigate_worker_prompt_tokens_total``) counted during the
run: against a running ``make run`` (``--gateway-metrics``/``--worker-metrics``, default its ports 9400 and
9401), send it nothing else meanwhile. Writes AIPerf's summary
and the checks to ``--output`` (bench/results/aiperf.json) and prints a table. Not a timed test: the
numbers are for reading, nothing fails on speed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.stack import MODELS_DIR, Stack, start_stack

REPO = Path(__file__).resolve().parents[1]

AIPERF_VERSION = "0.13.0"
DEFAULT_VENV = REPO / ".tools" / "aiperf-venv"
MODEL = MODELS_DIR / "tiny-qwen2.5-omni"
RESULTS = REPO / "bench" / "results"
INSTALL_TIMEOUT_S = 1200


def ensure_aiperf(venv: Path = DEFAULT_VENV) -> Path:
    """The ``aiperf`` command of ``venv``, creating the venv and installing AIPerf first when it is missing
    or another version (one install at a time: concurrent callers wait on a lock file)."""
    venv = venv.resolve()
    venv.parent.mkdir(parents=True, exist_ok=True)
    command = venv / "bin" / "aiperf"
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if command.exists() and _installed_version(venv) == AIPERF_VERSION:
            return command
        print(f"installing aiperf {AIPERF_VERSION} into {venv} (once; a few minutes)", file=sys.stderr)
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=INSTALL_TIMEOUT_S)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"aiperf=={AIPERF_VERSION}"],
            check=True,
            timeout=INSTALL_TIMEOUT_S,
        )
        if _installed_version(venv) != AIPERF_VERSION:
            raise RuntimeError(f"aiperf {AIPERF_VERSION} did not install into {venv}")
    return command


def _installed_version(venv: Path) -> str | None:
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('aiperf'))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def tokenizer_cache(model_dir: Path, cache_root: Path) -> tuple[str, dict[str, str]]:
    """A Hugging Face cache under ``cache_root`` holding ``model_dir``'s files (symbolic links) as the repo
    ``omnigate/<model_dir name>``; returns that repo id and the environment that makes AIPerf (and
    transformers) use the cache offline."""
    repo_id = f"omnigate/{model_dir.name}"
    revision = "0" * 40
    repo = cache_root / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for source in model_dir.resolve().iterdir():
        link = snapshot / source.name
        if not link.exists():
            link.symlink_to(source)
    env = {
        "HF_HUB_CACHE": str(cache_root / "hub"),
        "HF_HOME": str(cache_root),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    return repo_id, env


@dataclass
class Record:
    """One request as AIPerf recorded it."""

    request_id: str
    output_tokens: int | None
    input_tokens: int | None
    error: str | None


@dataclass
class AiperfRun:
    summary: dict  # profile_export_aiperf.json
    records: list[Record]
    command: list[str]
    artifacts: Path
    console: str = ""
    errors: int = field(init=False)

    def __post_init__(self) -> None:
        self.errors = sum(1 for r in self.records if r.error)

    def metric(self, name: str, stat: str = "avg") -> float | None:
        value = self.summary.get(name)
        return value.get(stat) if isinstance(value, dict) else None


def run_aiperf(
    aiperf: Path,
    url: str,
    model_dir: Path,
    workdir: Path,
    *,
    model_name: str | None = None,
    requests: int = 20,
    concurrency: int = 4,
    input_tokens: int = 64,
    output_tokens: int = 16,
    endpoint: str = "chat",
    metrics_urls: tuple[str, ...] = (),
    timeout_s: float = 900,
) -> AiperfRun:
    """Runs one ``aiperf profile`` (streamed, ignore_eos, server token counts) and reads its exports."""
    workdir.mkdir(parents=True, exist_ok=True)
    repo_id, env = tokenizer_cache(model_dir, workdir / "hf")
    artifacts = workdir / "artifacts"
    command = [
        str(aiperf),
        "profile",
        "--model",
        model_name or model_dir.name,
        "--url",
        url,
        "--endpoint-type",
        endpoint,
        "--streaming",
        "--tokenizer",
        repo_id,
        "--request-count",
        str(requests),
        "--concurrency",
        str(concurrency),
        "--prompt-input-tokens-mean",
        str(input_tokens),
        "--prompt-input-tokens-stddev",
        "0",
        "--prompt-output-tokens-mean",
        str(output_tokens),
        "--prompt-output-tokens-stddev",
        "0",
        "--extra-inputs",
        "ignore_eos:true",
        "--use-server-token-count",
        *(["--per-chunk-usage"] if endpoint == "chat" else []),
        *(["--server-metrics", *metrics_urls] if metrics_urls else ["--no-server-metrics"]),
        # AIPerf looks for NVIDIA's DCGM exporter on localhost:9400 and :9401 by default: `make run`'s
        # metrics ports. Nothing here is a GPU's.
        "--no-gpu-telemetry",
        "--random-seed",
        "7",
        "--ui-type",
        "none",
        "--no-auto-plot",
        "--output-artifact-dir",
        str(artifacts),
    ]
    process = subprocess.run(
        command,
        env={**os.environ, **env},
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    console = process.stdout + process.stderr
    summary_path = artifacts / "profile_export_aiperf.json"
    if process.returncode != 0 or not summary_path.exists():
        raise RuntimeError(f"aiperf exited with {process.returncode}:\n{console[-6000:]}")
    records = []
    records_path = artifacts / "profile_export.jsonl"
    for line in records_path.read_text().splitlines() if records_path.exists() else ():
        record = json.loads(line)
        metrics = record.get("metrics") or {}
        error = record.get("error")
        records.append(
            Record(
                request_id=(record.get("metadata") or {}).get("x_request_id", ""),
                output_tokens=(metrics.get("output_sequence_length") or {}).get("value"),
                input_tokens=(metrics.get("input_sequence_length") or {}).get("value"),
                error=json.dumps(error) if error else None,
            )
        )
    return AiperfRun(json.loads(summary_path.read_text()), records, command, artifacts, console)


def server_counts(stack: Stack) -> tuple[dict[str, int], dict[str, int]]:
    """(output tokens by request id from the gateway's access lines, prompt tokens from the worker's)."""

    def lines(path: Path, logger: str):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    record = json.loads(line)
                    if record.get("logger") == logger and record.get("request_id"):
                        yield record

    output = {
        r["request_id"]: r["output_tokens"] for r in lines(stack.gateway.log_path, "omnigate_gateway.access")
    }
    prompt = {
        r["request_id"]: r["prompt_tokens"]
        for r in lines(stack.worker.log_path, "omnigate_worker.access")
        if "prompt_tokens" in r
    }
    return output, prompt


COUNTERS = {
    "output": "omnigate_gateway_generated_tokens_total",
    "prompt": "omnigate_worker_prompt_tokens_total",
}


def token_counters(gateway_metrics: str, worker_metrics: str) -> dict[str, float]:
    """The services' token counters (what they generated and read in all) from their metrics ports."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = {}
    for kind, url in (("output", gateway_metrics), ("prompt", worker_metrics)):
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - a loopback metrics port
            text = response.read().decode()
        totals[kind] = sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == COUNTERS[kind]
        )
    return totals


def check_totals(run: AiperfRun, before: dict[str, float], after: dict[str, float]) -> list[str]:
    """AIPerf's token counts, summed, against what the services counted meanwhile (valid while nothing else
    sends them requests)."""
    problems = []
    ours = {
        "output": sum(r.output_tokens or 0 for r in run.records if not r.error),
        "prompt": sum(r.input_tokens or 0 for r in run.records if not r.error),
    }
    for kind, who in (("output", "the gateway"), ("prompt", "the worker")):
        server = after[kind] - before[kind]
        if server != ours[kind]:
            problems.append(f"AIPerf counted {ours[kind]} {kind} tokens in all; {who} counted {server:.0f}")
    return problems


def check(run: AiperfRun, requests: int, output_tokens: int, stack: Stack | None) -> list[str]:
    """What is wrong with a run (empty when nothing is)."""
    problems = []
    if len(run.records) != requests:
        problems.append(f"{len(run.records)} requests recorded, {requests} sent")
    if run.errors:
        problems.append(
            f"{run.errors} requests failed: {next(r.error for r in run.records if r.error)[:500]}"
        )
    lengths = {r.output_tokens for r in run.records if not r.error}
    if lengths != {output_tokens}:
        problems.append(f"output lengths {sorted(lengths, key=str)}; ignore_eos asked for {output_tokens}")
    if stack is not None:
        deadline = time.monotonic() + 10  # the last access lines may still be on their way to the log
        while True:
            output, prompt = server_counts(stack)
            missing = [
                r.request_id for r in run.records if r.request_id not in output or r.request_id not in prompt
            ]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if missing:
            problems.append(
                f"{len(missing)} requests lack a gateway or worker access line (e.g. {missing[0]})"
            )
        for r in run.records:
            if r.request_id in output and output[r.request_id] != r.output_tokens:
                problems.append(
                    f"request {r.request_id}: AIPerf counted {r.output_tokens} output tokens, the gateway "
                    f"{output[r.request_id]}"
                )
            if r.request_id in prompt and prompt[r.request_id] != r.input_tokens:
                problems.append(
                    f"request {r.request_id}: AIPerf counted {r.input_tokens} prompt tokens, the worker "
                    f"{prompt[r.request_id]}"
                )
    return problems


TABLE = [
    ("requests", "request_count", "avg", "{:.0f}"),
    ("failed requests", None, None, "{:.0f}"),
    ("request throughput (req/s)", "request_throughput", "avg", "{:.2f}"),
    ("output token throughput (tok/s)", "output_token_throughput", "avg", "{:.1f}"),
    ("time to first token p50 (ms)", "time_to_first_token", "p50", "{:.1f}"),
    ("time to first token p99 (ms)", "time_to_first_token", "p99", "{:.1f}"),
    ("inter-token latency p50 (ms)", "inter_token_latency", "p50", "{:.2f}"),
    ("request latency p50 (ms)", "request_latency", "p50", "{:.1f}"),
    ("request latency p99 (ms)", "request_latency", "p99", "{:.1f}"),
    ("output length avg (tokens)", "output_sequence_length", "avg", "{:.1f}"),
    ("input length avg (tokens, server)", "input_sequence_length", "avg", "{:.1f}"),
]


def table(run: AiperfRun) -> list[tuple[str, str]]:
    rows = []
    for label, name, stat, fmt in TABLE:
        value = run.errors if name is None else run.metric(name, stat)
        rows.append((label, "n/a" if value is None else fmt.format(value)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--url", help="a running gateway's HTTP API (default: start a stack of its own)")
    parser.add_argument(
        "--gateway-metrics",
        default="http://127.0.0.1:9400/metrics",
        help="with --url: the gateway's metrics (default: make run's); its token counter is compared with AIPerf's",
    )
    parser.add_argument(
        "--worker-metrics",
        default="http://127.0.0.1:9401/metrics",
        help="with --url: the worker's metrics (default: make run's); its prompt-token counter likewise",
    )
    parser.add_argument("--model", type=Path, default=MODEL, help="the served model's directory (tokenizer)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--output", type=Path, default=RESULTS / "aiperf.json")
    parser.add_argument("--install-only", action="store_true", help="install AIPerf into --venv and stop")
    args = parser.parse_args(argv)

    aiperf = ensure_aiperf(args.venv)
    if args.install_only:
        print(f"{aiperf}: aiperf {AIPERF_VERSION}")
        return 0
    with tempfile.TemporaryDirectory(prefix="omnigate-aiperf-") as tmp:
        workdir = Path(tmp)
        (workdir / "stack").mkdir()
        stack = None if args.url else start_stack(args.model, workdir / "stack")
        try:
            url = args.url or f"http://127.0.0.1:{stack.gateway.http_port}"
            metrics = (
                (args.gateway_metrics, args.worker_metrics)
                if stack is None
                else tuple(
                    f"http://127.0.0.1:{s.metrics_port}/metrics" for s in (stack.gateway, stack.worker)
                )
            )
            before = token_counters(*metrics)
            run = run_aiperf(
                aiperf,
                url,
                args.model,
                workdir / "aiperf",
                requests=args.requests,
                concurrency=args.concurrency,
                input_tokens=args.input_tokens,
                output_tokens=args.output_tokens,
                endpoint=args.endpoint,
                metrics_urls=metrics,
            )
            problems = check(run, args.requests, args.output_tokens, stack)
            # Totals too: what works against a running `make run`, where no access line names the run's
            # requests (the services' counters; nothing else may send them requests meanwhile).
            time.sleep(1.0)  # the last requests' counters are updated as their streams end
            problems += check_totals(run, before, token_counters(*metrics))
        finally:
            if stack is not None:
                stack.gateway.stop()
                stack.worker.stop()

    rows = table(run)
    width = max(len(label) for label, _ in rows)
    print(f"\nAIPerf {AIPERF_VERSION}, {args.endpoint} streamed, {url}")
    for label, value in rows:
        print(f"  {label:<{width}}  {value:>10}")
    print("checks:", "all passed" if not problems else "\n  " + "\n  ".join(problems))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "aiperf_version": AIPERF_VERSION,
                "endpoint": args.endpoint,
                "url": url if args.url else "own stack on loopback",
                "model": str(args.model),
                "requests": args.requests,
                "concurrency": args.concurrency,
                "input_tokens": args.input_tokens,
                "output_tokens": args.output_tokens,
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
                "table": dict(rows),
                "checks": problems or "all passed",
                "aiperf_command": run.command[1:],
                "aiperf_summary": {
                    k: v for k, v in run.summary.items() if isinstance(v, dict) and "unit" in v
                },
            },
            indent=2,
        )
    )
    print(f"wrote {args.output}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
