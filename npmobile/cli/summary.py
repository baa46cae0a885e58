"""``npmobile summary``: a model as a Keras-like table, or with ``--costs`` its params and MACs per layer."""

from __future__ import annotations

from pathlib import Path

from npmobile.cli.models import add_custom_object_option, add_load_options, positive_int
from npmobile.errors import UsageError
from npmobile.opening import family_model
from npmobile.weights.registry import FAMILIES


def add_parser(commands):
    parser = commands.add_parser(
        "summary", help="print a model as a Keras-like table",
        description="Print a model's layers, output shapes and parameter counts.",
    )
    parser.add_argument("model", metavar="MODEL",
                        help="a Keras file (.h5, .keras), a PyTorch state dict of a torchvision MobileNetV2/V3 "
                             "(.pth, .safetensors) or a family name: " + ", ".join(FAMILIES))
    parser.add_argument("--alpha", type=float, default=1.0, help="width multiplier for a family name")
    parser.add_argument("--size", type=positive_int, default=224, help="input size for a family name")
    parser.add_argument("--minimalistic", action="store_true", help="V3 minimalistic variant")
    parser.add_argument("--costs", action="store_true",
                        help="params and MACs per layer, subtotals per block part, and what each depthwise "
                             "layer saves against a standard convolution (a file with an unknown input size "
                             "is counted at --size)")
    add_load_options(parser)
    add_custom_object_option(parser)
    return parser


def run(args) -> int:
    import npmobile

    if args.model in FAMILIES:
        model = family_model(args.model, args.alpha, args.size, args.minimalistic, None)
    elif not Path(args.model).exists() and not Path(args.model).suffix:
        raise UsageError(unknown_family(args.model))
    else:
        model = npmobile.load_model(args.model, custom_objects=dict(args.custom_objects), timeout=args.load_timeout,
                                    trusted=args.trusted)
    if args.costs:
        print(costs_report(model, args.size))
    else:
        print(model.summary_text())
    return 0


def unknown_family(name: str) -> str:
    """The line for a model name that is neither a file nor a family: the families, and the closest."""
    import difflib

    close = difflib.get_close_matches(name.lower(), FAMILIES, n=2, cutoff=0.6)
    return (f"{name}: no such file, and not a model family npmobile builds ({', '.join(FAMILIES)})"
            + (f"; did you mean {' or '.join(close)}?" if close else ""))


def costs_report(model, size: int) -> str:
    from npmobile import costs

    unknown = any(d is None for d in model.input_shape[1:3])
    table = costs.costs_text(model, costs.layer_costs(model, input_size=size if unknown else None))
    if unknown:
        table = f"(the model takes any input size; counted at {size}x{size})\n" + table
    return table
