"""The metrics contract: docs/metrics.md against what the real gateway and worker export.

The real stack (tiny Qwen2.5-Omni) serves a handful of requests that touch every documented metric: text,
speech, image/audio/video inputs by URL and inline, GetModelInfo, requests the gateway refuses, one the
worker refuses, one cancelled by its client and one that runs out of time. Both /metrics endpoints are then
scraped and compared with the doc's tables both ways (every documented metric exported with exactly the
documented type and label names, every exported omnigate_* metric documented), and the values are checked
against the traffic that was sent.
"""

from __future__ import annotations

import re
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from omnigate_client import TextDelta
from tests.support import media_factory

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
TYPES = {"counter", "gauge", "histogram"}
SECTIONS = {"gateway": "## Gateway", "worker": "## Worker"}
# Label names of families nothing in this test sets (the others must have series, so that their label
# names are checked): the workers-by-state gauge belongs to the worker pool, not yet wired everywhere.
MAY_BE_EMPTY = {"omnigate_gateway_workers"}


# ---- the doc ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Documented:
    name: str
    type: str
    labels: frozenset[str]
    unit: str
    meaning: str

    @property
    def cuda_only(self) -> bool:
        return self.meaning.startswith("CUDA only")


def documented() -> dict[str, dict[str, Documented]]:
    """{"gateway"|"worker": {name: row}} from the tables of docs/metrics.md."""
    text = DOC.read_text()
    out: dict[str, dict[str, Documented]] = {}
    for service, heading in SECTIONS.items():
        start = text.index(heading)
        end = min((i for i in (text.find("\n## ", start + 1),) if i >= 0), default=len(text))
        rows: dict[str, Documented] = {}
        for line in text[start:end].splitlines():
            if not line.startswith("| `"):
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert len(cells) == 5, f"a table row needs 5 cells (name, type, labels, unit, meaning): {line}"
            name, kind, labels, unit, meaning = cells
            name = name.strip("`")
            assert name not in rows, f"{name} is documented twice"
            label_set = (
                frozenset() if labels == "-" else frozenset(x.strip().strip("`") for x in labels.split(","))
            )
            rows[name] = Documented(name, kind, label_set, unit, meaning)
        out[service] = rows
    return out


def test_the_doc_follows_prometheus_naming():
    docs = documented()
    assert len(docs["gateway"]) >= 15 and len(docs["worker"]) >= 19
    for service, rows in docs.items():
        for row in rows.values():
            assert row.name.startswith(f"omnigate_{service}_"), row.name
            assert re.fullmatch(r"[a-z][a-z0-9_]*", row.name), row.name
            assert row.type in TYPES, f"{row.name}: type {row.type}"
            assert (row.type == "counter") == row.name.endswith("_total"), (
                f"{row.name}: _total is for counters"
            )
            assert "le" not in row.labels and all(re.fullmatch(r"[a-z_]+", x) for x in row.labels), row.name
            assert row.unit and row.meaning, row.name
            base = row.name.removesuffix("_total")
            if row.unit in {"seconds", "bytes"}:
                assert base.endswith(f"_{row.unit}"), (
                    f"{row.name}: a metric in {row.unit} ends in _{row.unit}"
                )
            assert not re.search(r"_(ms|milliseconds|kb|mb|minutes)(_|$)", row.name), (
                f"{row.name}: base units"
            )


# ---- the services ----------------------------------------------------------------------------------


@dataclass
class Family:
    name: str  # as documented: counters with _total
    type: str
    labels: frozenset[str]
    samples: list = field(default_factory=list)

    def value(self, suffix: str = "", **labels: str) -> float:
        """Sum of the samples named name+suffix whose labels include ``labels``."""
        wanted = self.name + suffix
        return sum(
            s.value
            for s in self.samples
            if s.name == wanted and all(s.labels.get(k) == v for k, v in labels.items())
        )


def scrape(port: int) -> dict[str, Family]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    families = list(text_string_to_metric_families(text))
    types = {f.name: f.type for f in families}
    out = {}
    for f in families:
        base = f.name.removesuffix("_created")
        if f.name != base and types.get(base) in {"counter", "histogram"}:
            continue  # prometheus_client's creation timestamps of counters and histograms
        name = f"{f.name}_total" if f.type == "counter" else f.name
        labels = frozenset(k for s in f.samples for k in s.labels) - {"le"}
        out[name] = Family(name, f.type, labels, list(f.samples))
    return out


@dataclass
class Scrapes:
    gateway_before: dict[str, Family]
    worker_before: dict[str, Family]
    gateway: dict[str, Family]
    worker: dict[str, Family]

    def delta(self, service: str, name: str, suffix: str = "", **labels: str) -> float:
        before = getattr(self, f"{service}_before").get(name)
        after = getattr(self, service)[name]
        return after.value(suffix, **labels) - (before.value(suffix, **labels) if before else 0.0)


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def _failure(client, messages, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        client.generate_all(messages, **kwargs)
    return err.value.code()


def _wait_for(check, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


@pytest.fixture(scope="module")
def scrapes(omni_stack, media_server) -> Scrapes:
    gw_port, wk_port = omni_stack.gateway.metrics_port, omni_stack.worker.metrics_port
    gateway_before, worker_before = scrape(gw_port), scrape(wk_port)
    # Content no other test uses: the shared stack's media cache (keyed by content hash) would otherwise
    # answer from an earlier test's decode and no decode would be observed here.
    png = media_server.serve("/metrics-contract.png", media_factory.make_png(61, 47))
    wav = media_server.serve(
        "/metrics-contract.wav", media_factory.make_wav(seconds=1.0, rate=22050, freq=523.0)
    )
    mp4 = media_server.serve(
        "/metrics-contract.mp4", media_factory.make_mp4(seconds=2.0, fps=10, w=62, h=46, with_audio=True)
    )
    with omni_stack.client() as client:
        client.model_info()
        # text (several tokens: inter-token latency), media by URL and inline, speech
        client.generate_all(_user(_text("Count")), max_new_tokens=6, min_new_tokens=6)
        three = {"max_new_tokens": 3, "min_new_tokens": 3}
        client.generate_all(_user({"type": "image", "url": png}, _text("Describe.")), **three)
        client.generate_all(_user({"type": "audio", "url": wav}, _text("Hear?")), **three)
        client.generate_all(
            _user({"type": "video", "url": mp4}, _text("Watch.")), fps=1, load_audio_from_video=True, **three
        )
        inline = media_factory.make_wav(seconds=0.5, freq=587.0)  # unlike other tests' (decoded here)
        client.generate_all(_user({"type": "audio", "data": inline}, _text("Hear?")), **three)
        speech = client.generate_all(_user(_text("Hi")), generation_mode="audio", max_new_tokens=4)
        assert speech.audio, "the speech request produced audio"
        # refused by the gateway (never reach the worker), then by the worker
        assert _failure(
            client, _user({"type": "image", "url": media_server.url("/missing.png")}), retries=0
        ) == (grpc.StatusCode.INVALID_ARGUMENT)
        assert _failure(client, _user({"type": "image", "url": "file:///etc/passwd"}), retries=0) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert (
            _failure(
                client,
                _user(_text("Hi")),
                generation_mode="audio",
                speaker="Nobody",
                max_new_tokens=3,
                retries=0,
            )
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        # cancelled by its client after the first token; then one that runs out of time mid-generation
        stream = client.generate(_user(_text("Go on")), max_new_tokens=4000, min_new_tokens=4000)
        assert isinstance(next(stream), TextDelta)
        stream.cancel()
        with pytest.raises(grpc.RpcError):
            list(stream)
        late = client.generate(_user(_text("Go on")), max_new_tokens=4000, min_new_tokens=4000, timeout_s=1.5)
        with pytest.raises(grpc.RpcError) as err:
            list(late)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def settled() -> tuple[dict, dict] | None:
        # The worker learns of the cancellations asynchronously; wait until both have ended everywhere.
        gateway, worker = scrape(gw_port), scrape(wk_port)
        s = Scrapes(gateway_before, worker_before, gateway, worker)
        cancelled = s.delta("worker", "omnigate_worker_cancelled_requests_total")
        idle = (
            gateway["omnigate_gateway_in_flight_requests"].value() == 0
            and worker["omnigate_worker_in_flight_requests"].value() == 0
        )
        return (gateway, worker) if cancelled >= 2 and idle else None

    result = _wait_for(settled)
    assert result, "the worker did not record both cancellations, or requests stayed in flight"
    return Scrapes(gateway_before, worker_before, *result)


def _on_cuda(worker: dict[str, Family]) -> bool:
    return any(s.labels["device"].startswith("cuda") for s in worker["omnigate_worker_info"].samples)


def _check_contract(service: str, exported: dict[str, Family]) -> None:
    rows = documented()[service]
    cuda = service == "worker" and _on_cuda(exported)
    problems = []
    for row in rows.values():
        family = exported.get(row.name)
        if family is None:
            if not (row.cuda_only and not cuda):
                problems.append(f"{row.name} is documented but not exported")
            continue
        if row.cuda_only and not cuda:
            problems.append(f"{row.name} is CUDA only but exported by a worker without CUDA")
        if family.type != row.type:
            problems.append(f"{row.name} is exported as a {family.type}, documented as a {row.type}")
        if not family.samples:
            if row.name not in MAY_BE_EMPTY:
                problems.append(f"{row.name} has no series, so its labels cannot be checked")
        elif family.labels != row.labels:
            problems.append(
                f"{row.name} has labels {sorted(family.labels)}, documented as {sorted(row.labels)}"
            )
    for name in exported:
        if name.startswith("omnigate_") and name not in rows:
            problems.append(f"{name} is exported but not documented in {DOC.name}")
    assert not problems, "\n".join(problems)


def test_the_gateway_exports_exactly_the_documented_metrics(scrapes):
    _check_contract("gateway", scrapes.gateway)


def test_the_worker_exports_exactly_the_documented_metrics(scrapes):
    _check_contract("worker", scrapes.worker)
    if not _on_cuda(scrapes.worker):
        assert "omnigate_worker_gpu_memory_used_bytes" not in scrapes.worker
        assert "omnigate_worker_gpu_memory_total_bytes" not in scrapes.worker


def test_gateway_values_follow_the_traffic(scrapes):
    d = scrapes.delta
    g = "gateway"
    requests = "omnigate_gateway_requests_total"
    assert d(g, requests, rpc="GetModelInfo", code="OK", mode="none") == 1
    assert d(g, requests, rpc="Generate", code="OK", mode="text") == 5
    assert d(g, requests, rpc="Generate", code="OK", mode="audio") == 1
    assert d(g, requests, rpc="Generate", code="INVALID_ARGUMENT") == 2
    assert d(g, requests, rpc="Generate", code="PERMISSION_DENIED") == 1
    # The cancelled request and the late one. A server tells a passed deadline from a caller leaving by its
    # own clock (0.1 s of slack); on a loaded machine the late one can reach it as a plain cancellation
    # (seen in one fresh-clone CI run), so the split is checked loosely and the sum exactly.
    cancelled, expired = (d(g, requests, rpc="Generate", code=c) for c in ("CANCELLED", "DEADLINE_EXCEEDED"))
    assert cancelled + expired == 2 and cancelled >= 1
    finished = d(g, requests, rpc="Generate")
    assert finished == 11
    assert d(g, "omnigate_gateway_request_duration_seconds", "_count") == finished
    # 5 text answers, the cancelled one and the late one; the refused ones produced nothing
    assert d(g, "omnigate_gateway_time_to_first_output_seconds", "_count", mode="text") == 7
    assert d(g, "omnigate_gateway_time_to_first_token_seconds", "_count", mode="text") == 7
    assert d(g, "omnigate_gateway_time_to_first_audio_seconds", "_count") == 1
    # the first token cannot come before the first output, nor after the whole request
    ttft = d(g, "omnigate_gateway_time_to_first_token_seconds", "_sum", mode="text")
    assert 0 < ttft <= d(g, "omnigate_gateway_request_duration_seconds", "_sum")
    assert d(g, "omnigate_gateway_generated_tokens_total") >= 6 + 3 * 4
    for modality, source in [("image", "url"), ("audio", "url"), ("video", "url"), ("audio", "inline")]:
        # (the missing picture's fetch failed: no fetch time is observed for it)
        assert (
            d(g, "omnigate_gateway_media_fetch_duration_seconds", "_count", modality=modality, source=source)
            == 1
        )
    # one item of each kind, two audio items (by URL and inline); every one decoded (content no other test
    # sends, so no cache answers)
    for modality, items in (("image", 1), ("audio", 2), ("video", 1)):
        assert d(g, "omnigate_gateway_media_decode_duration_seconds", "_count", modality=modality) == items
        assert d(g, "omnigate_gateway_media_duration_seconds", "_count", modality=modality) == items
        assert d(g, "omnigate_gateway_media_bytes_total", modality=modality) > 100
    assert d(g, "omnigate_gateway_rejected_requests_total", reason="invalid_argument") == 1
    assert d(g, "omnigate_gateway_rejected_requests_total", reason="permission_denied") == 1
    # the unknown speaker passed the gateway: the worker refused it
    assert d(g, "omnigate_gateway_upstream_errors_total", code="INVALID_ARGUMENT") == 1
    assert scrapes.gateway["omnigate_gateway_in_flight_requests"].value() == 0
    info = scrapes.gateway["omnigate_gateway_info"].samples
    assert [s.value for s in info] == [1] and info[0].labels["version"]


def test_worker_values_follow_the_traffic(scrapes):
    d = scrapes.delta
    w = "worker"
    requests = "omnigate_worker_requests_total"
    assert d(w, requests, code="OK", mode="text") == 5
    assert d(w, requests, code="OK", mode="audio") == 1
    assert d(w, requests, code="INVALID_ARGUMENT", mode="audio") == 1
    finished = d(w, requests)
    assert d(w, "omnigate_worker_request_duration_seconds", "_count") == finished
    assert d(w, "omnigate_worker_time_to_first_token_seconds", "_count", mode="text") == 7
    assert d(w, "omnigate_worker_time_to_first_output_seconds", "_count", mode="audio") == 1
    # 6 + 3 * 4 tokens of finished text requests, and many more of the cancelled ones
    assert d(w, "omnigate_worker_inter_token_latency_seconds", "_count") >= 5 + 2 * 4
    assert d(w, "omnigate_worker_generated_tokens_total") >= 6 + 3 * 4
    assert d(w, "omnigate_worker_prompt_tokens_total") > 50
    # started by the engine: 5 text, 1 speech, the cancelled and the late one (the unknown speaker never ran)
    assert d(w, "omnigate_worker_queue_wait_seconds", "_count") == 8
    # observed for requests that finished (not the cancelled or the late one)
    assert d(w, "omnigate_worker_generation_duration_seconds", "_count", mode="text") == 5
    assert d(w, "omnigate_worker_generation_duration_seconds", "_count", mode="audio") == 1
    steps = d(w, "omnigate_worker_batch_size", "_count")
    assert steps >= 6 and d(w, "omnigate_worker_batch_size", "_sum") >= steps  # at least one row per step
    audio = d(w, "omnigate_worker_audio_generated_seconds_total")
    assert audio > 0
    assert d(w, "omnigate_worker_speech_real_time_factor", "_count") == 1
    assert d(w, "omnigate_worker_speech_real_time_factor", "_sum") > 0
    assert d(w, "omnigate_worker_time_to_first_audio_seconds", "_count") == 1
    assert 0 < d(w, "omnigate_worker_time_to_first_audio_seconds", "_sum") < 60
    assert d(w, "omnigate_worker_audio_underrun_seconds", "_count") == 1
    assert d(w, "omnigate_worker_audio_underrun_seconds", "_sum") >= 0
    # as at the gateway: the split between a caller leaving and its deadline passing is the server's guess
    by_client = d(w, "omnigate_worker_cancelled_requests_total", reason="client")
    by_deadline = d(w, "omnigate_worker_cancelled_requests_total", reason="deadline")
    assert by_client + by_deadline == 2 and by_client >= 1
    assert d(w, "omnigate_worker_rejected_requests_total", reason="invalid_argument") == 1
    assert scrapes.worker["omnigate_worker_in_flight_requests"].value() == 0
    assert scrapes.worker["omnigate_worker_queue_depth"].value() == 0
    assert scrapes.worker["omnigate_worker_model_load_seconds"].value() > 0
    (info,) = scrapes.worker["omnigate_worker_info"].samples
    assert info.value == 1
    assert info.labels["model"].endswith("tiny-qwen2.5-omni")
    assert info.labels["device"] == "cpu" and info.labels["dtype"] == "float32"
