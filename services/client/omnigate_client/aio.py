"""``AsyncOmnigateClient``: the asyncio (``grpc.aio``) twin of ``OmnigateClient``, with the same API.

    import asyncio
    from omnigate_client import AsyncOmnigateClient, ResponseDone, TextDelta

    async def main():
        async with AsyncOmnigateClient("127.0.0.1:50051") as client:
            async for event in client.generate(messages, max_new_tokens=20):
                if isinstance(event, TextDelta):
                    print(event.text, end="", flush=True)
            result = await client.generate_all(messages, max_new_tokens=20)
            async with client.converse(turn_detection=False) as conversation:  # Converse
                await conversation.create_item(text="Say hello.")
                await conversation.create_response()
                events = await conversation.until(ResponseDone)

    asyncio.run(main())

Create the client inside a running event loop (grpc.aio binds its channel to the loop).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any, cast

import grpc
from grpc_health.v1 import health_pb2

from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate.gateway.v1 import gateway_pb2_grpc
from omnigate_client.client import _UNSET, _ClientBase, _Deadline, _policy
from omnigate_client.conversation import AsyncConversation
from omnigate_client.errors import REQUEST_ID_KEY, OmnigateClientError, metadata_value
from omnigate_client.protocol import build_request, event_from_proto, model_info_from_proto, opening_request
from omnigate_client.retry import RetryPolicy
from omnigate_client.types import Event, GenerationResult, ModelInfo, TurnDetection


class AsyncGenerationStream:
    """The events of one ``Generate`` call (``async for``), or ``await collect()`` for the whole result.

    ``request_id`` and ``attempts`` as on ``GenerationStream``; ``cancel()`` ends the call.
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
        self._cancelled = asyncio.Event()
        self._events = self._run()

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> Event:
        return await self._events.__anext__()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def cancel(self) -> None:
        self._cancelled.set()
        call = self._call
        if call is not None:
            call.cancel()

    async def aclose(self) -> None:
        await self._events.aclose()

    async def collect(self) -> GenerationResult:
        events = [event async for event in self]
        return GenerationResult.from_events(events, self.request_id)

    async def _run(self) -> AsyncGenerator[Event, None]:
        retry = 0
        while True:
            self.attempts += 1
            call = self._stub.Generate(
                self._request, timeout=self._deadline.remaining(), metadata=self._metadata
            )
            self._call = call
            started = finished = False
            try:
                async for message in call:
                    if not started:
                        started = True
                        self.request_id = metadata_value(await call.initial_metadata(), REQUEST_ID_KEY)
                    yield event_from_proto(message)
                finished = True
                if self.request_id is None:
                    self.request_id = metadata_value(await call.trailing_metadata(), REQUEST_ID_KEY)
                return
            except grpc.RpcError as exc:
                finished = True
                error = OmnigateClientError.from_rpc_error(exc, attempts=self.attempts)
                self.request_id = self.request_id or error.request_id
                if started or self._cancelled.is_set():
                    raise error from None
                retry += 1
                delay = self._policy.delay(error, retry)
                if delay is None or not self._deadline.allows_wait(delay):
                    raise error from None
                try:
                    await asyncio.wait_for(self._cancelled.wait(), delay)
                except TimeoutError:
                    continue  # waited the full delay: retry
                raise error from None  # cancelled while waiting
            finally:
                if not finished:
                    call.cancel()


class AsyncOmnigateClient(_ClientBase):
    """Asyncio client; the constructor's arguments are those of ``OmnigateClient``."""

    _grpc = grpc.aio

    async def __aenter__(self) -> AsyncOmnigateClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await cast(grpc.aio.Channel, self._channel).close()  # _grpc is grpc.aio: an asyncio channel

    async def health(self, timeout_s: float = 5.0, service: str = "") -> str:
        try:
            # types-grpcio-health-checking declares HealthStub without its methods
            reply = await self._health.Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout_s,
                metadata=self._call_metadata(None, None),
            )
        except grpc.RpcError as exc:
            raise OmnigateClientError.from_rpc_error(exc) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def model_info(
        self, timeout_s: float | None = 10.0, *, retries: int | None = None, metadata: dict | None = None
    ) -> ModelInfo:
        policy = _policy(None, retries) if retries is not None else self.retry_policy
        deadline = _Deadline(timeout_s)
        attempts = 0
        while True:
            attempts += 1
            try:
                reply = await self._stub.GetModelInfo(
                    pb.GetModelInfoRequest(),
                    timeout=deadline.remaining(),
                    metadata=self._call_metadata(metadata, None),
                )
                return model_info_from_proto(reply)
            except grpc.RpcError as exc:
                error = OmnigateClientError.from_rpc_error(exc, attempts=attempts)
                delay = policy.delay(error, attempts)
                if delay is None or not deadline.allows_wait(delay):
                    raise error from None
                await asyncio.sleep(delay)

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
    ) -> AsyncGenerationStream:
        """Starts a ``Generate`` call; ``async for`` over the result (arguments as ``OmnigateClient.generate``)."""
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
        return AsyncGenerationStream(
            self._stub,
            request,
            self._call_metadata(metadata, request_id),
            self.timeout_s if timeout_s is _UNSET else timeout_s,
            _policy(None, retries) if retries is not None else self.retry_policy,
        )

    async def generate_all(self, messages: list[dict], **kwargs: Any) -> GenerationResult:
        return await self.generate(messages, **kwargs).collect()

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
    ) -> AsyncConversation:
        """Starts a ``Converse`` call (arguments as ``OmnigateClient.converse``): ``async for`` its events,
        ``await`` its send methods."""
        first = opening_request(instructions, voice, output_mode, turn_detection, max_output_tokens)
        return AsyncConversation(self._stub, self._call_metadata(metadata, request_id), timeout_s, first)
