"""Ingestion in process: cache, transfer bounds, per-modality caps, deadlines and cancellation."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from omnigate.conversation import Modality, ModelInfo
from omnigate.gateway.v1 import gateway_pb2 as pb
from omnigate_gateway import convert
from omnigate_gateway.errors import DeadlineExceeded, ErrorCode, LimitExceeded, MediaDecodeTimeout
from omnigate_gateway.media.fetch import MediaFetcher
from omnigate_gateway.media.image import decode_image
from omnigate_gateway.media.ingest import MediaIngestor
from omnigate_gateway.media.resize import fit_size
from omnigate_gateway.media.video import decode_video
from omnigate_gateway.metrics import GatewayMetrics
from omnigate_gateway.settings import GatewaySettings
from tests.support import media_factory as mf
from tests.support.hostile_server import etag_of

INFO = ModelInfo(
    model_id="test-model",
    architecture="Test",
    input_modalities=[Modality.TEXT, Modality.IMAGE, Modality.AUDIO, Modality.VIDEO],
    output_modalities=[Modality.TEXT],
    input_audio_sample_rate=16000,
    max_image_pixels=50176,
    max_video_frame_pixels=12544,
)


def settings(**overrides) -> GatewaySettings:
    return GatewaySettings(_cli_parse_args=False, allow_private_networks=True, **overrides)


@pytest.fixture
async def make_ingestor():
    made = []

    async def make(**overrides) -> MediaIngestor:
        s = settings(**overrides)
        fetcher = MediaFetcher(s.fetch_limits())
        ingestor = MediaIngestor(fetcher, s, GatewayMetrics(CollectorRegistry()))
        made.append((fetcher, ingestor))
        return ingestor

    yield make
    for fetcher, ingestor in made:
        await fetcher.aclose()
        ingestor.close()


def incoming(*sources: tuple[str, pb.MediaSource], fps: float = 2.0, load_audio: bool = False):
    parts = [pb.ContentPart(**{kind: source}) for kind, source in sources]
    parts.append(pb.ContentPart(text="hi"))
    message = pb.GenerateRequest(
        messages=[pb.Message(role="user", content=parts)],
        generation_mode=pb.GENERATION_MODE_TEXT,
        video=pb.VideoOptions(fps=fps, load_audio_from_video=load_audio),
    )
    return convert.parse_request(message, 8, 2.0)


def url(u: str) -> pb.MediaSource:
    return pb.MediaSource(url=u)


def inline(data: bytes) -> pb.MediaSource:
    return pb.MediaSource(inline=pb.InlineMedia(data=data))


async def resolve(ingestor, *sources, deadline=None, **kwargs):
    request = incoming(*sources, **kwargs)
    await ingestor.resolve(request, INFO, deadline)
    return [part for part, _ in request.media]


# ------------------------------------------------------------------------------------------- transfer


async def test_4k_image_is_downscaled_to_the_models_bound(make_ingestor):
    ingestor = await make_ingestor()
    (part,) = await resolve(ingestor, ("image", inline(mf.make_jpeg(3840, 2160))))
    assert part.image.pixels.shape == (168, 298, 3)
    assert fit_size(3840, 2160, INFO.max_image_pixels) == (298, 168)
    assert part.image.width * part.image.height <= INFO.max_image_pixels


async def test_image_within_bounds_is_untouched(make_ingestor):
    data = mf.make_png(200, 150)  # 30000 pixels, under 50176
    ingestor = await make_ingestor()
    (part,) = await resolve(ingestor, ("image", inline(data)))
    assert np.array_equal(part.image.pixels, decode_image(data, decode_limits()).pixels)


async def test_1080p_video_frames_are_downscaled(make_ingestor):
    ingestor = await make_ingestor()
    data = mf.make_video("mp4", "h264", seconds=1.0, fps=5, w=1920, h=1080, with_audio=False)
    (part,) = await resolve(ingestor, ("video", inline(data)), fps=2.0)
    assert part.video.frames.shape == (2, 84, 149, 3)  # fit_size(1920, 1080, 12544)


async def test_fitting_can_be_switched_off(make_ingestor):
    ingestor = await make_ingestor(fit_media_to_model=False)
    (part,) = await resolve(ingestor, ("image", inline(mf.make_png(640, 480))))
    assert part.image.pixels.shape == (480, 640, 3)


def decode_limits():
    return settings().decode_limits()


# ----------------------------------------------------------------------------------------------- cache


async def test_repeated_url_with_validators_is_revalidated_not_refetched(make_ingestor, hostile_server):
    png = mf.make_png(64, 48)
    u = hostile_server.serve("cached-etag.png", png, {"ETag": etag_of(png)})
    ingestor = await make_ingestor()
    first = (await resolve(ingestor, ("image", url(u))))[0].image
    second = (await resolve(ingestor, ("image", url(u))))[0].image
    assert second is first  # the decoded result itself, not a second decode
    hits = hostile_server.hits("/files/cached-etag.png")
    assert len(hits) == 2 and hits[1]["if-none-match"] == etag_of(png)  # the second answer was a 304
    assert not second.pixels.flags.writeable  # shared between requests, so read-only


async def test_fresh_url_is_not_requested_again(make_ingestor, hostile_server):
    wav = mf.make_wav(0.5)
    u = hostile_server.serve("cached-fresh.wav", wav, {"Cache-Control": "max-age=300", "ETag": '"a"'})
    ingestor = await make_ingestor()
    first = (await resolve(ingestor, ("audio", url(u))))[0].audio
    second = (await resolve(ingestor, ("audio", url(u))))[0].audio
    assert second is first
    assert len(hostile_server.hits("/files/cached-fresh.wav")) == 1


async def test_changed_content_is_fetched_and_decoded_again(make_ingestor, hostile_server):
    ingestor = await make_ingestor()
    hostile_server.serve("changing.png", mf.make_png(10, 10), {"ETag": '"one"'})
    u = hostile_server.url("/files/changing.png")
    first = (await resolve(ingestor, ("image", url(u))))[0].image
    hostile_server.serve("changing.png", mf.make_png(20, 10), {"ETag": '"two"'})
    second = (await resolve(ingestor, ("image", url(u))))[0].image
    assert (first.width, second.width) == (10, 20)


async def test_url_without_validators_is_fetched_but_not_decoded_again(make_ingestor, hostile_server):
    u = hostile_server.serve("no-validators.png", mf.make_png(30, 20))
    ingestor = await make_ingestor()
    first = (await resolve(ingestor, ("image", url(u))))[0].image
    second = (await resolve(ingestor, ("image", url(u))))[0].image
    assert second is first  # same bytes (content hash): decoded once
    assert len(hostile_server.hits("/files/no-validators.png")) == 2


async def test_no_store_is_respected(make_ingestor, hostile_server):
    u = hostile_server.serve("no-store.png", mf.make_png(8, 8), {"Cache-Control": "no-store", "ETag": '"x"'})
    ingestor = await make_ingestor()
    await resolve(ingestor, ("image", url(u)))
    await resolve(ingestor, ("image", url(u)))
    assert all("if-none-match" not in h for h in hostile_server.hits("/files/no-store.png"))


async def test_inline_media_is_decoded_once(make_ingestor):
    data = mf.make_video("mp4", "h264", seconds=1.0, with_audio=False)
    ingestor = await make_ingestor()
    a = (await resolve(ingestor, ("video", inline(data))))[0].video
    b = (await resolve(ingestor, ("video", inline(data))))[0].video
    c = (await resolve(ingestor, ("video", inline(data)), fps=4.0))[0].video  # other options, other entry
    assert b is a and c is not a and c.num_frames == 4


async def test_cache_can_be_disabled(make_ingestor):
    data = mf.make_png(8, 8)
    ingestor = await make_ingestor(media_cache_bytes=0)
    a = (await resolve(ingestor, ("image", inline(data))))[0].image
    b = (await resolve(ingestor, ("image", inline(data))))[0].image
    assert a is not b and len(ingestor.cache) == 0


# ---------------------------------------------------------------------------------------------- limits


async def test_per_modality_byte_caps(make_ingestor):
    ingestor = await make_ingestor(max_image_bytes=1000)
    with pytest.raises(LimitExceeded, match="the limit is 1000 bytes per image item"):
        await resolve(ingestor, ("image", inline(mf.make_png(64, 64, "RGB") + b"\x00" * 1000)))
    assert (await resolve(ingestor, ("audio", inline(mf.make_wav(0.1)))))[0].audio is not None


async def test_per_request_bytes_add_up(make_ingestor, hostile_server):
    png = mf.make_png(64, 64)
    u = hostile_server.serve("budget.png", png)
    ingestor = await make_ingestor(max_request_media_bytes=len(png) * 2 + 10, media_cache_bytes=0)
    await resolve(ingestor, ("image", url(u)), ("image", url(u)))
    with pytest.raises(LimitExceeded, match="per-request limit"):
        await resolve(ingestor, ("image", url(u)), ("image", url(u)), ("image", inline(png)))


# ------------------------------------------------------------------------------- deadlines, cancelling


@pytest.fixture(scope="module")
def long_video() -> tuple[bytes, float]:
    """A 60 s clip and how long decoding it at 10 fps takes here, undisturbed."""
    data = mf.make_video("mp4", "h264", seconds=60.0, fps=30, w=320, h=240, with_audio=False)
    started = time.monotonic()
    decode_video(data, 10.0, False, 16000, decode_limits())
    return data, time.monotonic() - started


async def test_request_deadline_stops_a_slow_fetch(make_ingestor, hostile_server):
    ingestor = await make_ingestor()
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="deadline passed") as info:
        await resolve(ingestor, ("image", url(hostile_server.url("/stall"))), deadline=time.monotonic() + 0.5)
    assert time.monotonic() - started < 3
    assert info.value.code == ErrorCode.DEADLINE_EXCEEDED
    for _ in range(150):  # the connection is dropped, not left hanging
        if hostile_server.hangups.get("/stall", 0) > started:
            break
        await asyncio.sleep(0.02)
    assert hostile_server.hangups.get("/stall", 0) > started


async def test_decode_time_limit(make_ingestor, long_video):
    data, natural_s = long_video
    ingestor = await make_ingestor(max_decode_s=natural_s / 5, media_cache_bytes=0)
    started = time.monotonic()
    with pytest.raises(MediaDecodeTimeout, match="decode time limit"):
        await resolve(ingestor, ("video", inline(data)), fps=10.0)
    assert time.monotonic() - started < natural_s * 0.6


async def test_cancelling_the_request_stops_the_decode_thread(make_ingestor, long_video):
    data, natural_s = long_video
    ingestor = await make_ingestor(decode_threads=1, media_cache_bytes=0)
    task = asyncio.create_task(resolve(ingestor, ("video", inline(data)), fps=10.0))
    await asyncio.sleep(natural_s / 5)  # decoding has started on the only decode thread
    task.cancel()
    cancelled_at = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The one decode thread is free long before the decode would have finished: it stopped.
    await asyncio.get_running_loop().run_in_executor(ingestor._executor, lambda: None)
    assert time.monotonic() - cancelled_at < natural_s * 0.5
