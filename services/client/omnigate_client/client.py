"""The blocking Python client for Omnigate's public gRPC API (``AsyncOmnigateClient`` is its asyncio twin).

    from omnigate_client import OmnigateClient, ResponseDone, TextDelta

    with OmnigateClient("127.0.0.1:50051", api_key=None, timeout_s=60) as client:
        messages = [{"role": "user", "content": [
            {"type": "audio", "url": "http://127.0.0.1:8088/sound.wav"},
            {"type": "text", "text": "What do you hear in this audio?"},
        ]}]
        for event in client.generate(messages, max_new_tokens=20):
            if isinstance(event, TextDelta):
                print(event.text, end="", flush=True)
        result = client.generate_all(messages, max_new_tokens=20)  # GenerationResult
        with client.converse(turn_detection=False) as conversation:  # a live conversation (Converse)
            conversation.create_item(text="Say hello.")
            conversation.create_response()
            events = conversation.until(ResponseDone)

Messages use Hugging Face's chat shape. A media part gives its source as ``url`` (http, https, data:), as
``path`` (a local file: read here and sent inline), or as raw ``data`` bytes.

Every call has a deadline (``timeout_s``, per call or the client's default) that covers all its attempts,
and is retried on ``UNAVAILABLE`` and on ``RESOURCE_EXHAUSTED`` with a ``RetryInfo`` (see ``retry.py``);
a stream is never retried once its first event arrived, a conversation never. Failures raise
``OmnigateClientError``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate.gateway.v1 import gateway_pb2_grpc
from omnigate_client.connection import (
    DEFAULT_TIMEOUT_S,
    Metadata,
    TLSConfig,
    call_metadata,
    channel_options,
    resolve_tls,
)
from omnigate_client.conversation import Conversation
from omnigate_client.errors import REQUEST_ID_KEY, OmnigateClientError, metadata_value
from omnigate_client.protocol import (
    build_request,
    event_from_proto,
    media_part,
    model_info_from_proto,
    opening_request,
)
from omnigate_client.retry import RetryPolicy
from omnigate_client.types import (
    AudioChunk,
    Event,
    GenerationResult,
    Image,
    ModelInfo,
    Result,
    Summary,
    TextDelta,
    TurnDetection,
)

ReplyT = TypeVar("ReplyT")

__all__ = [
    "AudioChunk",
    "GenerationResult",
    "GenerationStream",
    "Image",
    "OmnigateClient",
    "Result",
    "Summary",
    "TextDelta",
    "media_part",
]

_UNSET = object()


class _Deadline:
    """A call's deadline across its attempts."""

    def __init__(self, timeout_s: float | None) -> None:
        self.at = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def allows_wait(self, seconds: float) -> bool:
        """True when, after waiting ``seconds``, some time would be left for another attempt."""
        return self.at is None or time.monotonic() + seconds < self.at


class GenerationStream(Iterator[Event]):
    """The events of one ``Generate`` call, as they arrive: ``TextDelta``, ``AudioChunk``, ``Image``, then
    one ``Summary``.

    Iterate it, or ``collect()`` the rest into a ``GenerationResult``. ``request_id`` is the gateway's
    ``x-request-id`` once the response started (when the gateway sends one); ``attempts`` counts tries.
    ``cancel()`` (from any thread) or ``close()`` ends the call; leaving a ``with`` block does too.
    """

    def __init__(
        self,
        stub: gateway_pb2_grpc.GatewayServiceStub,
        request: pb.GenerateRequest,
        metadata: tuple,
        timeout_s: float | None,
        policy: RetryPolicy,
    ) -> None:
        self.request_id: str | None = None
        self.attempts = 0
        self._stub = stub
        self._request = request
        self._metadata = metadata
        self._deadline = _Deadline(timeout_s)
        self._policy = policy
        self._call = None
        self._cancelled = threading.Event()
        self._events = self._run()

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def cancel(self) -> None:
        """Cancels the call (the gateway stops generating); iteration then raises CANCELLED."""
        self._cancelled.set()
        call = self._call
        if call is not None:
            call.cancel()

    def close(self) -> None:
        """Stops iterating and cancels the call if it is still running."""
        self._events.close()

    def collect(self) -> GenerationResult:
        """Reads the rest of the stream into a ``GenerationResult``."""
        events = list(self)
        return GenerationResult.from_events(events, self.request_id)

    def _run(self) -> Generator[Event, None, None]:
        retry = 0
        while True:
            self.attempts += 1
            call = self._stub.Generate(
                self._request, timeout=self._deadline.remaining(), metadata=self._metadata
            )
            self._call = call
            started = finished = False
            try:
                for message in call:
                    if not started:
                        started = True
                        self.request_id = metadata_value(call.initial_metadata(), REQUEST_ID_KEY)
                    yield event_from_proto(message)
                finished = True
                if self.request_id is None:
                    self.request_id = metadata_value(call.trailing_metadata(), REQUEST_ID_KEY)
                return
            except grpc.RpcError as exc:
                finished = True
                error = OmnigateClientError.from_rpc_error(exc, attempts=self.attempts)
                self.request_id = self.request_id or error.request_id
                if started or self._cancelled.is_set():
                    raise error from None  # output has begun (or the caller cancelled): never repeat
                retry += 1
                delay = self._policy.delay(error, retry)
                if delay is None or not self._deadline.allows_wait(delay):
                    raise error from None
                if self._cancelled.wait(delay):
                    raise error from None
            finally:
                if not finished:
                    call.cancel()  # the consumer stopped early: free the gateway's work


class _ClientBase:
    """What the sync and async clients share: the channel (plaintext or TLS), the stubs, the defaults
    and the metadata sent with every call. ``_grpc`` is ``grpc`` or ``grpc.aio``: both make channels the
    same way."""

    _grpc = grpc

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        api_key: str | None = None,
        retries: int | None = None,
        retry_policy: RetryPolicy | None = None,
        tls: bool | TLSConfig | None = None,
        root_certificates: bytes | str | None = None,
        certificate_chain: bytes | str | None = None,
        private_key: bytes | str | None = None,
        server_name: str | None = None,
        metadata: dict[str, str] | None = None,
        options: list[tuple] | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self.retry_policy = _policy(retry_policy, retries)
        self._api_key = api_key
        self._metadata = dict(metadata or {})
        tls_config = resolve_tls(tls, root_certificates, certificate_chain, private_key, server_name)
        opts = channel_options(tls_config, options)
        if tls_config is None:
            self._channel = self._grpc.insecure_channel(target, options=opts)
        else:
            self._channel = self._grpc.secure_channel(target, tls_config.credentials(), options=opts)
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _call_metadata(self, metadata: dict | None, request_id: str | None) -> tuple:
        return call_metadata(self._api_key, {**self._metadata, **(metadata or {})}, request_id)


class OmnigateClient(_ClientBase):
    """A blocking client; one channel per instance (use as a context manager or call ``close()``).

    ``timeout_s`` is the default deadline of ``generate`` calls (None = none); ``api_key`` is sent as
    ``authorization: Bearer <key>``; ``retries`` (or a full ``retry_policy``) bounds retries of calls that
    failed before any output. TLS: ``tls=True`` (system roots) or any of ``root_certificates``,
    ``certificate_chain`` + ``private_key`` (a client certificate), ``server_name``; each certificate is
    PEM bytes or a file path. ``metadata`` is sent with every call.
    """

    def __enter__(self) -> OmnigateClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def health(self, timeout_s: float = 5.0, service: str = "") -> str:
        """The gateway's ``grpc.health.v1`` status name ("SERVING", "NOT_SERVING", ...); not retried."""
        try:
            # types-grpcio-health-checking declares HealthStub without its methods
            reply = self._health.Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout_s,
                metadata=self._call_metadata(None, None),
            )
        except grpc.RpcError as exc:
            raise OmnigateClientError.from_rpc_error(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def model_info(
        self, timeout_s: float | None = 10.0, *, retries: int | None = None, metadata: dict | None = None
    ) -> ModelInfo:
        """The served model: id, modalities in and out, audio rates, speakers, limits."""
        reply = self._unary(
            self._stub.GetModelInfo,
            pb.GetModelInfoRequest(),
            timeout_s,
            _policy(None, retries) if retries is not None else self.retry_policy,
            self._call_metadata(metadata, None),
        )
        return model_info_from_proto(reply)

    def generate(
        self,
        messages: list[dict],
        *,
        generation_mode: str = "text",
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
        return_full_text: bool = False,
        fps: float | None = None,
        load_audio_from_video: bool = False,
        speaker: str | None = None,
        timeout_s: float | None = _UNSET,  # type: ignore[assignment]
        retries: int | None = None,
        request_id: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> GenerationStream:
        """Starts a ``Generate`` call and returns its stream of typed events.

        The request is built (and local files read) at once: bad arguments raise ValueError or OSError here.
        Failures of the call raise ``OmnigateClientError`` while iterating. ``timeout_s`` (default: the
        client's) bounds the whole call including retries; ``request_id`` is sent as ``x-request-id``.
        """
        request = build_request(
            messages,
            generation_mode=generation_mode,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            return_full_text=return_full_text,
            fps=fps,
            load_audio_from_video=load_audio_from_video,
            speaker=speaker,
        )
        return GenerationStream(
            self._stub,
            request,
            self._call_metadata(metadata, request_id),
            self.timeout_s if timeout_s is _UNSET else timeout_s,
            _policy(None, retries) if retries is not None else self.retry_policy,
        )

    def generate_all(self, messages: list[dict], **kwargs: Any) -> GenerationResult:
        """Runs ``generate`` to the end and returns the collected ``GenerationResult``."""
        return self.generate(messages, **kwargs).collect()

    def converse(
        self,
        *,
        instructions: str | None = None,
        voice: str | None = None,
        output_mode: str | None = None,
        turn_detection: TurnDetection | bool | None = None,
        max_output_tokens: int | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> Conversation:
        """Starts a ``Converse`` call: a live conversation, audio and messages in, typed events out
        (``omnigate_client.conversation``). Settings given here are sent as its first ``update_session``
        (None: the gateway's defaults, server VAD on and speech for a model that speaks).

        ``timeout_s`` bounds the whole conversation (default: none; the gateway closes one left idle).
        A conversation is not retried. A refused API key or no ready worker raises ``OmnigateClientError``
        when its events are read."""
        first = opening_request(instructions, voice, output_mode, turn_detection, max_output_tokens)
        return Conversation(self._stub, self._call_metadata(metadata, request_id), timeout_s, first)

    def _unary(
        self,
        method: Callable[..., ReplyT],
        request: Message,
        timeout_s: float | None,
        policy: RetryPolicy,
        metadata: Metadata,
    ) -> ReplyT:
        deadline = _Deadline(timeout_s)
        attempts = 0
        while True:
            attempts += 1
            try:
                return method(request, timeout=deadline.remaining(), metadata=metadata)
            except grpc.RpcError as exc:
                error = OmnigateClientError.from_rpc_error(exc, attempts=attempts)
                delay = policy.delay(error, attempts)
                if delay is None or not deadline.allows_wait(delay):
                    raise error from None
                time.sleep(delay)


def _policy(policy: RetryPolicy | None, retries: int | None) -> RetryPolicy:
    if policy is not None and retries is not None:
        raise ValueError("give retries or retry_policy, not both")
    if policy is not None:
        return policy
    if retries is not None:
        return RetryPolicy(max_retries=retries)
    return RetryPolicy()
