"""A live ``Converse`` conversation: ``Conversation`` (blocking, from ``OmnigateClient.converse``) and
``AsyncConversation`` (asyncio, from ``AsyncOmnigateClient.converse``), with the same methods.

    from omnigate_client import OmnigateClient, OutputAudioDelta, OutputTextDelta, ResponseDone

    with OmnigateClient("127.0.0.1:50051") as client, client.converse(turn_detection=False) as conversation:
        conversation.create_item(text="Say hello.")
        conversation.create_response(max_output_tokens=20)
        for event in conversation:
            if isinstance(event, OutputTextDelta):
                print(event.text, end="", flush=True)  # the transcript of the spoken answer
            elif isinstance(event, OutputAudioDelta):
                speaker.play(event.audio.pcm())  # int16 samples at 24 kHz
            elif isinstance(event, ResponseDone):
                break

A conversation sends messages (``update_session``, ``append_audio``, ``commit``, ``clear``,
``create_item``, ``create_response``, ``cancel_response``) while its events are read, from another thread
(or task) when audio streams in live: sending never waits for the gateway's answers. Audio both ways is
16-bit mono PCM at 24 kHz (``append_audio`` also takes float or int16 numpy arrays at that rate).

A message the gateway does not take comes back as an ``EventRefused`` event and the conversation goes on;
a failure of the conversation itself (API key, no worker ready, idle too long) raises
``OmnigateClientError`` from the iteration. ``end_input()`` says nothing more will be sent: the answer
running then finishes and the events end. ``cancel()`` (or leaving the ``with`` block) ends the conversation
at once; the gateway cancels the running answer. A conversation is never retried: it holds state.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import numpy as np

from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate.gateway.v1 import gateway_pb2_grpc
from omnigate_client.errors import REQUEST_ID_KEY, OmnigateClientError, metadata_value
from omnigate_client.protocol import (
    audio_append_request,
    audio_clear_request,
    audio_commit_request,
    converse_event_from_proto,
    item_create_request,
    response_cancel_request,
    response_create_request,
    session_update_request,
)
from omnigate_client.types import (
    ConversationSession,
    ConverseEvent,
    SessionCreated,
    SessionUpdated,
    TurnDetection,
)

Audio = bytes | np.ndarray
_END = None  # ends the blocking call's request stream


class _Messages:
    """The messages both conversations send, built by ``protocol``; ``_send`` is each one's transport."""

    session: ConversationSession | None = None  # the latest settings (SessionCreated / SessionUpdated)
    request_id: str | None = None  # the gateway's x-request-id, once the first event arrived

    def _send(self, message: pb.ConverseRequest) -> Any:
        raise NotImplementedError

    def update_session(
        self,
        *,
        instructions: str | None = None,
        voice: str | None = None,
        output_mode: str | None = None,
        turn_detection: TurnDetection | bool | None = None,
        max_output_tokens: int | None = None,
        event_id: str | None = None,
    ) -> Any:
        """Changes the session's settings (None leaves one as it is); answered with ``SessionUpdated``.

        ``output_mode`` "audio" (speech and its transcript) or "text"; ``turn_detection`` False for manual
        turns, True (or a ``TurnDetection``) for server voice-activity detection; ``max_output_tokens``
        0 for the gateway's default."""
        return self._send(
            session_update_request(
                instructions=instructions,
                voice=voice,
                output_mode=output_mode,
                turn_detection=turn_detection,
                max_output_tokens=max_output_tokens,
                event_id=event_id,
            )
        )

    def append_audio(self, audio: Audio, *, event_id: str | None = None) -> Any:
        """Appends microphone audio (24 kHz mono: 16-bit PCM bytes, or an int16 or float numpy array) to the
        input buffer; with server VAD on, the gateway finds the user's turns in it."""
        return self._send(audio_append_request(audio, event_id))

    def commit(self, *, event_id: str | None = None) -> Any:
        """Commits the input buffer as a user item (manual turns); ``AudioCommitted`` and ``ItemCreated``."""
        return self._send(audio_commit_request(event_id))

    def clear(self, *, event_id: str | None = None) -> Any:
        """Empties the input buffer; ``AudioCleared``."""
        return self._send(audio_clear_request(event_id))

    def create_item(
        self,
        text: str | None = None,
        audio: Audio | None = None,
        *,
        role: str = "user",
        item_id: str | None = None,
        previous_item_id: str | None = None,
        event_id: str | None = None,
    ) -> Any:
        """Adds a message to the conversation: text, audio (24 kHz mono, user items only) or both (the audio
        first); ``ItemCreated``. It is not answered until ``create_response``."""
        return self._send(
            item_create_request(
                text, audio, role=role, item_id=item_id, previous_item_id=previous_item_id, event_id=event_id
            )
        )

    def create_response(
        self,
        *,
        instructions: str | None = None,
        voice: str | None = None,
        output_mode: str | None = None,
        max_output_tokens: int | None = None,
        metadata: dict[str, str] | None = None,
        event_id: str | None = None,
    ) -> Any:
        """Starts an answer over the conversation so far (None takes the session's setting): ``ResponseCreated``,
        its ``OutputTextDelta`` / ``OutputAudioDelta`` events, then ``ResponseDone``."""
        return self._send(
            response_create_request(
                instructions=instructions,
                voice=voice,
                output_mode=output_mode,
                max_output_tokens=max_output_tokens,
                metadata=metadata,
                event_id=event_id,
            )
        )

    def cancel_response(self, response_id: str | None = None, *, event_id: str | None = None) -> Any:
        """Cancels the running answer (or only ``response_id``): its ``ResponseDone`` says cancelled."""
        return self._send(response_cancel_request(response_id, event_id))

    def _seen(self, message: pb.ConverseResponse) -> ConverseEvent | None:
        event = converse_event_from_proto(message)
        if isinstance(event, SessionCreated | SessionUpdated):
            self.session = event.session
        return event


class Conversation(_Messages, Iterator[ConverseEvent]):
    """A blocking ``Converse`` call (see the module docstring). Iterate it for the events; the send methods
    may be called from any thread. ``until(ResponseDone)`` reads up to an event of a type."""

    def __init__(
        self,
        stub: gateway_pb2_grpc.GatewayServiceStub,
        metadata: tuple,
        timeout_s: float | None,
        first: pb.ConverseRequest | None = None,
    ) -> None:
        self._outgoing: queue.SimpleQueue[pb.ConverseRequest | None] = queue.SimpleQueue()
        if first is not None:
            self._outgoing.put(first)
        self._lock = threading.Lock()
        self._input_ended = False
        self._call = stub.Converse(self._requests(), metadata=metadata, timeout=timeout_s)

    def _requests(self) -> Iterator[pb.ConverseRequest]:
        while (message := self._outgoing.get()) is not _END:
            yield message

    def _send(self, message: pb.ConverseRequest) -> None:
        with self._lock:
            if self._input_ended:
                raise RuntimeError("the conversation's input has ended (end_input, cancel or close)")
            self._outgoing.put(message)

    def __iter__(self) -> Conversation:
        return self

    def __next__(self) -> ConverseEvent:
        while True:
            try:
                message = next(self._call)
            except grpc.RpcError as exc:
                self._stop_input()
                raise OmnigateClientError.from_rpc_error(exc) from None
            except StopIteration:
                self._stop_input()
                raise
            if self.request_id is None:
                self.request_id = metadata_value(self._call.initial_metadata(), REQUEST_ID_KEY)
            event = self._seen(message)
            if event is not None:
                return event

    def until(self, *kinds: type) -> list[ConverseEvent]:
        """The events up to and including the first of one of ``kinds`` (``EOFError`` when it ends first)."""
        events = []
        for event in self:
            events.append(event)
            if isinstance(event, kinds):
                return events
        raise EOFError(f"the conversation ended before {' or '.join(k.__name__ for k in kinds)}")

    def end_input(self) -> None:
        """Sends nothing more (a half-close): the running answer finishes, then the events end."""
        self._stop_input()

    def cancel(self) -> None:
        """Ends the conversation at once (the gateway cancels the running answer); iteration then raises
        CANCELLED."""
        self._stop_input()
        self._call.cancel()

    def close(self) -> None:
        """Cancels the conversation unless it has ended."""
        self.cancel()

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _stop_input(self) -> None:
        with self._lock:
            if not self._input_ended:
                self._input_ended = True
                self._outgoing.put(_END)


class AsyncConversation(_Messages):
    """An asyncio ``Converse`` call: ``async for`` its events; the send methods are coroutines
    (``await conversation.append_audio(chunk)``), the same as ``Conversation``'s otherwise."""

    def __init__(
        self,
        stub: gateway_pb2_grpc.GatewayServiceStub,
        metadata: tuple,
        timeout_s: float | None,
        first: pb.ConverseRequest | None = None,
    ) -> None:
        self._outgoing: asyncio.Queue[pb.ConverseRequest | None] = asyncio.Queue()
        if first is not None:
            self._outgoing.put_nowait(first)
        self._input_ended = False
        self._call = stub.Converse(self._requests(), metadata=metadata, timeout=timeout_s)

    async def _requests(self) -> AsyncIterator[pb.ConverseRequest]:
        while (message := await self._outgoing.get()) is not _END:
            yield message

    async def _send(self, message: pb.ConverseRequest) -> None:
        if self._input_ended:
            raise RuntimeError("the conversation's input has ended (end_input, cancel or aclose)")
        self._outgoing.put_nowait(message)

    def __aiter__(self) -> AsyncIterator[ConverseEvent]:
        return self

    async def __anext__(self) -> ConverseEvent:
        while True:
            try:
                message = await self._call.read()
            except grpc.RpcError as exc:
                self._stop_input()
                raise OmnigateClientError.from_rpc_error(exc) from None
            if message is grpc.aio.EOF:
                self._stop_input()
                raise StopAsyncIteration
            if self.request_id is None:
                self.request_id = metadata_value(await self._call.initial_metadata(), REQUEST_ID_KEY)
            event = self._seen(message)
            if event is not None:
                return event

    async def until(self, *kinds: type) -> list[ConverseEvent]:
        """The events up to and including the first of one of ``kinds`` (``EOFError`` when it ends first)."""
        events = []
        async for event in self:
            events.append(event)
            if isinstance(event, kinds):
                return events
        raise EOFError(f"the conversation ended before {' or '.join(k.__name__ for k in kinds)}")

    async def end_input(self) -> None:
        """Sends nothing more (a half-close): the running answer finishes, then the events end."""
        self._stop_input()

    def cancel(self) -> None:
        """Ends the conversation at once (the gateway cancels the running answer); reading then raises
        CANCELLED."""
        self._stop_input()
        self._call.cancel()

    async def aclose(self) -> None:
        """Cancels the conversation unless it has ended."""
        self.cancel()

    async def __aenter__(self) -> AsyncConversation:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _stop_input(self) -> None:
        if not self._input_ended:
            self._input_ended = True
            self._outgoing.put_nowait(_END)
