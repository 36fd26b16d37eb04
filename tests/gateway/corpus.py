"""The hostile-input corpus: malformed, oversized and malicious media and URLs, generated in memory.

Each ``Case`` says how to send it (inline bytes, a URL or a local path), which gateway gets it ("fetch":
loopback media servers allowed, so that slow, endless and lying servers can be reached; "ssrf": the
default policy, private networks refused) and what must come back: the gRPC status code, a fragment of
the message, and a time limit. ``build_corpus`` makes the whole list; the same seeds give the same bytes.

URL templates: ``{fetch}`` is the misbehaving server on 127.0.0.1, ``{public}`` the one on 127.0.0.2 by
the name public.test (the SSRF gateway resolves names from a fixed table and allows only that address of
all the private ones), ``{port}`` the 127.0.0.1 server's port. Local paths are read by the "fetch"
gateway from a media root that ``make_local_media_root`` fills (symlink loops, a FIFO, a directory).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import media_factory as mf

INVALID = "INVALID_ARGUMENT"
DENIED = "PERMISSION_DENIED"
EXHAUSTED = "RESOURCE_EXHAUSTED"
DEADLINE = "DEADLINE_EXCEEDED"
OK = "OK"

# The SSRF gateway's name table (resolver_gateway) and its one allowed private address.
SSRF_HOSTS = {
    "public.test": "127.0.0.2",
    "internal.test": "10.0.0.7",
    "metadata.test": "169.254.169.254",
    "mixed.test": ["127.0.0.2", "192.168.1.20"],
    "ula.test": "fd00:ec2::254",
    "mapped.test": "::ffff:127.0.0.1",
    "loopback.test": "127.0.0.1",
    "denied.test": "127.0.0.2",
}
SSRF_ALLOWED_NETWORK = "127.0.0.2/32"
SSRF_DENIED_DOMAIN = "denied.test"
FETCH_TOTAL_TIMEOUT_S = 3.0
FETCH_READ_TIMEOUT_S = 1.5


@dataclass
class Case:
    name: str
    kind: str  # image, audio or video
    expect: str  # gRPC status code name
    fragments: tuple[str, ...]  # the message contains one of these (lowercase)
    inline: bytes | None = None
    url: str | None = None
    path: str | None = None
    gateway: str = "fetch"  # "fetch" or "ssrf"
    limit_s: float = 10.0
    video: dict = field(default_factory=dict)  # VideoOptions (fps, load_audio_from_video)
    items: int = 1  # the same part repeated


# ------------------------------------------------------------------------------------- valid sources

AUDIO: dict[str, Callable[[], bytes]] = {
    "wav": lambda: mf.make_wav(0.5),
    "flac": lambda: mf.make_flac(0.5),
    "ogg-vorbis": lambda: mf.make_ogg(0.5),
    "ogg-opus": lambda: mf.make_opus(0.5),
    "mp3": lambda: mf.make_mp3(0.5),
    "m4a-aac": lambda: mf.make_m4a(0.5),
    "adts-aac": lambda: mf.make_aac(0.5),
    "webm-opus": lambda: mf.make_webm_audio(0.5),
}
IMAGES: dict[str, Callable[[], bytes]] = {
    fmt: (lambda fmt=fmt: mf.make_image(fmt, 48, 32)) for fmt in ("png", "jpeg", "webp", "gif", "bmp", "tiff")
}
VIDEOS: dict[str, Callable[[], bytes]] = {
    "mp4-h264": lambda: mf.make_video("mp4", "h264", seconds=1.0),
    "mp4-h265": lambda: mf.make_video("mp4", "h265", seconds=1.0),
    "mov-h264": lambda: mf.make_video("mov", "h264", seconds=1.0),
    "mkv-h264": lambda: mf.make_video("mkv", "h264", seconds=1.0),
    "webm-vp8": lambda: mf.make_video("webm", "vp8", seconds=1.0),
    "webm-vp9": lambda: mf.make_video("webm", "vp9", seconds=1.0),
    "webm-av1": lambda: mf.make_video("webm", "av1", seconds=1.0),
}

DECODE_FAILURE = (
    "could not decode",
    "expected",
    "no audio",
    "no frames",
    "contains no",
    "no video",
    "declares",
)


# Damage that is not an error: streaming formats decode the part that arrived, MPEG audio resyncs past a
# broken frame, and the overwritten bytes of a small GIF are its palette (other colours, same image).
SURVIVES = {
    "audio/wav/truncated-half",
    "audio/mp3/header-overwritten",
    "audio/webm-opus/truncated-half",
    "image/gif/header-overwritten",
    "video/mkv-h264/truncated-half",
    "video/webm-vp8/truncated-half",
    "video/webm-vp9/truncated-half",
    "video/webm-av1/truncated-half",
}
# Damage that makes a header declare more than the limits allow: refused as such, before decoding.
OVER_LIMIT = {"audio/flac/magic-then-noise", "audio/flac/header-overwritten"}
# Damage that leaves less audio than the audio encoders take (the first half of a short MP3 decodes to
# ~40 ms: its first frames only prime the decoder).
TOO_SHORT = {"audio/mp3/truncated-half"}


def _damaged(kind: str, fmt: str, data: bytes, rng: random.Random) -> list[Case]:
    """Six kinds of damage to one valid file: a decode error, unless listed in SURVIVES, OVER_LIMIT or
    TOO_SHORT."""
    header_wrecked = bytearray(data)
    header_wrecked[12:60] = b"\xff" * 48
    damage = {
        "magic-only": data[:12],
        "first-32-bytes": data[:32],
        "wrong-magic": b"\x00\x11\x22\x33" + data[4:],
        "magic-then-noise": data[:12] + rng.randbytes(4096),
        "header-overwritten": bytes(header_wrecked),
        "truncated-half": data[: len(data) // 2],
    }
    cases = []
    for what, payload in damage.items():
        name = f"{kind}/{fmt}/{what}"
        if name in SURVIVES:
            cases.append(Case(name, kind, OK, (), inline=payload))
        elif name in OVER_LIMIT:
            cases.append(Case(name, kind, EXHAUSTED, ("the limit is",), inline=payload))
        elif name in TOO_SHORT:
            cases.append(Case(name, kind, INVALID, ("the minimum is 0.1 s",), inline=payload))
        else:
            cases.append(Case(name, kind, INVALID, DECODE_FAILURE, inline=payload))
    return cases


# ---------------------------------------------------------------------------------------- header bombs


def png_declaring(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR (CRC fixed up) claims ``width`` x ``height``."""
    png = bytearray(mf.make_png(4, 4))
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def png_bomb(width: int, height: int) -> bytes:
    """A real, all-black grayscale PNG: tiny compressed, ``width`` x ``height`` pixels decoded."""
    raw = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    body = b"".join(raw.compress(row) for _ in range(height)) + raw.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def gif_declaring(width: int, height: int) -> bytes:
    gif = bytearray(mf.make_gif(4, 4))
    gif[6:10] = struct.pack("<HH", width, height)  # logical screen
    start = gif.index(b"\x2c", 13)  # image descriptor
    gif[start + 5 : start + 9] = struct.pack("<HH", width, height)
    return bytes(gif)


def bmp_declaring(width: int, height: int) -> bytes:
    bmp = bytearray(mf.make_bmp(4, 4))
    bmp[18:26] = struct.pack("<ii", width, height)
    return bytes(bmp)


def jpeg_declaring(width: int, height: int) -> bytes:
    jpeg = bytearray(mf.make_jpeg(16, 16))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(jpeg)


def tiff_declaring(width: int, height: int) -> bytes:
    tiff = bytearray(mf.make_tiff(4, 4))
    ifd = struct.unpack_from("<I", tiff, 4)[0]
    for i in range(struct.unpack_from("<H", tiff, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", tiff, entry)
        if tag in (256, 257):
            value = width if tag == 256 else height
            if kind == 3:  # SHORT
                struct.pack_into("<H", tiff, entry + 8, min(value, 65535))
            else:
                struct.pack_into("<I", tiff, entry + 8, value)
    return bytes(tiff)


def webp_declaring(width: int, height: int) -> bytes:
    """A lossless WebP whose VP8L header claims ``width`` x ``height`` (at most 16384 each)."""
    webp = bytearray(mf.make_webp(4, 4, lossless=True))
    start = webp.index(b"VP8L") + 8 + 1  # chunk header, signature byte
    bits = struct.unpack_from("<I", webp, start)[0]
    bits = (bits & ~0x0FFFFFFF) | ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
    struct.pack_into("<I", webp, start, bits)
    return bytes(webp)


def wav_declaring_seconds(seconds: float) -> bytes:
    wav = bytearray(mf.make_wav(0.1, 16000))
    data = wav.index(b"data")
    size = int(seconds * 16000 * 2)
    wav[data + 4 : data + 8] = struct.pack("<I", size)
    wav[4:8] = struct.pack("<I", min(size + data, 0xFFFFFFFF))
    return bytes(wav)


def flac_declaring_seconds(seconds: float) -> bytes:
    flac = bytearray(mf.make_flac(0.1, 16000))
    total = int(seconds * 16000)
    flac[8 + 13] = (flac[8 + 13] & 0xF0) | ((total >> 32) & 0x0F)
    flac[8 + 14 : 8 + 18] = struct.pack(">I", total & 0xFFFFFFFF)
    return bytes(flac)


def mp4_declaring_seconds(seconds: float) -> bytes:
    """A five-frame MP4 whose sample table (stts) spaces its frames over ``seconds``.

    (FFmpeg recomputes durations from the sample table, so that is where a length has to be declared;
    the movie header's duration alone is ignored.)
    """
    mp4 = bytearray(mf.make_video("mp4", "h264", seconds=0.5, fps=10, with_audio=False))
    mdhd = mp4.find(b"mdhd") + 4
    timescale = struct.unpack_from(">I", mp4, mdhd + 12)[0]
    stts = mp4.find(b"stts")
    for entry in range(struct.unpack_from(">I", mp4, stts + 8)[0]):
        struct.pack_into(">I", mp4, stts + 16 + 8 * entry, int(seconds * timescale / 5))
    return bytes(mp4)


def vp8_declaring_size(width: int, height: int) -> bytes:
    """A WebM whose VP8 keyframe header claims ``width`` x ``height`` (14 bits each, at most 16383)."""
    webm = bytearray(mf.make_video("webm", "vp8", seconds=0.5, with_audio=False))
    start = webm.index(b"\x9d\x01\x2a")  # keyframe start code; width and height follow
    struct.pack_into("<HH", webm, start + 3, width & 0x3FFF, height & 0x3FFF)
    return bytes(webm)


# --------------------------------------------------------------------------------------- non-media

NON_MEDIA: dict[str, bytes] = {
    "html": b"<!DOCTYPE html><html><body>not media</body></html>",
    "json": json.dumps({"error": "not media"}).encode(),
    "pdf": b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n",
    "text": b"just some text, nothing to decode\n" * 10,
    "random": random.Random(7).randbytes(8192),
    "gzip": gzip.compress(b"\x00" * 100000),
}


def wav_samples(samples: int, rate: int) -> bytes:
    """A 16-bit mono WAV of exactly ``samples`` samples."""
    wav = bytearray(mf.make_wav(0.1, rate))
    data = wav.index(b"data")
    size = 2 * samples
    wav[data + 4 : data + 8] = struct.pack("<I", size)
    wav[4:8] = struct.pack("<I", data + size)
    return bytes(wav[: data + 8 + size])


def _zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb.bin", b"\x00" * 1_000_000)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- SSRF

SSRF_HOSTS_REFUSED = [
    "127.0.0.1",
    "127.0.0.53",
    "0.0.0.0",
    "0",
    "[::1]",
    "[::]",
    "169.254.169.254",
    "2130706433",
    "017700000001",
    "0177.0.0.1",
    "0x7f.0.0.1",
    "0x7f000001",
    "127.1",
    "0xA9FEA9FE",  # 169.254.169.254
    "2852039166",  # 169.254.169.254 in decimal
    "10.0.0.1",
    "172.16.0.1",
    "192.168.0.1",
    "100.64.0.1",
    "100.100.100.200",
    "192.0.0.192",
    "224.0.0.1",
    "255.255.255.255",
    "240.0.0.1",
    "[fe80::1]",
    "[fc00::1]",
    "[fd00:ec2::254]",
    "[ff02::1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[::ffff:a9fe:a9fe]",
    "[::ffff:10.0.0.1]",
    "[::127.0.0.1]",
    "[64:ff9b::7f00:1]",
    "[2002:7f00:1::1]",
    "localhost",
    "LOCALHOST.",
    "foo.localhost",
    "metadata.google.internal",
    "metadata",
    "printer.local",
    "internal.test",
    "metadata.test",
    "mixed.test",
    "ula.test",
    "mapped.test",
    "loopback.test",
]

REFUSAL = (
    "loopback",
    "private",
    "link-local",
    "multicast",
    "unspecified",
    "broadcast",
    "reserved",
    "routable",
    "local network",
    "this network",
    "shared",
    "ietf",
)


def build_corpus() -> list[Case]:
    rng = random.Random(20240611)
    cases: list[Case] = []

    # Damaged files of every format.
    for kind, makers in (("audio", AUDIO), ("image", IMAGES), ("video", VIDEOS)):
        for fmt, make in makers.items():
            cases.extend(_damaged(kind, fmt, make(), rng))

    # Wrong kinds and non-media bodies.
    wav, png, mp4 = mf.make_wav(0.2), mf.make_png(), mf.make_video("mp4", "h264", seconds=0.5)
    for kind, data, what in (
        ("audio", png, "expected audio, got a png image"),
        ("audio", mp4[:0] + mf.make_jpeg(), "expected audio, got a jpeg image"),
        ("image", wav, "expected an image, got wav audio"),
        ("image", mp4, "expected an image, got an mp4 file"),
        ("video", wav, "expected video, got wav audio"),
        ("video", png, "expected video, got a png image"),
        ("video", mf.make_m4a(0.3), "has no video stream"),
    ):
        cases.append(Case(f"{kind}/wrong-kind/{what.split()[-2]}", kind, INVALID, (what,), inline=data))
    bodies = {**NON_MEDIA, "zip": _zip_bytes()}
    for kind in ("image", "audio", "video"):
        for name, body in bodies.items():
            cases.append(Case(f"{kind}/non-media/{name}", kind, INVALID, ("expected",), inline=body))

    # Headers that declare enormous media; bombs that inflate.
    for name, data in (
        ("png-100000x100000", png_declaring(100_000, 100_000)),
        ("png-10000x10000", png_declaring(10_000, 10_000)),
        ("png-1x2000000000", png_declaring(1, 2_000_000_000)),
        ("gif-65535x65535", gif_declaring(65535, 65535)),
        ("bmp-100000x100000", bmp_declaring(100_000, 100_000)),
        ("jpeg-65500x65500", jpeg_declaring(65500, 65500)),
        ("tiff-100000x100000", tiff_declaring(100_000, 100_000)),
        ("webp-16384x16384", webp_declaring(16384, 16384)),
        ("png-zip-bomb-9000x9000", png_bomb(9000, 9000)),
    ):
        cases.append(Case(f"image/bomb/{name}", "image", EXHAUSTED, ("the limit is",), inline=data))
    cases.append(Case("image/bomb/png-5000x5000-within-limits", "image", OK, (), inline=png_bomb(5000, 5000)))
    for name, data in (
        ("wav-10-hours", wav_declaring_seconds(36000)),
        ("flac-10-hours", flac_declaring_seconds(36000)),
    ):
        cases.append(Case(f"audio/bomb/{name}", "audio", EXHAUSTED, ("the limit is 600 s",), inline=data))
    cases.append(
        Case(
            "video/bomb/mp4-10-hours",
            "video",
            EXHAUSTED,
            ("the limit is 600 s",),
            inline=mp4_declaring_seconds(36000),
        )
    )
    cases.append(
        Case(
            "video/bomb/vp8-16383x16383",
            "video",
            INVALID,
            ("could not decode",),
            inline=vp8_declaring_size(16383, 16383),
        )
    )
    cases.append(
        Case(
            "video/too-many-frames",
            "video",
            EXHAUSTED,
            ("frames",),
            inline=mf.make_video("mp4", "h264", seconds=30.0, fps=30, w=16, h=16, with_audio=False),
            video={"fps": 1000.0},
        )
    )
    cases.append(
        Case(
            "video/audio-track-missing",
            "video",
            INVALID,
            ("no audio track",),
            inline=mf.make_video("mp4", "h264", seconds=0.5, with_audio=False),
            video={"fps": 2.0, "load_audio_from_video": True},
        )
    )
    cases.append(Case("image/too-many-items", "image", EXHAUSTED, ("media items",), inline=png, items=17))

    # Media the model's processor would refuse (the fake worker would take it): refused at decode time.
    for w, h in ((400, 1), (1, 300), (201, 1)):
        cases.append(
            Case(
                f"image/aspect-ratio/{w}x{h}",
                "image",
                INVALID,
                ("the limit is 200:1",),
                inline=mf.make_png(w, h),
            )
        )
    cases.append(Case("image/aspect-ratio/200x1-taken", "image", OK, (), inline=mf.make_png(200, 1)))
    cases.append(
        Case(
            "video/aspect-ratio/2x600",
            "video",
            INVALID,
            ("the limit is 200:1",),
            inline=mf.make_video("mp4", "h264", seconds=0.5, w=2, h=600, with_audio=False),
        )
    )
    for samples, rate in ((0, 16000), (1, 8000), (3, 192000), (800, 16000)):
        cases.append(
            Case(
                f"audio/too-short/{samples}-samples-at-{rate}",
                "audio",
                INVALID,
                ("the minimum is 0.1 s",),
                inline=wav_samples(samples, rate),
            )
        )
    for name, seconds in (("empty", 0.0), ("too-short", 0.02)):
        cases.append(
            Case(
                f"video/audio-track-{name}",
                "video",
                INVALID,
                ("the minimum is 0.1 s",),
                inline=mf.make_video_with_audio(seconds),
                video={"fps": 2.0, "load_audio_from_video": True},
            )
        )

    # Local paths that cannot be read (the "fetch" gateway's media root: make_local_media_root).
    for name, path, expect, fragment in (
        ("symlink-loop", "loop-a", INVALID, "symbolic links form a loop"),
        ("self-loop", "self", INVALID, "symbolic links form a loop"),
        ("loop-inside-a-path", "sub/into-loop/x.png", INVALID, "symbolic links form a loop"),
        ("fifo", "pipe", INVALID, "named pipe"),
        ("directory", "sub", INVALID, "a directory"),
        ("name-too-long", "n" * 300, INVALID, "too long"),
        ("path-too-long", "x/" * 40_000 + "y.png", INVALID, "too long"),
        ("missing", "missing.png", INVALID, "no such file"),
        ("outside", "../" * 50 + "etc/passwd", DENIED, "must be inside"),
    ):
        cases.append(Case(f"path/{name}", "image", expect, (fragment,), path=path, limit_s=5))
    cases.append(Case("path/regular-file", "image", OK, (), path="sub/ok.png", limit_s=5))

    # Servers that misbehave (reachable: the "fetch" gateway allows loopback).
    total = FETCH_TOTAL_TIMEOUT_S
    for name, route, kind, expect, fragments, limit in (
        ("slow-drip", "/drip?interval=0.2", "image", DEADLINE, ("took longer",), total + 4),
        ("stalled-body", "/stall", "image", DEADLINE, ("stalled", "took longer"), total + 4),
        ("no-response", "/silent", "audio", DEADLINE, ("timed out", "took longer"), total + 4),
        ("endless-body", "/endless", "video", EXHAUSTED, ("the limit is",), 10),
        ("short-body", "/lie?declared=100000&sent=100", "image", INVALID, ("mid-body",), 5),
        ("huge-content-length", "/huge-length", "audio", EXHAUSTED, ("the limit is",), 5),
        ("gzip-bomb", "/gzip", "image", INVALID, ("gzip-encoded",), 5),
        ("connection-reset", "/reset", "image", INVALID, ("mid-body", "could not"), 5),
        ("http-404", "/status/404", "image", INVALID, ("http 404",), 5),
        ("http-500", "/status/500", "audio", INVALID, ("http 500",), 5),
        ("http-204-empty", "/status/204", "image", INVALID, ("empty",), 5),
        ("redirect-loop", "/loop", "image", INVALID, ("redirected more than",), 5),
        ("redirect-chain-over-cap", "/chain/9", "image", INVALID, ("redirected more than",), 5),
        ("redirect-to-file", "/redirect?to=file:///etc/passwd", "image", DENIED, ("redirects may only",), 5),
        ("redirect-to-ftp", "/redirect?to=ftp://example.com/a", "image", DENIED, ("redirects may only",), 5),
        (
            "redirect-to-gopher",
            "/redirect?to=gopher://127.0.0.1:70/",
            "image",
            DENIED,
            ("redirects may only",),
            5,
        ),
        ("redirect-to-data", "/redirect?to=data:text/plain,hi", "image", DENIED, ("to a data: url",), 5),
        (
            "redirect-to-javascript",
            "/redirect?to=javascript:alert(1)",
            "image",
            DENIED,
            ("to a javascript: url",),
            5,
        ),
    ):
        cases.append(Case(f"fetch/{name}", kind, expect, fragments, url="{fetch}" + route, limit_s=limit))
    cases.append(
        Case("fetch/unreachable-port", "image", INVALID, ("could not connect",), url="http://127.0.0.1:9/a")
    )
    cases.append(
        Case("fetch/zero-length-body", "audio", INVALID, ("empty",), url="{fetch}/files/corpus-empty.bin")
    )
    cases.append(Case("inline/zero-length", "image", INVALID, ("has no data",), inline=b""))
    # Content decides the type, not the URL or the Content-Type header.
    cases.append(
        Case(
            "fetch/png-content-type-but-wav",
            "image",
            INVALID,
            ("expected an image, got wav audio",),
            url="{fetch}/typed/corpus-sound.wav?type=image/png",
        )
    )
    cases.append(
        Case(
            "fetch/html-body-named-png",
            "image",
            INVALID,
            ("got an html page",),
            url="{fetch}/typed/corpus-page.png?type=image/png",
        )
    )
    cases.append(
        Case(
            "fetch/mp4-named-png-is-video",
            "video",
            OK,
            (),
            url="{fetch}/typed/corpus-clip.png?type=image/png",
        )
    )

    # SSRF: every refusal happens on the address check, before any connection.
    for host in SSRF_HOSTS_REFUSED:
        cases.append(
            Case(
                f"ssrf/{host}",
                "image",
                DENIED,
                REFUSAL,
                url=f"http://{host}:{{port}}/files/corpus.png",
                gateway="ssrf",
                limit_s=3,
            )
        )
    for url, fragment in (
        ("file:///etc/passwd", "file: urls are not allowed"),
        ("FILE:///etc/passwd", "file: urls are not allowed"),
        ("ftp://example.com/a.png", "ftp: urls are not allowed"),
        ("gopher://127.0.0.1:70/_x", "gopher: urls are not allowed"),
        ("dict://127.0.0.1:11211/stat", "dict: urls are not allowed"),
        ("ldap://127.0.0.1/", "ldap: urls are not allowed"),
        ("jar:http://127.0.0.1/a.jar!/x", "jar: urls are not allowed"),
        ("javascript:alert(1)", "javascript: urls are not allowed"),
        ("blob:http://127.0.0.1/x", "blob: urls are not allowed"),
        ("//127.0.0.1/a.png", "no scheme"),
        ("a.png", "no scheme"),
        ("http://denied.test:{port}/a.png", "deny-list"),
    ):
        cases.append(
            Case(f"ssrf/scheme/{url[:24]}", "image", DENIED, (fragment,), url=url, gateway="ssrf", limit_s=3)
        )
    for name, target in (
        ("to-loopback", "http://127.0.0.1:{port}/files/corpus.png"),
        ("to-decimal-loopback", "http://2130706433:{port}/files/corpus.png"),
        ("to-ipv6-loopback", "http://[::1]:{port}/files/corpus.png"),
        ("to-mapped-loopback", "http://[::ffff:127.0.0.1]:{port}/files/corpus.png"),
        ("to-metadata", "http://169.254.169.254/latest/meta-data/"),
        ("to-name-resolving-private", "http://internal.test/x.png"),
        ("to-localhost", "http://localhost:{port}/files/corpus.png"),
    ):
        chain = "{public}/redirect?to={public}/redirect?to=" + target
        cases.append(
            Case(
                f"ssrf/redirect-chain/{name}", "image", DENIED, REFUSAL, url=chain, gateway="ssrf", limit_s=3
            )
        )
    # Oversized input: the refusal names it cut short (a status over ~8 KB would reach the caller as
    # RESOURCE_EXHAUSTED "metadata size exceeds hard limit" instead).
    for name, url, expect, fragment in (
        ("host-64k", "http://" + "a" * 65_000 + "/x.png", INVALID, "host names are at most 253"),
        ("labels-60k", "http://" + "a." * 30_000 + "com/x.png", INVALID, "host names are at most 253"),
        ("label-300", "http://" + "b" * 300 + ".test/x.png", INVALID, "63 per label"),
        ("path-50k-denied", "http://denied.test:{port}/" + "p" * 50_000, DENIED, "deny-list"),
        ("url-100k", "http://public.test:{port}/" + "p" * 100_000, INVALID, "url too long"),
        ("scheme-60k", "x" * 60_000 + "://public.test/x.png", DENIED, "are not allowed"),
        ("ipv4-20k", "http://1.2.3." + "9" * 20_000 + "/x.png", INVALID, "not valid"),
    ):
        cases.append(
            Case(f"oversized/{name}", "image", expect, (fragment,), url=url, gateway="ssrf", limit_s=3)
        )
    cases.append(
        Case(
            "ssrf/local-path-disabled", "image", DENIED, ("not enabled",), path="/etc/passwd", gateway="ssrf"
        )
    )
    cases.append(
        Case(
            "ssrf/allowed-public-host-works",
            "image",
            OK,
            (),
            url="{public}/files/corpus.png",
            gateway="ssrf",
            limit_s=5,
        )
    )
    return cases


def make_local_media_root(root: Path) -> None:
    """The "fetch" gateway's local media root: an image, symlink loops, a FIFO and a directory."""
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(mf.make_png(48, 32))
    os.symlink(root / "loop-b", root / "loop-a")
    os.symlink(root / "loop-a", root / "loop-b")
    os.symlink("self", root / "self")
    os.symlink(root / "loop-a", root / "sub" / "into-loop")
    os.mkfifo(root / "pipe")


def serve_corpus_files(server) -> None:
    """The files the corpus's URLs name, on a misbehaving server."""
    server.serve("corpus.png", mf.make_png(48, 32))
    server.serve("corpus-empty.bin", b"")
    server.serve("corpus-sound.wav", mf.make_wav(0.2))
    server.serve("corpus-page.png", NON_MEDIA["html"])
    server.serve("corpus-clip.png", mf.make_video("mp4", "h264", seconds=0.5))
