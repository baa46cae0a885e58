"""``npmobile show``: one layer's feature maps (or a depthwise layer's kernels) as a labelled PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from npmobile.cli.models import TEACHING_EXAMPLES, add_model_options, positive_int, teaching_model
from npmobile.errors import NpmobileError
from npmobile.opening import model_input


def add_parser(commands):
    parser = commands.add_parser(
        "show", help="draw one layer's feature maps (or a depthwise layer's kernels) as a labelled PNG",
        description="Run a model on one image and draw the output of one layer: the input image, then one "
                    "tile per channel (numbered as in the layer) on one colour scale, drawn as a colour bar "
                    "(red positive, white zero, blue negative when the values take both signs; viridis "
                    "otherwise); constant maps are crossed out. --filters draws a depthwise layer's kernels "
                    "instead.",
        epilog=TEACHING_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", metavar="IMAGE", help="an image file")
    parser.add_argument("--layer", required=True, metavar="NAME", help="a Keras layer name, e.g. block_3_depthwise")
    parser.add_argument("--out", required=True, metavar="PNG", help="where to write the picture")
    parser.add_argument("--filters", action="store_true", help="draw the depthwise kernels instead of feature maps")
    parser.add_argument("--channels", type=positive_int, default=64, metavar="N",
                        help="draw the first N channels (default 64)")
    parser.add_argument("--scale", choices=("shared", "channel"), default="shared",
                        help="shared: one colour scale for every tile (default); channel: each tile on its own "
                             "min..max, written under it (shows the pattern of quiet channels)")
    add_model_options(parser)
    return parser


def find_node(model, layer: str):
    """The graph node of the Keras layer ``layer``; an unknown name suggests the closest ones."""
    try:
        return model.graph.node(model.graph.resolve(layer))
    except KeyError as error:
        raise NpmobileError(str(error).strip("'\"")) from None


def input_picture(path: str, shape: tuple) -> np.ndarray:
    """The image as the model saw it (resized to its input size), RGB uint8, for the figure."""
    from npmobile.image import load_img

    return load_img(path, target_size=shape).round().astype(np.uint8)


def run(args) -> int:
    from npmobile import visualize

    model = teaching_model(args)
    node = find_node(model, args.layer)
    random = args.weights is not None and args.weights.lower() == "none"
    context = f"model {model.name}" + (" with random weights" if random else "") + f", image {Path(args.image).name}"
    per_tile = args.scale == "channel"
    if args.filters:
        if "depthwise_kernel" not in node.weights:
            raise NpmobileError(f"layer {args.layer!r} is a {node.op}, not a depthwise layer: --filters draws "
                                "depthwise kernels (try a layer named like block_3_depthwise or conv_dw_3)")
        kernel = node.weights["depthwise_kernel"]
        figure = visualize.kernel_figure(kernel, args.layer, args.channels, per_tile, context.split(", image")[0])
        what = f"{min(args.channels, kernel.shape[2] * kernel.shape[3])} of {kernel.shape[2] * kernel.shape[3]} " \
               f"{kernel.shape[0]}x{kernel.shape[1]} depthwise filters"
    else:
        x = model_input(model, args.image, args.size)
        maps = model.predict(x, outputs=[args.layer])[args.layer]
        if maps.ndim != 4:
            raise NpmobileError(f"layer {args.layer!r} outputs shape {tuple(maps.shape)}, not feature maps "
                                "(choose a convolution, e.g. block_3_depthwise)")
        figure = visualize.feature_map_figure(maps[0], args.layer, node.op, args.channels,
                                              input_picture(args.image, x.shape[1:3]), per_tile, context)
        what = f"{min(args.channels, maps.shape[-1])} of {maps.shape[-1]} feature maps, " \
               f"{maps.shape[1]}x{maps.shape[2]} each"
    try:
        figure.image.save(args.out)
    except (OSError, ValueError) as error:
        raise NpmobileError(f"{args.out}: cannot write the picture ({error})") from None
    print(f"wrote {args.out}: {what} of {args.layer} ({figure.image.width}x{figure.image.height} px)")
    return 0
