"""Media the model cannot take, local paths that cannot be read, redirects out of http(s) and oversized
input: each ends in a clear domain error that names what was wrong and what is allowed (never an
unexpected exception, never a message that repeats megabytes of input), and fetches are logged without
credentials or query strings.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import threading
from urllib.parse import quote as url_quote

import numpy as np
import pytest
import soundfile as sf

from omnigate.media import DecodeLimits
from omnigate_gateway.errors import (
    ErrorCode,
    ForbiddenSource,
    InvalidInput,
    MediaFetchError,
    OmnigateError,
)
from omnigate_gateway.media.audio import decode_audio
from omnigate_gateway.media.fetch import FetchLimits, MediaFetcher
from omnigate_gateway.media.image import decode_image
from omnigate_gateway.media.resolver import StaticResolver
from omnigate_gateway.media.video import decode_video
from tests.support import media_factory as mf

LIMITS = DecodeLimits()
LOCAL = FetchLimits(allow_private_networks=True, max_bytes=1_000_000)
# Longest refusal message accepted: far below gRPC's ~8 KB status limit, long enough for any real message.
MESSAGE_LIMIT = 600
# The processors of the Qwen2-VL family refuse pictures longer than this on one side than on the other.
PROCESSOR_RATIO_LIMIT = 200


def _wav(samples: int, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.full((samples, 1), 0.25, np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _invalid(info: pytest.ExceptionInfo) -> str:
    """The refusal's message, after checking it is an INVALID_ARGUMENT of a bounded size."""
    assert info.value.code == ErrorCode.INVALID_ARGUMENT
    message = str(info.value)
    assert 0 < len(message) < MESSAGE_LIMIT
    return message


# ------------------------------------------------------------------------ pictures the processor refuses


@pytest.mark.parametrize(
    ("width", "height", "ratio"),
    [
        (400, 1, "400:1"),
        (1, 300, "300:1"),
        (300, 1, "300:1"),
        (201, 1, "201:1"),
        (1, 201, "201:1"),
        (1000, 3, "333.3:1"),
        (2, 900, "450:1"),
    ],  # fmt: skip
)
@pytest.mark.parametrize("fmt", ["png", "gif", "bmp"])
def test_image_over_the_aspect_ratio_limit_is_refused_at_decode_time(width, height, ratio, fmt):
    data = {"png": mf.make_png, "gif": mf.make_gif, "bmp": mf.make_bmp}[fmt](width, height)
    with pytest.raises(InvalidInput) as info:
        decode_image(data, LIMITS, fit_pixels=50176)
    assert _invalid(info) == (
        f"the image is {width}x{height} pixels (aspect ratio {ratio}); the limit is 200:1"
    )


@pytest.mark.parametrize(("width", "height"), [(200, 1), (1, 200), (600, 3), (3, 600), (1, 1), (2, 1)])
def test_image_at_the_aspect_ratio_limit_is_accepted(width, height):
    image = decode_image(mf.make_png(width, height), LIMITS, fit_pixels=50176)
    assert (image.width, image.height) == (width, height)


@pytest.mark.parametrize(("width", "height"), [(3980, 20), (20, 3980), (9950, 50), (2000, 10)])
def test_downscaling_to_the_models_bound_never_pushes_the_ratio_past_the_limit(width, height):
    # 199:1 or 200:1 at the source; rounding the short side down to whole pixels made 3980x20 1579x7 (225:1).
    image = decode_image(mf.make_png(width, height), LIMITS, fit_pixels=50176)
    assert max(image.width, image.height) / min(image.width, image.height) <= PROCESSOR_RATIO_LIMIT
    assert image.width * image.height <= 50176


def test_aspect_ratio_limit_is_a_decode_limit():
    relaxed = DecodeLimits(max_aspect_ratio=500)
    assert decode_image(mf.make_png(400, 1), relaxed).width == 400
    with pytest.raises(InvalidInput, match="the limit is 10:1"):
        decode_image(mf.make_png(11, 1), DecodeLimits(max_aspect_ratio=10))


@pytest.mark.parametrize(
    ("container", "codec", "width", "height", "ratio"),
    [
        ("mp4", "h264", 2, 600, "300:1"),
        ("mp4", "h264", 600, 2, "300:1"),
        ("webm", "vp9", 1, 300, "300:1"),
        ("mp4", "h264", 4, 1000, "250:1"),
    ],  # fmt: skip
)
def test_video_frames_over_the_aspect_ratio_limit_are_refused(container, codec, width, height, ratio):
    data = mf.make_video(container, codec, seconds=0.5, w=width, h=height, with_audio=False)
    with pytest.raises(InvalidInput) as info:
        decode_video(data, 2.0, False, 16000, LIMITS, fit_pixels=12544)
    assert _invalid(info) == (
        f"the video's frames are {width}x{height} pixels (aspect ratio {ratio}); the limit is 200:1"
    )


def test_tall_video_within_the_limit_keeps_the_ratio_when_downscaled():
    data = mf.make_video("mp4", "h264", seconds=0.5, w=3980, h=20, with_audio=False)  # 199:1
    video = decode_video(data, 2.0, False, 16000, LIMITS, fit_pixels=12544)
    _, height, width, _ = video.frames.shape
    assert width / height <= PROCESSOR_RATIO_LIMIT and width * height <= 12544


# ----------------------------------------------------------------------------------- audio too short


@pytest.mark.parametrize(
    ("samples", "rate", "shown"),
    [
        (1, 8000, "0.125 ms"),
        (3, 192000, "0.0156 ms"),
        (12, 192000, "0.0625 ms"),
        (2, 16000, "0.125 ms"),
        (800, 16000, "50 ms"),
        (4409, 44100, "100 ms"),
    ],  # fmt: skip
)
def test_audio_shorter_than_the_minimum_is_refused(samples, rate, shown):
    with pytest.raises(InvalidInput) as info:
        decode_audio(_wav(samples, rate), 16000, LIMITS)
    count = "1 sample" if samples == 1 else f"{samples} samples"
    assert _invalid(info) == f"the audio is {shown} long ({count} at {rate} Hz); the minimum is 0.1 s"


@pytest.mark.parametrize(("samples", "rate"), [(1600, 16000), (4410, 44100), (19200, 192000), (800, 8000)])
def test_audio_of_the_minimum_length_is_accepted(samples, rate):
    audio = decode_audio(_wav(samples, rate), 16000, LIMITS)
    assert len(audio.samples) == 1600


def test_resampling_that_leaves_no_samples_is_refused_without_a_minimum():
    """Whatever the minimum, audio must keep at least one sample at the model's rate."""
    no_minimum = DecodeLimits(min_audio_duration_s=0.0)
    with pytest.raises(InvalidInput) as info:
        decode_audio(_wav(3, 192000), 16000, no_minimum)
    assert "at 16000 Hz, the model's rate, that leaves no samples" in _invalid(info)
    assert len(decode_audio(_wav(1, 8000), 16000, no_minimum).samples) >= 1


def test_zero_length_audio_is_refused_naming_the_minimum():
    with pytest.raises(InvalidInput) as info:
        decode_audio(_wav(0, 16000), 16000, LIMITS)
    assert _invalid(info) == "the audio (WAV audio) contains no samples; the minimum is 0.1 s"


def test_an_empty_audio_track_of_a_video_is_refused():
    data = mf.make_video_with_audio(0.0)
    assert decode_video(data, 2.0, False, 16000, LIMITS).num_frames == 2  # the pictures alone are fine
    with pytest.raises(InvalidInput) as info:
        decode_video(data, 2.0, True, 16000, LIMITS)
    assert _invalid(info) == "the video's audio track contains no samples; the minimum is 0.1 s"


def test_a_too_short_audio_track_of_a_video_is_refused():
    with pytest.raises(InvalidInput) as info:
        decode_video(mf.make_video_with_audio(0.02), 2.0, True, 16000, LIMITS)
    assert _invalid(info).startswith("the video's audio track is 23.2 ms long (1024 samples at 44100 Hz)")
    assert decode_video(mf.make_video_with_audio(0.2), 2.0, True, 16000, LIMITS).audio is not None


# ------------------------------------------------------------------------------ local paths that fail


@pytest.fixture
def media_root(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "ok.wav").write_bytes(b"fine")
    os.symlink(root / "loop-b", root / "loop-a")
    os.symlink(root / "loop-a", root / "loop-b")
    os.symlink("self", root / "self")
    os.symlink(root / "loop-a", root / "sub" / "into-loop")
    os.mkfifo(root / "pipe")
    return root


@pytest.fixture
async def local_fetcher(media_root):
    async with MediaFetcher(FetchLimits(local_files_root=str(media_root), max_bytes=1000)) as fetcher:
        yield fetcher


def _refused(fetcher: MediaFetcher, path: str) -> OmnigateError:
    """Reads ``path`` in a thread (a FIFO must not block it) and returns the domain error it raised."""
    outcome: list[BaseException | bytes] = []
    thread = threading.Thread(target=lambda: outcome.append(_capture(fetcher, path)), daemon=True)
    thread.start()
    thread.join(timeout=5)
    assert not thread.is_alive(), f"reading {path[:80]!r} blocked"
    (error,) = outcome
    assert isinstance(error, OmnigateError), error
    assert error.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.PERMISSION_DENIED)
    assert 0 < len(str(error)) < MESSAGE_LIMIT
    return error


def _capture(fetcher: MediaFetcher, path: str) -> BaseException | bytes:
    try:
        return fetcher.read_local(path)
    except BaseException as e:  # noqa: BLE001 - the test inspects whatever was raised
        return e


@pytest.mark.parametrize(
    "path", ["loop-a", "loop-b", "self", "sub/into-loop", "loop-a/x.wav", "self/../ok.wav"]
)
async def test_symlink_loop_is_refused(local_fetcher, path):
    error = _refused(local_fetcher, path)
    assert isinstance(error, MediaFetchError)
    assert "symbolic link" in str(error) and repr(path) in str(error)


async def test_fifo_is_refused_without_blocking(local_fetcher):
    error = _refused(local_fetcher, "pipe")
    assert str(error) == "'pipe' is a named pipe (FIFO), not a regular file"


async def test_directory_is_refused(local_fetcher):
    assert str(_refused(local_fetcher, "sub")) == "'sub' is a directory, not a regular file"
    assert str(_refused(local_fetcher, ".")) == "'.' is a directory, not a regular file"


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
async def test_device_node_is_refused(local_fetcher, media_root):
    os.mknod(media_root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert str(_refused(local_fetcher, "null")) == "'null' is a device, not a regular file"


@pytest.mark.parametrize(
    "path",
    ["a" * 300, "sub/" + "b" * 5000, "/".join(["c" * 200] * 30), "x/" * 40_000 + "y.wav"],
    ids=["name-300", "name-5000", "path-6000", "path-120k"],
)
async def test_path_too_long_is_refused_without_repeating_it(local_fetcher, path):
    error = _refused(local_fetcher, path)
    assert isinstance(error, MediaFetchError)
    assert "too long" in str(error) and f"({len(path)} characters)" in str(error)


async def test_unreadable_file_is_permission_denied(local_fetcher, monkeypatch):
    real_open = os.open

    def fake_refusing_open(path, flags, *args, **kwargs):
        """A fake of os.open that refuses ok.wav as a file without read permission would."""
        if str(path).endswith("ok.wav"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_refusing_open)
    error = _refused(local_fetcher, "ok.wav")
    assert isinstance(error, ForbiddenSource)
    assert str(error) == "the gateway is not allowed to read 'ok.wav' (permission denied)"


async def test_long_missing_and_outside_paths_are_not_repeated(local_fetcher):
    inside = "m" * 100_000 + "/../missing.wav"
    assert "(100015 characters) is too long" in str(_refused(local_fetcher, inside))
    outside = _refused(local_fetcher, "../" + "o" * 100_000)
    assert isinstance(outside, ForbiddenSource) and "must be inside" in str(outside)
    assert "no such file" in str(_refused(local_fetcher, "missing.wav"))
    assert local_fetcher.read_local("ok.wav") == b"fine"


# ------------------------------------------------------------------------- redirects out of http(s)


@pytest.mark.parametrize(
    ("target", "named"),
    [
        ("data:text/plain,hello", "a data: URL"),
        ("data:image/png;base64," + "A" * 20_000, "a data: URL"),
        ("javascript:alert(1)", "a javascript: URL"),
        ("JavaScript:alert(document.domain)", "a javascript: URL"),
        ("ftp://example.com/a.png", "a ftp: URL"),
        ("file:///etc/passwd", "a file: URL"),
        ("gopher://127.0.0.1:70/_x", "a gopher: URL"),
        ("x" * 10_000 + ":y", "a URL with the scheme 'xxxx"),
    ],
)
async def test_redirect_to_another_scheme_names_the_target(hostile_server, target, named):
    start = hostile_server.url("/redirect?to=" + url_quote(target, safe=""))
    async with MediaFetcher(LOCAL) as fetcher:
        with pytest.raises(ForbiddenSource) as info:
            await fetcher.fetch(start + "&token=SECRET")
    message = str(info.value)
    assert info.value.code == ErrorCode.PERMISSION_DENIED
    assert len(message) < MESSAGE_LIMIT and "SECRET" not in message
    assert message.startswith(f"the media URL was redirected to {named}")
    assert "redirects may only go to http:// or https:// URLs" in message


# ------------------------------------------------------------------------ oversized input in messages


@pytest.mark.parametrize(
    "url",
    [
        "http://" + "a" * 65_536 + "/x.png",
        "http://" + "a." * 32_000 + "com/x.png",
        "https://" + "b" * 300 + ".example/x.png",
        "http://1.2.3." + "9" * 20_000 + "/x.png",
        "http://[" + "1:" * 20_000 + "]/x.png",
        "http://" + "%41" * 20_000 + "/x.png",
        "http://exa mple" + " " * 20_000 + ".com/",
        "x" * 70_000 + "://host/x.png",
        "data:image/png;base64," + "!" * 100_000,
        "http://user:" + "p" * 50_000 + "@127.0.0.1:9/x.png",
    ],
    ids=[
        "host-64k",
        "labels-64k",
        "label-300",
        "ipv4-20k",
        "ipv6-40k",
        "percent-60k",
        "spaces",
        "scheme-70k",
        "data-100k",
        "password-50k",
    ],  # fmt: skip
)
async def test_refusals_do_not_repeat_oversized_urls(url):
    # Public addresses only, and a resolver that knows no name (no test asks DNS).
    async with MediaFetcher(FetchLimits(connect_timeout_s=1), resolver=StaticResolver({})) as fetcher:
        with pytest.raises(OmnigateError) as info:
            await fetcher.fetch(url)
    message = str(info.value)
    assert info.value.code in (ErrorCode.INVALID_ARGUMENT, ErrorCode.PERMISSION_DENIED), message
    assert 0 < len(message) < MESSAGE_LIMIT, message[:200]
    assert "ppppp" not in message  # no part of a password


# ----------------------------------------------------------------------------------------- logging


def _records(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records]


async def test_fetches_are_logged_without_credentials_query_or_fragment(hostile_server, caplog):
    hostile_server.serve("signed.png", mf.make_png(8, 8))
    signed = (
        f"http://alice:hunter2@127.0.0.1:{hostile_server.port}/files/signed.png"
        "?X-Amz-Credential=AKIASECRET&X-Amz-Signature=deadbeef#frag-secret"
    )
    caplog.set_level(logging.DEBUG)
    async with MediaFetcher(LOCAL) as fetcher:
        assert await fetcher.fetch(signed)
        with pytest.raises(MediaFetchError):
            await fetcher.fetch(hostile_server.url("/status/404?token=SECRET404"))
        with pytest.raises(ForbiddenSource):
            await fetcher.fetch(hostile_server.url("/redirect?to=javascript:alert(1)&sig=SECRET302"))
    lines = _records(caplog)
    text = "\n".join(lines)
    for secret in (
        "alice",
        "hunter2",
        "AKIASECRET",
        "deadbeef",
        "frag-secret",
        "SECRET404",
        "SECRET302",
        "?",
    ):
        assert secret not in text, text
    assert f"GET http://127.0.0.1:{hostile_server.port}/files/signed.png -> 200" in text
    assert f"GET http://127.0.0.1:{hostile_server.port}/status/404 -> 404" in text


async def test_long_urls_are_logged_cut(hostile_server, caplog):
    url = hostile_server.serve("p" * 50_000, b"long name")
    caplog.set_level(logging.DEBUG)
    async with MediaFetcher(LOCAL) as fetcher:
        assert await fetcher.fetch(url) == b"long name"
    (line,) = [line for line in _records(caplog) if line.startswith("media fetch:")]
    assert line.endswith(f"... ({len(url)} characters) -> 200")
    assert all(len(line) < 400 for line in _records(caplog))


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("https://u:p@Example.com:8443/a/b.png?sig=1#f", "https://example.com:8443/a/b.png"),
        ("http://[::1]:80/x?y", "http://[::1]:80/x"),
        ("https://cdn.test/", "https://cdn.test/"),
        ("https://cdn.test", "https://cdn.test"),
        ("http://h/a%0Ab\r\n", "http://h/a%0Ab"),
        ("http://h/" + "p" * 500, "http://h/" + "p" * 151 + "... (509 characters)"),
        ("http://" + "h" * 500 + "/x", "http://" + "h" * 153 + "... (509 characters)"),
        ("not a url at all ?x=1", "not a url at all "),
    ],
)
def test_loggable_url(url, logged):
    from omnigate_gateway.media.fetch import loggable_url

    assert loggable_url(url) == logged
