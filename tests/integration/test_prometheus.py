"""A real Prometheus scrapes a real gateway and worker while a bounded load runs; through Prometheus' HTTP API
every metric of the contract (docs/metrics.md) is present with sane values, and every query the chart
ships returns data: the HPA's prometheus-adapter rules, the KEDA triggers, the recording rules, the alerts
and every panel and variable of the Grafana dashboard.

How the chart's queries are used (see tests/chart_queries.py): unmodified, because Prometheus gives the
targets the labels the chart's ServiceMonitors give them in a cluster (job = the component's Service
name, namespace, pod); adapter templates are filled as prometheus-adapter fills them; dashboard variables
take the defaults the chart rendered and `$__rate_interval` is 5m; an alert is checked through its
expression without the final threshold comparison (it need not fire). The OmnigateNoReadyWorkers alert
reads kube-state-metrics series (kube_deployment_*), which do not exist outside a cluster: only its
evaluation without error is checked here; tests/charts/promtool/alerts_test.yaml covers its logic.

The load is bounded and mixes what makes every contract series move: text requests at concurrency 6,
media by URL (image, audio, video with its audio track) and inline, a speech answer, GetModelInfo, a
malformed request (INVALID_ARGUMENT, refused by the gateway), a prompt over the worker's token limit
(refused by the worker: an upstream error), a request whose deadline passes (DEADLINE_EXCEEDED) and one
the client cancels, and a /v1/realtime answer interrupted by the user's speech (barge-in). Counters whose labels are initialised to 0 (rejections and cancellations by reason)
are present from the start; GPU memory rows are "CUDA only" and must be absent on a CPU worker.
"""

from __future__ import annotations

import asyncio
import base64
import math
import random
import string
import time
from dataclasses import dataclass

import grpc
import openai
import pytest

from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate.gateway.v1 import gateway_pb2_grpc
from tests.charts.chart import CHART_DIR, GATEWAY, NAMESPACE, PROFILES, WORKER, missing_tools_reason, render
from tests.support import media_factory, speech_like
from tests.support.chart_queries import (
    adapter_query,
    adapter_rules,
    adapter_series_name,
    alert_inner,
    alerts,
    dashboard,
    dashboard_queries,
    dashboard_variables,
    hpa_spec,
    keda_triggers,
    metric_names,
    metrics_contract,
    recording_rules,
    rule_groups,
    variable_queries,
)
from tests.support.prometheus_server import PrometheusServer, ScrapeJob, Target, prometheus_binary

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        prometheus_binary() is None, reason="prometheus is not installed (Debian package `prometheus`)"
    ),
    pytest.mark.skipif(missing_tools_reason() is not None, reason=str(missing_tools_reason())),
]

GATEWAY_POD = f"{GATEWAY}-0"
WORKER_POD = f"{WORKER}-0"
GW = f'namespace="{NAMESPACE}",job="{GATEWAY}"'
WK = f'namespace="{NAMESPACE}",job="{WORKER}"'
TARGET_LABELS = {"__name__", "job", "instance", "namespace", "pod"}  # added by the scrape, not the services
RATE_INTERVAL = "5m"
CONCURRENCY = 6


@dataclass
class Observed:
    prometheus: PrometheusServer
    rendered: object  # the keda profile with the dashboard on: ScaledObject, PrometheusRule, ConfigMap
    load_start: float
    load_end: float
    outcomes: dict[str, str]
    worker_device: str


# -- the load ---------------------------------------------------------------------------------------------


def _request(
    *parts: pb.ContentPart, tokens: int = 8, mode=pb.GENERATION_MODE_TEXT, **kwargs
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.Message(role="user", content=list(parts))] if parts else [],
        parameters=pb.GenerationParameters(max_new_tokens=tokens, min_new_tokens=tokens),
        generation_mode=mode,
        **kwargs,
    )


def _text(text: str) -> pb.ContentPart:
    return pb.ContentPart(text=text)


async def _call(
    stub, request: pb.GenerateRequest, timeout: float = 120, cancel_after_first: bool = False
) -> str:
    """Streams one request; returns the final status code name."""
    call = stub.Generate(request, timeout=timeout)
    try:
        async for _event in call:
            if cancel_after_first:
                call.cancel()
                return "CANCELLED"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "OK"


def _singles(media_server, round_: int, too_long: str) -> dict[str, pb.GenerateRequest]:
    """One of each special request; media differ per round so that the gateway's media cache misses."""
    image = media_server.serve(f"/prom/{round_}/picture.png", media_factory.make_png(64 + round_, 48))
    audio = media_server.serve(f"/prom/{round_}/sound.wav", media_factory.make_wav(seconds=1.0 + round_ / 10))
    video = media_server.serve(
        f"/prom/{round_}/clip.mp4", media_factory.make_mp4(seconds=2.0 + round_, fps=5, with_audio=True)
    )
    inline = media_factory.make_jpeg(48 + round_, 32)
    long = _request(_text("Tell me everything."), tokens=2000)
    return {
        "image url": _request(pb.ContentPart(image=pb.MediaSource(url=image)), _text("Describe it.")),
        "audio url": _request(pb.ContentPart(audio=pb.MediaSource(url=audio)), _text("What is it?")),
        "video url + audio track": _request(
            pb.ContentPart(video=pb.MediaSource(url=video)),
            _text("Describe this video."),
            video=pb.VideoOptions(fps=1.0, load_audio_from_video=True),
        ),
        "inline image": _request(
            pb.ContentPart(image=pb.MediaSource(inline=pb.InlineMedia(data=inline))), _text("And this?")
        ),
        "speech": _request(_text("Say something."), tokens=4, mode=pb.GENERATION_MODE_AUDIO),
        "malformed (no messages)": _request(),
        "prompt over the worker's limit": _request(_text(too_long), tokens=2),
        "deadline passes": long,
        "client cancels": long,
    }


def _realtime_barge_in(http_port: int, seed: int) -> str:
    """One /v1/realtime answer (the unmodified openai SDK) interrupted by the user's speech; returns how it
    ended (the realtime sessions, answers and barge-in metrics get their observations)."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    deadline = time.monotonic() + 120
    with client.realtime.connect(model=model) as connection:

        def until(kind: str):
            for event in connection:
                assert event.type != "error", event
                if event.type == kind:
                    return event
                assert time.monotonic() < deadline, f"no {kind}"
            raise AssertionError(f"the connection closed before {kind}")

        until("session.created")
        connection.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Tell a story."}],
            }
        )
        connection.response.create(response={"max_output_tokens": 2000})
        until("response.output_audio.delta")
        speech = speech_like.pcm16(speech_like.speech(1.0, seed=seed))
        for chunk in speech_like.chunks(speech):
            connection.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())
        return until("response.done").response.status


async def _run_load(target: str, media_server, http_port: int) -> dict[str, str]:
    """Text clients throughout, and two rounds of the special requests a few scrapes apart.

    Two rounds because a labelled series appears with its first observation: Prometheus' rate() sees no
    increase in a counter's first sample, so a label value seen once would show no rate (NaN quantiles)."""
    random.seed(0)
    too_long = "".join(random.choice(string.ascii_letters + string.digits) for _ in range(50_000))
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.max_send_message_length", 64 << 20)]
    ) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        texts = iter(range(4 * CONCURRENCY))

        async def text_client() -> list[str]:
            return [await _call(stub, _request(_text(f"Count to {i}."), tokens=24)) for i in texts]

        async def special(name: str, request: pb.GenerateRequest) -> str:
            if name == "deadline passes":
                return await _call(stub, request, timeout=2.0)
            return await _call(stub, request, cancel_after_first=name == "client cancels")

        text_clients = asyncio.gather(*(text_client() for _ in range(CONCURRENCY)))
        outcomes: dict[str, str] = {}
        for round_ in range(2):
            if round_:
                await asyncio.sleep(2.5)  # at least two scrapes between the rounds
            singles = _singles(media_server, round_, too_long)
            codes = await asyncio.gather(*(special(name, r) for name, r in singles.items()))
            for name, code in zip(singles, codes, strict=True):
                outcomes[name] = ",".join(sorted({code, *outcomes.get(name, code).split(",")}))
            # The tiny random model may end its answer (end of sequence) before the user's speech is
            # heard: a completed answer is not a barge-in, so try again (a few times, each bounded).
            for attempt in range(3):
                barge_in = await asyncio.to_thread(_realtime_barge_in, http_port, round_ * 3 + attempt)
                if barge_in != "completed":
                    break
            outcomes["realtime barge-in"] = ",".join(
                sorted({barge_in, *outcomes.get("realtime barge-in", barge_in).split(",")})
            )
        text_codes = [code for codes in await text_clients for code in codes]
        outcomes["text"] = ",".join(sorted(set(text_codes)))
    return outcomes


@pytest.fixture(scope="module")
def observed(omni_stack, media_server, tmp_path_factory):
    rendered = render(PROFILES["keda"], set_values={"metrics.grafanaDashboard.enabled": "true"})
    jobs = [
        ScrapeJob(GATEWAY, NAMESPACE, (Target(f"127.0.0.1:{omni_stack.gateway.metrics_port}", GATEWAY_POD),)),
        ScrapeJob(WORKER, NAMESPACE, (Target(f"127.0.0.1:{omni_stack.worker.metrics_port}", WORKER_POD),)),
    ]
    prometheus = PrometheusServer(tmp_path_factory.mktemp("prometheus"), jobs, rule_groups(rendered))
    with prometheus:
        prometheus.wait_targets_up()
        prometheus.wait_scrapes(2)
        start = time.time()
        outcomes = asyncio.run(
            _run_load(omni_stack.gateway.target, media_server, omni_stack.gateway.http_port)
        )
        end = time.time()
        prometheus.wait_scrapes(3)  # the load's last samples are in, and the rules have run on them
        (info,) = prometheus.query(f"omnigate_worker_info{{{WK}}}")
        yield Observed(prometheus, rendered, start, end, outcomes, info["metric"]["device"])


def _finite(results: list[dict]) -> list[float]:
    return [r["value"] for r in results if math.isfinite(r["value"])]


def _total(prometheus, expr: str) -> float:
    return sum(r["value"] for r in prometheus.query(expr))


# -- the load did what it should --------------------------------------------------------------------------


def test_the_load_met_every_outcome_it_needs(observed):
    assert observed.outcomes == {
        "image url": "OK",
        "audio url": "OK",
        "video url + audio track": "OK",
        "inline image": "OK",
        "speech": "OK",
        "malformed (no messages)": "INVALID_ARGUMENT",
        "prompt over the worker's limit": "RESOURCE_EXHAUSTED",
        "deadline passes": "DEADLINE_EXCEEDED",
        "client cancels": "CANCELLED",
        "realtime barge-in": "cancelled",
        "text": "OK",
    }


# -- the metrics contract ----------------------------------------------------------------------------------


def test_every_contract_metric_is_present_with_its_labels_and_sane_values(observed):
    prometheus = observed.prometheus
    contract = metrics_contract()
    assert len(contract) >= 30
    problems = []
    for metric in contract:
        selector = GW if metric.name.startswith("omnigate_gateway_") else WK
        sample_name = f"{metric.name}_count" if metric.type == "histogram" else metric.name
        results = prometheus.query(f"{sample_name}{{{selector}}}")
        if metric.cuda_only and not observed.worker_device.startswith("cuda"):
            if results:
                problems.append(
                    f"{metric.name}: CUDA only, yet exported by a {observed.worker_device} worker"
                )
            continue
        if not results:
            problems.append(f"{metric.name}: absent")
            continue
        for r in results:
            labels = set(r["metric"]) - TARGET_LABELS
            if labels != set(metric.labels):
                problems.append(
                    f"{metric.name}: labels {sorted(labels)}, the contract says {list(metric.labels)}"
                )
            if not (math.isfinite(r["value"]) and r["value"] >= 0):
                problems.append(f"{metric.name}{r['metric']}: value {r['value']}")
        if metric.type == "histogram":
            count = _total(prometheus, f"{metric.name}_count{{{selector}}}")
            total = _total(prometheus, f"{metric.name}_sum{{{selector}}}")
            inf = _total(prometheus, f'{metric.name}_bucket{{{selector},le="+Inf"}}')
            if count < 1 or inf != count:
                problems.append(f"{metric.name}: {count} observations, +Inf bucket {inf}")
            elif metric.unit == "seconds" and not 0 <= total / count < 600:
                problems.append(f"{metric.name}: mean {total / count} s")
    assert not problems, "\n".join(problems)


# What the load must have moved, and values each metric can only sanely have after it (PromQL, check).
EXPECTATIONS = [
    (
        f'sum(omnigate_gateway_requests_total{{{GW},rpc="Generate",code="OK"}})',
        lambda v: v >= 4 * CONCURRENCY + 5,
    ),
    (f'sum(omnigate_gateway_requests_total{{{GW},rpc="GetModelInfo",mode="none"}})', lambda v: v >= 1),
    (f'sum(omnigate_gateway_requests_total{{{GW},code="DEADLINE_EXCEEDED"}})', lambda v: v >= 1),
    (f'sum(omnigate_gateway_requests_total{{{GW},code="CANCELLED"}})', lambda v: v >= 1),
    (f'sum(omnigate_gateway_rejected_requests_total{{{GW},reason="invalid_argument"}})', lambda v: v >= 1),
    (f'sum(omnigate_gateway_upstream_errors_total{{{GW},code="RESOURCE_EXHAUSTED"}})', lambda v: v >= 1),
    (f'sum(omnigate_worker_rejected_requests_total{{{WK},reason="too_long"}})', lambda v: v >= 1),
    (f"sum(omnigate_worker_cancelled_requests_total{{{WK}}})", lambda v: v >= 2),
    (f"sum(omnigate_gateway_generated_tokens_total{{{GW}}})", lambda v: v >= 4 * CONCURRENCY * 24),
    (f"sum(omnigate_worker_generated_tokens_total{{{WK}}})", lambda v: v >= 4 * CONCURRENCY * 24),
    (f"sum(omnigate_worker_prompt_tokens_total{{{WK}}})", lambda v: v > 4 * CONCURRENCY),
    (f"sum(omnigate_worker_audio_generated_seconds_total{{{WK}}})", lambda v: v > 0),
    (f"count(count by (modality) (omnigate_gateway_media_bytes_total{{{GW}}} > 0))", lambda v: v == 3),
    (
        f"count(count by (source) (omnigate_gateway_media_fetch_duration_seconds_count{{{GW}}} > 0))",
        lambda v: v >= 2,
    ),
    (
        f"count(count by (modality) (omnigate_gateway_media_decode_duration_seconds_count{{{GW}}} > 0))",
        lambda v: v == 3,
    ),
    (f'sum(omnigate_gateway_workers{{{GW},state="ready"}})', lambda v: v == 1),
    (f"sum(omnigate_gateway_in_flight_requests{{{GW}}})", lambda v: v == 0),  # the load is over
    (f"sum(omnigate_worker_in_flight_requests{{{WK}}})", lambda v: v == 0),
    (f"sum(omnigate_worker_queue_depth{{{WK}}})", lambda v: v == 0),
    (f"max(omnigate_gateway_info{{{GW}}})", lambda v: v == 1),
    (f"max(omnigate_worker_info{{{WK}}})", lambda v: v == 1),
    (f"max(omnigate_worker_model_load_seconds{{{WK}}})", lambda v: 0 < v < 600),
    # Rows per decode step: at least one, at most the worker's batch limit (32).
    (
        f"sum(omnigate_worker_batch_size_sum{{{WK}}}) / sum(omnigate_worker_batch_size_count{{{WK}}})",
        lambda v: 1 <= v <= 32,
    ),
    (
        f'sum(omnigate_worker_batch_size_bucket{{{WK},le="32.0"}}) == sum(omnigate_worker_batch_size_count{{{WK}}})',
        lambda v: v > 0,
    ),
    (f"sum(omnigate_worker_inter_token_latency_seconds_count{{{WK}}})", lambda v: v >= 4 * CONCURRENCY),
    (f"sum(omnigate_worker_speech_real_time_factor_count{{{WK}}})", lambda v: v >= 1),
    (f"sum(omnigate_worker_time_to_first_audio_seconds_count{{{WK}}})", lambda v: v >= 1),
    (f"sum(omnigate_worker_audio_underrun_seconds_count{{{WK}}})", lambda v: v >= 1),
    (f"sum(omnigate_gateway_time_to_first_audio_seconds_count{{{GW}}})", lambda v: v >= 1),
    # Time to first token is never after the end of the request. (Not p50 <= p50: the durations also count
    # requests refused in milliseconds, which have no first token, so their p50 can fall below TTFT's.)
    (
        f'histogram_quantile(0.5, sum by (le) (omnigate_gateway_time_to_first_token_seconds_bucket{{{GW},mode="text"}}))'
        f' <= histogram_quantile(0.99, sum by (le) (omnigate_gateway_request_duration_seconds_bucket{{{GW},mode="text"}}))',
        lambda v: v > 0,
    ),
]


@pytest.mark.parametrize(("expr", "check"), EXPECTATIONS, ids=[e for e, _ in EXPECTATIONS])
def test_metric_values_reflect_the_load(observed, expr, check):
    results = observed.prometheus.query(expr)
    assert len(results) == 1, f"{expr}: {results}"
    assert check(results[0]["value"]), f"{expr} = {results[0]['value']}"


def test_worker_info_names_the_model_and_gpu_memory_follows_the_device(observed):
    (info,) = observed.prometheus.query(f"omnigate_worker_info{{{WK}}}")
    assert info["metric"]["model"].endswith("tiny-qwen2.5-omni")
    assert info["metric"]["dtype"] in {"float32", "bfloat16", "float16"}
    used = observed.prometheus.query(f"omnigate_worker_gpu_memory_used_bytes{{{WK}}}")
    total = observed.prometheus.query(f"omnigate_worker_gpu_memory_total_bytes{{{WK}}}")
    if observed.worker_device.startswith("cuda"):
        assert used and total and all(u["value"] <= t["value"] for u, t in zip(used, total, strict=True))
    else:
        assert not used and not total


# -- autoscaling ---------------------------------------------------------------------------------------------


def test_hpa_metrics_come_from_adapter_rules_whose_queries_return_each_pod(observed):
    prometheus = observed.prometheus
    rules = {adapter_series_name(r): r for r in adapter_rules(CHART_DIR / "values.yaml")}
    both = render(set_values={"worker.autoscaling.enabled": "true", "gateway.autoscaling.enabled": "true"})
    used = set(hpa_spec(both, WORKER)["metrics"]) | set(hpa_spec(both, GATEWAY)["metrics"])
    assert used == {
        "omnigate_worker_in_flight_requests",
        "omnigate_worker_queue_depth",
        "omnigate_gateway_in_flight_requests",
    }
    assert used <= set(rules)
    for name, rule in rules.items():
        pod = GATEWAY_POD if name.startswith("omnigate_gateway_") else WORKER_POD
        # Series discovery (the rule's seriesQuery) finds the pod's series with the labels the rule maps.
        discovered = prometheus.series(rule["seriesQuery"])
        assert {(s["namespace"], s["pod"]) for s in discovered} == {(NAMESPACE, pod)}, discovered
        # The query the adapter runs for the HPA's pods returns one value per pod, 0 once the load ended.
        query = adapter_query(rule, NAMESPACE, [pod, "not-running-0"])
        results = prometheus.query(query)
        assert [r["metric"] for r in results] == [{"pod": pod}], query
        assert results[0]["value"] == 0
    # During the load the in-flight metric the worker HPA scales on saw the requests.
    query = adapter_query(rules["omnigate_worker_in_flight_requests"], NAMESPACE, [WORKER_POD])
    (during,) = prometheus.query_range(query, observed.load_start, observed.load_end + 2)
    assert max(v for _t, v in during["values"]) >= 1, during


def test_keda_triggers_return_the_load(observed):
    prometheus = observed.prometheus
    triggers = {t["name"]: t for t in keda_triggers(observed.rendered)}
    assert set(triggers) == {"in-flight", "queue-depth", "gateway-demand"}
    for trigger in triggers.values():
        results = prometheus.query(trigger["query"])
        assert len(results) == 1 and math.isfinite(results[0]["value"]) and results[0]["value"] >= 0, trigger
    assert prometheus.query(triggers["gateway-demand"]["query"])[0]["value"] > 0  # rate over 2m: still > 0
    (during,) = prometheus.query_range(
        triggers["in-flight"]["query"], observed.load_start, observed.load_end + 2
    )
    assert max(v for _t, v in during["values"]) >= 1, during


# -- rules ------------------------------------------------------------------------------------------------------


def test_every_rule_evaluates_without_error(observed):
    rules = observed.prometheus.rules()
    groups = rule_groups(observed.rendered)
    assert len(rules) == sum(len(g["rules"]) for g in groups["groups"]) >= 14
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad


def test_recording_rules_record_series_with_values(observed):
    prometheus = observed.prometheus
    records = recording_rules(rule_groups(observed.rendered))
    assert len(records) >= 10
    for record in records:
        results = prometheus.query(record.source)
        assert results, f"{record.source} recorded nothing"
        assert _finite(results), f"{record.source}: {results}"
        for r in results:
            assert r["metric"]["namespace"] == NAMESPACE and r["metric"]["job"] in {GATEWAY, WORKER}, r
    (ratio,) = prometheus.query("namespace_job:omnigate_gateway_server_errors_per_requests:ratio_rate5m")
    assert 0 < ratio["value"] < 1  # the request whose deadline passed
    (tokens,) = prometheus.query("namespace_job:omnigate_worker_generated_tokens:rate5m")
    assert tokens["value"] > 0


def test_alert_expressions_return_data(observed):
    prometheus = observed.prometheus
    checked = []
    for alert in alerts(rule_groups(observed.rendered)):
        if not metric_names(alert.expr):
            assert "kube_deployment_" in alert.expr, alert  # kube-state-metrics only: see the module doc
            continue
        inner = alert_inner(alert.expr)
        assert inner != alert.expr.strip(), f"{alert.source}: no threshold found"
        results = prometheus.query(inner)
        assert _finite(results), f"{alert.source}: {inner} -> {results}"
        checked.append(alert.source)
    assert set(checked) == {
        "OmnigateGatewayHighErrorRate",
        "OmnigateTimeToFirstOutputSLO",
        "OmnigateWorkerQueueSaturated",
        "OmnigateWorkersLost",
        "OmnigateDemandWithoutWorkers",
    }


# -- the dashboard -----------------------------------------------------------------------------------------------


def test_every_dashboard_panel_returns_data(observed):
    prometheus = observed.prometheus
    board = dashboard(observed.rendered)
    assert dashboard_variables(board) == {"namespace": NAMESPACE, "gateway": GATEWAY, "worker": WORKER}
    cuda_only = {m.name for m in metrics_contract() if m.cuda_only}
    empty, checked = [], 0
    for panel, target, expr in dashboard_queries(board, RATE_INTERVAL):
        results = prometheus.query(expr, at=observed.load_end + 2)
        if metric_names(expr) <= cuda_only and not observed.worker_device.startswith("cuda"):
            assert not results, f"{panel['title']} ({target['refId']}) shows GPU memory of a CPU worker"
            continue
        checked += 1
        if not _finite(results):
            empty.append(f"{panel['title']} ({target['refId']}): {expr} -> {results}")
    assert not empty, "\n".join(empty)
    assert checked >= 40


def test_dashboard_variables_find_this_release(observed):
    board = dashboard(observed.rendered)
    defaults = dashboard_variables(board)
    for name, selector, label in variable_queries(board):
        values = {s.get(label) for s in observed.prometheus.series(selector)}
        assert defaults[name] in values, f"${name}: label_values({selector}, {label}) = {values}"
