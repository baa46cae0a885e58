"""Shared fixtures. Keras is the reference: it is imported here only for the tests that ask for it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The kernels from Numba's JIT, whatever `npmobile build-kernels` left in the user's cache: tests/test_aot.py
# builds and checks the ahead-of-time module itself.
os.environ.setdefault("NPMOBILE_KERNELS", "jit")
sys.path.insert(0, str(Path(__file__).parent))  # tests/keras_files.py is importable from the tests


@pytest.fixture(scope="session")
def keras_files(tmp_path_factory):
    """Keras-written model files with Keras's own outputs (see tests/keras_files.py)."""
    from keras_files import KerasFiles

    return KerasFiles(tmp_path_factory.mktemp("keras_files"))


@pytest.fixture(scope="session")
def tutorials(tmp_path_factory):
    """Hand-built tutorial MobileNets with function activations (see tests/tutorial_models.py):
    ``tutorials("MobileNetV3Small", "tfkeras_h5")``."""
    from tutorial_models import TutorialFiles

    return TutorialFiles(tmp_path_factory.mktemp("tutorials"))


# Fuzzed inputs per target, reported at the end of the run (tests/test_fuzz.py).
FUZZ_COUNTS: dict[str, dict[str, int]] = {}


def record_fuzz(target: str, ran: int, outcomes: dict[str, int]) -> None:
    counts = FUZZ_COUNTS.setdefault(target, {"ran": 0})
    counts["ran"] += ran
    for outcome, n in outcomes.items():
        counts[outcome] = counts.get(outcome, 0) + n


def pytest_terminal_summary(terminalreporter):
    if not FUZZ_COUNTS:
        return
    total = sum(c["ran"] for c in FUZZ_COUNTS.values())
    terminalreporter.write_line(f"fuzzing: {total} mutated inputs ran; outcomes per target (any foreign one fails)")
    for target, counts in sorted(FUZZ_COUNTS.items()):
        detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "ran")
        terminalreporter.write_line(f"  {target}: {counts['ran']} ({detail})")


@pytest.fixture(scope="session")
def transfer_models(tmp_path_factory):
    """Transfer-learning models as TensorFlow's tutorial builds them (see tests/tutorial_models.py):
    ``transfer_models("tutorial", "keras3_keras")``."""
    from tutorial_models import TransferFiles

    return TransferFiles(tmp_path_factory.mktemp("transfer"))
