"""The gateway's workers: discovery, health, balancing, ejection, and Generate with retries.

``WorkerPool`` holds one ``WorkerClient`` (a channel, its stubs, the worker's model info and state) per
worker address:

- **Discovery.** ``OMNIGATE_GATEWAY_WORKER_TARGET`` is a comma-separated list of entries. An entry with an
  IP address (``10.0.0.7:50061``, ``[::1]:50061``) is one worker. An entry with a name (``dns:///name:port``,
  gRPC's syntax, or plain ``name:port``) is resolved with the event loop's ``getaddrinfo`` every
  ``worker_discovery_interval_s``: every A/AAAA record is a worker (a Kubernetes headless Service lists
  one per ready pod). Workers that leave the answers get no new requests; their channel closes once their
  calls are done.
- **Health.** Each worker's ``grpc.health.v1`` status is checked every ``worker_check_interval_s`` (at
  once after a failed call). A worker is *ready* when it answers SERVING and serves the pool's model,
  *draining* when it answered NOT_SERVING after having served (SIGTERM), *not_ready* when it cannot be
  reached, is still loading or serves another model, *ejected* for ``worker_ejection_s`` after
  ``worker_eject_after_failures`` failed calls in a row.
- **Balancing.** A request goes to the ready worker with the fewest requests outstanding from this
  gateway (ties broken at random).
- **Retries.** A call that fails before any output reached the client is sent again to another worker
  (at most ``worker_max_retries`` times, within the request's deadline) when the failure is retriable:
  UNAVAILABLE (unreachable, crashed, draining, still loading) or RESOURCE_EXHAUSTED carrying a retry delay
  (a full queue). Once output has started, a failure ends the stream with its status: nothing is sent
  twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnigate import status
from omnigate.conversation import GenerationRequest, ModelInfo
from omnigate.errors import DeadlineExceeded, Unavailable
from omnigate.worker.v1 import worker_pb2, worker_pb2_grpc
from omnigate_gateway import convert
from omnigate_gateway.workers.channels import credentials_version, worker_channel

if TYPE_CHECKING:
    from omnigate_gateway.metrics import GatewayMetrics
    from omnigate_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # grpc.aio's call classes are generic only in their stubs
    WorkerCall = grpc.aio.StreamStreamCall[worker_pb2.GenerateRequest, worker_pb2.GenerateResponse]

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
STATES = ("ready", "not_ready", "ejected", "draining")
_STATE_WORDS = {
    "ready": "ready",
    "not_ready": "not ready (unreachable, loading its model, or serving another model)",
    "ejected": "ejected after failed calls",
    "draining": "draining",
}

# Failures that count against a worker (toward ejection): the worker is gone, refuses work (draining, not
# ready), or reports it is out of a resource (a full queue, out of memory: RESOURCE_EXHAUSTED with a retry
# delay). Everything else is the worker's answer to one request (its input was bad, too long, or hit a bug),
# which says nothing about the next request: counting INTERNAL let a handful of bad requests eject the only
# worker and turn the gateway NOT_SERVING. A worker that is broken for every request says so through its
# health (the watch marks it not ready).
_WORKER_FAULTS = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS}


def is_worker_fault(code: grpc.StatusCode | None, retry_after_s: float | None = None) -> bool:
    """Whether a call ending with ``code`` counts against the worker (see ``_WORKER_FAULTS``)."""
    return code in _WORKER_FAULTS or (
        code is grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_s is not None
    )


Resolve = Callable[[str, int], Awaitable[list[str]]]


# ---- worker_target ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetEntry:
    """One entry of worker_target: an address (one worker) or a name resolved to workers."""

    host: str
    port: int
    resolve: bool  # True: a DNS name whose A/AAAA records are the workers

    def __str__(self) -> str:
        return f"dns:///{self.host}:{self.port}" if self.resolve else address(self.host, self.port)


def address(host: str, port: int) -> str:
    """``host:port`` as gRPC takes it (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_worker_target(value: str) -> list[TargetEntry]:
    """Parses worker_target (``host:port``, ``dns:///name:port``, comma-separated); ValueError if malformed."""
    entries = []
    for raw in (item.strip() for item in value.split(",")):
        if not raw:
            continue
        rest = raw
        if rest.startswith("dns:"):
            rest = rest[4:]
            if rest.startswith("//"):
                authority, _, rest = rest[2:].partition("/")
                if authority:
                    raise ValueError(
                        f"worker target {raw!r}: a DNS server (dns://SERVER/...) is not supported; use "
                        "dns:///name:port"
                    )
        if rest.startswith("["):
            host, sep, port_text = rest[1:].partition("]:")
            if not sep:
                raise ValueError(f"worker target {raw!r}: expected [IPv6]:port")
        else:
            host, sep, port_text = rest.rpartition(":")
            if not sep or ":" in host:
                raise ValueError(
                    f"worker target {raw!r}: expected host:port, [IPv6]:port or dns:///name:port"
                )
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"worker target {raw!r}: expected host:port with a port from 1 to 65535")
        try:
            ipaddress.ip_address(host)
            is_ip = True
        except ValueError:
            is_ip = False
        if not is_ip and ":" in host:
            raise ValueError(f"worker target {raw!r}: {host!r} is not an IPv6 address")
        entries.append(TargetEntry(host, int(port_text), resolve=not is_ip))
    if not entries:
        raise ValueError(
            "worker_target is empty: give host:port, a comma-separated list, or dns:///name:port"
        )
    return entries


async def resolve_with_loop(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (A and AAAA records), in the resolver's order, no duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# ---- one worker ---------------------------------------------------------------------------------------


class WorkerClient:
    """One worker: its channel, health and model info, and what this gateway has outstanding on it."""

    def __init__(self, target: str, settings: GatewaySettings) -> None:
        self.target = target
        self._settings = settings
        self._open()
        self.info: ModelInfo | None = None
        self.serving = False  # the last health check answered SERVING
        self.draining = False  # it answered NOT_SERVING after having served
        self.suspect = False  # a call failed as unavailable: no new requests until the next health check
        self.outstanding = 0  # calls this gateway has on it now
        self.failures = 0  # worker faults in a row
        self.ejected_until = 0.0
        self.removed = False  # no longer discovered: closes once its calls are done
        self.recheck = asyncio.Event()
        self.watcher: asyncio.Task | None = None

    def _open(self) -> None:
        self.channel = worker_channel(self.target, self._settings)
        self.stub = worker_pb2_grpc.WorkerServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def reopen(self) -> grpc.aio.Channel:
        """Opens a new channel (new TLS files); returns the old one, for the caller to close when done."""
        old = self.channel
        self._open()
        return old

    def state(self, model_id: str | None, now: float) -> str:
        if self.draining:
            return "draining"
        if not self.serving or self.suspect or self.info is None or self.info.model_id != model_id:
            return "not_ready"
        if self.ejected_until > now:
            return "ejected"
        return "ready"

    async def check(self, timeout_s: float) -> bool:
        """Asks the worker's health (and, when it starts serving, its model info); updates the state.

        Returns True when the model info was (re)read.
        """
        read_info = False
        try:
            # types-grpcio-health-checking declares HealthStub without its methods
            reply = await self.health.Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=WORKER_SERVICE), timeout=timeout_s
            )
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                if self.info is None or not self.serving:
                    info = await self.stub.GetModelInfo(worker_pb2.GetModelInfoRequest(), timeout=timeout_s)
                    self.info = convert.model_info_from_worker(info)
                    read_info = True
                    log.info("worker %s serves %s", self.target, self.info.model_id)
                self.serving, self.draining = True, False
            else:
                if self.serving and not self.draining:
                    log.info("worker %s is draining (NOT_SERVING): no new requests go to it", self.target)
                self.draining = self.draining or self.serving
                self.serving = False
        except grpc.RpcError as exc:
            if self.serving or self.draining:
                log.warning("worker %s is unreachable: %s", self.target, exc.details() or exc.code().name)
            self.serving = self.draining = False
            self.info = None  # a worker that comes back may be a new process (reread its model)
        self.suspect = False
        return read_info


# ---- the pool -----------------------------------------------------------------------------------------


class WorkerPool:
    """Every worker of the gateway; ``generate`` routes a request to one and retries it on another."""

    def __init__(
        self, settings: GatewaySettings, metrics: GatewayMetrics, *, resolve: Resolve | None = None
    ) -> None:
        self.target = settings.worker_target
        self._settings = settings
        self._metrics = metrics
        self._entries = parse_worker_target(settings.worker_target)
        self._resolve = resolve or resolve_with_loop
        self._resolved: dict[TargetEntry, list[str]] = {}
        self._workers: dict[str, WorkerClient] = {}
        self._model_id: str | None = None
        self._tasks: list[asyncio.Task] = []
        self._closing: dict[asyncio.Task, grpc.aio.Channel] = {}  # old channels closing once idle
        self._changed: asyncio.Future | None = None
        self._credentials = credentials_version(settings)
        for state in STATES:
            metrics.workers.labels(state).set(0)

    # -- lifecycle --

    def start(self) -> None:
        """Starts discovery and health checks (call from the running event loop)."""
        self._tasks.append(asyncio.create_task(self._discover(), name="worker-discovery"))

    async def close(self) -> None:
        tasks = self._tasks + [w.watcher for w in self._workers.values() if w.watcher]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        closing = list(self._closing.values())
        for task in list(self._closing):
            task.cancel()
        await asyncio.gather(*(channel.close() for channel in closing), return_exceptions=True)
        await asyncio.gather(*(w.channel.close() for w in self._workers.values()))
        self._workers.clear()

    # -- what the rest of the gateway reads --

    @property
    def info(self) -> ModelInfo | None:
        """The served model's info while a worker is ready, else None."""
        ready = self._ready()
        return ready[0].info if ready else None

    def require_info(self) -> ModelInfo:
        info = self.info
        if info is None:
            raise Unavailable(self._no_worker_message())
        return info

    def counts(self) -> dict[str, int]:
        """Workers by state."""
        now = time.monotonic()
        counts = dict.fromkeys(STATES, 0)
        for worker in self._workers.values():
            if not worker.removed:
                counts[worker.state(self._model_id, now)] += 1
        return counts

    def workers(self) -> list[WorkerClient]:
        return [w for w in self._workers.values() if not w.removed]

    async def watch_ready(self) -> AsyncIterator[bool]:
        """Yields whether any worker is ready: now, then each time that changes."""
        last = None
        while True:
            if self._changed is None:
                self._changed = asyncio.get_running_loop().create_future()
            changed = self._changed
            ready = bool(self._ready())
            if ready != last:
                last = ready
                yield ready
            await asyncio.shield(changed)

    def generate(
        self,
        request: GenerationRequest,
        timeout_s: float | None,
        metadata: list[tuple[str, str]] | None = None,
    ) -> PoolCall:
        """Starts a Generate call (iterate it for worker events; ``cancel()`` it when done).

        ``metadata`` goes with every attempt (trace context, request id).
        """
        return PoolCall(self, request, timeout_s, metadata)

    # -- routing --

    def _ready(self) -> list[WorkerClient]:
        now = time.monotonic()
        return [
            w for w in self._workers.values() if not w.removed and w.state(self._model_id, now) == "ready"
        ]

    def pick(self, exclude: AbstractSet[str] = frozenset()) -> WorkerClient | None:
        """The ready worker with the fewest outstanding calls (random among equals), or None."""
        candidates = [w for w in self._ready() if w.target not in exclude]
        if not candidates:
            return None
        fewest = min(w.outstanding for w in candidates)
        return random.choice([w for w in candidates if w.outstanding == fewest])

    def _no_worker_message(self) -> str:
        known = {state: n for state, n in self.counts().items() if n}
        if not known:
            where = ", ".join(str(e) for e in self._entries)
            return f"no worker is ready: none found at {where}; retry shortly"
        states = ", ".join(f"{n} {_STATE_WORDS[state]}" for state, n in known.items())
        return f"no worker is ready yet: {states}; retry shortly"

    def attempt_done(self, worker: WorkerClient, code: grpc.StatusCode | None, fault: bool = False) -> None:
        """Books the end of one call on ``worker`` (``code`` None: cancelled by the gateway; ``fault``: the
        call failed for a reason of the worker's, ``is_worker_fault``).

        Ejection never takes the last ready worker out (Envoy's outlier detection keeps a share of hosts
        for the same reason): with nowhere else to go, an ejection would only turn a degraded service into
        no service. A worker that is really gone is marked unavailable by the health watch instead.
        """
        worker.outstanding -= 1
        if fault:
            worker.failures += 1
            if code is grpc.StatusCode.UNAVAILABLE:
                worker.suspect = True  # until a health check says otherwise
                worker.recheck.set()
            if worker.failures >= self._settings.worker_eject_after_failures:
                worker.failures = 0
                others = [w for w in self._ready() if w is not worker]
                if others:
                    worker.ejected_until = time.monotonic() + self._settings.worker_ejection_s
                    log.warning(
                        "worker %s ejected for %.0f s after %d failed calls in a row",
                        worker.target,
                        self._settings.worker_ejection_s,
                        self._settings.worker_eject_after_failures,
                    )
                else:
                    log.warning(
                        "worker %s failed %d calls in a row; not ejected: it is the only ready worker",
                        worker.target,
                        self._settings.worker_eject_after_failures,
                    )
            self._publish()
        elif code is not None:
            worker.failures = 0  # it answered
        if worker.removed and worker.outstanding == 0:
            self._retire(worker)

    # -- discovery and health --

    async def _discover(self) -> None:
        while True:
            targets: list[str] = []
            for entry in self._entries:
                if not entry.resolve:
                    targets.append(address(entry.host, entry.port))
                    continue
                try:
                    found = await self._resolve(entry.host, entry.port)
                except socket.gaierror as exc:
                    if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                        found = []  # the name exists no more, or has no ready workers
                    else:  # a resolver hiccup: keep what we knew
                        found = self._resolved.get(entry, [])
                    if self._resolved.get(entry) != found:
                        log.warning("resolving %s: %s", entry, exc)
                except OSError as exc:
                    found = self._resolved.get(entry, [])
                    log.warning("resolving %s: %s", entry, exc)
                if found != self._resolved.get(entry):
                    log.info("%s resolves to %s", entry, ", ".join(found) or "nothing")
                self._resolved[entry] = found
                targets.extend(address(host, entry.port) for host in found)
            self._update(list(dict.fromkeys(targets)))
            self._check_credentials()
            if not any(entry.resolve for entry in self._entries):
                return
            await asyncio.sleep(self._settings.worker_discovery_interval_s)

    def _update(self, targets: list[str]) -> None:
        for target in targets:
            worker = self._workers.get(target)
            if worker is None:
                worker = self._workers[target] = WorkerClient(target, self._settings)
                log.info("worker %s added", target)
            elif worker.removed:
                worker.removed = False
                log.info("worker %s is back", target)
            else:
                continue
            worker.watcher = asyncio.create_task(self._watch(worker), name=f"health {target}")
        for target, worker in list(self._workers.items()):
            if target not in targets and not worker.removed:
                log.info("worker %s is no longer discovered: no new requests go to it", target)
                worker.removed = True
                if worker.watcher is not None:
                    worker.watcher.cancel()
                    worker.watcher = None
                if worker.outstanding == 0:
                    self._retire(worker)
        self._publish()

    def _retire(self, worker: WorkerClient) -> None:
        if self._workers.get(worker.target) is worker:
            del self._workers[worker.target]
        self._close_later(worker.channel)

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.create_task(channel.close(grace=self._settings.default_timeout_s))
        self._closing[task] = channel
        task.add_done_callback(lambda done: self._closing.pop(done, None))

    def _check_credentials(self) -> None:
        """New TLS files (a renewed certificate or CA): new channels; old ones close when their calls end."""
        version = credentials_version(self._settings)
        if version == self._credentials:
            return
        try:
            for worker in self._workers.values():
                self._close_later(worker.reopen())
        except Exception:  # noqa: BLE001 - files mid-rotation: try again at the next check
            log.exception("reloading the worker TLS files failed; keeping the current channels")
            return
        log.info("worker TLS files changed: new channels opened")
        self._credentials = version

    async def _watch(self, worker: WorkerClient) -> None:
        s = self._settings
        while True:
            worker.recheck.clear()
            fresh = await worker.check(s.worker_check_timeout_s)
            self._adopt_model(worker, fresh)
            self._publish()
            if not any(entry.resolve for entry in self._entries):
                self._check_credentials()
            with contextlib.suppress(TimeoutError):  # (asyncio.wait_for could swallow a cancellation)
                async with asyncio.timeout(s.worker_check_interval_s):
                    await worker.recheck.wait()

    def _adopt_model(self, worker: WorkerClient, fresh: bool) -> None:
        """The pool serves one model: the one most serving workers serve (on a tie, the one it had).

        Workers serving another model get no requests, and say so in the log. When the last worker of the
        pool's model goes (a rollout to a new model), the pool follows the remaining ones.
        """
        serving = [
            (w, w.info.model_id)
            for w in self._workers.values()
            if not w.removed and w.serving and w.info is not None
        ]
        counts = Counter(model_id for _, model_id in serving)
        if counts:
            best, n = counts.most_common(1)[0]
            if self._model_id is None or counts[self._model_id] < n:
                if self._model_id is not None:
                    log.warning("most workers now serve %s (was %s): serving %s", best, self._model_id, best)
                self._model_id = best
                for other, model_id in serving:
                    if model_id != best:
                        self._log_mismatch(other, model_id)
                return
        if fresh and worker.serving and worker.info is not None and worker.info.model_id != self._model_id:
            self._log_mismatch(worker, worker.info.model_id)

    def _log_mismatch(self, worker: WorkerClient, model_id: str) -> None:
        log.error(
            "worker %s serves %s but the other workers serve %s: no requests go to it",
            worker.target,
            model_id,
            self._model_id,
        )

    def _publish(self) -> None:
        for state, n in self.counts().items():
            self._metrics.workers.labels(state).set(n)
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        self._changed = None


class PoolCall:
    """One Generate request across attempts: iterate it for worker events, ``cancel()`` it when done.

    An attempt that fails before its first event is retried on another worker when the failure is
    retriable and the budget and deadline allow; the last failure is raised as the ``grpc.RpcError`` it
    was (``target`` names the worker that produced it).
    """

    def __init__(
        self,
        pool: WorkerPool,
        request: GenerationRequest,
        timeout_s: float | None,
        metadata: list[tuple[str, str]] | None,
    ) -> None:
        self._pool = pool
        self._request = request
        self._metadata = metadata
        self._deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        self._tried: set[str] = set()
        self._retries = 0
        self._started = False  # an event went to the caller: no retry from now on
        self._worker: WorkerClient | None = None
        self._call: WorkerCall | None = None
        self.target = pool.target

    def __aiter__(self) -> PoolCall:
        return self

    async def __anext__(self) -> worker_pb2.GenerateResponse:
        while True:
            call = self._call if self._call is not None else self._attempt()
            try:
                event = await call.read()
            except grpc.RpcError as exc:
                # A connection lost under the call is the worker going away: book it as UNAVAILABLE.
                code = grpc.StatusCode.UNAVAILABLE if status.is_connection_lost(exc) else exc.code()
                self._end(code, is_worker_fault(code, status.retry_after_s(exc)))
                if not self._retry(exc):
                    raise
                continue
            if event is grpc.aio.EOF:
                self._end(grpc.StatusCode.OK)
                raise StopAsyncIteration
            self._started = True
            return cast(worker_pb2.GenerateResponse, event)  # read() gives a message or EOF, ruled out above

    def cancel(self) -> None:
        """Stops the current attempt (no-op when it has ended)."""
        if self._call is not None:
            self._call.cancel()
            self._end(None)

    def _attempt(self) -> WorkerCall:
        """Starts the call on the least busy worker not tried yet; returns it (it is also ``self._call``)."""
        worker = self._pool.pick(self._tried)
        if worker is None:
            raise Unavailable(self._pool._no_worker_message())
        timeout = None
        if self._deadline is not None:
            timeout = self._deadline - time.monotonic()
            if timeout <= 0:
                raise DeadlineExceeded("the request's deadline passed before a worker could take it")
        self._tried.add(worker.target)
        self.target = worker.target
        worker.outstanding += 1
        self._worker = worker
        stream = convert.worker_stream(self._request, self._pool._settings.worker_chunk_bytes)
        self._call = worker.stub.Generate(stream, timeout=timeout, metadata=self._metadata)
        return self._call

    def _end(self, code: grpc.StatusCode | None, fault: bool = False) -> None:
        if self._worker is not None:
            self._pool.attempt_done(self._worker, code, fault)
        self._worker = None
        self._call = None

    def _retry(self, exc: grpc.RpcError) -> bool:
        """Whether to try another worker after ``exc`` (counts the failed attempt when so)."""
        code = exc.code()
        retriable = (
            code is grpc.StatusCode.UNAVAILABLE
            or status.is_connection_lost(exc)  # the worker died while we were sending it the request
            or (code is grpc.StatusCode.RESOURCE_EXHAUSTED and status.retry_after_s(exc) is not None)
        )
        s = self._pool._settings
        if self._started or not retriable or self._retries >= s.worker_max_retries:
            return False
        if self._deadline is not None and self._deadline <= time.monotonic():
            return False
        if self._pool.pick(self._tried) is None:
            return False
        self._retries += 1
        log.info(
            "worker %s failed before any output (%s: %s); trying another worker",
            self.target,
            code.name,
            exc.details(),
        )
        self._pool._metrics.upstream_errors.labels(code.name).inc()
        self._pool._metrics.upstream_retries.inc()
        return True
