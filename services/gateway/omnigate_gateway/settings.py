"""Gateway settings (environment variables prefixed ``OMNIGATE_GATEWAY_``, or command-line flags)."""

from __future__ import annotations

from pydantic import Field
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
    max_media_bytes: int = Field(100 * 1024 * 1024, description="Encoded bytes of one media item.")
    max_request_media_bytes: int = Field(
        256 * 1024 * 1024, description="Encoded bytes of all media of one request together."
    )
    max_image_pixels: int = Field(64_000_000, description="Pixels of one image (decompression-bomb guard).")
    max_audio_duration_s: float = Field(600.0, description="Seconds of one audio input.")
    max_video_duration_s: float = Field(600.0, description="Seconds of one video input.")
    max_video_frames: int = Field(768, description="Frames sampled from one video.")
    max_decoded_bytes: int = Field(1_500_000_000, description="Decoded bytes of one media item.")
    fetch_connect_timeout_s: float = Field(5.0, description="Seconds to connect to a media host.")
    fetch_read_timeout_s: float = Field(15.0, description="Longest wait for the next bytes of a media body.")
    fetch_total_timeout_s: float = Field(30.0, description="Wall-clock limit for fetching one media item.")
    fetch_max_redirects: int = Field(5, description="Redirect hops followed when fetching media.")
    allow_private_networks: bool = Field(
        False,
        description="Allow media URLs on loopback/private/link-local addresses (local development only).",
    )
    local_media_root: str | None = Field(
        None, description="Directory that MediaSource.path may read from; unset = paths refused."
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

    def fetch_limits(self) -> FetchLimits:
        return FetchLimits(
            connect_timeout_s=self.fetch_connect_timeout_s,
            read_timeout_s=self.fetch_read_timeout_s,
            total_timeout_s=self.fetch_total_timeout_s,
            max_bytes=self.max_media_bytes,
            max_redirects=self.fetch_max_redirects,
            allow_private_networks=self.allow_private_networks,
            local_files_root=self.local_media_root,
        )

    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(
            max_image_pixels=self.max_image_pixels,
            max_audio_duration_s=self.max_audio_duration_s,
            max_video_duration_s=self.max_video_duration_s,
            max_video_frames=self.max_video_frames,
            max_decoded_bytes=self.max_decoded_bytes,
        )
