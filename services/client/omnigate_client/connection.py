"""How a client reaches the gateway: plaintext or TLS (optionally with a client certificate), the API key,
and the options shared by the sync and async clients."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Any

import grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # inline media can be large; the gateway enforces its own limit
DEFAULT_TIMEOUT_S = 600.0

# PEM bytes, or the path of a PEM file
PemSource = bytes | str | pathlib.Path
# grpc channel options: (name, value) pairs, the value an int or a string
ChannelOptions = list[tuple[str, Any]]
# the metadata sent with a call
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class TLSConfig:
    """TLS to the gateway. ``root_certificates`` None = the system's trust store (grpc's bundled roots).

    Each of ``root_certificates``, ``certificate_chain`` and ``private_key`` is PEM bytes or a file path.
    A client certificate (mutual TLS) needs both ``certificate_chain`` and ``private_key``.
    ``server_name`` overrides the name the server certificate is checked against (e.g. when connecting by
    IP address).
    """

    root_certificates: PemSource | None = None
    certificate_chain: PemSource | None = None
    private_key: PemSource | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs both certificate_chain and private_key")
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates),
            private_key=_pem(self.private_key),
            certificate_chain=_pem(self.certificate_chain),
        )


def _pem(value: PemSource | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return pathlib.Path(value).read_bytes()


def channel_options(tls: TLSConfig | None, extra: ChannelOptions | None = None) -> ChannelOptions:
    options: ChannelOptions = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # retries are the client's own (they honour RetryInfo); gRPC's transparent ones stay as they are
    ]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options + list(extra or [])


def resolve_tls(
    tls: bool | TLSConfig | None,
    root_certificates: PemSource | None = None,
    certificate_chain: PemSource | None = None,
    private_key: PemSource | None = None,
    server_name: str | None = None,
) -> TLSConfig | None:
    """A TLSConfig when TLS is asked for (``tls=True`` or any certificate option), else None."""
    if isinstance(tls, TLSConfig):
        return tls
    if tls or any(v is not None for v in (root_certificates, certificate_chain, private_key, server_name)):
        return TLSConfig(root_certificates, certificate_chain, private_key, server_name)
    return None


def call_metadata(
    api_key: str | None, extra: dict[str, str] | list[tuple[str, str]] | None, request_id: str | None
) -> Metadata:
    """Per-call metadata: the API key as ``authorization: Bearer``, a request id, and the caller's own."""
    pairs: list[tuple[str, str]] = []
    if api_key:
        pairs.append(("authorization", f"Bearer {api_key}"))
    if request_id:
        pairs.append(("x-request-id", request_id))
    items = extra.items() if isinstance(extra, dict) else (extra or [])
    pairs.extend((str(k).lower(), v) for k, v in items)
    return tuple(pairs)
