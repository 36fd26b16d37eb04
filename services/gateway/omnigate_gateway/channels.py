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
    options = [
        # Requests go out as a spec and 1 MiB media chunks; what comes back is forwarded to clients, so it
        # is bounded by what the public port may send.
        ("grpc.max_send_message_length", max(4 * 1024 * 1024, 2 * settings.worker_chunk_bytes)),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]
    if not uses_tls(settings):
        return grpc.aio.insecure_channel(target, options=options)
    if settings.worker_tls_server_name:
        options.append(("grpc.ssl_target_name_override", settings.worker_tls_server_name))
    credentials = tls.channel_credentials(
        settings.worker_tls_ca_file, settings.worker_tls_cert_file, settings.worker_tls_key_file
    )
    return grpc.aio.secure_channel(target, credentials, options=options)
