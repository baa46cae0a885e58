"""What the commands share: the model options, opening a model from a family name, a Keras file or
weights, and feeding it an image the way it wants its pixels."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from npmobile.errors import NpmobileError
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
                             "(.weights.h5, official .h5); default: the official ImageNet weights")
    add_custom_object_option(parser)


def open_model(family: str, alpha: float, size: int, minimalistic: bool, weights: str | None,
               custom_objects: list[tuple[str, str]] | None = None):
    """A model for the CLI: a whole Keras model from ``weights`` if the file holds one, otherwise the
    ``family`` architecture with ``weights`` (a weights file, or the official ImageNet weights)."""
    import npmobile
    from npmobile.errors import WeightsOnlyFileError

    if weights is not None:
        if not Path(weights).is_file():
            raise NpmobileError(f"{weights}: no such file")
        try:
            return npmobile.load_model(weights, custom_objects=dict(custom_objects or ()))
        except WeightsOnlyFileError:  # what fits the architecture is the question, and its answer the message
            return family_model(family, alpha, size, minimalistic, weights)
        except npmobile.ModelFileError as whole_model_error:
            try:
                return family_model(family, alpha, size, minimalistic, weights)
            except NpmobileError:
                raise whole_model_error from None
    return family_model(family, alpha, size, minimalistic, "imagenet")


def family_model(family: str, alpha: float, size: int, minimalistic: bool, weights):
    """The ``family`` architecture (a name from weights.registry.FAMILIES) with ``weights``."""
    from npmobile import applications

    kwargs = {"alpha": alpha, "weights": weights}
    if family.startswith("mobilenet_v3"):
        kwargs["minimalistic"] = minimalistic
    if weights is None or weights != "imagenet" or size != 224 or family.startswith("mobilenet_v3"):
        kwargs["input_shape"] = (size, size, 3)
    return applications.FAMILIES[family](**kwargs)


def teaching_model(args):
    """The model for profile/show: as classify opens it, plus ``--weights none`` for random weights."""
    if args.weights is not None and args.weights.lower() == "none":
        return family_model(args.model, args.alpha, args.size, args.minimalistic, None)
    return open_model(args.model, args.alpha, args.size, args.minimalistic, args.weights, args.custom_objects)


def preprocess_for(model) -> str:
    """How a model wants its pixels: MobileNetV3 graphs start with a Rescaling layer and take 0..255;
    V1/V2 take x / 127.5 - 1."""
    first = next(n for n in model.graph.nodes if n.op != "InputLayer")
    return "none" if first.op == "Rescaling" else "tf"


def model_input(model, path: str, size: int) -> np.ndarray:
    """One image as the model wants it: resized to its input size (or --size) and preprocessed."""
    from npmobile.applications.common import preprocess_tf
    from npmobile.image import load_img

    height, width = (d or size for d in model.input_shape[1:3])
    x = load_img(path, target_size=(height, width))[None].astype(np.float32)
    return preprocess_tf(x) if preprocess_for(model) == "tf" else x


def notice_first_compile() -> None:
    """Say so when the kernels are about to be compiled (first run after install: ~10-30 s);
    afterwards Numba loads them from its cache in milliseconds."""
    from npmobile.kernels.threads import kernels_cached

    if not kernels_cached():
        print("npmobile: compiling kernels (first run only, about half a minute)...", file=sys.stderr)
