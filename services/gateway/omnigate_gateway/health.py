"""The gateway's grpc.health.v1 services: three questions, three answers (set by ``main.serve``).

- ``""`` and the GatewayService's name (``WORKER_FOLLOWING_SERVICES``): can a model answer a request now?
  SERVING while at least one worker is ready. Clients and scripts wait on it; ``GET /health`` over HTTP.
- ``READINESS_SERVICE``: should load balancers send this gateway requests? SERVING from the moment its
  servers listen until its drain begins, whatever the workers do. While no worker is ready the gateway still
  answers each request itself, in-band: it holds it until a worker is (within ``wait_for_worker_s`` and the
  request's deadline), else answers UNAVAILABLE with a retry delay. So a worker outage, a rollout or a
  scale-from-zero never pulls every gateway out of rotation at once. The chart's readinessProbe asks it;
  ``GET /health/readiness``.
- ``LIVENESS_SERVICE``: is the process still working? SERVING until it stops, draining included. Its answer
  comes from the event loop that serves requests, so a wedged loop fails it where a TCP check would pass. The
  chart's livenessProbe asks it; ``GET /health/liveness``.
"""

from __future__ import annotations

from omnigate_gateway.grpc_api.server import SERVICE_NAME

READINESS_SERVICE = "readiness"
LIVENESS_SERVICE = "liveness"
WORKER_FOLLOWING_SERVICES = ("", SERVICE_NAME)
