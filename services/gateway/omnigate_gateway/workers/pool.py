"""The set of a gateway's workers, and the choice of one for each request.

``WorkerPool`` holds one ``WorkerClient`` (``client.py``: a channel, its stubs, the worker's model info and
state) per worker address:

- **Discovery.** The workers are the entries of ``worker_target`` (``targets.py``), names resolved again
  every ``worker_discovery_interval_s``. Workers that leave the answers get no new requests; their channel
  closes once their calls are done.
- **Health.** Each worker's health is watched (``WorkerClient.watch``); the pool serves the model most
  serving workers serve.
- **Balancing.** A request goes to the ready worker with the fewest requests outstanding from this
  gateway (ties broken at random).
- **Ejection.** A worker is ejected for ``worker_ejection_s`` after ``worker_eject_after_failures`` failed
  calls in a row (never the last ready one).

``generate`` starts one request's call (``call.py``, where a failed attempt is retried on another worker).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING

import grpc

from omnigate.conversation import GenerationRequest, ModelInfo
from omnigate.errors import Unavailable
from omnigate_gateway.workers.call import PoolCall
from omnigate_gateway.workers.channels import credentials_version
from omnigate_gateway.workers.client import STATE_WORDS, STATES, WorkerClient
from omnigate_gateway.workers.targets import (
    Resolve,
    TargetEntry,
    address,
    parse_worker_target,
    resolve_with_loop,
)

if TYPE_CHECKING:
    from omnigate_gateway.metrics import GatewayMetrics
    from omnigate_gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


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
            raise Unavailable(self.no_worker_message())
        return info

    async def wait_for_info(self, timeout_s: float, retry_after_s: float) -> ModelInfo:
        """The served model's info, waiting up to ``timeout_s`` for a worker to become ready while none is
        (a cold start); Unavailable with ``retry_after_s`` as its retry delay when none became ready."""
        info = self.info
        if info is None and timeout_s > 0:
            try:
                async with asyncio.timeout(timeout_s):
                    async for ready in self.watch_ready():
                        if ready and (info := self.info) is not None:
                            break
            except TimeoutError:
                pass
        if info is None:
            raise Unavailable(self.no_worker_message(), retry_after_s=retry_after_s)
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
        return PoolCall(self, self._settings, self._metrics, request, timeout_s, metadata)

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

    def no_worker_message(self) -> str:
        """Why no worker can take a request now (the workers by state, or where none was found)."""
        known = {state: n for state, n in self.counts().items() if n}
        if not known:
            where = ", ".join(str(e) for e in self._entries)
            return f"no worker is ready: none found at {where}; retry shortly"
        states = ", ".join(f"{n} {STATE_WORDS[state]}" for state, n in known.items())
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
            watch = worker.watch(
                self._settings.worker_check_interval_s,
                self._settings.worker_check_timeout_s,
                functools.partial(self._checked, worker),
            )
            worker.watcher = asyncio.create_task(watch, name=f"health {target}")
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

    def _checked(self, worker: WorkerClient, fresh: bool) -> None:
        """After each health check of ``worker`` (``fresh``: its model info was reread)."""
        self._adopt_model(worker, fresh)
        self._publish()
        if not any(entry.resolve for entry in self._entries):
            self._check_credentials()

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
