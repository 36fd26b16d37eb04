"""The decoded-media cache: byte cap, LRU order, read-only values, URL records and freshness."""

from __future__ import annotations

import numpy as np

from omnigate.media import Audio, Image, Video
from omnigate_gateway.media.cache import DecodeKey, MediaCache, UrlRecord, decoded_size
from omnigate_gateway.media.fetch import Validators


def image(side: int) -> Image:
    return Image(np.zeros((side, side, 3), dtype=np.uint8))


def key(name: str) -> DecodeKey:
    return DecodeKey(name, "image", (0,))


def test_lru_eviction_keeps_the_cache_under_its_byte_cap():
    cache = MediaCache(10_000)
    for name in "abc":
        cache.put_decoded(key(name), image(30), 100)  # 2700 bytes each
    assert cache.get_decoded(key("a")) is not None  # "a" is now the most recently used
    cache.put_decoded(key("d"), image(30), 100)  # 4 x 2700 > 10000: the least recently used ("b") goes
    assert cache.get_decoded(key("b")) is None
    assert all(cache.get_decoded(key(n)) is not None for n in "acd")
    assert cache.bytes <= cache.max_bytes


def test_one_item_may_not_take_more_than_half():
    cache = MediaCache(10_000)
    cache.put_decoded(key("big"), image(60), 1)  # 10800 bytes
    assert cache.get_decoded(key("big")) is None and len(cache) == 0


def test_stored_values_are_read_only_and_counted():
    cache = MediaCache(1 << 20)
    video = Video(
        np.zeros((2, 4, 4, 3), np.uint8),
        [0.0, 0.5],
        2.0,
        10.0,
        1.0,
        10,
        Audio(np.zeros(8, np.float32), 16000),
    )
    cache.put_decoded(DecodeKey("v", "video", (2.0, True, 16000, 0)), video, 5)
    value, encoded = cache.get_decoded(DecodeKey("v", "video", (2.0, True, 16000, 0)))
    assert value is video and encoded == 5
    assert not video.frames.flags.writeable and not video.audio.samples.flags.writeable
    assert decoded_size(video) == 96 + 16 + 32
    assert cache.get_decoded(DecodeKey("v", "video", (4.0, True, 16000, 0))) is None  # other options


def test_url_records_and_freshness():
    now = [100.0]
    cache = MediaCache(1 << 20, clock=lambda: now[0])
    record = UrlRecord("hash", 10, Validators('"e"'), cache.fresh_until(60))
    cache.put_url("http://x/a", record)
    assert cache.get_url("http://x/a") == record and cache.is_fresh(record)
    now[0] += 61
    assert not cache.is_fresh(record)
    cache.forget_url("http://x/a")
    assert cache.get_url("http://x/a") is None and cache.bytes == 0


def test_disabled_cache_stores_nothing():
    cache = MediaCache(0)
    cache.put_decoded(key("a"), image(2), 1)
    cache.put_url("http://x/", UrlRecord("h", 1, Validators(), 0.0))
    assert not cache.enabled and len(cache) == 0 and cache.get_decoded(key("a")) is None
