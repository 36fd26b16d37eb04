"""gRPC channels from the gateway to its workers (options, keepalives, transport security).

With ``OMNIGATE_GATEWAY_WORKER_TLS_CA_FILE`` (or a client certificate) set, channels speak TLS: the worker's
certificate must chain to that CA and name the target's host, or ``worker_tls_server_name`` when set (a
``dns:///`` target resolves to pod IPs that certificates rarely name). With a client certificate and key the
gateway authenticates itself to workers that require it (mutual TLS).

A channel reads the certificate files once, when it is opened. ``credentials_version(settings)`` changes
whenever one of those files does: whoever holds channels compares it from time to time and opens new ones
(and closes the old ones once their calls are done) so a renewed client certificate or CA is picked up.
"""

from __future__ import annotations

from typing import Any

import grpc

from omnigate import tls
from omnigate_gateway.settings import GatewaySettings


def uses_tls(settings: GatewaySettings) -> bool:
    """True when channels to workers speak TLS."""
    return bool(settings.worker_tls_ca_file or settings.worker_tls_cert_file)


def credentials_version(settings: GatewaySettings) -> tls.FileVersion:
    """Changes whenever the worker TLS files change (always ``()`` for plaintext channels)."""
    if not uses_tls(settings):
        return ()
    return tls.files_version(
        (settings.worker_tls_ca_file, settings.worker_tls_cert_file, settings.worker_tls_key_file)
    )


def worker_channel(target: str, settings: GatewaySettings) -> grpc.aio.Channel:
    """Opens a channel to one worker (TLS when configured; raises TlsConfigError for unusable files)."""
    options: list[tuple[str, Any]] = [
        # Requests go out as a spec and 1 MiB media chunks. The spec carries the request's text, which the
        # public port accepted up to max_message_bytes: the channel must carry as much, so that a long prompt
        # reaches the worker's prompt-budget check instead of failing here ("Sent message larger than max").
        # What comes back is forwarded to clients, so it is bounded by what the public port may send.
        ("grpc.max_send_message_length", max(settings.max_message_bytes, 2 * settings.worker_chunk_bytes)),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # Keepalive pings detect a hung worker (SIGSTOP, a dead node) while calls are in flight: its calls
        # then fail with UNAVAILABLE instead of waiting for their deadline.
        ("grpc.keepalive_time_ms", int(settings.worker_keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.worker_keepalive_timeout_s * 1000)),
        # gRPC 1.85 waits for a ping's reply this long (default 60 s) whatever keepalive_timeout_ms says.
        ("grpc.http2.ping_timeout_ms", int(settings.worker_keepalive_timeout_s * 1000)),
        ("grpc.http2.max_pings_without_data", 0),  # a long silent prefill is no reason to stop pinging
        # gRPC calls this the minimum reconnect backoff; it is the connect timeout (default 20 s), which
        # bounds how long a call waits on a worker that accepts connections but does not answer.
        ("grpc.min_reconnect_backoff_ms", int(settings.worker_connect_timeout_s * 1000)),
        # A restarted worker is found again within this (gRPC's default backoff grows to 120 s).
        ("grpc.initial_reconnect_backoff_ms", min(1000, int(settings.worker_reconnect_backoff_max_s * 1000))),
        ("grpc.max_reconnect_backoff_ms", int(settings.worker_reconnect_backoff_max_s * 1000)),
    ]
    if not uses_tls(settings):
        return grpc.aio.insecure_channel(target, options=options)
    if settings.worker_tls_server_name:
        options.append(("grpc.ssl_target_name_override", settings.worker_tls_server_name))
    credentials = tls.channel_credentials(
        settings.worker_tls_ca_file, settings.worker_tls_cert_file, settings.worker_tls_key_file
    )
    return grpc.aio.secure_channel(target, credentials, options=options)
