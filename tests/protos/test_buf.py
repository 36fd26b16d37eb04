"""The protocol guard that `make lint` runs: buf lint (STANDARD) on protos/, and buf breaking (WIRE_JSON)
against the released protos in protos-released/.

Each breaking case edits a copy of protos/ the way a careless change would and checks that buf refuses it,
naming the field; a compatible change (a new field) must pass, so the guard is not just "any diff fails".
buf is the pinned one `make buf-tools` installs into .tools/ (`make lint` and `make test` run it first).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parents[2]
PROTOS = REPO_DIR / "protos"
RELEASED = REPO_DIR / "protos-released"
GATEWAY = "omnigate/gateway/v1/gateway.proto"
WORKER = "omnigate/worker/v1/worker.proto"


def _buf_path() -> Path:
    version = re.search(r"^BUF_VERSION := (\S+)$", (REPO_DIR / "Makefile").read_text(), re.M)
    assert version, "the Makefile pins BUF_VERSION"
    return REPO_DIR / ".tools" / f"buf-{version.group(1)}" / "node_modules" / ".bin" / "buf"


@pytest.fixture(scope="module")
def buf() -> Path:
    path = _buf_path()
    if not path.exists():  # e.g. pytest run on its own: install it the way make lint does
        subprocess.run(["make", "--no-print-directory", "buf-tools"], cwd=REPO_DIR, check=False)
    assert path.exists(), (
        f"{path} is missing: `make buf-tools` (run by `make lint` and `make test`) installs it"
    )
    return path


def _run(buf: Path, *args: str, cwd: Path = REPO_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(buf), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _breaking(buf: Path, protos: Path) -> subprocess.CompletedProcess[str]:
    return _run(buf, "breaking", str(protos), "--against", str(RELEASED))


@pytest.fixture
def protos_copy(tmp_path: Path) -> Path:
    """protos/ (with its buf.yaml) copied, to be edited by a test."""
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS, copy)
    return copy


def _edit(protos: Path, file: str, old: str, new: str) -> None:
    path = protos / file
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not in {file} exactly once"
    path.write_text(text.replace(old, new))


def test_the_baseline_is_a_full_copy_of_the_released_files():
    released = sorted(p.relative_to(RELEASED).as_posix() for p in RELEASED.rglob("*.proto"))
    assert released == [GATEWAY, WORKER]


def test_current_protos_pass_lint_and_breaking(buf):
    lint = _run(buf, "lint", "protos")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    breaking = _breaking(buf, PROTOS)
    assert breaking.returncode == 0, breaking.stdout + breaking.stderr


def test_a_new_field_is_compatible(buf, protos_copy):
    _edit(
        protos_copy,
        GATEWAY,
        "  string speaker = 6;\n",
        "  string speaker = 6;\n  // A field added after the release.\n  string added_later = 99;\n",
    )
    result = _breaking(buf, protos_copy)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("file", "old", "new", "expected"),
    [
        pytest.param(
            WORKER,
            "uint64 max_video_frame_pixels = 12;",
            "uint64 max_video_frame_pixels = 15;",
            'field "12" with name "max_video_frame_pixels" on message "GetModelInfoResponse" was deleted '
            'without reserving the number "12"',
            id="renumbered field",
        ),
        pytest.param(
            GATEWAY,
            "bool return_full_text = 4;",
            "bool full_text = 4;",
            'Field "4" on message "GenerateRequest" changed name from "return_full_text" to "full_text"',
            id="renamed field (JSON)",
        ),
        pytest.param(
            GATEWAY,
            "uint32 min_new_tokens = 9;",
            "string min_new_tokens = 9;",
            'Field "9" with name "min_new_tokens" on message "GenerationParameters" changed type from '
            '"uint32" to "string"',
            id="retyped field",
        ),
    ],
)
def test_breaking_changes_are_refused(buf, protos_copy, file, old, new, expected):
    _edit(protos_copy, file, old, new)
    result = _breaking(buf, protos_copy)
    assert result.returncode != 0, f"buf breaking accepted {old!r} -> {new!r}"
    assert expected in result.stdout, result.stdout + result.stderr
