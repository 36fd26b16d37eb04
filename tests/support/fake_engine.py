"""A fake of the worker's engine (``omnigate_worker.engine.base.Engine``), named as one: for tests about
the worker's control flow (the scheduler's admission and ordering, the server's streaming, refusals,
cancellation and overload) without a model. The real engine is tested in tests/worker/test_engine.py.

``FakeRecordingEngine`` records every request it is handed and every start: text requests join a
``FakeBatch`` (a row ends after a fixed number of decode steps, with a summary), other requests run alone
and play ``script``, whose ``HOLD`` waits until the test sets ``hold`` or the request is cancelled.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable

from omnigate.conversation import (
    Event,
    FinishReason,
    GenerationMode,
    GenerationRequest,
    Modality,
    ModelInfo,
    Summary,
)
from omnigate.errors import InvalidInput
from omnigate_worker.engine.base import Batch, Engine, EventSink, Prepared

FAKE_MODEL = ModelInfo(
    model_id="fake/omni-model",
    architecture="FakeOmniForConditionalGeneration",
    input_modalities=[Modality.TEXT, Modality.IMAGE, Modality.AUDIO],
    output_modalities=[Modality.TEXT, Modality.AUDIO],
    input_audio_sample_rate=16000,
    output_audio_sample_rate=24000,
    speakers=["FakeSpeakerA", "FakeSpeakerB"],
    device="fake:0",
    max_image_pixels=12845056,
    max_video_frame_pixels=602112,
    attention="fake-attention",
    decode_runner="fake-runner",
)


class _Hold:
    def __repr__(self) -> str:
        return "HOLD"


HOLD = _Hold()  # in a script: wait until ``hold`` is set, or end early (no summary) when cancelled
HOLD_LIMIT_S = 10.0  # a held run goes on by itself after this long, so a failing test cannot hang


class FakeBatch(Batch):
    """Stands in for the decode batch: admits up to ``capacity`` rows; a row ends after ``steps`` steps."""

    def __init__(self, capacity: int, steps: int, log: list) -> None:
        self.capacity, self.steps, self.log = capacity, steps, log
        self.rows: list[list] = []  # [name, steps left, emit, done]
        self.widths: list[int] = []

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        return 0

    def admits(self, prompt_tokens: int, admitted: list[int]) -> bool:
        return len(self.rows) + len(admitted) < self.capacity

    def step(self) -> None:
        self.widths.append(len(self.rows))
        for row in list(self.rows):
            row[1] -= 1
            if row[1] == 0:
                self.rows.remove(row)
                self.log.append(("end", row[0]))
                row[2](Summary(FinishReason.STOP, 1, 1))
                row[3](None)

    def fail_all(self, error: BaseException) -> None:
        rows, self.rows = self.rows, []
        for row in rows:
            row[3](error)


class FakeRecordingEngine(Engine):
    """Stands in for the engine: text requests batch, others run alone and play ``script``; records every
    request ``prepare`` is handed (``requests``) and every start, end and cancel (``log``, by name).

    A request's name (and its prompt length) is its first text part, ``"name:tokens"`` (tokens default 1).
    """

    def __init__(self, capacity: int = 8, steps: int = 3, info: ModelInfo = FAKE_MODEL) -> None:
        self.info = info
        self.log: list[tuple[str, str]] = []
        self.requests: list[GenerationRequest] = []
        self.batch = FakeBatch(capacity, steps, self.log)
        self.hold = threading.Event()  # a HOLD in the script waits on it when not set
        self.hold.set()
        self.script: list[Event | _Hold] = [HOLD, Summary(FinishReason.STOP, 1, 0)]

    def validate(self, request: GenerationRequest) -> None:
        if request.mode.output not in self.info.output_modalities:
            raise InvalidInput(f"the fake model cannot generate {request.mode.value}")

    def prepare(self, request: GenerationRequest) -> Prepared:
        self.requests.append(request)
        text = next(p.text for m in request.messages for p in m.content if p.text is not None)
        name, _, tokens = text.partition(":")
        return Prepared(request, name, int(tokens or 1))

    def can_batch(self, prepared: Prepared) -> bool:
        return prepared.request.mode is GenerationMode.TEXT

    def open_batch(self) -> FakeBatch:
        return self.batch

    def start_row(
        self,
        batch: Batch,
        prepared: Prepared,
        emit: EventSink,
        done: Callable,
        cancelled: threading.Event,
        deadline: float | None,
    ) -> None:
        assert isinstance(batch, FakeBatch)
        self.log.append(("join", prepared.inputs))
        batch.rows.append([prepared.inputs, batch.steps, emit, done])

    def run(self, prepared: Prepared, emit: EventSink, cancelled: threading.Event) -> None:
        self.log.append(("alone", prepared.inputs))
        for item in self.script:
            if isinstance(item, _Hold):
                if not self._held(cancelled):
                    self.log.append(("cancelled", prepared.inputs))
                    return
            else:
                emit(copy.deepcopy(item))  # the server writes into a Summary's timings

    def _held(self, cancelled: threading.Event) -> bool:
        """Waits for ``hold``; False when the request was cancelled first."""
        limit = time.monotonic() + HOLD_LIMIT_S
        while not self.hold.wait(0.005):
            if cancelled.is_set():
                return False
            if time.monotonic() > limit:
                break
        return True
