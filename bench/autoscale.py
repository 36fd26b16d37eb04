"""Autoscaling simulation: load steps against a real stack, the chart's autoscaling queries read from a real
Prometheus, and the Kubernetes HPA algorithm applied to them.

    python -m bench.autoscale [--time-scale 1] [--concurrency 24] [--idle-s 30] [--high-s 120]

- A worker and a gateway run as processes on loopback; Prometheus (the Debian package) scrapes both with
  the labels the chart's ServiceMonitors give them (job = Service name, namespace, pod).
- The chart is rendered with the worker HPA on (`worker.autoscaling.enabled`); the HPA's Pods metrics
  (omnigate_worker_in_flight_requests, omnigate_worker_queue_depth), targets, bounds and behavior are
  read from the rendered HorizontalPodAutoscaler, and each metric's PromQL is the chart's
  prometheus-adapter rule (values.yaml) as the adapter fills it for the worker pods.
- Load: closed-loop clients streaming short text requests, in steps: idle, high (`--concurrency`), idle.
- Every sync period (the HPA controller's 15 s) the queries run against Prometheus and the HPA algorithm
  (`hpa_decide`, below: tolerance, per-metric proposals, stabilization windows, scaling policies, bounds)
  gives the desired worker count.
- Only one worker really runs: the simulation computes the count the HPA would ask for, it starts no
  workers. The load is closed-loop, so the total in flight is the same wherever it would run; the
  simulated replicas are treated as sharing it (average per pod = total / replicas, which is also what
  KEDA's triggers compute from the same sums).
- `--time-scale N` divides every duration of the chart's behavior (stabilization windows, policy periods)
  and the sync period by N, so a run takes minutes instead of the ~20 of the chart's defaults (600 s
  scale-down stabilization, then one pod per 120 s).

Writes bench/results/autoscale.json (the series) and autoscale.png (load, metric and desired replicas over
time) and prints a summary. It reports what happened; it never fails on numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
SYNC_PERIOD_S = 15.0  # kube-controller-manager --horizontal-pod-autoscaler-sync-period
TOLERANCE = 0.1  # --horizontal-pod-autoscaler-tolerance

# ---- the HPA algorithm (pure) ----------------------------------------------------------------------------
# Kubernetes pkg/controller/podautoscaler (horizontal.go, replica_calculator.go), autoscaling/v2 behavior.


@dataclass(frozen=True)
class ScalingPolicy:
    type: str  # "Pods" or "Percent"
    value: int
    period_s: float


@dataclass(frozen=True)
class ScalingRules:
    stabilization_s: float
    select_policy: str  # "Max", "Min" or "Disabled"
    policies: tuple[ScalingPolicy, ...]

    @classmethod
    def from_spec(cls, spec: dict) -> ScalingRules:
        return cls(
            stabilization_s=float(spec.get("stabilizationWindowSeconds", 0)),
            select_policy=spec.get("selectPolicy", "Max"),
            policies=tuple(
                ScalingPolicy(p["type"], int(p["value"]), float(p["periodSeconds"]))
                for p in spec.get("policies", [])
            ),
        )

    def longest_period_s(self) -> float:
        return max((p.period_s for p in self.policies), default=0.0)


@dataclass(frozen=True)
class Behavior:
    scale_up: ScalingRules
    scale_down: ScalingRules

    @classmethod
    def from_spec(cls, spec: dict) -> Behavior:
        return cls(ScalingRules.from_spec(spec["scaleUp"]), ScalingRules.from_spec(spec["scaleDown"]))


@dataclass(frozen=True)
class History:
    """What the HPA controller remembers between syncs: its raw recommendations and its scale events."""

    recommendations: tuple[tuple[float, int], ...] = ()  # (time, replicas the metrics asked for)
    scale_up_events: tuple[tuple[float, int], ...] = ()  # (time, replicas added)
    scale_down_events: tuple[tuple[float, int], ...] = ()  # (time, replicas removed)


@dataclass(frozen=True)
class Decision:
    desired: int
    proposal: int | None  # what the metrics asked for, before stabilization and policies (None: no metrics)
    history: History
    reason: str


def replicas_for_metric(total: float, target: float, current: int, tolerance: float = TOLERANCE) -> int:
    """Replicas one AverageValue metric asks for: ceil(total / target), unless the average per current pod
    is within the tolerance of the target (then the current count)."""
    if target <= 0:
        raise ValueError("an AverageValue target must be positive")
    usage_ratio = total / (target * current) if current else math.inf
    if current and abs(1.0 - usage_ratio) <= tolerance:
        return current
    return math.ceil(round(total / target, 9))  # round: 16/8 stays 2 whatever the float noise


def _change_in_period(events: tuple[tuple[float, int], ...], now: float, period_s: float) -> int:
    return sum(change for t, change in events if t > now - period_s)


def _replicas_at_period_start(current: int, now: float, history: History, period_s: float) -> int:
    """The replica count a policy's period started from: today's count minus the changes made within it."""
    return (
        current
        - _change_in_period(history.scale_up_events, now, period_s)
        + _change_in_period(history.scale_down_events, now, period_s)
    )


def _scale_up_limit(current: int, now: float, history: History, rules: ScalingRules) -> int:
    if rules.select_policy == "Disabled":
        return current
    pick, result = (min, math.inf) if rules.select_policy == "Min" else (max, -math.inf)
    for policy in rules.policies:
        start = _replicas_at_period_start(current, now, history, policy.period_s)
        if policy.type == "Pods":
            proposed = start + policy.value
        else:
            proposed = math.ceil(start * (1 + policy.value / 100))
        result = pick(result, proposed)
    return int(result)


def _scale_down_limit(current: int, now: float, history: History, rules: ScalingRules) -> int:
    if rules.select_policy == "Disabled":
        return current
    pick, result = (max, -math.inf) if rules.select_policy == "Min" else (min, math.inf)
    for policy in rules.policies:
        start = _replicas_at_period_start(current, now, history, policy.period_s)
        if policy.type == "Pods":
            proposed = start - policy.value
        else:
            proposed = int(start * (1 - policy.value / 100))
        result = pick(result, proposed)
    return int(result)


def hpa_decide(
    now: float,
    current: int,
    metrics: list[tuple[float | None, float]],
    min_replicas: int,
    max_replicas: int,
    behavior: Behavior,
    history: History,
    tolerance: float = TOLERANCE,
) -> Decision:
    """One sync of the HPA controller for AverageValue metrics given as (total over pods or None, target).

    Returns the replica count it sets and its updated memory. Pure: same inputs, same decision."""
    if current > max_replicas:
        return Decision(
            max_replicas, None, _record_event(history, now, current, max_replicas, behavior), "above max"
        )
    if current < min_replicas:
        return Decision(
            min_replicas, None, _record_event(history, now, current, min_replicas, behavior), "below min"
        )
    proposals = [
        replicas_for_metric(total, target, current, tolerance)
        for total, target in metrics
        if total is not None
    ]
    if not proposals:
        return Decision(current, None, history, "no metrics: no change")
    proposal = max(proposals)
    if len(proposals) < len(metrics) and proposal < current:
        return Decision(current, None, history, "some metrics missing: no scale-down")

    # Stabilization: the highest recommendation within the scale-down window caps a scale-down, the lowest
    # within the scale-up window caps a scale-up; this sync's raw recommendation is remembered.
    up_cutoff = now - behavior.scale_up.stabilization_s
    down_cutoff = now - behavior.scale_down.stabilization_s
    up_recommendation = down_recommendation = proposal
    for t, replicas in history.recommendations:
        if t > up_cutoff:
            up_recommendation = min(up_recommendation, replicas)
        if t > down_cutoff:
            down_recommendation = max(down_recommendation, replicas)
    stabilized = min(max(current, up_recommendation), down_recommendation)
    keep_after = min(up_cutoff, down_cutoff)
    recommendations = tuple((t, r) for t, r in history.recommendations if t > keep_after) + ((now, proposal),)
    history = replace(history, recommendations=recommendations)

    # Scaling policies and bounds.
    desired, reason = stabilized, "desired within range"
    if stabilized > current:
        limit = max(_scale_up_limit(current, now, history, behavior.scale_up), current)
        allowed = min(max_replicas, limit)
        if stabilized > allowed:
            desired, reason = allowed, "scale-up limit" if allowed == limit else "max replicas"
    elif stabilized < current:
        limit = min(_scale_down_limit(current, now, history, behavior.scale_down), current)
        allowed = max(min_replicas, limit)
        if stabilized < allowed:
            desired, reason = allowed, "scale-down limit" if allowed == limit else "min replicas"
    if stabilized != proposal and desired == stabilized:
        reason = "stabilization window"
    return Decision(desired, proposal, _record_event(history, now, current, desired, behavior), reason)


def _record_event(history: History, now: float, current: int, desired: int, behavior: Behavior) -> History:
    if desired > current:
        keep = behavior.scale_up.longest_period_s()
        events = tuple(e for e in history.scale_up_events if e[0] > now - keep) + ((now, desired - current),)
        return replace(history, scale_up_events=events)
    if desired < current:
        keep = behavior.scale_down.longest_period_s()
        events = tuple(e for e in history.scale_down_events if e[0] > now - keep) + (
            (now, current - desired),
        )
        return replace(history, scale_down_events=events)
    return history


# ---- the chart's autoscaling --------------------------------------------------------------------------------


def scaled_behavior(behavior: dict, time_scale: float) -> dict:
    """The chart's behavior with every duration divided by time_scale (rounded, at least 1 s)."""

    def scale(seconds: float) -> int:
        return max(1, round(seconds / time_scale)) if seconds else 0

    out = json.loads(json.dumps(behavior))
    for rules in out.values():
        rules["stabilizationWindowSeconds"] = scale(rules.get("stabilizationWindowSeconds", 0))
        for policy in rules.get("policies", []):
            policy["periodSeconds"] = scale(policy["periodSeconds"])
    return out


@dataclass
class AutoscalingSpec:
    """The worker HPA as the chart renders it, with each metric's PromQL (the adapter rule, filled)."""

    min_replicas: int
    max_replicas: int
    behavior_spec: dict
    metrics: dict[str, tuple[str, float]]  # metric name -> (PromQL, target average value per pod)
    set_values: dict = field(default_factory=dict)

    @property
    def behavior(self) -> Behavior:
        return Behavior.from_spec(self.behavior_spec)


def chart_autoscaling(
    time_scale: float = 1.0, namespace: str | None = None, worker_pods=None
) -> AutoscalingSpec:
    """Renders the chart with the worker HPA on (and the behavior time-scaled) and reads its autoscaling."""
    import yaml

    from tests.charts.chart import CHART_DIR, NAMESPACE, WORKER, render
    from tests.support import chart_queries

    namespace = namespace or NAMESPACE
    worker_pods = worker_pods or [f"{WORKER}-0"]
    set_values: dict = {"worker.autoscaling.enabled": "true"}
    if time_scale != 1:
        defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["worker"]["autoscaling"][
            "behavior"
        ]
        set_values["worker.autoscaling.behavior"] = scaled_behavior(defaults, time_scale)
    rendered = render(set_values=set_values, namespace=namespace)
    hpa = chart_queries.hpa_spec(rendered, WORKER)
    rules = {
        chart_queries.adapter_series_name(r): r
        for r in chart_queries.adapter_rules(CHART_DIR / "values.yaml")
    }
    metrics = {
        name: (chart_queries.adapter_query(rules[name], namespace, worker_pods), target)
        for name, target in hpa["metrics"].items()
    }
    return AutoscalingSpec(hpa["minReplicas"], hpa["maxReplicas"], hpa["behavior"], metrics, set_values)


# ---- load and the control loop ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    concurrency: int
    until_settled: bool = False  # end early once the desired count is back at the minimum (last phase)


class Load:
    """Closed-loop clients streaming short text requests through the gateway; the count follows the phase."""

    def __init__(self, target: str, max_new_tokens: int) -> None:
        import grpc

        from omnigate.gateway.v1 import gateway_pb2 as pb
        from omnigate.gateway.v1 import gateway_pb2_grpc

        self._grpc = grpc
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.request = pb.GenerateRequest(
            messages=[
                pb.Message(role="user", content=[pb.ContentPart(text="Tell me a story about a lighthouse.")])
            ],
            parameters=pb.GenerationParameters(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens),
            generation_mode=pb.GENERATION_MODE_TEXT,
        )
        self.clients: list[asyncio.Task] = []
        self.stopping: set[asyncio.Task] = set()
        self.completed = 0
        self.failed: dict[str, int] = {}

    async def _client(self) -> None:
        me = asyncio.current_task()
        while me not in self.stopping:
            try:
                async for _event in self.stub.Generate(self.request, timeout=300):
                    pass
                self.completed += 1
            except self._grpc.aio.AioRpcError as exc:
                self.failed[exc.code().name] = self.failed.get(exc.code().name, 0) + 1
                await asyncio.sleep(0.5)

    def set_concurrency(self, n: int) -> None:
        while len(self.clients) < n:
            self.clients.append(asyncio.get_running_loop().create_task(self._client()))
        while len(self.clients) > n:
            self.stopping.add(self.clients.pop())  # finishes its current request, then stops

    async def close(self) -> None:
        self.set_concurrency(0)
        pending = [t for t in self.stopping if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=120)
        for task in pending:
            task.cancel()
        await self.channel.close()


async def _simulate(
    gateway_target: str,
    prometheus,
    spec: AutoscalingSpec,
    phases: list[Phase],
    sync_period_s: float,
    max_new_tokens: int,
) -> dict:
    """Two tasks on one clock: the phases switch the load at their times; the controller syncs every period."""
    load = Load(gateway_target, max_new_tokens)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    boundaries: list[dict] = []
    samples: list[dict] = []
    settled = asyncio.Event()  # the last phase may end once the desired count is back at the minimum

    async def drive() -> None:
        for phase in phases:
            settled.clear()
            boundaries.append(
                {"phase": phase.name, "start_s": round(loop.time() - t0, 3), "concurrency": phase.concurrency}
            )
            load.set_concurrency(phase.concurrency)
            if phase.until_settled:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(settled.wait(), phase.seconds)
            else:
                await asyncio.sleep(phase.seconds)
            boundaries[-1]["end_s"] = round(loop.time() - t0, 3)

    async def control() -> None:
        history, replicas = History(), spec.min_replicas
        next_sync = loop.time()
        while True:
            await asyncio.sleep(max(0.0, next_sync - loop.time()))
            next_sync += sync_period_s
            now = loop.time() - t0
            phase = phases[len(boundaries) - 1]
            totals = {}
            for name, (query, _target) in spec.metrics.items():
                result = await asyncio.to_thread(prometheus.query, query)
                totals[name] = sum(r["value"] for r in result) if result else None
            decision = hpa_decide(
                now,
                replicas,
                [(totals[name], target) for name, (_q, target) in spec.metrics.items()],
                spec.min_replicas,
                spec.max_replicas,
                spec.behavior,
                history,
            )
            history, replicas = decision.history, decision.desired
            samples.append(
                {
                    "t": round(now, 3),
                    "phase": phase.name,
                    "clients": len(load.clients),
                    "completed": load.completed,
                    "metrics": totals,
                    "proposal": decision.proposal,
                    "desired": decision.desired,
                    "reason": decision.reason,
                }
            )
            in_phase = [x for x in samples if x["phase"] == phase.name]
            at_min_in_phase = sum(1 for x in in_phase[-3:] if x["desired"] == spec.min_replicas)
            if phase.until_settled and len(in_phase) >= 3 and at_min_in_phase == 3:
                settled.set()

    driver = loop.create_task(drive())
    controller = loop.create_task(control())
    try:
        # The controller only ends by failing (a query error): then stop at once and raise it.
        await asyncio.wait({driver, controller}, return_when=asyncio.FIRST_COMPLETED)
        if controller.done():
            controller.result()
        await driver
    finally:
        for task in (driver, controller):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await load.close()
    return {
        "phases": boundaries,
        "samples": samples,
        "failed_requests": load.failed,
        "completed_requests": load.completed,
    }


def simulate(
    gateway_target: str,
    gateway_metrics: str,
    worker_metrics: str,
    spec: AutoscalingSpec,
    phases: list[Phase],
    workdir: Path,
    sync_period_s: float,
    max_new_tokens: int = 16,
    namespace: str | None = None,
) -> dict:
    """Runs the phases against the stack while a Prometheus scrapes it, deciding every sync period."""
    from tests.charts.chart import GATEWAY, NAMESPACE, WORKER
    from tests.support.prometheus_server import PrometheusServer, ScrapeJob, Target

    namespace = namespace or NAMESPACE
    jobs = [
        ScrapeJob(GATEWAY, namespace, (Target(gateway_metrics, f"{GATEWAY}-0"),)),
        ScrapeJob(WORKER, namespace, (Target(worker_metrics, f"{WORKER}-0"),)),
    ]
    with PrometheusServer(workdir / "prometheus", jobs) as prometheus:
        prometheus.wait_targets_up()
        result = asyncio.run(
            _simulate(gateway_target, prometheus, spec, phases, sync_period_s, max_new_tokens)
        )
    result.update(
        {
            "sync_period_s": sync_period_s,
            "tolerance": TOLERANCE,
            "chart": {
                "set_values": spec.set_values,
                "minReplicas": spec.min_replicas,
                "maxReplicas": spec.max_replicas,
                "behavior": spec.behavior_spec,
                "metrics": {
                    name: {"query": q, "target_average_value": t} for name, (q, t) in spec.metrics.items()
                },
            },
        }
    )
    result["summary"] = summarize(result, spec)
    return result


def summarize(result: dict, spec: AutoscalingSpec) -> dict:
    phases = {p["phase"]: p for p in result["phases"]}
    samples = result["samples"]
    high = phases.get("high")
    summary: dict = {"peak_desired": max((s["desired"] for s in samples), default=None)}
    if high:
        risen = [s for s in samples if s["t"] >= high["start_s"] and s["desired"] > spec.min_replicas]
        summary["rise_after_load_start_s"] = round(risen[0]["t"] - high["start_s"], 3) if risen else None
        after = [s for s in samples if s["t"] >= high["end_s"]]
        back = next((s for s in after if s["desired"] == spec.min_replicas), None)
        summary["back_to_min_after_load_end_s"] = round(back["t"] - high["end_s"], 3) if back else None
    return summary


# ---- report --------------------------------------------------------------------------------------------------


def write_results(result: dict, name: str = "autoscale") -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, png_path = RESULTS / f"{name}.json", RESULTS / f"{name}.png"
    json_path.write_text(json.dumps(result, indent=2) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = [s["t"] for s in samples]
    fig, (load_ax, metric_ax, replicas_ax) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    completed = [s["completed"] for s in samples]
    rate = [0.0] + [(completed[i] - completed[i - 1]) / max(t[i] - t[i - 1], 1e-9) for i in range(1, len(t))]
    load_ax.step(t, [s["clients"] for s in samples], where="post", label="concurrent clients")
    load_ax.plot(t, rate, label="requests completed/s", alpha=0.7)
    load_ax.set(
        ylabel="load", title="Load steps, the chart's autoscaling metrics and the HPA's desired workers"
    )
    load_ax.legend(loc="upper right", fontsize=8)
    for name, metric in result["chart"]["metrics"].items():
        values = [s["metrics"].get(name) for s in samples]
        line = metric_ax.plot(t, [v if v is not None else float("nan") for v in values], label=name)[0]
        metric_ax.axhline(metric["target_average_value"], color=line.get_color(), linestyle=":", linewidth=1)
    metric_ax.set(ylabel="sum over worker pods")
    metric_ax.legend(loc="upper right", fontsize=8, title="dotted: target per pod", title_fontsize=8)
    replicas_ax.step(
        t, [s["desired"] for s in samples], where="post", label="desired workers (HPA)", linewidth=2
    )
    replicas_ax.step(
        t,
        [s["proposal"] if s["proposal"] is not None else float("nan") for s in samples],
        where="post",
        label="metric proposal (before stabilization and policies)",
        linestyle="--",
        alpha=0.7,
    )
    replicas_ax.set(ylabel="replicas", xlabel="seconds")
    replicas_ax.yaxis.get_major_locator().set_params(integer=True)
    stabilization = result["chart"]["behavior"]["scaleDown"].get("stabilizationWindowSeconds", 0)
    for phase in result["phases"]:
        for ax in (load_ax, metric_ax, replicas_ax):
            ax.axvline(phase["start_s"], color="gray", linewidth=0.5)
        load_ax.text(
            phase["start_s"], load_ax.get_ylim()[1] * 0.9, f" {phase['phase']}", fontsize=8, color="gray"
        )
        if phase["phase"] == "high" and "end_s" in phase:
            replicas_ax.axvspan(
                phase["end_s"],
                phase["end_s"] + stabilization,
                color="gray",
                alpha=0.15,
                label=f"scale-down stabilization window ({stabilization} s)",
            )
    replicas_ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return json_path, png_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="divide the behavior's durations by this"
    )
    parser.add_argument("--concurrency", type=int, default=24, help="clients in the high step")
    parser.add_argument("--idle-s", type=float, default=30.0, help="idle step before the load")
    parser.add_argument("--high-s", type=float, default=120.0, help="duration of the high step")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--sync-period-s", type=float, default=0.0, help="0 = 15 s / time scale (at least 1 s)"
    )
    args = parser.parse_args()
    from tests.support.prometheus_server import prometheus_binary
    from tests.support.stack import MODELS_DIR, start_stack

    if prometheus_binary() is None:
        sys.exit("prometheus is not installed (Debian: apt-get install prometheus)")
    spec = chart_autoscaling(args.time_scale)
    sync = args.sync_period_s or max(1.0, SYNC_PERIOD_S / args.time_scale)
    down = spec.behavior.scale_down
    settle_s = (
        down.stabilization_s + (spec.max_replicas - spec.min_replicas) * down.longest_period_s() + 10 * sync
    )
    phases = [
        Phase("idle", args.idle_s, 0),
        Phase("high", args.high_s, args.concurrency),
        Phase("idle after", settle_s, 0, until_settled=True),
    ]
    workdir = Path(tempfile.mkdtemp(prefix="omnigate-autoscale-"))
    stack = start_stack(MODELS_DIR / "tiny-qwen2.5-omni", workdir)
    try:
        print(
            f"phases: {[(p.name, p.seconds, p.concurrency) for p in phases]}, sync every {sync} s", flush=True
        )
        result = simulate(
            stack.gateway.target,
            f"127.0.0.1:{stack.gateway.metrics_port}",
            f"127.0.0.1:{stack.worker.metrics_port}",
            spec,
            phases,
            workdir,
            sync,
            args.max_new_tokens,
        )
    finally:
        stack.gateway.stop()
        stack.worker.stop()
    result["conditions"] = (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), no GPU; one real worker "
        f"(tiny-qwen2.5-omni fp32); time scale {args.time_scale}; load, services and Prometheus share the machine"
    )
    json_path, png_path = write_results(result)
    print(json.dumps(result["summary"], indent=2))
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
