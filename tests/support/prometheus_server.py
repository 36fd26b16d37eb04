"""A real Prometheus server (the Debian package's binary) on 127.0.0.1, for tests and benchmarks.

It scrapes the services' metrics endpoints as the chart's ServiceMonitors would in a cluster: `job` is the
component's Service name and every target carries `namespace` and `pod` labels, so the chart's queries,
which select on those labels, run unmodified. Rule files (a PrometheusRule's `.spec`) are evaluated too.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import yaml

START_TIMEOUT_S = 60


class PromQLError(RuntimeError):
    """Prometheus refused a query (bad syntax, execution error)."""


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


@dataclass(frozen=True)
class Target:
    """One scraped endpoint: its address and the pod name it stands for."""

    address: str  # host:port of the /metrics endpoint
    pod: str


@dataclass(frozen=True)
class ScrapeJob:
    """A scrape job named like the component's Service (the `job` label the chart's queries select on)."""

    job: str
    namespace: str
    targets: tuple[Target, ...]


@dataclass
class PrometheusServer:
    workdir: Path
    jobs: list[ScrapeJob]
    rule_groups: dict | None = None  # {"groups": [...]}: a PrometheusRule's spec
    scrape_interval_s: float = 1.0
    port: int = 0
    process: subprocess.Popen | None = field(default=None, repr=False)
    _http: httpx.Client | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def config(self) -> dict:
        interval = f"{int(self.scrape_interval_s * 1000)}ms"
        config: dict = {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "scrape_configs": [
                {
                    "job_name": job.job,
                    "metrics_path": "/metrics",
                    "static_configs": [
                        {"targets": [t.address], "labels": {"namespace": job.namespace, "pod": t.pod}}
                        for t in job.targets
                    ],
                }
                for job in self.jobs
            ],
        }
        if self.rule_groups is not None:
            config["rule_files"] = [str(self.workdir / "rules.yaml")]
        return config

    def start(self) -> PrometheusServer:
        binary = prometheus_binary()
        if binary is None:
            raise RuntimeError("prometheus is not installed (Debian: apt-get install prometheus)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.rule_groups is not None:
            (self.workdir / "rules.yaml").write_text(yaml.safe_dump(self.rule_groups, sort_keys=False))
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self._http = httpx.Client(timeout=10)
        for _attempt in range(5):  # the free port we picked may be taken before Prometheus binds it
            self.port = _free_port()
            log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process for its lifetime
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1d",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError(f"prometheus did not start:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if self._http.get(f"{self.url}/-/ready").status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def close(self) -> None:
        self.stop()
        if self._http is not None:
            self._http.close()

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- HTTP API ---------------------------------------------------------------------------------------

    def _get(self, path: str, params: dict | list) -> dict | list:
        reply = self._http.get(f"{self.url}{path}", params=params)
        body = reply.json()
        if reply.status_code != 200 or body.get("status") != "success":
            raise PromQLError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query: [{"metric": {...}, "value": float}] (scalars and strings become one sample)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._get("/api/v1/query", params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": float(data["result"][1])}]
        return [{"metric": r["metric"], "value": float(r["value"][1])} for r in data["result"]]

    def query_range(self, expr: str, start: float, end: float, step_s: float = 1.0) -> list[dict]:
        """[{"metric": {...}, "values": [(t, float), ...]}]"""
        data = self._get(
            "/api/v1/query_range",
            {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": step_s},
        )
        return [
            {"metric": r["metric"], "values": [(float(t), float(v)) for t, v in r["values"]]}
            for r in data["result"]
        ]

    def series(self, match: str) -> list[dict]:
        return self._get("/api/v1/series", [("match[]", match)])

    def targets(self) -> list[dict]:
        return self._get("/api/v1/targets", {"state": "active"})["activeTargets"]

    def rules(self) -> list[dict]:
        return [rule for group in self._get("/api/v1/rules", {})["groups"] for rule in group["rules"]]

    def wait_targets_up(self, timeout_s: float = 30) -> None:
        """Until every target has been scraped successfully at least once."""
        deadline = time.monotonic() + timeout_s
        expected = sum(len(job.targets) for job in self.jobs)
        while True:
            targets = self.targets()
            if len(targets) == expected and all(t["health"] == "up" for t in targets):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"targets not up after {timeout_s} s: {targets}\n{self.log_tail()}")
            time.sleep(0.2)

    def wait_scrapes(self, count: int = 2) -> None:
        """Waits until every target has been scraped `count` more times (new data is in the TSDB)."""
        time.sleep(count * self.scrape_interval_s + 0.2)
        started = time.time()
        deadline = time.monotonic() + 10 * count * self.scrape_interval_s + 10
        while time.monotonic() < deadline:
            if all(_parse_time(t["lastScrape"]) >= started for t in self.targets()):
                return
            time.sleep(0.1)
        raise RuntimeError(f"targets were not scraped again:\n{self.log_tail()}")


def _parse_time(value: str) -> float:
    """Prometheus' RFC 3339 timestamps (nanoseconds, Z or an offset) as Unix seconds."""
    match = re.fullmatch(r"(.*?)(\.\d+)?(Z|[+-]\d\d:\d\d)", value)
    if match is None:
        raise ValueError(f"not an RFC 3339 time: {value!r}")
    zone = "+00:00" if match[3] == "Z" else match[3]
    return datetime.fromisoformat(match[1] + zone).timestamp() + float(match[2] or 0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A loopback port nothing listens on (for a service that must find no peer)."""
    return _free_port()
