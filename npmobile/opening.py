"""Opening a model the way the command line does, from a family name, a file or weights: one way,
shared by every command, ``npmobile.batch`` (one process, Ray, Dask) and ``verify``.

A file is read once (in the bounded reader's child, npmobile.isolation), and what it holds decides:
a whole Keras model, weights for the family asked for, or a PyTorch state dict whose architecture is
read from its tensors. ``preprocess_for`` says how that model wants its pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from npmobile.errors import NpmobileError
from npmobile.isolation import DEFAULT_TIMEOUT


def open_model(family: str, alpha: float, size: int, minimalistic: bool, weights: str | None,
               timeout: float | None = DEFAULT_TIMEOUT, trusted: bool = False,
               custom_objects: list[tuple[str, str]] | None = None, given: tuple[str, ...] = ()):
    """A model for the CLI: a whole Keras model from ``weights`` if the file holds one, otherwise the
    ``family`` architecture with ``weights`` (a weights file, or the official ImageNet weights).

    The file is read once (one child process, see npmobile.isolation), and what it holds decides.
    ``given``: the architecture options the user typed (model, alpha, size, minimalistic); a whole model
    has its own architecture, so typing one that contradicts it is a UsageError (check_whole_model)."""
    if weights is None:
        return family_model(family, alpha, size, minimalistic, "imagenet", timeout, trusted)
    if Path(weights).is_dir():
        raise NpmobileError(f"{weights}: is a directory; --weights takes a model or weights file (.h5, .keras, "
                            ".weights.h5, .pth, .safetensors)")
    if not Path(weights).is_file():
        raise NpmobileError(f"{weights}: no such file")
    from npmobile.activations import check_custom_objects, map_custom_functions
    from npmobile.errors import WeightsOnlyFileError
    from npmobile.io.torch import StateDict
    from npmobile.isolation import start_read
    from npmobile.spec import ModelSpec

    mapping = check_custom_objects(dict(custom_objects or ()))
    pending = start_read(weights, "any", timeout, trusted)
    from npmobile.graph import Graph  # the engine's imports (Numba) overlap with the reading
    from npmobile.interpreter import Model

    contents = pending.result()
    if isinstance(contents, ModelSpec):
        map_custom_functions(contents, mapping)
        return check_whole_model(Model(Graph.from_spec(contents)), weights, given, size)
    if isinstance(contents, StateDict):  # PyTorch: the architecture is read from the tensors
        from npmobile.applications.torchvision import model_from_state_dict

        return check_whole_model(model_from_state_dict(contents), weights, given, size)
    if isinstance(contents.model_error, WeightsOnlyFileError):
        # Weights and no architecture: whether they fit --model is the question, and its answer the message.
        return family_model(family, alpha, size, minimalistic, contents)
    try:
        return family_model(family, alpha, size, minimalistic, contents)
    except NpmobileError:
        raise contents.model_error from None


def check_whole_model(model, path: str, given: tuple[str, ...], size: int):
    """``model`` (read whole from ``path``), unless a typed option contradicts it: --model, --alpha and
    --minimalistic build a family's architecture, which a whole-model file replaces; --size is applied
    to a model that takes any input size and must equal a fixed one."""
    from npmobile.errors import UsageError

    family = [f"--{name}" for name in ("model", "alpha", "minimalistic") if name in given]
    if family:
        several = len(family) > 1
        raise UsageError(f"{path} holds a whole model with its own architecture: {' and '.join(family)} "
                         f"{'do' if several else 'does'} not apply (drop {'them' if several else 'it'})")
    height, width = model.input_shape[1:3]
    if "size" in given and height is not None and (height, width) != (size, size):
        raise UsageError(f"{path} takes {height}x{width} images: --size {size} contradicts it (drop --size)")
    return model


def family_model(family: str, alpha: float, size: int, minimalistic: bool, weights,
                 timeout: float | None = DEFAULT_TIMEOUT, trusted: bool = False):
    """The ``family`` architecture (a name from weights.registry.FAMILIES) with ``weights``."""
    from npmobile import applications

    kwargs = {"alpha": alpha, "weights": weights, "timeout": timeout, "trusted": trusted}
    if family.startswith("mobilenet_v3"):
        kwargs["minimalistic"] = minimalistic
    if weights is None or weights != "imagenet" or size != 224 or family.startswith("mobilenet_v3"):
        kwargs["input_shape"] = (size, size, 3)
    return applications.FAMILIES[family](**kwargs)


def carries_preprocessing(graph) -> bool:
    """Whether the graph maps its pixels itself before its first layer with weights: a Rescaling (MobileNetV3),
    a Normalization, or preprocess_input called on the input tensor (op nodes, TFOpLambda arithmetic with a
    constant): what each layer is, its record says (``preprocessing``, ``weights``)."""
    from npmobile.ops import layer_type

    for node in graph.nodes:  # in an order where every node follows its inputs: the stem comes first
        record = layer_type(node.op)
        if record.is_preprocessing(node):
            return True
        if record.weight_names(node.config):
            return False
    return False


def preprocess_for(model) -> str:
    """How a model wants its pixels: "torchvision" for PyTorch state dicts (npmobile.image.load_torchvision);
    "none" (0..255, as keras.utils.load_img gives them) for a model that does its own preprocessing, like
    MobileNetV3's Rescaling or the transfer-learning tutorial's preprocess_input inside the model; "tf"
    (x / 127.5 - 1) for V1/V2 without it. Never both: a model's own preprocessing is never applied twice."""
    if getattr(model, "preprocessing", None) == "torchvision":
        return "torchvision"
    return "none" if carries_preprocessing(model.graph) else "tf"


def model_input(model, path: str, size: int) -> np.ndarray:
    """One image as the model wants it: resized to its input size (or --size) and preprocessed."""
    from npmobile.applications.common import preprocess_tf
    from npmobile.image import load_img

    height, width = (d or size for d in model.input_shape[1:3])
    if preprocess_for(model) == "torchvision":
        return load_torchvision_sized(path, height)[None]
    x = load_img(path, target_size=(height, width))[None].astype(np.float32)
    return preprocess_tf(x) if preprocess_for(model) == "tf" else x


def load_torchvision_sized(path, size: int, max_pixels: int | None = None) -> np.ndarray:
    """torchvision's preparation for a ``size`` crop: resized to 256/224 of it first (Resize(256), CenterCrop(224))."""
    from npmobile.image import load_torchvision

    return load_torchvision(path, crop_size=size, resize_size=round(size * 256 / 224), max_pixels=max_pixels)


def binary_head(model) -> str | None:
    """A model with one output unit is a binary classifier: "logits" when its output is a raw score (the
    transfer-learning tutorial's ``Dense(1)``), "probability" when a sigmoid ends it; None otherwise."""
    from npmobile.ops import layer_type

    output = model.graph.outputs[0]
    if model.shapes[output][-1] != 1 or len(model.shapes[output]) != 2:
        return None
    node = model.graph.node(output)
    activation = node.config.get("activation") if layer_type(node.op).activation else None
    return "probability" if activation == "sigmoid" else "logits"


def two_class_probabilities(model, out: np.ndarray) -> np.ndarray:
    """A binary head's output as the probabilities of classes 0 and 1: [1 - p, p], with p the sigmoid of
    a logit (float64, as a probability should be computed, then float32) or the model's own p."""
    p = out.astype(np.float64).reshape(len(out), 1)
    if binary_head(model) == "logits":
        p = 1.0 / (1.0 + np.exp(-p))
    return np.concatenate([1.0 - p, p], axis=1).astype(np.float32)
