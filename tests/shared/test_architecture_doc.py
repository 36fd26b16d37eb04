"""docs/architecture.md and the README's layout stay true: every file they name exists, and the newcomer's
four questions (issue 15) are answered by a file name that holds the answer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
SOURCES = [p for root in ("services", "tests", "bench") for p in (REPO / root).rglob("*.py")]


def _named_files(text: str) -> set[str]:
    """Every `something.py` (or `folder/something.py`) written in backticks."""
    return set(re.findall(r"`([\w/.]+\.py)\b", text))


@pytest.mark.parametrize("document", [DOC, REPO / "README.md"], ids=["architecture", "readme"])
def test_every_file_the_document_names_exists(document):
    named = _named_files(document.read_text())
    assert len(named) > 10, named
    missing = sorted(name for name in named if not any(p.as_posix().endswith("/" + name) for p in SOURCES))
    assert missing == [], f"{document.name} names files that do not exist: {missing}"


@pytest.mark.parametrize(
    ("question", "path", "holds"),
    [
        ("where is video sampled", "services/gateway/omnigate_gateway/media/video.py", "def _sample_frames("),
        ("where does an error become an HTTP code", "services/gateway/omnigate_gateway/openai_api/errors.py",
         "def http_error("),
        ("where does Qwen-Omni's talker get its arguments", "services/worker/omnigate_worker/families/qwen_omni.py",
         "talker_"),
        ("where does a retry happen", "services/gateway/omnigate_gateway/workers/call.py", "def _retry("),
    ],
)  # fmt: skip
def test_the_newcomers_questions_are_answered_by_file_names(question, path, holds):
    assert holds in (REPO / path).read_text(), question
    assert f"`{Path(path).name}`" in DOC.read_text(), f"docs/architecture.md does not say {question}"
