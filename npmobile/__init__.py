"""npmobile: MobileNet inference in NumPy and Numba that reads Keras files and answers as Keras does.

>>> import npmobile
>>> model = npmobile.load_model("mobilenet_v2.h5")                 # doctest: +SKIP
>>> probs = model.predict(x)                                       # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def _find_top_level_subpackages() -> None:
    """Let ``npmobile.kernels`` and ``npmobile.weights`` be found in a source checkout.

    They sit at the top of the repository (the design card's layout) and are installed into the
    package as npmobile/kernels and npmobile/weights. Run from the repository root, this folder
    shadows any installed copy, so an installed one (editable or not) is never what is imported:
    when the two folders are not inside the package, look for them one level up.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    in_checkout = os.path.isfile(os.path.join(root, "kernels", "__init__.py"))
    if in_checkout and not os.path.isdir(os.path.join(here, "kernels")):
        __path__.append(root)  # noqa: F821 -- a package's __path__, set by the import system


_find_top_level_subpackages()

from typing import TYPE_CHECKING  # noqa: E402

from npmobile.errors import (  # noqa: E402 -- after the search path is complete
    CustomObjectError,
    ImageError,
    InputShapeError,
    ModelFileError,
    NpmobileError,
    UnsupportedLayerError,
    WeightsError,
)
from npmobile.isolation import DEFAULT_TIMEOUT  # noqa: E402

if TYPE_CHECKING:
    from npmobile.interpreter import Model

__version__ = "0.1.0"


def load_model(path: str | os.PathLike, custom_objects: Mapping[str, str] | None = None,
               timeout: float | None = DEFAULT_TIMEOUT, trusted: bool = False) -> Model:
    """Load a whole Keras model: a legacy .h5 (Keras 2/tf_keras or Keras 3) or a .keras file; or a PyTorch
    state dict (.pth, .safetensors) of a torchvision MobileNetV2/V3, its architecture read from its tensors.

    ``custom_objects``: for each of your own activation functions the file names (``Activation(hard_swish)``
    in a tutorial), the built-in it computes, as a string: ``{"hard_swish": "hard_swish", "my_act": "relu6"}``.
    npmobile runs its own kernel for that built-in; nothing from the file is executed, and a custom function
    left unmapped is refused. ``npmobile verify`` checks the mapping against your functions in Keras.

    The file is read in a child process that ``timeout`` seconds (None: no limit) and a memory limit
    bound, so a corrupt or hostile file ends in ``ModelFileError`` instead of hanging or crashing this
    process. ``trusted=True`` reads it in this process instead: a faster start, no limits.

    Weights-only files (.weights.h5, or the official keras-applications .h5) carry no architecture:
    pass them as ``weights=`` to an architecture in npmobile.applications instead.
    """
    from npmobile.activations import check_custom_objects, map_custom_functions
    from npmobile.io.torch import StateDict
    from npmobile.isolation import start_read

    mapping = check_custom_objects(custom_objects)
    # The reader starts before the engine (Numba) is imported, so that the two overlap.
    pending = start_read(path, "model", timeout, trusted)
    from npmobile.graph import Graph
    from npmobile.interpreter import Model

    contents = pending.result()
    if isinstance(contents, StateDict):
        from npmobile.applications.torchvision import model_from_state_dict

        return model_from_state_dict(contents)
    map_custom_functions(contents, mapping)
    return Model(Graph.from_spec(contents))


def __getattr__(name: str):
    # `npmobile.applications` without importing every family at `import npmobile`, and `npmobile.Model`
    # without importing the engine (Numba): the readers, which a child process runs, need neither.
    if name in ("applications", "interpreter"):
        import importlib

        return importlib.import_module(f"npmobile.{name}")
    if name == "Model":
        from npmobile.interpreter import Model

        return Model
    raise AttributeError(name)


__all__ = [
    "CustomObjectError", "ImageError", "InputShapeError", "Model", "ModelFileError", "NpmobileError",
    "UnsupportedLayerError", "WeightsError", "load_model",
]
