"""The real tiny Qwen2.5-Omni engine, loaded once for the worker tests."""

from __future__ import annotations

import pytest
from stack import MODELS_DIR

from omnigate_worker import loading
from omnigate_worker.settings import WorkerSettings
from omnigate_worker.transformers_engine import TransformersEngine

OMNI = str(MODELS_DIR / "tiny-qwen2.5-omni")


@pytest.fixture(scope="session")
def engine() -> TransformersEngine:
    engine = TransformersEngine(
        loading.load(OMNI, "cpu", "auto", "auto", False), WorkerSettings(model=OMNI), OMNI
    )
    engine.warmup()
    return engine
