"""Imported by Python at start-up when this folder is on PYTHONPATH (see tests/support/encoder_probe.py): installs
the encoder probe in a worker process the tests start."""

import os
import sys

_SUPPORT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _SUPPORT_DIR)
try:
    import encoder_probe
finally:
    sys.path.remove(_SUPPORT_DIR)  # nothing else of tests/support/ is importable in the worker

encoder_probe.install_from_env()
