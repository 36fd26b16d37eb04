"""Starting the real worker and gateway as processes on OS-chosen loopback ports (tests and benchmarks)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnigate_client import OmnigateClient

REPO_DIR = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO_DIR / "models"
START_TIMEOUT_S = 240


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    grpc_port: int
    metrics_port: int | None
    log_path: Path
    http_port: int | None = None  # the gateway's OpenAI-compatible HTTP API

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


def start_service(name: str, module: str, env: dict[str, str], workdir: Path) -> Service:
    """Starts ``python -m module`` with its port set to 0 and waits for the ports file it writes."""
    ports_file = workdir / f"{name}.ports.json"
    log_path = workdir / f"{name}.log"
    prefix = "OMNIGATE_WORKER_" if "worker" in module else "OMNIGATE_GATEWAY_"
    full_env = {
        **os.environ,
        f"{prefix}PORT": "0",
        f"{prefix}METRICS_PORT": "0",
        f"{prefix}PORTS_FILE": str(ports_file),
        # The gateway's HTTP API defaults to port 8000: tests take an OS-chosen one too. With no worker
        # ready, a test gateway refuses at once instead of holding the request for a cold start (tests of
        # the refusal expect it); tests/integration/test_scale_from_zero.py turns the wait on.
        **(
            {"OMNIGATE_GATEWAY_HTTP_PORT": "0", "OMNIGATE_GATEWAY_WAIT_FOR_WORKER_S": "0"}
            if prefix == "OMNIGATE_GATEWAY_"
            else {}
        ),
        **env,
    }
    log = open(log_path, "wb")  # noqa: SIM115 - owned by the process for its lifetime
    process = subprocess.Popen(
        [sys.executable, "-m", module], env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_DIR
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ports_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{name} did not start:\n{log_path.read_text(errors='replace')[-4000:]}")
        time.sleep(0.05)
    ports = json.loads(ports_file.read_text())
    return Service(
        name, process, ports["grpc_port"], ports["metrics_port"], log_path, http_port=ports.get("http_port")
    )


def wait_serving(service: Service, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(service.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise RuntimeError(f"{service.name} exited:\n{service.log_tail()}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{service.name} not SERVING after {timeout_s} s:\n{service.log_tail()}")


@dataclass
class Stack:
    worker: Service
    gateway: Service

    def client(self) -> OmnigateClient:
        return OmnigateClient(self.gateway.target, timeout_s=300)


def start_stack(
    model: Path,
    workdir: Path,
    gateway_env: dict[str, str] | None = None,
    worker_env: dict[str, str] | None = None,
) -> Stack:
    if not (model / "config.json").exists():
        raise RuntimeError(f"{model} is missing: run `make models` (make test does it first)")
    worker = start_service(
        "worker", "omnigate_worker.main", {"OMNIGATE_WORKER_MODEL": str(model), **(worker_env or {})}, workdir
    )
    try:
        gateway = start_service(
            "gateway",
            "omnigate_gateway.main",
            {
                "OMNIGATE_GATEWAY_WORKER_TARGET": worker.target,
                "OMNIGATE_GATEWAY_WORKER_CHECK_INTERVAL_S": "0.5",
                # The test media server is on loopback: the local-development setting allows it.
                "OMNIGATE_GATEWAY_ALLOW_PRIVATE_NETWORKS": "true",
                **(gateway_env or {}),
            },
            workdir,
        )
    except Exception:
        worker.stop()
        raise
    try:
        wait_serving(worker)
        wait_serving(gateway)
    except Exception:
        gateway.stop()
        worker.stop()
        raise
    return Stack(worker, gateway)


# ---- several workers behind one gateway (failover tests, bench/soak.py) ------------------------------


def start_worker(
    model: Path, workdir: Path, name: str, env: dict[str, str] | None = None, port: int | None = None
) -> Service:
    """Starts a worker process; ``port`` None = OS-chosen, else that port (to restart a worker in place)."""
    return start_service(
        name,
        "omnigate_worker.main",
        {
            "OMNIGATE_WORKER_MODEL": str(model),
            **({"OMNIGATE_WORKER_PORT": str(port)} if port is not None else {}),
            **(env or {}),
        },
        workdir,
    )


def scrape_metrics(service: Service, timeout_s: float = 5.0) -> dict[tuple[str, tuple], float]:
    """The service's Prometheus samples: {(name, sorted label items): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(
        f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=timeout_s
    ).read()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def metric_sum(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        value
        for (sample_name, items), value in samples.items()
        if sample_name == name and all(dict(items).get(k) == v for k, v in labels.items())
    )


@dataclass
class PoolStack:
    """Several workers behind one gateway; workers can be killed, stopped and restarted on their port."""

    workers: list[Service]
    gateway: Service
    model: Path
    workdir: Path
    worker_env: dict[str, str]
    starts: int = 0

    def restart_worker(self, index: int, wait: bool = True) -> Service:
        """Starts worker ``index`` again on the same port (after it exited or was killed)."""
        old = self.workers[index]
        if old.process.poll() is None:
            raise RuntimeError(f"{old.name} is still running")
        self.starts += 1
        new = start_worker(
            self.model, self.workdir, f"worker{index}-{self.starts}", self.worker_env, port=old.grpc_port
        )
        self.workers[index] = new
        if wait:
            wait_serving(new)
        return new

    def gateway_workers(self) -> dict[str, float]:
        """The gateway's omnigate_gateway_workers gauge by state."""
        samples = scrape_metrics(self.gateway)
        return {
            dict(items)["state"]: value
            for (name, items), value in samples.items()
            if name == "omnigate_gateway_workers"
        }

    def wait_ready(self, ready: int, timeout_s: float = 60.0) -> None:
        """Waits until the gateway counts ``ready`` ready workers."""
        deadline = time.monotonic() + timeout_s
        while (states := self.gateway_workers()).get("ready") != ready:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"gateway workers {states}, wanted {ready} ready:\n{self.gateway.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        self.gateway.stop()
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGCONT)  # in case a test left it stopped
            worker.stop()


def start_pool_stack(
    model: Path,
    workdir: Path,
    workers: int = 2,
    gateway_env: dict[str, str] | None = None,
    worker_env: dict[str, str] | None = None,
) -> PoolStack:
    """``workers`` workers and one gateway whose worker_target lists them all; returns once all serve."""
    if not (model / "config.json").exists():
        raise RuntimeError(f"{model} is missing: run `make models` (make test does it first)")
    started: list[Service] = []
    try:
        for index in range(workers):
            started.append(start_worker(model, workdir, f"worker{index}", worker_env))
        gateway = start_service(
            "gateway",
            "omnigate_gateway.main",
            {
                "OMNIGATE_GATEWAY_WORKER_TARGET": ",".join(w.target for w in started),
                "OMNIGATE_GATEWAY_WORKER_CHECK_INTERVAL_S": "0.5",
                **(gateway_env or {}),
            },
            workdir,
        )
        started.append(gateway)
        for service in started:
            wait_serving(service)
    except Exception:
        for service in started:
            service.stop()
        raise
    stack = PoolStack(started[:-1], gateway, model, workdir, dict(worker_env or {}))
    stack.wait_ready(workers)
    return stack


# ---- commands as a user types them (the README's `make` targets) ----------------------------------------


def user_env(**extra: str) -> dict[str, str]:
    """A user's shell: no settings or make state inherited from the test run (`make test` runs the tests)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMNIGATE_", "MAKE", "MFLAGS"))}
    return {**env, **extra}


def start_command(args: list[str], log: Path) -> subprocess.Popen:
    """Starts ``args`` in the repository as a user would, output to ``log``, in its own process group:
    `make` starts children (worker, gateway, http.server) and ``stop_process_group`` stops them all."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            args, cwd=REPO_DIR, env=user_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (make, its shell and the services it started), SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=40)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
