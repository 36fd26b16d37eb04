"""Speech as pipelined stages (thinker row, batched talker, vocoder thread) on the real tiny Qwen2.5-Omni.

The references are transformers' own: the talker inputs ``Qwen2_5OmniForConditionalGeneration.generate``
builds and the talker's own forward for its codes (``_talker_reference``), and one unstreamed token2wav
synthesis (``vocoder.synthesize``, checked against token2wav's forward) for the waveform the streamed chunks
join into.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from transformers import LogitsProcessorList
from transformers.cache_utils import DynamicCache
from transformers.generation.streamers import BaseStreamer

from omnigate.conversation import (
    AudioChunk,
    ContentPart,
    GenerationMode,
    GenerationParams,
    GenerationRequest,
    Message,
    Modality,
    Summary,
)
from omnigate.errors import DeadlineExceeded
from omnigate.media import Audio, Image
from omnigate_worker.engine.sampling import generate_kwargs
from omnigate_worker.metrics import Playback, WorkerMetrics
from omnigate_worker.scheduler import Scheduler
from omnigate_worker.settings import WorkerSettings
from omnigate_worker.speech import pipeline as speech
from omnigate_worker.speech.talker import TALKER_STOP_CODES, talker_generation_config
from omnigate_worker.speech.vocoder import NoiseSource, synthesize
from tests.support.stack import MODELS_DIR

OMNI = str(MODELS_DIR / "tiny-qwen2.5-omni")


def _request(parts, tokens=8, mode=GenerationMode.AUDIO, seed=None) -> GenerationRequest:
    if isinstance(parts, str):
        parts = [ContentPart(Modality.TEXT, text=parts)]
    return GenerationRequest(
        messages=[Message("user", parts)],
        params=GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens, seed=seed),
        mode=mode,
    )


def _media_requests() -> list[GenerationRequest]:
    rng = np.random.default_rng(0)
    audio = Audio((0.1 * np.sin(np.arange(24000) * 0.05)).astype(np.float32), 16000)
    image = Image(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
    return [
        _request("Say something short."),
        _request(
            [ContentPart(Modality.AUDIO, audio=audio), ContentPart(Modality.TEXT, text="Answer aloud.")]
        ),
        _request(
            [ContentPart(Modality.IMAGE, image=image), ContentPart(Modality.TEXT, text="Describe it.")], 6
        ),
    ]


class _Timed:
    """A job's events with their arrival times."""

    def __init__(self) -> None:
        self.events: list = []
        self.times: list[float] = []
        self.error: BaseException | None = None

    @property
    def chunks(self) -> list[AudioChunk]:
        return [e for e in self.events if isinstance(e, AudioChunk)]

    @property
    def samples(self) -> np.ndarray:
        return np.concatenate([c.samples for c in self.chunks])


async def _collect(job, on_event=None) -> _Timed:
    out = _Timed()
    try:
        async for event in job.events():
            out.events.append(event)
            out.times.append(time.monotonic())
            if on_event is not None:
                on_event(event)
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        out.error = exc
    return out


def _scheduler(engine) -> Scheduler:
    scheduler = Scheduler(engine, WorkerSettings(model=OMNI), WorkerMetrics(CollectorRegistry()))
    scheduler.start()
    return scheduler


@pytest.fixture
def recorded_codes(monkeypatch) -> list[list[int]]:
    """Every finished talker's codes, in the order the talkers finished (observation only)."""
    codes: list[list[int]] = []
    original = speech.SpeechRequest.talker_done

    def talker_done(self, error):
        codes.append((self.tap.input_ids[0].tolist(), list(self.codes)))
        original(self, error)

    monkeypatch.setattr(speech.SpeechRequest, "talker_done", talker_done)
    return codes


def _talker_reference(engine, request) -> list[int]:
    """The talker's greedy codes for ``request`` from transformers' own code, one request at a time.

    ``Qwen2_5OmniForConditionalGeneration.generate`` runs the thinker and builds the talker's inputs (its
    prompt embeddings, text ids, ``thinker_reply_part`` after the end-of-text rewrite); they are taken where it
    hands them to ``talker.generate``. The talker then runs its own forward step by step with a growing
    attention mask, as ``generate`` ran it before transformers 5 and still runs it for padded prompts:
    transformers 5.23's ``generate`` drops an all-ones attention mask before the forward, and the talker's
    forward only adds the codec pad/start embeddings and computes its multimodal rope positions when it is
    given a mask, so an unpadded ``generate`` feeds the talker differently from how it was trained. Omnigate
    keeps the model's design (talker.py); this reference does too.
    """
    model = engine._model
    talker = model.talker
    captured: dict = {}

    def capture(*args, **kwargs):
        captured.update(kwargs)
        return torch.zeros((1, 1), dtype=torch.long)  # the thinker's part is done; the talker runs below

    prepared = engine.prepare(request)
    original = talker.generate
    talker.generate = capture  # instance attribute: only this call, only in this test
    try:
        with torch.inference_mode():
            try:
                engine._family.generate_speech(
                    prepared.inputs, request, generate_kwargs(request.params), None, None, None, None
                )
            except Exception:  # noqa: BLE001 - token2wav on the stand-in codes; the inputs are captured
                pass
    finally:
        del talker.generate
    assert talker.generate == original and captured, "generate() did not reach the talker"
    codec_ids = captured["input_ids"]
    config = talker_generation_config(talker, captured["max_new_tokens"], do_sample=False)
    processors = talker._get_logits_processor(
        generation_config=config,
        input_ids_seq_length=codec_ids.shape[1],
        encoder_input_ids=codec_ids,
        prefix_allowed_tokens_fn=None,
        logits_processor=LogitsProcessorList(),
        device=codec_ids.device,
        model_kwargs={},
    )
    rope = {
        k: captured[k]
        for k in ("image_grid_thw", "video_grid_thw", "audio_feature_lengths", "use_audio_in_video")
        if k in captured
    }
    history = codec_ids
    mask = captured["attention_mask"]
    cache = DynamicCache(config=talker.config)
    codes: list[int] = []
    with torch.inference_mode():
        out = talker(
            inputs_embeds=captured["inputs_embeds"].clone(),
            input_text_ids=captured["input_text_ids"],
            thinker_reply_part=captured["thinker_reply_part"],
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            **rope,
        )
        for _ in range(captured["max_new_tokens"]):
            scores = processors(history, out.logits[:, -1].float())
            code = int(scores.argmax(-1))
            if code in TALKER_STOP_CODES:
                break
            codes.append(code)
            history = torch.cat([history, torch.tensor([[code]])], dim=1)
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            out = talker(
                input_ids=torch.tensor([[code]]),
                input_text_ids=captured["input_text_ids"],
                thinker_reply_part=out.thinker_reply_part,
                attention_mask=mask,
                past_key_values=cache,
                use_cache=True,
                **rope,
            )
    return codes


# ---- the talker --------------------------------------------------------------------------------------


async def test_batched_talker_codes_equal_generate(greedy_speech_engine, recorded_codes):
    """Three speech requests (text, audio and image input; prompts prefilled whole and in chunks) and a
    text request decode together; each talker's codes equal generate()'s for the same request."""
    engine = greedy_speech_engine
    requests = _media_requests()
    prompts = [engine.prepare(r).prompt_len for r in requests]
    assert min(prompts) <= 100 < max(prompts), prompts  # both prefill paths
    expected = {}
    for request in requests:
        prepared = engine.prepare(request)
        expected[tuple(prepared.inputs["input_ids"][0].tolist())] = _talker_reference(engine, request)
    scheduler = _scheduler(engine)
    try:
        jobs = [scheduler.submit(r) for r in requests] + [
            scheduler.submit(_request("Hi", 12, GenerationMode.TEXT))
        ]
        results = await asyncio.gather(*(_collect(job) for job in jobs))
    finally:
        scheduler.shutdown()
    assert all(r.error is None for r in results), [r.error for r in results]
    assert len(recorded_codes) == 3
    for prompt, codes in recorded_codes:
        want = expected[tuple(prompt)]
        assert len(want) > 8
        assert codes == want
    for result in results[:3]:
        summary = result.events[-1]
        assert isinstance(summary, Summary) and summary.audio_seconds > 0
        assert summary.audio_seconds == pytest.approx(len(result.samples) / 24000)
    assert isinstance(results[3].events[-1], Summary) and not results[3].chunks


# ---- the vocoder -------------------------------------------------------------------------------------


def test_synthesize_is_token2wav_with_the_noise_given(engine):
    model = engine._model
    params = model.speaker_map[engine._family.default_speaker()]
    conditioning = params["cond"].float().reshape(1, -1)
    reference = params["ref_mel"].float()
    codes = torch.randint(0, 8000, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.manual_seed(5)
        want = model.token2wav(codes, conditioning=conditioning, reference_mel=reference).reshape(-1)
        torch.manual_seed(5)
        noise = torch.randn(1, 30 * model.token2wav.code2wav_dit_model.repeats, 80)
        got = synthesize(model.token2wav, codes, conditioning, reference, noise).reshape(-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_noise_does_not_depend_on_the_chunking():
    a = NoiseSource(80, 2, torch.device("cpu"), seed=11)
    b = NoiseSource(80, 2, torch.device("cpu"), seed=11)
    whole = a.codes(0, 300)
    pieces = torch.cat([b.codes(s, e) for s, e in ((0, 25), (25, 75), (75, 175), (175, 300))], dim=1)
    torch.testing.assert_close(pieces, whole, rtol=0, atol=0)
    assert not torch.equal(NoiseSource(80, 2, torch.device("cpu"), seed=12).codes(0, 300), whole)


async def test_streamed_chunks_join_into_the_unstreamed_waveform(greedy_speech_engine, recorded_codes):
    """Each chunk is vocoded with 25 codes of left context and 8 of look-ahead (the defaults) and the same
    noise the whole synthesis uses: the joined stream equals one unstreamed synthesis within 1e-3 relative
    RMS (measured ~1e-6 on the tiny model) and has exactly its length."""
    engine = greedy_speech_engine
    scheduler = _scheduler(engine)
    try:
        result = await _collect(scheduler.submit(_request("Tell me more.", 16, seed=7)))
    finally:
        scheduler.shutdown()
    assert result.error is None
    assert len(result.chunks) >= 3
    ((_, codes),) = recorded_codes
    model = engine._model
    params = model.speaker_map[engine._family.default_speaker()]
    noise = NoiseSource(80, 2, torch.device("cpu"), seed=7).codes(0, len(codes))
    with torch.inference_mode():
        whole = (
            synthesize(
                model.token2wav,
                torch.tensor([codes]),
                params["cond"].float().reshape(1, -1),
                params["ref_mel"].float(),
                noise,
            )
            .reshape(-1)
            .numpy()
        )
    joined = result.samples
    assert len(joined) == len(whole)
    error = np.sqrt(np.mean((joined - whole) ** 2)) / np.sqrt(np.mean(whole**2))
    assert error < 1e-3, error


async def test_concurrent_speech_shares_vocoder_calls(engine):
    scheduler = _scheduler(engine)
    vocoder = engine._speech.vocoder
    calls, shared = vocoder.calls, vocoder.batched_jobs
    try:
        jobs = [scheduler.submit(_request(f"Say {i}.", 8)) for i in range(4)]
        results = await asyncio.gather(*(_collect(job) for job in jobs))
    finally:
        scheduler.shutdown()
    assert all(r.error is None and r.chunks for r in results)
    chunks = sum(len(r.chunks) for r in results)
    assert vocoder.batched_jobs > shared
    assert vocoder.calls - calls < chunks  # some calls vocoded several requests' chunks


# ---- sharing, cancellation, deadlines ----------------------------------------------------------------


async def test_text_and_speech_do_not_wait_for_each_other(engine):
    """A text request sent after a long spoken answer finishes long before it; a spoken answer sent after a
    long text request starts speaking before that text is done."""
    scheduler = _scheduler(engine)
    try:
        long_speech = scheduler.submit(_request("Tell me a story.", 24))
        await asyncio.sleep(0.05)
        text = scheduler.submit(_request("Hi", 6, GenerationMode.TEXT))
        spoken, written = await asyncio.gather(_collect(long_speech), _collect(text))
        assert written.times[-1] < spoken.times[-1]

        long_text = scheduler.submit(_request("Write a lot.", 1000, GenerationMode.TEXT))
        await asyncio.sleep(0.05)
        short_speech = scheduler.submit(_request("Hello", 6))
        written, spoken = await asyncio.gather(_collect(long_text), _collect(short_speech))
        first_audio = spoken.times[spoken.events.index(spoken.chunks[0])]
        assert first_audio < written.times[-1]
    finally:
        scheduler.shutdown()


def _idle(engine) -> bool:
    pipeline = engine._speech
    return (
        not pipeline.active
        and not len(pipeline.talker)
        and not pipeline.waiting
        and not pipeline.vocoder.pending()
    )


async def _wait_idle(engine, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while not _idle(engine):
        assert time.monotonic() < deadline, "the speech stages still hold the request"
        await asyncio.sleep(0.02)


async def test_cancelling_stops_every_stage_and_frees_its_slots(engine):
    talker_steps = []
    hook = engine._model.talker.model.register_forward_hook(lambda *_: talker_steps.append(1))
    scheduler = _scheduler(engine)
    try:
        job = scheduler.submit(_request("Tell me a long story.", 64))
        seen = []

        def on_event(event):
            if isinstance(event, AudioChunk) and not seen:
                seen.append(len(talker_steps))
                job.cancel()

        result = await _collect(job, on_event)
        await _wait_idle(engine)
    finally:
        scheduler.shutdown()
        hook.remove()
    assert result.error is None and not any(isinstance(e, Summary) for e in result.events)
    # 64 text tokens allow 512 codes; the talker stopped a few steps after the cancel.
    assert len(talker_steps) - seen[0] < 40
    assert engine._pool.owner is None and engine._talker_pool.owner is None


async def test_a_deadline_during_speech_ends_every_stage(engine):
    scheduler = _scheduler(engine)
    try:
        started = time.monotonic()
        result = await _collect(scheduler.submit(_request("Tell me a long story.", 64), timeout_s=1.0))
        took = time.monotonic() - started
        await _wait_idle(engine)
    finally:
        scheduler.shutdown()
    assert isinstance(result.error, DeadlineExceeded)
    assert took < 5
    assert engine._talker_pool.owner is None


async def test_an_empty_reply_ends_with_a_summary_and_no_audio(engine, monkeypatch):
    """The thinker's first token ends the reply: nothing to speak (generate() would crash), one summary."""
    gen = engine._gen_model
    eos = gen.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos

    def only_eos(input_ids, scores):
        forced = torch.full_like(scores, -float("inf"))
        forced[:, eos] = 0
        return forced

    original = gen._get_logits_processor
    monkeypatch.setattr(gen, "_get_logits_processor", lambda **kw: [*original(**kw), only_eos])
    request = _request("Hi", 4)
    request.params.min_new_tokens = 0
    scheduler = _scheduler(engine)
    try:
        result = await _collect(scheduler.submit(request))
        await _wait_idle(engine)
    finally:
        scheduler.shutdown()
    assert result.error is None
    summary = result.events[-1]
    assert isinstance(summary, Summary) and summary.output_tokens == 1 and summary.audio_seconds == 0
    assert not result.chunks


def test_playback_counts_gaps_after_the_first_chunk():
    playback = Playback()
    playback.chunk(0.5, now=10.0)  # plays until 10.5
    playback.chunk(0.5, now=10.2)  # queued: plays 10.5-11.0
    playback.chunk(1.0, now=11.3)  # 0.3 s of silence
    playback.chunk(1.0, now=11.5)
    assert playback.first_at == 10.0
    assert playback.underrun_s == pytest.approx(0.3)


def test_the_engine_reports_the_speech_pipeline(engine):
    assert "speech: batched talker" in engine.info.decode_runner
    assert engine.can_batch(engine.prepare(_request("Hi", 4)))


# ---- one request's failure (fault injection: named fakes of a failing stage) --------------------------


async def test_a_failing_vocoder_call_fails_only_its_request(engine, monkeypatch):
    """FakeBrokenVocoder: synthesis raises whenever Ethan's voice is in the call. The batched call is retried
    chunk by chunk, so Chelsie's request, vocoded alongside, still gets all its audio."""
    from omnigate_worker.speech import vocoder as vocoder_module

    ethan = engine._speech.speaker_tensors("Ethan")[0]
    real = vocoder_module.synthesize

    def fake_broken_vocoder(token2wav, codes, conditioning, *args, **kwargs):
        if any(torch.equal(row, ethan[0]) for row in conditioning):
            raise RuntimeError("FakeBrokenVocoder: this voice fails")
        return real(token2wav, codes, conditioning, *args, **kwargs)

    monkeypatch.setattr(vocoder_module, "synthesize", fake_broken_vocoder)
    scheduler = _scheduler(engine)
    try:
        ethan_request, chelsie_request = _request("One.", 8), _request("Two.", 8)
        ethan_request.speaker, chelsie_request.speaker = "Ethan", "Chelsie"
        failed, spoken = await asyncio.gather(
            _collect(scheduler.submit(ethan_request)), _collect(scheduler.submit(chelsie_request))
        )
        await _wait_idle(engine)
    finally:
        scheduler.shutdown()
    assert isinstance(failed.error, RuntimeError) and "FakeBrokenVocoder" in str(failed.error)
    assert spoken.error is None and spoken.events[-1].audio_seconds == pytest.approx(64 * 480 / 24000)


async def test_a_failing_talker_step_fails_the_speech_not_the_text(engine, monkeypatch):
    """FakeBrokenTalker: the talker's decoder raises on its fifth step. The spoken request fails; a text
    request decoding in the same loop finishes with all its tokens."""
    talker_model = engine._model.talker.model
    real = talker_model.forward
    calls = []

    def fake_broken_talker(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("FakeBrokenTalker: a device error")
        return real(*args, **kwargs)

    monkeypatch.setattr(talker_model, "forward", fake_broken_talker)
    scheduler = _scheduler(engine)
    try:
        spoken, written = await asyncio.gather(
            _collect(scheduler.submit(_request("Speak.", 16))),
            _collect(scheduler.submit(_request("Write.", 40, GenerationMode.TEXT))),
        )
        await _wait_idle(engine)
    finally:
        scheduler.shutdown()
    assert isinstance(spoken.error, RuntimeError) and "FakeBrokenTalker" in str(spoken.error)
    assert written.error is None and written.events[-1].output_tokens == 40
    assert engine._talker_pool.owner is None


def test_the_vocoder_thread_outlives_a_failing_callback(engine):
    """A request's callback raising (its event loop gone, say) must not kill the thread every later speech
    request needs."""
    from omnigate_worker.speech.vocoder import VocodeJob, Vocoder

    model = engine._model
    vocoder = Vocoder(model.token2wav, torch.device("cpu"), num_steps=2, max_batch=4)
    conditioning, reference = engine._speech.speaker_tensors("Chelsie")
    results: list = []
    finished = threading.Event()

    def job(on_done, owner):
        return VocodeJob(
            codes=torch.randint(0, 8000, (1, 10)),
            noise=torch.randn(1, 20, 80),
            conditioning=conditioning,
            reference_mel=reference,
            keep_from=0,
            keep_to=10,
            on_done=on_done,
            alive=lambda: True,
            owner=owner,
        )

    def raising(samples, error):
        raise RuntimeError("FakeClosedLoop: the listener is gone")

    def keep(samples, error):
        results.append((samples, error))
        finished.set()

    try:
        vocoder.submit(job(raising, object()))
        vocoder.submit(job(keep, object()))
        assert finished.wait(60)
    finally:
        vocoder.close()
    ((samples, error),) = results
    assert error is None and len(samples) == 10 * 480


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vocoder_graphs_equal_the_eager_solve():
    from omnigate_worker.engine import loading
    from omnigate_worker.speech.vocoder import DitGraphs, dit_mel, ode_times

    model = loading.load(OMNI, "cuda", "float32", "auto", False).model
    token2wav = model.token2wav.float()
    graphs = DitGraphs(token2wav, torch.device("cuda"), 10, 8)
    params = model.speaker_map["Chelsie"]
    for rows, window in ((1, 33), (3, 33), (4, 83)):
        codes = torch.randint(0, 8000, (rows, window), device="cuda")
        conditioning = params["cond"].float().cuda().reshape(1, -1).repeat(rows, 1)
        reference = params["ref_mel"].float().cuda().reshape(1, 32, 80).repeat(rows, 1, 1)
        noise = torch.randn(rows, window * 2, 80, device="cuda")
        with torch.inference_mode():
            got = graphs(codes, conditioning, reference, noise)
            speaker = conditioning.unsqueeze(1).repeat(1, window * 2, 1)
            want = dit_mel(token2wav, codes, speaker, reference, noise, ode_times(10, -1.0, "cuda"))
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert not graphs.failed


async def test_a_seed_makes_sampled_speech_repeatable(engine):
    """The talker samples (generate()'s defaults) from the request's seed, and the DiT's noise comes from it
    too: the same seeded request speaks the same codes and audio, alone or beside another request."""
    scheduler = _scheduler(engine)
    try:
        alone = await _collect(scheduler.submit(_request("Seeded.", 8, seed=3)))
        together, _ = await asyncio.gather(
            _collect(scheduler.submit(_request("Seeded.", 8, seed=3))),
            _collect(scheduler.submit(_request("Other.", 8, seed=4))),
        )
    finally:
        scheduler.shutdown()
    assert alone.error is None and together.error is None
    assert len(alone.samples) == len(together.samples) > 0
    np.testing.assert_allclose(together.samples, alone.samples, atol=1e-4)


class _BatchCodes(BaseStreamer):
    """Codes per row of a batched talker ``generate`` (its first put is the prompt)."""

    def __init__(self) -> None:
        self.rows: list[list[int]] | None = None
        self._prompt = True

    def put(self, value) -> None:
        if self._prompt:
            self._prompt = False
            return
        codes = value.reshape(-1).tolist()
        if self.rows is None:
            self.rows = [[] for _ in codes]
        for row, code in zip(self.rows, codes, strict=True):
            if not row or row[-1] not in TALKER_STOP_CODES:
                row.append(int(code))

    def end(self) -> None:
        pass


async def test_talker_codes_equal_transformers_generate_on_a_padded_batch(
    greedy_speech_engine, recorded_codes
):
    """transformers' own generate() on a batch of two prompts of different lengths (left-padded, so it keeps
    the attention mask the talker needs; see _talker_reference) speaks exactly the codes the pipeline
    speaks for the same two requests: thinker and talker greedy."""
    engine = greedy_speech_engine
    requests = [_request("Say something short.", 8), _request("Hi", 8)]
    prepared = [engine.prepare(r) for r in requests]
    length = max(p.prompt_len for p in prepared)
    assert len({p.prompt_len for p in prepared}) == 2  # one row is padded
    ids, masks = [], []
    for p in prepared:
        missing = length - p.prompt_len
        ids.append(torch.cat([torch.full((1, missing), engine._pad_token_id), p.inputs["input_ids"]], 1))
        masks.append(torch.cat([torch.zeros((1, missing), dtype=torch.long), p.inputs["attention_mask"]], 1))
    streamer = _BatchCodes()
    with torch.inference_mode():
        engine._model.generate(
            input_ids=torch.cat(ids),
            attention_mask=torch.cat(masks),
            generation_mode="audio",
            speaker=engine._family.default_speaker(),
            thinker_max_new_tokens=8,
            thinker_min_new_tokens=8,
            thinker_do_sample=False,
            talker_do_sample=False,
            talker_max_new_tokens=engine._family.talker_tokens(requests[0]),
            talker_streamer=streamer,
        )
    scheduler = _scheduler(engine)
    try:
        results = await asyncio.gather(*(_collect(scheduler.submit(r)) for r in requests))
    finally:
        scheduler.shutdown()
    assert all(r.error is None for r in results)
    spoken = {tuple(prompt): codes for prompt, codes in recorded_codes}
    for p, row in zip(prepared, streamer.rows, strict=True):
        want = [code for code in row if code not in TALKER_STOP_CODES]
        assert len(want) > 8
        assert spoken[tuple(p.inputs["input_ids"][0].tolist())] == want
