"""Gateway settings (environment variables prefixed ``OMNIGATE_GATEWAY_``, or command-line flags)."""

from __future__ import annotations

import ipaddress

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from omnigate.media import DecodeLimits
from omnigate_gateway.fetch import FetchLimits


class GatewaySettings(BaseSettings):
    """Everything the gateway can be told. Built once in ``main()`` and passed down."""

    model_config = SettingsConfigDict(env_prefix="OMNIGATE_GATEWAY_", extra="ignore", cli_kebab_case=True)

    host: str = Field("127.0.0.1", description="Address the public gRPC server binds to.")
    port: int = Field(50051, description="Public gRPC port (0 = OS-chosen; the chosen port is logged).")
    metrics_host: str = Field("127.0.0.1", description="Address of the Prometheus metrics endpoint.")
    metrics_port: int = Field(9400, description="Prometheus metrics port (0 = OS-chosen, -1 = disabled).")
    reflection: bool = Field(True, description="Serve gRPC server reflection.")
    worker_target: str = Field("127.0.0.1:50061", description="gRPC address (host:port) of the worker.")
    worker_check_interval_s: float = Field(2.0, description="Seconds between checks of the worker's health.")
    default_max_new_tokens: int = Field(256, description="max_new_tokens used when a request sets none.")
    default_video_fps: float = Field(2.0, description="Video sampling rate used when a request sets none.")
    default_timeout_s: float = Field(600.0, description="Deadline for a request whose client set none.")
    max_media_items: int = Field(16, description="Media parts (images, audio, videos) per request.")
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
        64 * 1024 * 1024, description="Largest single gRPC message accepted from clients (inline media)."
    )
    grace_period_s: float = Field(30.0, description="On SIGTERM, seconds to let in-flight requests finish.")
    ports_file: str | None = Field(
        None, description="Write the bound ports as JSON to this file once listening (for tests and scripts)."
    )
    log_level: str = Field("INFO", description="Python log level.")

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
