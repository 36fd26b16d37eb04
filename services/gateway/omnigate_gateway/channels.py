"""gRPC channels from the gateway to its workers (options, keepalives, transport security)."""

from __future__ import annotations

import grpc

from omnigate_gateway.settings import GatewaySettings


def worker_channel(target: str, settings: GatewaySettings) -> grpc.aio.Channel:
    """Opens a channel to one worker."""
    message_bytes = max(4 * 1024 * 1024, 2 * settings.worker_chunk_bytes)
    options = [
        ("grpc.max_send_message_length", message_bytes),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]
    return grpc.aio.insecure_channel(target, options=options)
