"""What the commands share: the model options, opening a model from a family name, a Keras file or
weights, and feeding it an image the way it wants its pixels."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from npmobile.errors import NpmobileError
from npmobile.isolation import DEFAULT_TIMEOUT
from npmobile.weights.registry import FAMILIES

TEACHING_EXAMPLES = """\
examples:
  npmobile profile cat.jpg                                  MobileNetV2 at 224, official weights
  npmobile profile cat.jpg --model mobilenet --weights none --size 160 --repeats 10
  npmobile profile cat.jpg --weights finetuned.keras --plot time.png --roofline roofline.png
  npmobile show cat.jpg --layer block_3_depthwise --out maps.png
  npmobile show cat.jpg --model mobilenet_v3_small --layer expanded_conv_1_depthwise --filters --out k.png

--weights none runs the architecture with random weights (times do not depend on weights; feature maps do).
exit status: 0 ok, 1 failure, 2 usage error.
"""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def add_load_options(parser: argparse.ArgumentParser) -> None:
    """How a model file is read: in a child process with a time limit (a hostile file cannot hang or crash
    the command), or, for a file the user trusts, in the command's own process."""
    parser.add_argument("--load-timeout", type=positive_seconds, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="give up reading a model file after this long: a corrupt or hostile file fails "
                             f"instead of hanging (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--trusted", action="store_true",
                        help="read the model file in this process, without the time and memory limits "
                             "(a faster start; only for files you trust)")


def custom_object(text: str) -> tuple[str, str]:
    """``--custom-object NAME=BUILTIN``: a custom function in the file, and the built-in it computes."""
    name, sep, builtin = text.partition("=")
    if not sep or not name or not builtin:
        raise argparse.ArgumentTypeError(f"expected NAME=BUILTIN (e.g. hard_swish=hard_swish), got {text!r}")
    return name, builtin


def add_custom_object_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--custom-object", dest="custom_objects", metavar="NAME=BUILTIN", type=custom_object,
                        action="append", default=[],
                        help="your own activation function NAME in the file computes the built-in BUILTIN "
                             "(e.g. hard_swish=hard_swish, my_act=relu6); repeatable. Nothing in the file is run")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=list(FAMILIES), default="mobilenet_v2",
                        help="architecture (default mobilenet_v2)")
    parser.add_argument("--alpha", type=float, default=1.0, help="width multiplier (default 1.0)")
    parser.add_argument("--size", type=positive_int, default=224, help="input size in pixels (default 224)")
    parser.add_argument("--minimalistic", action="store_true", help="V3 minimalistic variant")
    parser.add_argument("--weights", metavar="PATH", default=None,
                        help="any Keras file npmobile reads: a whole model (.h5, .keras) or weights for --model "
                             "(.weights.h5, official .h5); or a PyTorch state dict (.pth, .safetensors) of a "
                             "torchvision MobileNetV2/V3, architecture read from the file, images prepared the "
                             "torchvision way (shorter side to 256 bilinear, center crop 224, ImageNet mean/std) "
                             "and the top-k a softmax over its logits; default: the official ImageNet weights")
    add_load_options(parser)
    add_custom_object_option(parser)


def open_model(family: str, alpha: float, size: int, minimalistic: bool, weights: str | None,
               timeout: float | None = DEFAULT_TIMEOUT, trusted: bool = False,
               custom_objects: list[tuple[str, str]] | None = None):
    """A model for the CLI: a whole Keras model from ``weights`` if the file holds one, otherwise the
    ``family`` architecture with ``weights`` (a weights file, or the official ImageNet weights).

    The file is read once (one child process, see npmobile.isolation), and what it holds decides."""
    if weights is None:
        return family_model(family, alpha, size, minimalistic, "imagenet", timeout, trusted)
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
        return Model(Graph.from_spec(contents))
    if isinstance(contents, StateDict):  # PyTorch: the architecture is read from the tensors
        from npmobile.applications.torchvision import model_from_state_dict

        return model_from_state_dict(contents)
    if isinstance(contents.model_error, WeightsOnlyFileError):
        # Weights and no architecture: whether they fit --model is the question, and its answer the message.
        return family_model(family, alpha, size, minimalistic, contents)
    try:
        return family_model(family, alpha, size, minimalistic, contents)
    except NpmobileError:
        raise contents.model_error from None


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


def teaching_model(args):
    """The model for profile/show: as classify opens it, plus ``--weights none`` for random weights."""
    if args.weights is not None and args.weights.lower() == "none":
        return family_model(args.model, args.alpha, args.size, args.minimalistic, None)
    return open_model(args.model, args.alpha, args.size, args.minimalistic, args.weights, args.load_timeout,
                      args.trusted, args.custom_objects)


def preprocess_for(model) -> str:
    """How a model wants its pixels: "torchvision" for PyTorch state dicts (npmobile.image.load_torchvision);
    MobileNetV3 graphs start with a Rescaling layer and take 0..255; V1/V2 take x / 127.5 - 1."""
    if getattr(model, "preprocessing", None) == "torchvision":
        return "torchvision"
    first = next(n for n in model.graph.nodes if n.op != "InputLayer")
    return "none" if first.op == "Rescaling" else "tf"


def model_input(model, path: str, size: int) -> np.ndarray:
    """One image as the model wants it: resized to its input size (or --size) and preprocessed."""
    from npmobile.applications.common import preprocess_tf
    from npmobile.image import load_img

    height, width = (d or size for d in model.input_shape[1:3])
    if preprocess_for(model) == "torchvision":
        return load_torchvision_sized(path, height)[None]
    x = load_img(path, target_size=(height, width))[None].astype(np.float32)
    return preprocess_tf(x) if preprocess_for(model) == "tf" else x


def load_torchvision_sized(path, size: int) -> np.ndarray:
    """torchvision's preparation for a ``size`` crop: resized to 256/224 of it first (Resize(256), CenterCrop(224))."""
    from npmobile.image import load_torchvision

    return load_torchvision(path, crop_size=size, resize_size=round(size * 256 / 224))


def notice_first_compile() -> None:
    """Say so when the kernels are about to be compiled (first run after install: ~10-30 s);
    afterwards Numba loads them from its cache in milliseconds."""
    from npmobile.kernels.threads import kernels_cached

    if not kernels_cached():
        print("npmobile: compiling kernels (first run only, about half a minute)...", file=sys.stderr)
