"""What the commands share: the model options, opening a model from a family name, a Keras file or
weights, and feeding it an image the way it wants its pixels."""

from __future__ import annotations

import argparse
import sys

from npmobile.isolation import DEFAULT_TIMEOUT
from npmobile.opening import family_model, open_model
from npmobile.weights.registry import FAMILIES

# The top-level command's examples (npmobile --help) and classify's.
EXAMPLES = """\
examples:
  npmobile classify samples/chelsea.jpg                 top-5 ImageNet classes (MobileNetV2, official weights)
  npmobile classify photos/ --model mobilenet_v3_large --top 3 --json > labels.json
  npmobile classify cat.png --weights my_finetuned.keras
  npmobile classify cat.png --weights best.pth --labels classes.txt   a PyTorch state dict (torchvision's way)
  npmobile classify cat.png --model mobilenet --alpha 0.5 --size 160 --crop center
  npmobile classify photos/ --engine ray --workers 4 --out preds.parquet   on Ray Data (or --engine dask)
  find photos -name '*.jpg' | npmobile classify --from-file - --out preds.jsonl   paths from standard input
  npmobile summary mobilenet_v3_small
  npmobile summary my_model.h5
  npmobile summary mobilenet_v2 --costs                 params and MACs per layer, depthwise vs standard conv
  npmobile profile cat.jpg --size 160 --plot time.png --roofline roofline.png
  npmobile show cat.jpg --layer block_3_depthwise --out maps.png
  npmobile show cat.jpg --layer block_3_depthwise --filters --out kernels.png
  npmobile verify my_model.h5 cat.jpg --custom-object hard_swish=hard_swish   npmobile vs Keras, layer by layer
  npmobile build-kernels                                compile the kernels ahead of time: faster start-up

weights="imagenet" files are looked for in $NPMOBILE_WEIGHTS_DIR, then the Keras cache (~/.keras/models),
then downloaded once into ~/.cache/npmobile (checksummed).
exit status: 0 ok, 1 failure (any image that could not be classified), 2 usage error, 130 interrupted (Ctrl-C).
"""

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


# The architecture options' defaults, filled in after parsing (settle_model_options) so that what the user
# typed is known: a whole-model file has its own architecture, and an option that contradicts it is refused.
MODEL_DEFAULTS = {"model": "mobilenet_v2", "alpha": 1.0, "size": 224, "minimalistic": False}


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=list(FAMILIES), default=None,
                        help="architecture (default mobilenet_v2); not with a whole-model file, which has its own")
    parser.add_argument("--alpha", type=float, default=None, help="width multiplier (default 1.0)")
    parser.add_argument("--size", type=positive_int, default=None,
                        help="input size in pixels (default 224); with a whole-model file, only for a model "
                             "that takes any size")
    parser.add_argument("--minimalistic", action="store_true", default=None, help="V3 minimalistic variant")
    parser.set_defaults(model_options=True)  # cli.main settles them after parsing (settle_model_options)
    parser.add_argument("--weights", metavar="PATH", default=None,
                        help="any Keras file npmobile reads: a whole model (.h5, .keras) or weights for --model "
                             "(.weights.h5, official .h5); or a PyTorch state dict (.pth, .safetensors) of a "
                             "torchvision MobileNetV2/V3, architecture read from the file, images prepared the "
                             "torchvision way (shorter side to 256 bilinear, center crop 224, ImageNet mean/std) "
                             "and the top-k a softmax over its logits; default: the official ImageNet weights")
    add_load_options(parser)
    add_custom_object_option(parser)


def settle_model_options(args: argparse.Namespace) -> None:
    """Record which architecture options were typed (``args.given_model_options``), then fill in defaults."""
    args.given_model_options = tuple(name for name in MODEL_DEFAULTS if getattr(args, name) is not None)
    for name, default in MODEL_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def teaching_model(args):
    """The model for profile/show: as classify opens it, plus ``--weights none`` for random weights."""
    if args.weights is not None and args.weights.lower() == "none":
        return family_model(args.model, args.alpha, args.size, args.minimalistic, None)
    return open_model(args.model, args.alpha, args.size, args.minimalistic, args.weights, args.load_timeout,
                      args.trusted, args.custom_objects, args.given_model_options)


def first_run_kernels(model) -> dict:
    """What ``model``'s plan compiles on its first run, as keyword arguments of kernels_cached
    (kernels/first_run.py): each step's record says its own; window sizes gathered, flags any of them."""
    from npmobile.ops import layer_type

    wanted = {"depthwise_sizes": (), "squeeze_excite": False, "rescaled_input": False, "expand_depthwise_sizes": ()}
    for node in model.optimized_graph().nodes:
        for key, value in layer_type(node.op).first_run_kernels(node).items():
            wanted[key] = tuple(sorted({*wanted[key], *value})) if isinstance(value, tuple) else wanted[key] or value
    return wanted


def notice_first_compile(model) -> None:
    """Say so when ``model``'s kernels are about to be compiled (first run after install: about 13 s for MobileNetV2);
    afterwards Numba loads them from its cache in milliseconds."""
    from npmobile.kernels.first_run import kernels_cached

    if not kernels_cached(**first_run_kernels(model)):
        print("npmobile: compiling kernels (first run only, about 15 s)...", file=sys.stderr)
