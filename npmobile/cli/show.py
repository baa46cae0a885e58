"""``npmobile show``: one layer's feature maps (or a depthwise layer's kernels) as a PNG grid."""

from __future__ import annotations

import argparse

from npmobile.cli.models import TEACHING_EXAMPLES, add_model_options, positive_int, teaching_model
from npmobile.errors import NpmobileError
from npmobile.opening import model_input


def add_parser(commands):
    parser = commands.add_parser(
        "show", help="draw one layer's feature maps (or a depthwise layer's kernels) as a PNG grid",
        description="Run a model on one image and draw the output of one layer as a grid, one tile per "
                    "channel, each normalized to its own min..max; --filters draws a depthwise layer's "
                    "kernels instead (red positive, blue negative).",
        epilog=TEACHING_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", metavar="IMAGE", help="an image file")
    parser.add_argument("--layer", required=True, metavar="NAME", help="a Keras layer name, e.g. block_3_depthwise")
    parser.add_argument("--out", required=True, metavar="PNG", help="where to write the picture")
    parser.add_argument("--filters", action="store_true", help="draw the depthwise kernels instead of feature maps")
    parser.add_argument("--channels", type=positive_int, default=64, metavar="N",
                        help="draw the first N channels (default 64)")
    add_model_options(parser)
    return parser


def run(args) -> int:
    from npmobile import visualize

    model = teaching_model(args)
    try:
        node = model.graph.node(model.graph.resolve(args.layer))
    except KeyError as error:
        raise NpmobileError(str(error).strip("'\"")) from None
    if args.filters:
        if "depthwise_kernel" not in node.weights:
            raise NpmobileError(f"layer {args.layer!r} is a {node.op}, not a depthwise layer: --filters draws "
                                "depthwise kernels (try a layer named like block_3_depthwise or conv_dw_3)")
        kernel = node.weights["depthwise_kernel"]
        image = visualize.kernel_image(kernel, max_channels=args.channels)
        what = f"{min(args.channels, kernel.shape[2] * kernel.shape[3])} of {kernel.shape[2] * kernel.shape[3]} " \
               f"{kernel.shape[0]}x{kernel.shape[1]} depthwise filters"
    else:
        x = model_input(model, args.image, args.size)
        maps = model.predict(x, outputs=[args.layer])[args.layer]
        if maps.ndim != 4:
            raise NpmobileError(f"layer {args.layer!r} outputs shape {tuple(maps.shape)}, not feature maps "
                                "(choose a convolution, e.g. block_3_depthwise)")
        image = visualize.feature_map_image(maps[0], max_channels=args.channels)
        what = f"{min(args.channels, maps.shape[-1])} of {maps.shape[-1]} feature maps, " \
               f"{maps.shape[1]}x{maps.shape[2]} each"
    try:
        image.save(args.out)
    except (OSError, ValueError) as error:
        raise NpmobileError(f"{args.out}: cannot write the picture ({error})") from None
    print(f"wrote {args.out}: {what} of {args.layer} ({image.width}x{image.height} px)")
    return 0
