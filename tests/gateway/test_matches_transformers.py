"""The gateway's decoders give what transformers' own loaders give, on the same files.

(The gateway never imports transformers; this test does, to compare.)
"""

from __future__ import annotations

import numpy as np
import pytest

from omnigate.media import DecodeLimits
from omnigate_gateway.media.audio import decode_audio
from omnigate_gateway.media.image import decode_image
from omnigate_gateway.media.video import decode_video
from tests.support import media_factory as mf

transformers = pytest.importorskip("transformers")
from transformers.audio_utils import load_audio  # noqa: E402
from transformers.image_utils import load_image  # noqa: E402
from transformers.video_utils import load_video  # noqa: E402

LIMITS = DecodeLimits()


@pytest.mark.parametrize(
    ("suffix", "make"),
    [
        ("wav", lambda: mf.make_wav(2.0, 44100, channels=2)),
        ("flac", lambda: mf.make_flac(2.0, 22050, channels=2)),
        ("mp3", lambda: mf.make_mp3(2.0, 44100, channels=2)),
        ("ogg", lambda: mf.make_ogg(2.0, 48000, channels=1)),
    ],
)
def test_audio_matches_load_audio(tmp_path, suffix, make):
    path = tmp_path / f"sound.{suffix}"
    path.write_bytes(make())
    ours = decode_audio(path.read_bytes(), 16000, LIMITS).samples
    theirs = load_audio(str(path), sampling_rate=16000, backend="soundfile")
    assert ours.shape == theirs.shape
    assert np.abs(ours - np.clip(theirs, -1, 1)).max() < 1e-6


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "gif", "bmp", "tiff"])
def test_image_matches_load_image(tmp_path, fmt):
    path = tmp_path / f"picture.{fmt}"
    path.write_bytes(mf.make_image(fmt, 64, 48))
    assert np.array_equal(decode_image(path.read_bytes(), LIMITS).pixels, np.asarray(load_image(str(path))))


def test_exif_rotated_image_matches_load_image(tmp_path):
    path = tmp_path / "rotated.jpg"
    path.write_bytes(mf.make_jpeg(64, 48, exif_orientation=6))
    assert np.array_equal(decode_image(path.read_bytes(), LIMITS).pixels, np.asarray(load_image(str(path))))


@pytest.mark.parametrize("codec", ["h264", "h264-bframes", "h265"])
def test_video_matches_load_video(tmp_path, codec):
    path = tmp_path / "clip.mp4"
    path.write_bytes(mf.make_video("mp4", codec, seconds=4.0, fps=10, w=64, h=48, with_audio=False))
    ours = decode_video(path.read_bytes(), 2.0, False, 16000, LIMITS)
    theirs, metadata = load_video(str(path), fps=2.0, backend="pyav")
    assert list(metadata.frames_indices) == [round(t * 10) for t in ours.timestamps_s]
    assert np.array_equal(ours.frames, theirs)
