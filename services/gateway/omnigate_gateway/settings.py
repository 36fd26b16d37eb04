"""Gateway settings (environment variables prefixed ``OMNIGATE_GATEWAY_``, or command-line flags)."""

from __future__ import annotations

import ipaddress

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from omnigate.media import DecodeLimits
from omnigate.service_settings import ServiceSettings
from omnigate_gateway.media.fetch import FetchLimits
from omnigate_gateway.workers.targets import parse_worker_target


class GatewaySettings(ServiceSettings):
    """Everything the gateway can be told. Built once in ``main()`` and passed down."""

    model_config = SettingsConfigDict(env_prefix="OMNIGATE_GATEWAY_", extra="ignore", cli_kebab_case=True)

    host: str = Field("127.0.0.1", description="Address the public gRPC server binds to.")
    port: int = Field(50051, description="Public gRPC port (0 = OS-chosen; the chosen port is logged).")
    metrics_host: str = Field("127.0.0.1", description="Address of the Prometheus metrics endpoint.")
    metrics_port: int = Field(9400, description="Prometheus metrics port (0 = OS-chosen, -1 = disabled).")
    reflection: bool = Field(True, description="Serve gRPC server reflection.")
    http_host: str = Field("127.0.0.1", description="Address the OpenAI-compatible HTTP API binds to.")
    http_port: int = Field(
        8000, description="OpenAI-compatible HTTP API port (0 = OS-chosen, -1 = disabled)."
    )
    max_http_body_bytes: int = Field(
        64 * 1024 * 1024,
        description="Largest HTTP request body accepted (JSON with inline base64 media); larger gets 413.",
    )
    worker_target: str = Field(
        "127.0.0.1:50061",
        description="Workers: host:port, a comma-separated list, or a DNS name (dns:///name:port or "
        "name:port) whose every A/AAAA record is a worker.",
    )
    worker_check_interval_s: float = Field(
        2.0, gt=0, description="Seconds between health checks of each worker."
    )
    worker_check_timeout_s: float = Field(
        2.0,
        gt=0,
        description="Seconds a worker health check may take before the worker counts as unreachable.",
    )
    worker_discovery_interval_s: float = Field(
        5.0, gt=0, description="Seconds between DNS resolutions of worker names."
    )
    worker_max_retries: int = Field(
        2,
        ge=0,
        description="Times a request is sent again to another worker after a retriable failure before any "
        "output (0 = never).",
    )
    worker_eject_after_failures: int = Field(
        3, ge=1, description="Failed calls in a row after which a worker is ejected (gets no requests)."
    )
    worker_ejection_s: float = Field(10.0, ge=0, description="Seconds an ejected worker gets no requests.")
    worker_keepalive_time_s: float = Field(
        10.0,
        gt=0,
        description="Seconds between keepalive pings on worker connections with calls in flight (workers "
        "must allow it: OMNIGATE_WORKER_KEEPALIVE_MIN_PING_INTERVAL_S).",
    )
    worker_keepalive_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Seconds without a ping reply after which a worker connection is dead and its calls "
        "fail with UNAVAILABLE (a hung worker).",
    )
    worker_connect_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Seconds to set up a connection to a worker (TCP and HTTP/2 handshake) before the "
        "attempt fails.",
    )
    worker_reconnect_backoff_max_s: float = Field(
        5.0, gt=0, description="Longest wait between attempts to reconnect to an unreachable worker."
    )
    wait_for_worker_s: float = Field(
        300.0,
        ge=0,
        description="Seconds an admitted Generate request waits at the gateway for a ready worker while none "
        "is (a cold start after scaling to zero), never past the caller's deadline; 0 = refuse at once.",
    )
    no_worker_retry_after_s: float = Field(
        30.0,
        gt=0,
        description="Retry delay (gRPC RetryInfo, HTTP Retry-After) sent with UNAVAILABLE when no worker "
        "became ready in time.",
    )
    default_max_new_tokens: int = Field(256, description="max_new_tokens used when a request sets none.")
    default_video_fps: float = Field(2.0, description="Video sampling rate used when a request sets none.")
    default_timeout_s: float = Field(600.0, description="Deadline for a request whose client set none.")
    max_media_items: int = Field(16, description="Media parts (images, audio, videos) per request.")
    max_messages: int = Field(1024, ge=1, description="Messages in one request's conversation.")
    max_content_parts: int = Field(
        4096, ge=1, description="Content parts (text and media) in one request, all messages together."
    )
    max_media_bytes: int = Field(
        100 * 1024 * 1024,
        description="Encoded bytes of one media item of any kind (the caps below may be lower).",
    )
    max_image_bytes: int = Field(32 * 1024 * 1024, description="Encoded bytes of one image.")
    max_audio_bytes: int = Field(64 * 1024 * 1024, description="Encoded bytes of one audio input.")
    max_video_bytes: int = Field(100 * 1024 * 1024, description="Encoded bytes of one video.")
    max_request_media_bytes: int = Field(
        256 * 1024 * 1024, description="Encoded bytes of all media of one request together."
    )
    max_image_pixels: int = Field(64_000_000, description="Pixels of one image (decompression-bomb guard).")
    max_audio_duration_s: float = Field(600.0, description="Seconds of one audio input.")
    max_video_duration_s: float = Field(600.0, description="Seconds of one video input.")
    max_video_frame_pixels: int = Field(
        7680 * 4320, description="Pixels of one source video frame (8K; checked from the header first)."
    )
    max_video_frames: int = Field(768, description="Most frames sampled from one video.")
    min_video_frames: int = Field(
        1, description="Fewest frames sampled from one video (short clips are sampled faster to reach it)."
    )
    max_decoded_bytes: int = Field(1_500_000_000, description="Decoded bytes of one media item.")
    max_decode_s: float = Field(
        60.0, description="Seconds one media item may spend decoding (the request's deadline also applies)."
    )
    fetch_connect_timeout_s: float = Field(5.0, description="Seconds to connect to a media host.")
    fetch_read_timeout_s: float = Field(15.0, description="Longest wait for the next bytes of a media body.")
    fetch_total_timeout_s: float = Field(30.0, description="Wall-clock limit for fetching one media item.")
    fetch_max_redirects: int = Field(5, description="Redirect hops followed when fetching media.")
    allow_private_networks: bool = Field(
        False,
        description="Allow media URLs on loopback/private/link-local addresses (local development only).",
    )
    allowed_networks: str = Field(
        "",
        description="Comma-separated CIDR blocks reachable even when private networks are not (e.g. an "
        "internal media store).",
    )
    allowed_media_domains: str = Field(
        "",
        description="Comma-separated domains media URLs may use (subdomains included); empty = any public host.",
    )
    denied_media_domains: str = Field(
        "", description="Comma-separated domains media URLs may never use (subdomains included)."
    )
    local_media_root: str | None = Field(
        None, description="Directory that MediaSource.path may read from; unset = paths refused."
    )
    fit_media_to_model: bool = Field(
        True,
        description="Downscale images and video frames over the model processor's pixel bound before "
        "sending them to the worker.",
    )
    media_cache_bytes: int = Field(
        256 * 1024 * 1024,
        description="Bytes of decoded media kept for repeated URLs and inline media (0 = no cache).",
    )
    decode_threads: int = Field(
        2, description="Threads decoding media (decoding never runs on the event loop)."
    )
    worker_chunk_bytes: int = Field(
        1024 * 1024, description="Bytes of decoded media per message to the worker."
    )
    max_message_bytes: int = Field(
        64 * 1024 * 1024,
        description="Largest single gRPC message accepted from clients (inline media) or from a worker, "
        "and sent to clients.",
    )
    max_connection_age_s: float = Field(
        300.0,
        ge=0,
        description="Seconds a client connection to the public gRPC port lives before the gateway asks the "
        "client to reconnect (GOAWAY, gRPC A9; +-10 % jitter), so clients spread over gateways added since; "
        "0 = never.",
    )
    max_connection_age_grace_s: float = Field(
        660.0,
        ge=0,
        description="Seconds the calls in flight on an aged connection may still run before it is closed "
        "(above default_timeout_s, so no call within its deadline is cut).",
    )
    tls_cert_file: str | None = Field(
        None,
        description="PEM certificate (chain) of the public gRPC port; set with tls_key_file to serve TLS.",
    )
    tls_key_file: str | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: str | None = Field(
        None, description="PEM CA(s) that client certificates must chain to; set = clients need one (mTLS)."
    )
    health_port: int = Field(
        -1,
        description="Port of an extra plaintext server answering only grpc.health.v1 (Kubernetes gRPC probes "
        "cannot speak TLS); -1 = none, 0 = OS-chosen.",
    )
    worker_tls_ca_file: str | None = Field(
        None,
        description="PEM CA(s) that worker certificates must chain to; set (or worker_tls_cert_file) = talk "
        "TLS to workers (unset = the system's CAs).",
    )
    worker_tls_cert_file: str | None = Field(
        None, description="PEM client certificate presented to workers (mTLS); set with worker_tls_key_file."
    )
    worker_tls_key_file: str | None = Field(None, description="PEM private key of worker_tls_cert_file.")
    worker_tls_server_name: str | None = Field(
        None,
        description="Name expected in worker certificates instead of the target's host (e.g. the worker "
        "Service's DNS name when the target resolves to pod IPs).",
    )
    api_keys_file: str | None = Field(
        None,
        description="File of API keys, one 'name:secret[:option=value...]' per line (README, Security); "
        "unset = no authentication.",
    )
    api_keys_reload_interval_s: float = Field(
        2.0, description="Seconds between checks of api_keys_file for changes (added and revoked keys)."
    )
    api_key_requests_per_s: float = Field(
        0.0, description="Generate requests per second allowed per API key (token bucket); 0 = no limit."
    )
    api_key_burst: int = Field(
        10, description="Generate requests an API key may send at once above its rate (token bucket size)."
    )
    api_key_max_concurrent: int = Field(
        0, description="Generate streams one API key may have open at once; 0 = no limit."
    )
    grace_period_s: float = Field(30.0, description="On SIGTERM, seconds to let in-flight requests finish.")
    realtime_max_items: int = Field(
        64,
        ge=1,
        description="Conversation items (messages) a realtime session keeps (/v1/realtime); the oldest are "
        "dropped first.",
    )
    realtime_max_buffer_s: float = Field(
        60.0,
        gt=0,
        description="Seconds of user audio a realtime session buffers before it becomes an item: with manual "
        "turns more is refused, with server VAD a longer utterance is committed there.",
    )
    realtime_idle_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Seconds a realtime session may go without a client event while no answer is running "
        "before the gateway closes it.",
    )

    @field_validator("worker_target")
    @classmethod
    def _valid_worker_target(cls, value: str) -> str:
        parse_worker_target(value)  # ValueError names the malformed entry
        return value

    @field_validator("allowed_networks")
    @classmethod
    def _valid_networks(cls, value: str) -> str:
        for network in _split(value):
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as e:
                raise ValueError(f"allowed_networks: {network!r} is not a CIDR block ({e})") from None
        return value

    @model_validator(mode="after")
    def _frame_bounds(self) -> GatewaySettings:
        if not 1 <= self.min_video_frames <= self.max_video_frames:
            raise ValueError(
                f"min_video_frames ({self.min_video_frames}) must be between 1 and max_video_frames "
                f"({self.max_video_frames})"
            )
        return self

    def fetch_limits(self) -> FetchLimits:
        return FetchLimits(
            connect_timeout_s=self.fetch_connect_timeout_s,
            read_timeout_s=self.fetch_read_timeout_s,
            total_timeout_s=self.fetch_total_timeout_s,
            max_bytes=self.max_media_bytes,
            max_redirects=self.fetch_max_redirects,
            allow_private_networks=self.allow_private_networks,
            local_files_root=self.local_media_root,
            allowed_networks=_split(self.allowed_networks),
            allowed_domains=_split(self.allowed_media_domains),
            denied_domains=_split(self.denied_media_domains),
        )

    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(
            max_image_pixels=self.max_image_pixels,
            max_video_frame_pixels=self.max_video_frame_pixels,
            max_audio_duration_s=self.max_audio_duration_s,
            max_video_duration_s=self.max_video_duration_s,
            max_video_frames=self.max_video_frames,
            min_video_frames=self.min_video_frames,
            max_decoded_bytes=self.max_decoded_bytes,
        )


def _split(items: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in items.split(",") if item.strip())
