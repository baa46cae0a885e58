"""npmobile: MobileNet inference in NumPy and Numba that reads Keras files and answers as Keras does.

>>> import npmobile
>>> model = npmobile.load_model("mobilenet_v2.h5")                 # doctest: +SKIP
>>> probs = model.predict(x)                                       # doctest: +SKIP
"""

from __future__ import annotations

import os

from npmobile.errors import (
    ImageError,
    InputShapeError,
    ModelFileError,
    NpmobileError,
    UnsupportedLayerError,
    WeightsError,
)
from npmobile.interpreter import Model

__version__ = "0.1.0"


def load_model(path: str | os.PathLike) -> Model:
    """Load a whole Keras model: a legacy .h5 (Keras 2/tf_keras or Keras 3) or a .keras file.

    Weights-only files (.weights.h5, or the official keras-applications .h5) carry no architecture:
    pass them as ``weights=`` to an architecture in npmobile.applications instead.
    """
    from npmobile.graph import Graph
    from npmobile.io import read_model

    return Model(Graph.from_spec(read_model(os.fspath(path))))


def __getattr__(name: str):
    # `npmobile.applications` without importing every family at `import npmobile`.
    if name == "applications":
        import importlib

        return importlib.import_module("npmobile.applications")
    raise AttributeError(name)


__all__ = [
    "ImageError", "InputShapeError", "Model", "ModelFileError", "NpmobileError", "UnsupportedLayerError",
    "WeightsError", "load_model",
]
