"""The supported-model matrix: each tiny family behind a real worker + gateway, one test per table cell.

``MATRIX`` below is the README's "Supported models" table; ``test_readme_table_matches`` checks that the two
say the same, and every other test proves one cell (inputs, outputs, streaming, batching) through the public
API with the Python SDK. A "no" is proven too: the gateway refuses it with INVALID_ARGUMENT, or (batching)
concurrent requests never share a decode step.
"""

from __future__ import annotations

import asyncio
import io
import re
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import PIL.Image
import pytest

from omnigate_client import AsyncOmnigateClient, AudioChunk, Image, OmnigateClientError, TextDelta
from tests.support import media_factory
from tests.support.stack import MODELS_DIR, metric_sum, scrape_metrics, start_stack

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"
INPUTS = ("text", "image", "audio", "video")
OUTPUTS = ("text", "speech", "image")
MODE_OF_OUTPUT = {"text": "text", "speech": "audio", "image": "image"}


@dataclass(frozen=True)
class Family:
    name: str  # as in the README table
    folder: str  # under models/
    architecture: str
    inputs: frozenset[str]
    outputs: frozenset[str]
    streamed: frozenset[str]  # outputs that arrive in more than one event
    batching: bool  # concurrent text requests decode together in one batch
    shared_fixture: str | None = None  # a session stack other integration tests use too


MATRIX = {
    f.name: f
    for f in (
        Family(
            "Qwen2.5-Omni",
            "tiny-qwen2.5-omni",
            "Qwen2_5OmniForConditionalGeneration",
            frozenset(INPUTS),
            frozenset({"text", "speech"}),
            frozenset({"text", "speech"}),
            True,
            "omni_stack",
        ),
        Family(
            "Janus",
            "tiny-janus",
            "JanusForConditionalGeneration",
            frozenset({"text", "image"}),
            frozenset({"text", "image"}),
            frozenset({"text"}),
            True,
            "janus_stack",
        ),
        Family(
            "Qwen2-Audio",
            "tiny-qwen2-audio",
            "Qwen2AudioForConditionalGeneration",
            frozenset({"text", "audio"}),
            frozenset({"text"}),
            frozenset({"text"}),
            True,
        ),
        Family(
            "Gemma 3n",
            "tiny-gemma3n",
            "Gemma3nForConditionalGeneration",
            frozenset({"text", "image", "audio"}),
            frozenset({"text"}),
            frozenset({"text"}),
            False,
        ),
        Family(
            "Qwen3-Omni",
            "tiny-qwen3-omni",
            "Qwen3OmniMoeForConditionalGeneration",
            frozenset(INPUTS),
            frozenset({"text", "speech"}),
            frozenset(
                {"text"}
            ),  # speech is synthesized whole at the end of generate(), then framed in chunks
            True,
        ),
        Family(
            "Voxtral",
            "tiny-voxtral",
            "VoxtralForConditionalGeneration",
            frozenset({"text", "audio"}),
            frozenset({"text"}),
            frozenset({"text"}),
            True,
        ),
    )
}


@pytest.fixture(scope="module", params=list(MATRIX))
def family(request, tmp_path_factory):
    """(Family, Stack): one family at a time (pytest groups the tests by family)."""
    spec = MATRIX[request.param]
    if spec.shared_fixture:
        yield spec, request.getfixturevalue(spec.shared_fixture)
        return
    stack = start_stack(MODELS_DIR / spec.folder, tmp_path_factory.mktemp(spec.folder))
    try:
        yield spec, stack
    finally:
        stack.gateway.stop()
        stack.worker.stop()


def _media(modality: str) -> dict:
    data = {
        "image": lambda: media_factory.make_png(80, 60),
        "audio": lambda: media_factory.make_wav(seconds=1.0),
        "video": lambda: media_factory.make_mp4(seconds=2.0, fps=5, w=64, h=48, with_audio=False),
    }[modality]()
    return {"type": modality, "data": data}


def _user(*parts) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]}]


def _client(stack) -> AsyncOmnigateClient:
    return AsyncOmnigateClient(stack.gateway.target, timeout_s=120, retries=0)


# ------------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------------


def _readme_rows() -> dict[str, list[str]]:
    text = README.read_text()
    section = text.split("## Supported models", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and not set(cells[0]) <= {"-"} and not cells[0].startswith("family"):
            rows[re.sub(r"\s*\(.*\)$", "", cells[0])] = cells
    return rows


def _cell_set(cell: str) -> frozenset[str]:
    return frozenset(part.strip() for part in re.sub(r"\(.*?\)", "", cell).split(",") if part.strip())


def test_readme_table_matches():
    """The README's table claims exactly what the tests below prove."""
    rows = _readme_rows()
    assert set(rows) == set(MATRIX), "one README row per tested family"
    for name, spec in MATRIX.items():
        _, architecture, inputs, outputs, streamed, batching = rows[name]
        assert f"`{spec.folder}`" in rows[name][0], name
        assert architecture.strip("`") == spec.architecture, name
        assert _cell_set(inputs) == spec.inputs, name
        assert _cell_set(outputs) == spec.outputs, name
        assert _cell_set(streamed) == spec.streamed, name
        assert batching.split()[0] == ("yes" if spec.batching else "no"), name


# ------------------------------------------------------------------------------------------------------
# One test per cell
# ------------------------------------------------------------------------------------------------------


async def test_model_info_states_the_row(family):
    spec, stack = family
    async with _client(stack) as client:
        info = await client.model_info()
    assert info.architecture == spec.architecture
    assert set(info.input_modalities) == spec.inputs
    assert set(info.output_modalities) == {"audio" if o == "speech" else o for o in spec.outputs}


@pytest.mark.parametrize("modality", INPUTS)
async def test_input(family, modality):
    """A claimed input is taken and reaches the prompt (its placeholder tokens are counted); any other is
    refused with INVALID_ARGUMENT."""
    spec, stack = family
    async with _client(stack) as client:
        text_only = await client.generate_all(_user(), max_new_tokens=2)
        if modality == "text":
            assert text_only.usage.prompt_tokens > 0 and text_only.summary is not None
            return
        if modality in spec.inputs:
            result = await client.generate_all(_user(_media(modality)), max_new_tokens=2, fps=1)
            assert result.usage.prompt_tokens > text_only.usage.prompt_tokens + 1, (
                "media tokens in the prompt"
            )
            assert result.finish_reason in {"stop", "length"}
        else:
            with pytest.raises(OmnigateClientError) as err:
                await client.generate_all(_user(_media(modality)), max_new_tokens=2, fps=1)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"cannot take {modality} input" in err.value.message


@pytest.mark.parametrize("output", OUTPUTS)
async def test_output(family, output):
    spec, stack = family
    async with _client(stack) as client:
        request = client.generate(
            _user(), generation_mode=MODE_OF_OUTPUT[output], max_new_tokens=6, min_new_tokens=2
        )
        if output not in spec.outputs:
            with pytest.raises(OmnigateClientError) as err:
                await request.collect()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "cannot generate" in err.value.message
            return
        result = await request.collect()
    if output == "text":
        assert 2 <= result.usage.output_tokens <= 6 and result.text
    elif output == "speech":
        assert result.audio.sample_rate == 24000 and len(result.audio.pcm) > 0
        assert float(np.sqrt(np.mean(result.audio.samples**2))) > 1e-3, "audible"
    else:
        assert len(result.images) == 1
        picture = PIL.Image.open(io.BytesIO(result.images[0].data))
        assert picture.format == "PNG" and picture.size == (result.images[0].width, result.images[0].height)


async def test_streaming(family):
    """Each streamed output arrives as several events before the summary (text per token, speech in
    chunks); an image arrives whole."""
    spec, stack = family
    async with _client(stack) as client:
        for output in sorted(spec.outputs):
            events = [
                e
                async for e in client.generate(
                    _user(), generation_mode=MODE_OF_OUTPUT[output], max_new_tokens=8, min_new_tokens=8
                )
            ]
            kind = {"text": TextDelta, "speech": AudioChunk, "image": Image}[output]
            count = sum(isinstance(e, kind) for e in events)
            if output in spec.streamed:
                assert count > 1, f"{output}: {count} events"
            elif output == "speech":
                # Not streamed: synthesized whole at the end, then framed in 0.5 s chunks (one or more,
                # as long as the talker spoke), all after the text.
                last_text = max(i for i, e in enumerate(events) if isinstance(e, TextDelta))
                first_audio = min(i for i, e in enumerate(events) if isinstance(e, AudioChunk))
                assert count >= 1 and first_audio > last_text, f"{output}: {count} events"
            else:
                assert count == 1, f"{output}: {count} events"


async def test_batching(family):
    """Concurrent text requests share decode steps (the worker's batch size histogram sees rows > 1), or,
    for a family whose cache cannot be merged, run one at a time (no batch step at all)."""
    spec, stack = family
    before = scrape_metrics(stack.worker)
    async with _client(stack) as client:
        results = await asyncio.gather(
            *(client.generate_all(_user(), max_new_tokens=24, min_new_tokens=24) for _ in range(4))
        )
    assert all(r.usage.output_tokens == 24 for r in results)
    after = scrape_metrics(stack.worker)

    def shared_steps(samples) -> float:  # decode steps that ran more than one request
        return metric_sum(samples, "omnigate_worker_batch_size_count") - metric_sum(
            samples, "omnigate_worker_batch_size_bucket", le="1.0"
        )

    steps = metric_sum(after, "omnigate_worker_batch_size_count") - metric_sum(
        before, "omnigate_worker_batch_size_count"
    )
    if spec.batching:
        assert shared_steps(after) - shared_steps(before) > 0, "some decode steps ran several requests"
    else:
        assert steps == 0, "requests ran one at a time, outside the batch"
