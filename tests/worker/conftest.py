"""The real tiny Qwen2.5-Omni engine, loaded once for the worker tests."""

from __future__ import annotations

import pytest

from omnigate_worker.engine import loading
from omnigate_worker.engine.transformers_engine import TransformersEngine
from omnigate_worker.settings import WorkerSettings
from tests.support.stack import MODELS_DIR

OMNI = str(MODELS_DIR / "tiny-qwen2.5-omni")


@pytest.fixture(scope="session")
def loaded_omni() -> loading.LoadedModel:
    return loading.load(OMNI, "cpu", "auto", "auto", False)


@pytest.fixture(scope="session")
def engine(loaded_omni) -> TransformersEngine:
    """The default engine: batched decoding over KV-cache slots."""
    engine = TransformersEngine(loaded_omni, WorkerSettings(model=OMNI), OMNI)
    engine.warmup()
    return engine


@pytest.fixture(scope="session")
def dynamic_engine(loaded_omni) -> TransformersEngine:
    """The same model with the dynamic-cache batch (decode_runner=dynamic)."""
    engine = TransformersEngine(loaded_omni, WorkerSettings(model=OMNI, decode_runner="dynamic"), OMNI)
    engine.warmup()
    return engine


@pytest.fixture(scope="session")
def greedy_speech_engine(loaded_omni) -> TransformersEngine:
    """Greedy talker (talker_do_sample=false), and prompts over 100 tokens prefilled in chunks, so both
    prefill paths feed the talker."""
    settings = WorkerSettings(model=OMNI, talker_do_sample=False, prefill_tokens_per_step=100)
    engine = TransformersEngine(loaded_omni, settings, OMNI)
    engine.warmup()
    yield engine
    engine.close()
