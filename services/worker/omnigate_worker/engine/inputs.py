"""Turns a plain GenerationRequest into the processor's model inputs.

This follows what ``processor.apply_chat_template(..., tokenize=True)`` does (render the chat template,
collect the media in conversation order, call the processor), in two explicit steps so that media that
arrives already decoded can be passed in every case, including the audio track of a video, which
``apply_chat_template`` can only load from a file with torchcodec (not available on every machine).

What the template or the processor refuses of a request's content (a picture too long for its resize
rule, text it cannot encode) is the caller's mistake: it ends as ``InvalidInput`` with the library's
reason cut short, never as an internal error. Audio too short for the audio encoders and text with lone
surrogates are refused before the processor runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image

from omnigate.conversation import GenerationMode, GenerationRequest, Modality
from omnigate.errors import InvalidInput
from omnigate.media import MIN_AUDIO_DURATION_S, Audio
from omnigate.validation import check_text

log = logging.getLogger(__name__)

# What image, video and audio processors and tokenizers raise for content they cannot take (smart_resize's
# ValueError for a 400x1 image, the tokenizer's TypeError for text it cannot encode). Other exceptions
# (KeyError, AttributeError, RuntimeError, MemoryError) are bugs or resource failures and stay internal.
_CONTENT_ERRORS = (ValueError, TypeError, IndexError, ArithmeticError)
_DETAIL_LIMIT = 200  # characters of a library's reason a message repeats


@dataclass
class CollectedMedia:
    """The conversation as the chat template sees it, and the media in the order the processor wants."""

    messages: list[dict[str, Any]]
    images: list[PIL.Image.Image] = field(default_factory=list)
    videos: list[np.ndarray] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)
    audio_from_video_indices: list[int | None] = field(default_factory=list)
    video_fps: float | None = None


def collect(request: GenerationRequest) -> CollectedMedia:
    """Builds chat-template messages (media parts carry their decoded data) and the media lists."""
    out = CollectedMedia(messages=[])
    for index, message in enumerate(request.messages):
        content: list[dict[str, Any]] = []
        for part in message.content:
            if part.type is Modality.TEXT:
                check_text(f"the text of message {index}", part.text or "")
                content.append({"type": "text", "text": part.text or ""})
            elif part.type is Modality.IMAGE:
                assert part.image is not None  # an IMAGE part carries its image
                image = PIL.Image.fromarray(part.image.pixels, mode="RGB")
                out.images.append(image)
                content.append({"type": "image", "image": image})
            elif part.type is Modality.AUDIO:
                assert part.audio is not None  # an AUDIO part carries its audio
                _check_audio(part.audio, f"an audio part of message {index}")
                out.audio.append(part.audio.samples)
                out.audio_from_video_indices.append(None)
                content.append({"type": "audio", "audio": part.audio.samples})
            elif part.type is Modality.VIDEO:
                video = part.video
                assert video is not None  # a VIDEO part carries its video
                if out.video_fps is not None and abs(out.video_fps - video.sampled_fps) > 1e-6:
                    raise InvalidInput("all videos of a request must be sampled at the same fps")
                out.video_fps = video.sampled_fps
                if request.use_audio_in_video:
                    if video.audio is None:
                        raise InvalidInput(
                            "use_audio_in_video is set but a video arrived without its audio track"
                        )
                    _check_audio(video.audio, f"the audio track of a video of message {index}")
                    out.audio.append(video.audio.samples)
                    out.audio_from_video_indices.append(len(out.videos))
                out.videos.append(video.frames)
                content.append({"type": "video", "video": video.frames})
        out.messages.append({"role": message.role, "content": content})
    return out


def _check_audio(audio: Audio, subject: str) -> None:
    """Refuses audio shorter than every supported audio encoder takes (``MIN_AUDIO_DURATION_S``)."""
    if audio.duration_s < MIN_AUDIO_DURATION_S:
        samples, rate = len(audio.samples), audio.sample_rate
        count = f"{samples} sample{'s' if samples != 1 else ''}"
        length = f"{audio.duration_s * 1000:.3g} ms long ({count} at {rate} Hz)" if samples else "empty"
        raise InvalidInput(f"{subject} is {length}; the minimum is {MIN_AUDIO_DURATION_S:g} s")


def _detail(error: BaseException) -> str:
    """A library's reason for a message: one line, cut to ``_DETAIL_LIMIT`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= _DETAIL_LIMIT else f"{text[:_DETAIL_LIMIT]}... ({len(text)} characters)"


def _kinds(media: CollectedMedia) -> str:
    """What the processor was given besides text, for messages: "image and video", "text"."""
    kinds = [
        name
        for name, items in (("image", media.images), ("video", media.videos), ("audio", media.audio))
        if items
    ]
    return " and ".join(kinds) if kinds else "text"


def processor_kwargs(
    processor: Any,
    media: CollectedMedia,
    use_audio_in_video: bool,
    mode: GenerationMode = GenerationMode.TEXT,
) -> dict[str, Any]:
    """The processor call's keyword arguments for these media (the same ones the equivalence tests use)."""
    kwargs: dict[str, Any] = {}
    if media.videos:
        # Frames arrive already sampled at `video_fps`: the processor must not sample again, but needs the
        # rate to place frames in time (Qwen-Omni's `video_second_per_grid` = temporal_patch_size / fps).
        kwargs["fps"] = media.video_fps
        kwargs["do_sample_frames"] = False
        # Frames are (height, width, 3). Left to guess, transformers reads a frame 1 or 3 pixels high as
        # channels-first (a 150x1 strip became 3 channels of 1x150), so say so.
        kwargs["videos_kwargs"] = {"input_data_format": "channels_last"}
        video_processor = getattr(processor, "video_processor", None)
        if video_processor is not None and getattr(video_processor, "size", None):
            # transformers 5.23: Qwen2.5-Omni's processor-level `videos_kwargs` default size overrides the
            # saved video processor size (64x64 frames became 336x336), so pass the saved size per call.
            kwargs["size"] = dict(video_processor.size)
    if media.audio:
        feature_extractor = getattr(processor, "feature_extractor", None)
        if feature_extractor is not None:
            kwargs["sampling_rate"] = feature_extractor.sampling_rate
    if mode is GenerationMode.IMAGE:
        kwargs["generation_mode"] = "image"  # e.g. Janus appends its begin-of-image token to the prompt
    if use_audio_in_video and media.videos:
        kwargs["load_audio_from_video"] = True
        kwargs["audio_from_video_indices"] = list(media.audio_from_video_indices)
    return kwargs


def audio_padding_for(processor: Any) -> int | None:
    """Extra samples of zero padding that keep audio features exact, where shorter padding is known safe.

    transformers 5.23: Qwen2.5-Omni's processor pads every audio to the feature extractor's 300 s
    (``padding="max_length"``), ~0.1-0.25 s of CPU per audio. Its audio tower only reads the frames under
    ``feature_attention_mask``, and Whisper's log-mel frames of the real samples only see zeros after the
    audio as long as at least ``n_fft`` zeros follow (the STFT window is centred), so padding to the audio's
    length + ``n_fft`` gives the same features for those frames and the same model output (checked by
    the equivalence tests). Other families (e.g. Qwen2-Audio, whose encoder wants exactly 3000 frames)
    keep the processor's padding.
    """
    feature_extractor = getattr(processor, "feature_extractor", None)
    if type(processor).__name__ != "Qwen2_5OmniProcessor" or feature_extractor is None:
        return None
    return int(feature_extractor.n_fft)


def _padded_length(samples: int, extra: int, hop: int, cap: int) -> int:
    length = samples + extra
    return min(cap, -(-length // hop) * hop)


def build(processor: Any, request: GenerationRequest, audio_padding: int | None = None) -> tuple[Any, str]:
    """Renders the prompt and runs the processor; returns (BatchFeature with tensors, prompt text)."""
    media = collect(request)
    try:
        prompt = processor.apply_chat_template(media.messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja raises on conversations the template rejects (roles, order)
        raise InvalidInput(f"the model's chat template rejected the conversation: {_detail(exc)}") from exc
    kwargs = processor_kwargs(processor, media, request.use_audio_in_video, request.mode)
    if audio_padding is not None and media.audio:
        fe = processor.feature_extractor
        longest = max(len(a) for a in media.audio)
        kwargs["audio_kwargs"] = {
            "max_length": _padded_length(longest, audio_padding, fe.hop_length, fe.n_samples)
        }
    tokenizer = getattr(processor, "tokenizer", processor)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and prompt.startswith(bos):
        kwargs["add_special_tokens"] = False  # as apply_chat_template: the template already wrote BOS
    try:
        inputs = processor(
            text=prompt,
            images=media.images or None,
            videos=media.videos or None,
            audio=media.audio or None,
            return_tensors="pt",
            **kwargs,
        )
    except _CONTENT_ERRORS as exc:
        kinds = _kinds(media)
        log.info(
            "the processor refused a request's %s: %s: %s",
            kinds,
            type(exc).__name__,
            _detail(exc),
            exc_info=log.isEnabledFor(logging.DEBUG),
        )
        raise InvalidInput(f"the model's processor refused the request's {kinds}: {_detail(exc)}") from exc
    return inputs, prompt


def max_pixels(component: Any) -> int:
    """Pixels an image or video processor keeps of one picture (it downscales larger ones); 0 = unknown.

    Qwen2-VL-style processors (``merge_size`` and a ``size`` with ``shortest_edge``/``longest_edge``) count
    ``longest_edge`` in pixels (their "max_pixels"); fixed-size processors keep ``height x width``.
    """
    if component is None:
        return 0
    size = getattr(component, "size", None)
    explicit = getattr(component, "max_pixels", None) or getattr(size, "max_pixels", None)
    if explicit:
        return int(explicit)
    if size is None:
        return 0
    if getattr(component, "merge_size", None) and getattr(size, "longest_edge", None):
        return int(size.longest_edge)
    if getattr(size, "height", None) and getattr(size, "width", None):
        return int(size.height) * int(size.width)
    return 0
