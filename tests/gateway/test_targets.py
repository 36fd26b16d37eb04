"""worker_target: its entries parsed (addresses, names to resolve, malformed ones refused) and names resolved."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from omnigate_gateway.settings import GatewaySettings
from omnigate_gateway.workers.targets import TargetEntry, parse_worker_target, resolve_with_loop


def test_parse_worker_target():
    assert parse_worker_target("10.0.0.7:50061") == [TargetEntry("10.0.0.7", 50061, resolve=False)]
    assert parse_worker_target("[::1]:50061") == [TargetEntry("::1", 50061, resolve=False)]
    assert parse_worker_target("dns:///omnigate-worker.ns.svc.cluster.local:50061") == [
        TargetEntry("omnigate-worker.ns.svc.cluster.local", 50061, resolve=True)
    ]
    assert parse_worker_target("worker:50061, 10.0.0.1:2,") == [
        TargetEntry("worker", 50061, resolve=True),
        TargetEntry("10.0.0.1", 2, resolve=False),
    ]
    assert str(parse_worker_target("dns:10.0.0.1:7")[0]) == "10.0.0.1:7"  # an address needs no resolving
    for bad in (
        "",
        " , ",
        "worker",
        "worker:0",
        "worker:99999",
        "worker:http",
        "::1:50061",
        "[::1]",
        "dns://8.8.8.8/w:1",
    ):
        with pytest.raises(ValueError):
            parse_worker_target(bad)
    with pytest.raises(ValidationError, match="worker:http"):
        GatewaySettings(worker_target="worker:http")


async def test_resolve_with_loop_returns_every_address():
    assert "127.0.0.1" in await resolve_with_loop("localhost", 50061)
