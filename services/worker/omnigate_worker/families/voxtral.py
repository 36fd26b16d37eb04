"""Voxtral (``VoxtralForConditionalGeneration``): audio and text in, text out.

Voxtral's processor tokenizes through mistral-common (``MistralCommonBackend`` over a ``tekken.json``
vocabulary): mistral-common's chat-request code writes the prompt (``<s>[INST][BEGIN_AUDIO][AUDIO]...
text[/INST]``) and places the audio tokens (375 ``[AUDIO]`` per 30 s chunk), and ``VoxtralProcessor.__call__``
refuses audio. So the generic path (render the chat template, then ``processor(text=..., audio=...)``) cannot
feed it, and this family builds its inputs the way the processor documents instead:
``processor.apply_chat_template(messages, tokenize=True, return_dict=True)`` with each audio part inline as
base64 audio. The worker's decoded samples are written as a 32-bit float WAV at their own rate, which
mistral-common reads back sample for sample (and resamples only if the rate is not its 16 kHz), so the
features equal the feature extractor's on the decoded audio. Audio is always padded to whole 30 s chunks:
the encoder reads exactly 3000 mel frames per chunk, so the engine's shorter audio padding does not apply.

What mistral-common refuses of a conversation (one that ends with an assistant turn, audio in an assistant
turn) is the caller's mistake: InvalidInput with its reason.

Transcription (``processor.apply_transcription_request``: the audio, then ``lang:xx[TRANSCRIBE]``) is not
served: a request is a conversation, with no field that asks for a transcript or names the language.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import soundfile
from mistral_common.exceptions import MistralCommonException

from omnigate.conversation import GenerationRequest, Modality
from omnigate.errors import InvalidInput
from omnigate_worker.engine import inputs as model_inputs
from omnigate_worker.families.generic import GenericFamily

_DETAIL_LIMIT = 200  # characters of mistral-common's reason a message repeats


def wav_base64(samples: Any, sample_rate: int) -> str:
    """Mono float samples as a base64 32-bit float WAV (lossless for float32 samples)."""
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, sample_rate, format="WAV", subtype="FLOAT")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class VoxtralFamily(GenericFamily):
    architectures = ("VoxtralForConditionalGeneration",)

    def build_inputs(self, request: GenerationRequest, audio_padding: int | None) -> Any:
        media = model_inputs.collect(request)  # the request's text and audio checks
        messages = []
        for message, collected in zip(request.messages, media.messages, strict=True):
            content = []
            for part, entry in zip(message.content, collected["content"], strict=True):
                if part.type is Modality.AUDIO:
                    assert part.audio is not None  # an AUDIO part carries its audio
                    entry = {
                        "type": "audio",
                        "base64": wav_base64(part.audio.samples, part.audio.sample_rate),
                    }
                content.append(entry)
            messages.append({"role": collected["role"], "content": content})
        try:
            return self.processor.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_tensors="pt"
            )
        except MistralCommonException as exc:
            reason = " ".join(str(exc).split())[:_DETAIL_LIMIT] or type(exc).__name__
            raise InvalidInput(f"the model's tokenizer refused the conversation: {reason}") from exc
