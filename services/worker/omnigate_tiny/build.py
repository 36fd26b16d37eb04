"""Building the tiny checkpoints: one ``Family`` per checkpoint (its CLI name, folder and builder), each built
into a temporary folder, stamped with its recipe version and file hashes, and renamed into place atomically;
an up-to-date build is kept. ``python -m omnigate_tiny`` (``make models``) runs ``main``.

The builders are in ``builders.py`` (the shared pieces and the families that need no more) and in a module
per larger family (``qwen3_omni.py``, ``voxtral.py``)."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omnigate_tiny.builders import (
    RECIPE_VERSION,
    SEED,
    build_gemma3n,
    build_janus,
    build_qwen2_5_omni,
    build_qwen2_audio,
)
from omnigate_tiny.qwen3_omni import build_qwen3_omni
from omnigate_tiny.voxtral import build_voxtral

logger = logging.getLogger(__name__)

STAMP_FILE = "omnigate-build.json"
# Leftover temporary build folders older than this are from interrupted runs and get removed.
_STALE_TMP_SECONDS = 3600


@dataclass(frozen=True)
class Family:
    """One checkpoint family: its CLI name, output folder and builder."""

    name: str
    folder: str
    build: Callable[[Path], None]


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("omni", "tiny-qwen2.5-omni", build_qwen2_5_omni),
        Family("janus", "tiny-janus", build_janus),
        Family("qwen2-audio", "tiny-qwen2-audio", build_qwen2_audio),
        Family("gemma3n", "tiny-gemma3n", build_gemma3n),
        Family("qwen3-omni", "tiny-qwen3-omni", build_qwen3_omni),
        Family("voxtral", "tiny-voxtral", build_voxtral),
    )
}


@dataclass(frozen=True)
class BuildResult:
    """What ``build_family`` did for one family."""

    family: str
    path: Path
    built: bool  # False when an up-to-date build was already there
    seconds: float
    size_bytes: int


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` except the stamp, keyed by POSIX relative path, sorted."""
    hashes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != STAMP_FILE:
            hashes[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def is_up_to_date(folder: Path) -> bool:
    """True when ``folder`` holds a complete build of the current recipe, untouched since."""
    try:
        stamp = json.loads((folder / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("recipe_version") == RECIPE_VERSION and stamp.get("files") == file_hashes(folder)


def _write_stamp(folder: Path, family: Family) -> None:
    import transformers

    stamp = {
        "family": family.name,
        "recipe_version": RECIPE_VERSION,
        "seed": SEED,
        "transformers_version": transformers.__version__,  # for the reader; config.json records it too
        "files": file_hashes(folder),
    }
    (folder / STAMP_FILE).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")


def _remove_stale_tmp(out_root: Path, family: Family) -> None:
    """Remove temporary folders that interrupted builds of ``family`` left behind.

    Only old ones: a young one may belong to a build running right now in another process.
    """
    for pattern in (f".{family.folder}.*.tmp", f".{family.folder}.*.old"):
        for leftover in out_root.glob(pattern):
            if time.time() - leftover.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' warnings and progress bars while building.

    Saving a Qwen2.5-Omni config diffs it against a default talker config whose real-size token ids do not
    fit its own vocabulary, and transformers warns about that default on every save.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    progress_bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bar:
            hf_logging.enable_progress_bar()


def _normalize_modes(folder: Path) -> None:
    """Files readable by everyone (save_pretrained writes the weights 0600), folder listable."""
    folder.chmod(0o755)  # mkdtemp creates 0700 folders
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def build_family(name: str, out_root: Path, force: bool = False) -> BuildResult:
    """Build one family into ``out_root/<folder>`` unless an up-to-date build is already there."""
    family = FAMILIES[name]
    out_root.mkdir(parents=True, exist_ok=True)
    target = out_root / family.folder
    started = time.monotonic()
    if not force and is_up_to_date(target):
        return BuildResult(name, target, False, 0.0, _folder_size(target))

    _remove_stale_tmp(out_root, family)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family.folder}.", suffix=".tmp", dir=out_root))
    try:
        with _quiet_transformers():
            family.build(tmp)
        _write_stamp(tmp, family)
        _normalize_modes(tmp)
        _replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildResult(name, target, True, time.monotonic() - started, _folder_size(target))


def _replace_folder(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is moved aside first and then deleted."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old / target.name, target)  # put the previous build back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build(out_root: Path, families: list[str], force: bool = False) -> list[BuildResult]:
    """Build the named families under ``out_root``; return one result per family."""
    return [build_family(name, out_root, force=force) for name in families]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m omnigate_tiny",
        description="Build deterministic tiny random-weight checkpoints for tests (no download).",
    )
    parser.add_argument("--out", type=Path, default=Path("models"), help="folder to build into")
    parser.add_argument(
        "--family", choices=[*FAMILIES, "all"], default="all", help="which checkpoint to build"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when an up-to-date build exists")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    families = list(FAMILIES) if args.family == "all" else [args.family]
    for result in build(args.out, families, force=args.force):
        verb = f"built in {result.seconds:.1f} s" if result.built else "up to date"
        logger.info("%s: %s (%s, %.1f MB)", result.family, result.path, verb, result.size_bytes / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
