"""One realtime conversation: its settings, the user's audio buffer, the conversation items, and the one
answer that may be running; shared by every duplex front door.

A front door (the OpenAI Realtime WebSocket, a gRPC bidi stream) opens a ``RealtimeSession`` per
connection, feeds it the client's events as they arrive (``send``) and forwards what ``events()`` yields,
both as the plain dataclasses of ``events``; it never sees how a turn is taken or answered::

    async with RealtimeSession(core, call, model_info) as session:
        ...  # one task: await session.send(event) for each client event
        async for event in session.events(): ...  # another: send each to the client

An answer (``Response``) is one ``GatewayCore.generate`` call with the conversation so far (the session's
instructions as the system message, user audio inline as WAV at the model's input rate, earlier answers as
their text), in speech mode when the output is audio; its text and audio events stream back as deltas. Only
one runs at a time. Cancelling it closes that ``generate`` iteration, which cancels the worker call, and so
every stage of the worker (``core``).

Turns: with server VAD on (the default), ``vad.SpeechDetector`` watches the appended audio; a detected start
is reported (``SpeechStarted``) and interrupts a running answer (barge-in: cancelled with reason
``turn_detected``; the time from the detection to the worker call's cancellation is logged and observed as
``omnigate_gateway_realtime_barge_in_seconds``); a detected stop commits the speech, with its prefix padding,
as a user item and starts an answer. With turn detection off, the client commits and asks for answers.

Bounds (settings): ``realtime_max_items`` items are kept (the oldest dropped first), and a request carries
the newest of them whose audio parts fit ``max_media_items``; ``realtime_max_buffer_s`` seconds of audio may
wait in the buffer (manual turns: more is refused; server VAD: a longer utterance is committed there); a
session with no client event and no running answer for ``realtime_idle_timeout_s`` is closed
(``SessionClosed``). ``close()`` (the client left) cancels the running answer and everything else.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Self

import numpy as np

from omnigate.conversation import Modality, ModelInfo
from omnigate.errors import ErrorCode, OmnigateError
from omnigate.gateway.v1 import gateway_pb2 as gw
from omnigate.media import MIN_AUDIO_DURATION_S
from omnigate_gateway.core import Call, GatewayCore
from omnigate_gateway.realtime.audio import OutputAudio, pcm16_to_float, wav_for_model
from omnigate_gateway.realtime.events import (
    AUDIO_RATE,
    UNCHANGED,
    AppendAudio,
    AudioCleared,
    AudioCommitted,
    AudioContent,
    AudioDelta,
    CancelReason,
    CancelResponse,
    ClearAudio,
    ClientEvent,
    CommitAudio,
    ContentPart,
    CreateItem,
    CreateResponse,
    Error,
    Item,
    ItemCreated,
    OutputItemAdded,
    OutputItemDone,
    OutputModality,
    Response,
    ResponseCreated,
    ResponseDone,
    ResponseOptions,
    ResponseStatus,
    ServerEvent,
    SessionClosed,
    SessionConfig,
    SessionCreated,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TextContent,
    TextDelta,
    TurnDetection,
    UpdateSession,
    Usage,
    new_id,
)
from omnigate_gateway.realtime.vad import SpeechDetector, SpeechEnd, SpeechModel, SpeechStart, load_silero

log = logging.getLogger(__name__)

OUTGOING_EVENTS = 256  # events waiting for a slow client before the answer waits for it (back-pressure)
VAD_LAG_S = 1.0  # audio kept beyond the prefix padding while no speech is detected (the detector's lag)


class Refused(Exception):
    """A client event the session cannot take; becomes an ``Error`` event (the session goes on)."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


class RealtimeSession:
    """One connection's conversation (see the module docstring)."""

    def __init__(
        self,
        core: GatewayCore,
        call: Call,
        info: ModelInfo,
        *,
        speech_model: Callable[[], SpeechModel] = load_silero,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._core = core
        self._call = call  # the connection's: credential and metadata; each answer gets its own request id
        self._info = info
        self._settings = core.settings
        self._metrics = core.metrics
        self._speech_model = speech_model
        self._clock = clock
        self.id = new_id("sess")
        speaks = Modality.AUDIO in info.output_modalities
        self.config = SessionConfig(
            model=info.model_id,
            voice=info.speakers[0] if info.speakers else "",
            output_modalities=("audio",) if speaks else ("text",),
        )
        self.items: list[Item] = []
        # The input buffer: float32 pieces at AUDIO_RATE, from input sample ``_buffer_start`` to ``_written``.
        self._buffer: list[np.ndarray] = []
        self._buffer_start = 0
        self._written = 0
        self._detector: SpeechDetector | None = None
        self._speech_start: int | None = None  # input sample where the speech being heard is committed from
        self._speech_item_id: str | None = None
        self._response: Response | None = None
        self._response_task: asyncio.Task[None] | None = None
        self._response_closed_at = 0.0  # when the last answer's generate iteration was closed
        self._out: asyncio.Queue[ServerEvent | None] = asyncio.Queue(OUTGOING_EVENTS)
        self._last_event = clock()
        self._watchdog: asyncio.Task[None] | None = None
        self._opened = self._closed = False

    # ---- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Sends ``SessionCreated`` (with the defaults) and starts the idle clock."""
        self._opened = True
        self._metrics.realtime_sessions.inc()
        if self.config.turn_detection is not None:
            self._detector = await self._new_detector(self.config.turn_detection)
        await self._emit(SessionCreated(self.id, self.config))
        self._watchdog = asyncio.create_task(self._expire_when_idle(), name=f"realtime-idle-{self.id}")

    async def close(self) -> None:
        """Ends the session: the running answer (and its worker call) is cancelled, nothing more is sent."""
        if self._closed:
            return
        self._closed = True
        tasks = [t for t in (self._response_task, self._watchdog) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._response_task = self._response = None
        if self._opened:
            self._metrics.realtime_sessions.dec()
        while not self._out.empty():  # nobody will read them; make room for the end marker
            self._out.get_nowait()
        self._out.put_nowait(None)

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def events(self) -> AsyncIterator[ServerEvent]:
        """What to send the client, in order, until the session is closed."""
        while True:
            event = await self._out.get()
            if event is None:
                return
            yield event

    async def send(self, event: ClientEvent) -> None:
        """Takes one client event; a refused one is answered with an ``Error`` event."""
        if self._closed:
            return
        self._last_event = self._clock()
        try:
            match event:
                case UpdateSession():
                    await self._update(event)
                case AppendAudio():
                    await self._append(event)
                case CommitAudio():
                    await self._commit_buffer()
                case ClearAudio():
                    self._clear_buffer()
                    await self._emit(AudioCleared())
                case CreateItem():
                    await self._create_item(event)
                case CreateResponse():
                    await self._create_response(event.options)
                case CancelResponse():
                    await self._cancel_by_client(event.response_id)
        except Refused as refused:
            await self._emit(
                Error(refused.message, refused.code, param=refused.param, event_id=event.event_id)
            )

    async def error(
        self, message: str, code: str, param: str | None = None, event_id: str | None = None
    ) -> None:
        """Sends the client an error found by the front door (an event it could not read)."""
        await self._emit(Error(message, code, param=param, event_id=event_id))

    async def end_input(self) -> None:
        """The client will send nothing more (a gRPC half-close): the running answer, if any, finishes, then
        ``events()`` ends after the events already queued. ``close()`` still ends the session."""
        task = self._response_task
        if task is not None:
            await asyncio.wait([task])
        if not self._closed:
            await self._out.put(None)

    async def _emit(self, event: ServerEvent) -> None:
        if not self._closed:
            await self._out.put(event)

    # ---- settings ----------------------------------------------------------------------------------

    async def _update(self, event: UpdateSession) -> None:
        config = self.config
        changes: dict[str, object] = {}
        if event.instructions is not UNCHANGED:
            changes["instructions"] = event.instructions
        if event.voice is not UNCHANGED:
            changes["voice"] = self._voice(event.voice)
        if event.output_modalities is not UNCHANGED:
            changes["output_modalities"] = self._modalities(event.output_modalities)
        if event.max_output_tokens is not UNCHANGED:
            changes["max_output_tokens"] = self._max_tokens(event.max_output_tokens)
        if event.turn_detection is not UNCHANGED:
            if event.turn_detection is not None:
                _check_turn_detection(event.turn_detection)
            changes["turn_detection"] = event.turn_detection
        self.config = dataclasses.replace(config, **changes)  # type: ignore[arg-type]
        if "turn_detection" in changes and self.config.turn_detection != config.turn_detection:
            turns = self.config.turn_detection
            self._detector = await self._new_detector(turns) if turns is not None else None
            self._speech_start = self._speech_item_id = None
        await self._emit(SessionUpdated(self.id, self.config))

    def _voice(self, name: str) -> str:
        speakers = self._info.speakers
        if not speakers:
            return name
        for speaker in speakers:
            if speaker.lower() == name.lower():
                return speaker
        raise Refused(
            f"voice {name!r} is not one of the model's voices: {', '.join(speakers)}", param="voice"
        )

    def _modalities(self, modalities: tuple[OutputModality, ...]) -> tuple[OutputModality, ...]:
        if modalities not in (("audio",), ("text",)):
            raise Refused(
                f"output_modalities is {list(modalities)}; it must be ['audio'] (speech and its transcript) "
                "or ['text']",
                param="output_modalities",
            )
        if modalities == ("audio",) and Modality.AUDIO not in self._info.output_modalities:
            raise Refused(
                f"the model {self._info.model_id} cannot speak; set output_modalities to ['text']",
                param="output_modalities",
            )
        return modalities

    def _max_tokens(self, value: int | None) -> int | None:
        limit = self._info.max_new_tokens or 2**31
        if value is not None and not 1 <= value <= limit:
            raise Refused(
                f"max_output_tokens is {value}; it must be between 1 and {limit} (or 'inf')",
                param="max_output_tokens",
            )
        return value

    async def _new_detector(self, turns: TurnDetection) -> SpeechDetector:
        model = await asyncio.to_thread(self._speech_model)  # loading takes tens of ms
        return SpeechDetector(turns, model, AUDIO_RATE)

    # ---- the input audio buffer --------------------------------------------------------------------

    def _buffered(self) -> int:
        return self._written - self._buffer_start

    def _take(self, start: int, end: int) -> np.ndarray:
        """The buffered samples from ``start`` to ``end`` (input samples), dropping everything before end."""
        audio = np.concatenate(self._buffer) if self._buffer else np.zeros(0, dtype=np.float32)
        first = max(0, start - self._buffer_start)
        taken = audio[first : max(first, end - self._buffer_start)]
        rest = audio[max(0, end - self._buffer_start) :]
        self._buffer = [rest] if rest.size else []
        self._buffer_start = max(self._buffer_start, end)
        return taken

    def _drop_before(self, sample: int) -> None:
        if sample > self._buffer_start:
            self._take(sample, sample)

    def _clear_buffer(self) -> None:
        self._buffer, self._buffer_start = [], self._written
        self._speech_start = self._speech_item_id = None
        if self._detector is not None:
            self._detector.end_speech()

    async def _append(self, event: AppendAudio) -> None:
        if len(event.pcm) % 2:
            raise Refused(
                f"the audio is {len(event.pcm)} bytes; 16-bit PCM has an even number of bytes", param="audio"
            )
        self._takes_audio()
        samples = pcm16_to_float(event.pcm)
        limit = round(self._settings.realtime_max_buffer_s * AUDIO_RATE)
        detector = self._detector
        while samples.size:
            room = limit - self._buffered()
            if samples.size > room and not (detector is not None and detector.speaking):
                raise Refused(
                    f"the input audio buffer would hold {(self._buffered() + samples.size) / AUDIO_RATE:.1f} s; "
                    f"the limit is {self._settings.realtime_max_buffer_s:g} s: commit or clear it",
                    "input_audio_buffer_full",
                    param="audio",
                )
            piece, samples = samples[:room], samples[room:]
            self._buffer.append(piece)
            self._written += piece.size
            if detector is None:
                continue
            for found in detector.feed(piece):
                if isinstance(found, SpeechStart):
                    await self._speech_started(found.sample, detector.settings)
                elif isinstance(found, SpeechEnd):
                    await self._speech_stopped(found.sample, detector.settings)
            if samples.size and detector.speaking:  # the utterance filled the buffer: it ends here
                detector.end_speech()
                await self._speech_stopped(self._written, detector.settings)
            if not detector.speaking:
                padding = detector.settings.prefix_padding_ms * AUDIO_RATE // 1000
                self._drop_before(self._written - padding - round(VAD_LAG_S * AUDIO_RATE))

    async def _speech_started(self, onset: int, turns: TurnDetection) -> None:
        detected_at = self._clock()
        start = max(self._buffer_start, onset - turns.prefix_padding_ms * AUDIO_RATE // 1000)
        self._speech_start, self._speech_item_id = start, new_id("item")
        interrupted = self._interrupt("turn_detected") if turns.interrupt_response else None
        await self._emit(SpeechStarted(_ms(start), self._speech_item_id))
        if interrupted is not None:
            await self._stopped(interrupted)
            latency = self._response_closed_at - detected_at
            self._metrics.realtime_barge_ins.inc()
            self._metrics.realtime_barge_in_latency.observe(latency)
            log.info(
                "barge-in: the answer's worker call was cancelled %.1f ms after speech was detected",
                latency * 1000,
            )

    async def _speech_stopped(self, end: int, turns: TurnDetection) -> None:
        start = self._speech_start if self._speech_start is not None else self._buffer_start
        item_id = self._speech_item_id or new_id("item")
        self._speech_start = self._speech_item_id = None
        await self._emit(SpeechStopped(_ms(end), item_id))
        await self._commit(start, end, item_id)
        if turns.create_response and self._response_task is None:
            await self._start_response(ResponseOptions())

    async def _commit_buffer(self) -> None:
        buffered = self._buffered()
        if buffered < MIN_AUDIO_DURATION_S * AUDIO_RATE:
            raise Refused(
                f"the input audio buffer holds {_ms(buffered)} ms of audio; a commit needs at least "
                f"{MIN_AUDIO_DURATION_S * 1000:g} ms",
                "input_audio_buffer_commit_empty",
            )
        item_id = self._speech_item_id or new_id("item")
        self._speech_start = self._speech_item_id = None
        if self._detector is not None:
            self._detector.end_speech()
        await self._commit(self._buffer_start, self._written, item_id)

    async def _commit(self, start: int, end: int, item_id: str) -> None:
        self._takes_audio()
        samples = self._take(start, end)
        wav = await asyncio.to_thread(wav_for_model, samples, self._info.input_audio_sample_rate)
        item = Item(item_id, "user", [ContentPart("audio", wav=wav, duration_ms=_ms(samples.size))])
        await self._emit(AudioCommitted(item_id, self.items[-1].id if self.items else None))
        await self._add_item(item)

    def _takes_audio(self) -> None:
        if Modality.AUDIO not in self._info.input_modalities:
            raise Refused(
                f"the model {self._info.model_id} does not take audio; send text items instead",
                param="audio",
            )

    # ---- the conversation --------------------------------------------------------------------------

    async def _add_item(self, item: Item) -> None:
        previous = self._append_item(item)
        self._forget_unsendable_audio()
        await self._emit(ItemCreated(item, previous))

    def _append_item(self, item: Item) -> str | None:
        """Adds ``item`` at the end (the oldest go beyond ``realtime_max_items``); the previous item's id."""
        previous = self.items[-1].id if self.items else None
        self.items.append(item)
        del self.items[: max(0, len(self.items) - self._settings.realtime_max_items)]
        return previous

    def _forget_unsendable_audio(self) -> None:
        """Frees the audio of items older than the newest ``max_media_items`` audio parts: no request can
        carry it any more (``_context``), so a session holds at most that much audio."""
        room = self._settings.max_media_items
        for item in reversed(self.items):
            for part in item.content if item.role == "user" else ():
                if part.kind == "audio":
                    if room > 0:
                        room -= 1
                    else:
                        part.wav = b""

    async def _create_item(self, event: CreateItem) -> None:
        if event.item_id is not None and any(item.id == event.item_id for item in self.items):
            raise Refused(f"an item with id {event.item_id!r} already exists", param="item.id")
        last = self.items[-1].id if self.items else None
        if event.previous_item_id is not None and event.previous_item_id != last:
            raise Refused(
                f"previous_item_id is {event.previous_item_id!r}; items can only be added at the end of the "
                f"conversation (after {last!r}, or with previous_item_id unset)",
                param="previous_item_id",
            )
        if not event.content:
            raise Refused("the item has no content", param="item.content")
        parts = []
        for index, content in enumerate(event.content):
            if isinstance(content, TextContent):
                parts.append(ContentPart("text", text=content.text))
                continue
            param = f"item.content[{index}].audio"
            if event.role != "user":
                raise Refused(f"a {event.role} item takes text only", param=param)
            parts.append(await self._audio_part(content, param))
        await self._add_item(Item(event.item_id or new_id("item"), event.role, parts))

    async def _audio_part(self, content: AudioContent, param: str) -> ContentPart:
        self._takes_audio()
        if len(content.pcm) % 2:
            raise Refused(
                f"the audio is {len(content.pcm)} bytes; 16-bit PCM has an even number", param=param
            )
        samples = pcm16_to_float(content.pcm)
        seconds = samples.size / AUDIO_RATE
        limit = self._settings.realtime_max_buffer_s
        if not MIN_AUDIO_DURATION_S <= seconds <= limit:
            raise Refused(
                f"the audio is {seconds * 1000:.0f} ms long; it must be between "
                f"{MIN_AUDIO_DURATION_S * 1000:g} ms and {limit:g} s",
                param=param,
            )
        wav = await asyncio.to_thread(wav_for_model, samples, self._info.input_audio_sample_rate)
        return ContentPart("audio", wav=wav, duration_ms=_ms(samples.size))

    def _context(self) -> list[Item]:
        """The newest items whose audio fits one request's media limit, oldest first."""
        room = self._settings.max_media_items
        context: list[Item] = []
        for item in reversed(self.items):
            if item.audio_parts > room:
                break
            room -= item.audio_parts
            context.append(item)
        return context[::-1]

    def _request(self, response: Response, instructions: str) -> gw.GenerateRequest:
        messages = []
        if instructions:
            messages.append(gw.Message(role="system", content=[gw.ContentPart(text=instructions)]))
        for item in self._context():
            parts = []
            for part in item.content:
                if part.wav:
                    inline = gw.InlineMedia(data=part.wav, mime_type="audio/wav")
                    parts.append(gw.ContentPart(audio=gw.MediaSource(inline=inline)))
                elif part.text:
                    parts.append(gw.ContentPart(text=part.text))
            if parts:
                messages.append(gw.Message(role=item.role, content=parts))
        speech = "audio" in response.output_modalities
        return gw.GenerateRequest(
            messages=messages,
            parameters=gw.GenerationParameters(max_new_tokens=response.max_output_tokens or 0),
            generation_mode=gw.GENERATION_MODE_AUDIO if speech else gw.GENERATION_MODE_TEXT,
            speaker=response.voice if speech else "",
        )

    # ---- answers -----------------------------------------------------------------------------------

    async def _create_response(self, options: ResponseOptions) -> None:
        if self._response is not None:
            raise Refused(
                f"the answer {self._response.id} is in progress; wait for its response.done or cancel it",
                "conversation_already_has_active_response",
            )
        await self._start_response(options)

    async def _start_response(self, options: ResponseOptions) -> None:
        config = self.config
        max_tokens = config.max_output_tokens
        if options.max_output_tokens is not UNCHANGED:
            max_tokens = self._max_tokens(options.max_output_tokens)
        response = Response(
            id=new_id("resp"),
            output_modalities=self._modalities(options.output_modalities or config.output_modalities),
            voice=self._voice(options.voice) if options.voice is not None else config.voice,
            max_output_tokens=max_tokens,
            metadata=options.metadata,
        )
        instructions = options.instructions if options.instructions is not None else config.instructions
        request = self._request(response, instructions)
        self._response = response
        await self._emit(ResponseCreated(copy.deepcopy(response)))
        self._response_task = asyncio.create_task(self._answer(response, request), name=response.id)

    async def _answer(self, response: Response, request: gw.GenerateRequest) -> None:
        """Runs one answer to its end; a cancellation with a reason (barge-in, the client's cancel) ends it
        as ``cancelled``, one from ``close()`` ends it silently."""
        speech = "audio" in response.output_modalities
        item = Item(new_id("item"), "assistant", [ContentPart("audio" if speech else "text")], "in_progress")
        part = item.content[0]
        previous = self._append_item(item)
        response.output.append(item)
        status: ResponseStatus = "completed"
        # The request id of the answer's Generate call (access line, spans, the worker's logs) is its id.
        events = self._core.generate(request, dataclasses.replace(self._call, request_id=response.id))
        try:
            await self._emit(OutputItemAdded(response.id, copy.deepcopy(item), previous))
            audio = OutputAudio()
            async for event in events:
                kind = event.WhichOneof("event")
                if kind == "text" and event.text.text:
                    part.text += event.text.text
                    await self._emit(TextDelta(response.id, item.id, event.text.text, transcript=speech))
                elif kind == "audio" and speech:
                    chunk = event.audio
                    pcm = audio.convert(chunk.pcm, chunk.sample_rate, chunk.channels)
                    if pcm:
                        await self._emit(AudioDelta(response.id, item.id, pcm))
                elif kind == "summary":
                    summary = event.summary
                    response.usage = Usage(summary.prompt_tokens, summary.output_tokens)
                    if summary.finish_reason == gw.FINISH_REASON_LENGTH:
                        status, response.reason = "incomplete", "max_output_tokens"
            tail = audio.flush()
            if tail:
                await self._emit(AudioDelta(response.id, item.id, tail))
        except asyncio.CancelledError:
            if self._closed or response.reason is None:
                raise
            status = "cancelled"
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        except OmnigateError as exc:
            status, response.error = "failed", Error(exc.message, exc.code.value, kind=exc.code)
        except Exception:
            log.exception("realtime answer %s failed", response.id)
            status = "failed"
            response.error = Error(
                "internal error; the answer was logged", "internal_error", ErrorCode.INTERNAL
            )
        finally:
            await events.aclose()  # the worker call is cancelled, unless it had finished
            self._response_closed_at = self._clock()
        await self._finish(response, status)

    async def _finish(self, response: Response, status: ResponseStatus) -> None:
        """Ends the answer: from here on a cancel or a barge-in finds nothing to stop."""
        self._response = self._response_task = None
        self._last_event = self._clock()
        response.status = status
        self._metrics.realtime_responses.labels(status).inc()
        for item in response.output:
            item.status = "completed" if status == "completed" else "incomplete"
            await self._emit(OutputItemDone(response.id, item))
        await self._emit(ResponseDone(response))

    def _interrupt(self, reason: CancelReason) -> asyncio.Task[None] | None:
        """Asks the running answer to stop (it reports itself cancelled); the task to wait for
        (``_stopped``)."""
        task, response = self._response_task, self._response
        if task is None or response is None or task.done():
            return None
        response.reason = reason
        task.cancel()
        return task

    async def _stopped(self, task: asyncio.Task[None]) -> None:
        """Waits for an interrupted answer to end. One cancelled before its task ever ran (so before its
        worker call) cannot report itself: it is reported here."""
        response = self._response
        await asyncio.wait([task])
        if response is not None and self._response is response:
            self._response_closed_at = self._clock()
            await self._finish(response, "cancelled")

    async def _cancel_by_client(self, response_id: str | None) -> None:
        running = self._response
        if running is None or (response_id is not None and response_id != running.id):
            what = f"the answer {response_id!r} is" if response_id else "no answer is"
            raise Refused(f"{what} not in progress", "response_cancel_not_active", param="response_id")
        task = self._interrupt("client_cancelled")
        if task is not None:
            await self._stopped(task)

    # ---- idle ----------------------------------------------------------------------------------------

    async def _expire_when_idle(self) -> None:
        timeout = self._settings.realtime_idle_timeout_s
        while True:
            remaining = self._last_event + timeout - self._clock()
            if remaining <= 0 and self._response_task is None:
                break
            await asyncio.sleep(remaining if remaining > 0 else timeout)
        await self._emit(
            Error(
                f"the session was idle for {timeout:g} s (no client event and no answer running); the limit is "
                "OMNIGATE_GATEWAY_REALTIME_IDLE_TIMEOUT_S",
                "session_expired",
                ErrorCode.DEADLINE_EXCEEDED,
            )
        )
        await self._emit(SessionClosed("idle"))


def _check_turn_detection(turns: TurnDetection) -> None:
    if not 0 <= turns.threshold <= 1:
        raise Refused(
            f"turn_detection.threshold is {turns.threshold}; it must be between 0 and 1",
            param="turn_detection.threshold",
        )
    for name in ("prefix_padding_ms", "silence_duration_ms"):
        value = getattr(turns, name)
        if not 0 <= value <= 10_000:
            raise Refused(
                f"turn_detection.{name} is {value}; it must be between 0 and 10000",
                param=f"turn_detection.{name}",
            )


def _ms(samples: int) -> int:
    return samples * 1000 // AUDIO_RATE
