"""Shared fixtures. Keras is the reference: it is imported here only for the tests that ask for it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).parent))  # tests/keras_files.py is importable from the tests


@pytest.fixture(scope="session")
def keras_files(tmp_path_factory):
    """Keras-written model files with Keras's own outputs (see tests/keras_files.py)."""
    from keras_files import KerasFiles

    return KerasFiles(tmp_path_factory.mktemp("keras_files"))
