"""What reaches a model's audio and vision encoders, recorded where the model runs.

The tiny checkpoints answer the same greedy text for very different media (a tone, silence, noise, a
reversed clip), so comparing answers cannot show that samples or pixels arrived intact. This probe records
the first argument of every audio- and vision-encoder call: the log-mel features the audio tower reads
(after the padding is masked away) and the patches the vision tower reads. Tests compare those records
between the service and transformers' own pipeline.

In the test process ``recording()`` installs the probe around a block. In a worker process started with
``worker_env(directory)`` (its PYTHONPATH puts ``encoder_probe_site/sitecustomize.py`` first), the probe is
installed at start-up and writes one ``.npy`` file per encoder call into ``directory``; ``read`` and
``clear`` work on that folder.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

DIR_ENV = "OMNIGATE_TEST_ENCODER_PROBE_DIR"
SITE_DIR = Path(__file__).resolve().parent / "encoder_probe_site"
# Encoder classes by the kind of input they read (transformers' class names).
ENCODERS = {
    "Qwen2_5OmniAudioEncoder": "audio",
    "Qwen2_5OmniVisionEncoder": "vision",
}

Record = tuple[str, np.ndarray]  # (kind, the encoder's input as float32)


def _hook(sink):
    def hook(module, args):
        kind = ENCODERS.get(type(module).__name__)
        if kind is not None and args:
            sink(kind, args[0].detach().float().cpu().numpy())

    return hook


@contextlib.contextmanager
def recording() -> Iterator[list[Record]]:
    """Records the encoder inputs of every model run in this process while the block runs."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    records: list[Record] = []
    handle = register_module_forward_pre_hook(_hook(lambda kind, array: records.append((kind, array))))
    try:
        yield records
    finally:
        handle.remove()


def install_from_env() -> None:
    """Installs the probe for the whole process if ``DIR_ENV`` names a folder (the worker's start-up)."""
    directory = os.environ.get(DIR_ENV)
    if not directory:
        return
    from torch.nn.modules.module import register_module_forward_pre_hook

    counter = itertools.count()

    def write(kind: str, array: np.ndarray) -> None:
        path = Path(directory) / f"{os.getpid()}-{next(counter):06d}-{kind}.npy"
        partial = path.with_suffix(".partial")
        with open(partial, "wb") as f:
            np.save(f, array)
        os.replace(partial, path)

    register_module_forward_pre_hook(_hook(write))


def worker_env(directory: Path) -> dict[str, str]:
    """Environment for a worker process that records its encoder inputs into ``directory``."""
    path = os.pathsep.join(p for p in (str(SITE_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {DIR_ENV: str(directory), "PYTHONPATH": path}


def clear(directory: Path) -> None:
    for path in directory.glob("*.npy"):
        path.unlink()


def read(directory: Path) -> list[Record]:
    """The records in ``directory``, in the order the encoders were called."""
    return [(path.stem.rsplit("-", 1)[1], np.load(path)) for path in sorted(directory.glob("*.npy"))]


def assert_same(got: list[Record], expected: list[Record], atol: float = 1e-4) -> None:
    """The same encoder calls with the same inputs (to float tolerance), kind by kind in call order (which
    of the audio and vision encoders runs first is the model code's business)."""
    assert expected, "no encoder ran: nothing was compared"
    for kind in sorted({k for k, _ in got} | {k for k, _ in expected}):
        ours = [array for k, array in got if k == kind]
        theirs = [array for k, array in expected if k == kind]
        assert len(ours) == len(theirs), f"{kind} encoder: {len(ours)} calls here, {len(theirs)} expected"
        for mine, wanted in zip(ours, theirs, strict=True):
            assert mine.shape == wanted.shape, f"{kind} encoder input: shape {mine.shape} != {wanted.shape}"
            difference = float(np.abs(mine - wanted).max()) if mine.size else 0.0
            assert difference <= atol, (
                f"{kind} encoder input differs by up to {difference:g} (allowed {atol:g})"
            )
