"""The command line: ``python -m npmobile classify|summary|profile|show ...`` (also installed as ``npmobile``).

Expected failures (a bad file, a missing weights file, an unreadable image) print one line to stderr
and exit 1; usage errors exit 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from npmobile.errors import NpmobileError

FAMILIES = {
    "mobilenet": "MobileNet",
    "mobilenet_v2": "MobileNetV2",
    "mobilenet_v3_small": "MobileNetV3Small",
    "mobilenet_v3_large": "MobileNetV3Large",
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
BATCH = 16

EXAMPLES = """\
examples:
  npmobile classify samples/chelsea.jpg                 top-5 ImageNet classes (MobileNetV2, official weights)
  npmobile classify photos/ --model mobilenet_v3_large --top 3 --json > labels.json
  npmobile classify cat.png --weights my_finetuned.keras
  npmobile classify cat.png --model mobilenet --alpha 0.5 --size 160 --crop center
  npmobile summary mobilenet_v3_small
  npmobile summary my_model.h5
  npmobile summary mobilenet_v2 --costs                 params and MACs per layer, depthwise vs standard conv
  npmobile profile cat.jpg --size 160 --plot time.png --roofline roofline.png
  npmobile show cat.jpg --layer block_3_depthwise --out maps.png
  npmobile show cat.jpg --layer block_3_depthwise --filters --out kernels.png

weights="imagenet" files are looked for in $NPMOBILE_WEIGHTS_DIR, then the Keras cache (~/.keras/models),
then downloaded once into ~/.cache/npmobile (checksummed).
exit status: 0 ok, 1 failure (any image that could not be classified), 2 usage error.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npmobile",
        description="Run MobileNet V1/V2/V3 on the CPU without TensorFlow; reads Keras files.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    classify = commands.add_parser(
        "classify", help="classify images with an ImageNet MobileNet or your own Keras model",
        description="Classify images (files or folders). Prints rank, label, WordNet id and probability.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    classify.add_argument("images", nargs="+", metavar="IMAGE|DIR", help="image files and/or folders of images")
    _add_model_options(classify)
    classify.add_argument("--top", type=_positive_int, default=5, metavar="K", help="how many classes (default 5)")
    classify.add_argument("--json", action="store_true", help="print JSON: per image its path and top-K list")
    classify.add_argument("--interpolation", default="nearest",
                          choices=["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"],
                          help="resize filter, as keras.utils.load_img (default nearest, Keras's default)")
    classify.add_argument("--crop", choices=["none", "center"], default="none",
                          help="center: keep the central 87.5%% before resizing (the published evaluations do)")
    classify.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                          help="CPU threads (default: all cores, or NUMBA_NUM_THREADS)")
    classify.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    summary = commands.add_parser(
        "summary", help="print a model as a Keras-like table",
        description="Print a model's layers, output shapes and parameter counts.",
    )
    summary.add_argument("model", metavar="MODEL",
                         help="a Keras file (.h5, .keras) or a family name: " + ", ".join(FAMILIES))
    summary.add_argument("--alpha", type=float, default=1.0, help="width multiplier for a family name")
    summary.add_argument("--size", type=_positive_int, default=224, help="input size for a family name")
    summary.add_argument("--minimalistic", action="store_true", help="V3 minimalistic variant")
    summary.add_argument("--costs", action="store_true",
                         help="params and MACs per layer, subtotals per block part, and what each depthwise "
                              "layer saves against a standard convolution (a file with an unknown input size "
                              "is counted at --size)")
    summary.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _add_teaching_parsers(commands)
    return parser


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


def _add_teaching_parsers(commands) -> None:
    profile = commands.add_parser(
        "profile", help="time each layer and explain it with FLOPs, bytes moved and a measured roofline",
        description="Run a model on one image and print, per step of the optimized plan, its time, GFLOP/s, "
                    "bytes moved and arithmetic intensity, against this machine's measured balance "
                    "(peak GFLOP/s / memory GB/s): which layers are memory-bound and which compute-bound.",
        epilog=TEACHING_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    profile.add_argument("image", metavar="IMAGE", help="an image file")
    _add_model_options(profile)
    profile.add_argument("--repeats", type=_positive_int, default=5, metavar="N",
                         help="timed runs after one warm-up; the median is shown (default 5)")
    profile.add_argument("--plot", metavar="PNG", help="write a bar chart of time per layer (needs matplotlib)")
    profile.add_argument("--roofline", metavar="PNG", help="write a roofline chart (needs matplotlib)")
    profile.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    show = commands.add_parser(
        "show", help="draw one layer's feature maps (or a depthwise layer's kernels) as a PNG grid",
        description="Run a model on one image and draw the output of one layer as a grid, one tile per "
                    "channel, each normalized to its own min..max; --filters draws a depthwise layer's "
                    "kernels instead (red positive, blue negative).",
        epilog=TEACHING_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("image", metavar="IMAGE", help="an image file")
    show.add_argument("--layer", required=True, metavar="NAME", help="a Keras layer name, e.g. block_3_depthwise")
    show.add_argument("--out", required=True, metavar="PNG", help="where to write the picture")
    show.add_argument("--filters", action="store_true", help="draw the depthwise kernels instead of feature maps")
    show.add_argument("--channels", type=_positive_int, default=64, metavar="N",
                      help="draw the first N channels (default 64)")
    _add_model_options(show)
    show.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=list(FAMILIES), default="mobilenet_v2",
                        help="architecture (default mobilenet_v2)")
    parser.add_argument("--alpha", type=float, default=1.0, help="width multiplier (default 1.0)")
    parser.add_argument("--size", type=_positive_int, default=224, help="input size in pixels (default 224)")
    parser.add_argument("--minimalistic", action="store_true", help="V3 minimalistic variant")
    parser.add_argument("--weights", metavar="PATH", default=None,
                        help="any Keras file npmobile reads: a whole model (.h5, .keras) or weights for --model "
                             "(.weights.h5, official .h5); default: the official ImageNet weights")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def open_model(family: str, alpha: float, size: int, minimalistic: bool, weights: str | None):
    """A model for the CLI: a whole Keras model from ``weights`` if the file holds one, otherwise the
    ``family`` architecture with ``weights`` (a weights file, or the official ImageNet weights)."""
    import npmobile
    from npmobile import applications

    if weights is not None:
        if not Path(weights).is_file():
            raise NpmobileError(f"{weights}: no such file")
        try:
            return npmobile.load_model(weights)
        except npmobile.ModelFileError as whole_model_error:
            try:
                return _family_model(applications, family, alpha, size, minimalistic, weights)
            except NpmobileError:
                raise whole_model_error from None
    return _family_model(applications, family, alpha, size, minimalistic, "imagenet")


def _family_model(applications, family: str, alpha: float, size: int, minimalistic: bool, weights):
    kwargs = {"alpha": alpha, "weights": weights}
    if family.startswith("mobilenet_v3"):
        kwargs["minimalistic"] = minimalistic
    if weights is None or weights != "imagenet" or size != 224 or family.startswith("mobilenet_v3"):
        kwargs["input_shape"] = (size, size, 3)
    return getattr(applications, FAMILIES[family])(**kwargs)


def preprocess_for(model) -> str:
    """How a model wants its pixels: MobileNetV3 graphs start with a Rescaling layer and take 0..255;
    V1/V2 take x / 127.5 - 1."""
    first = next(n for n in model.graph.nodes if n.op != "InputLayer")
    return "none" if first.op == "Rescaling" else "tf"


# --------------------------------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------------------------------


def find_images(paths: Sequence[str]) -> Iterator[Path]:
    """Files as given; folders expanded to the images in them (sorted, not recursive)."""
    for text in paths:
        path = Path(text)
        if path.is_dir():
            yield from sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield path


class Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal and there is enough work."""

    def __init__(self, total: int, label: str, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.label, self.done = total, label, 0
        self.enabled = total > 1 and hasattr(self.stream, "isatty") and self.stream.isatty()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.enabled:
            width = 30
            filled = int(width * self.done / max(self.total, 1))
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
            if self.done >= self.total:
                self.stream.write("\n")
            self.stream.flush()


def classify(args) -> int:
    from npmobile.applications.common import preprocess_tf
    from npmobile.image import load_img

    images = list(find_images(args.images))
    if not images:
        raise NpmobileError(f"no images found in {', '.join(args.images)}")
    model = open_model(args.model, args.alpha, args.size, args.minimalistic, args.weights)
    height, width = (d or args.size for d in model.input_shape[1:3])
    mode = preprocess_for(model)

    results: list[dict] = []
    failed = 0
    progress = Progress(len(images), "classifying")
    for start in range(0, len(images), BATCH):
        chunk, batch = [], []
        for path in images[start : start + BATCH]:
            try:
                batch.append(load_img(path, target_size=(height, width), interpolation=args.interpolation,
                                      crop=None if args.crop == "none" else args.crop))
                chunk.append(path)
            except NpmobileError as error:
                failed += 1
                print(f"npmobile: {error}", file=sys.stderr)
                results.append({"path": str(path), "error": str(error)})
        if batch:
            x = np.stack(batch)
            if start == 0:
                notice_first_compile()
            probs = model.predict(preprocess_tf(x) if mode == "tf" else x, threads=args.threads)
            for path, p in zip(chunk, np.asarray(probs).reshape(len(chunk), -1)):
                results.append({"path": str(path), "top": top_classes(p, args.top)})
        progress.advance(len(images[start : start + BATCH]))

    order = {str(p): i for i, p in enumerate(images)}
    results.sort(key=lambda r: order[r["path"]])
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_results([r for r in results if "top" in r])
    return 1 if failed else 0


def notice_first_compile() -> None:
    """Say so when the kernels are about to be compiled (first run after install: ~10-30 s);
    afterwards Numba loads them from its cache in milliseconds."""
    from npmobile.kernels.threads import kernels_cached

    if not kernels_cached():
        print("npmobile: compiling kernels (first run only, about half a minute)...", file=sys.stderr)


def top_classes(probabilities: np.ndarray, k: int) -> list[dict]:
    """The k most likely classes with ImageNet labels when there are 1000 classes, indices otherwise."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    if probabilities.shape[0] == 1000:
        from npmobile.applications.imagenet_utils import decode_predictions

        decoded = decode_predictions(probabilities[None], top=k)[0]
        return [{"rank": i + 1, "wnid": wnid, "label": label, "probability": float(p)}
                for i, (wnid, label, p) in enumerate(decoded)]
    return [{"rank": i + 1, "wnid": None, "label": f"class {c}", "probability": float(probabilities[c])}
            for i, c in enumerate(order)]


def print_results(results: list[dict]) -> None:
    for n, result in enumerate(results):
        if n:
            print()
        print(result["path"])
        for entry in result["top"]:
            wnid = entry["wnid"] or "-"
            print(f"  {entry['rank']:>2}. {entry['label']:<28} {wnid:<10} {entry['probability']:.4f}")


# --------------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------------


def summary(args) -> int:
    import npmobile
    from npmobile import applications

    if args.model in FAMILIES:
        model = _family_model(applications, args.model, args.alpha, args.size, args.minimalistic, None)
    else:
        model = npmobile.load_model(args.model)
    if args.costs:
        print(costs_report(model, args.size))
    else:
        print(model.summary_text())
    return 0


def costs_report(model, size: int) -> str:
    from npmobile import costs

    unknown = any(d is None for d in model.input_shape[1:3])
    table = costs.costs_text(model, costs.layer_costs(model, input_size=size if unknown else None))
    if unknown:
        table = f"(the model takes any input size; counted at {size}x{size})\n" + table
    return table


# --------------------------------------------------------------------------------------------------
# profile and show
# --------------------------------------------------------------------------------------------------


def _teaching_model(args):
    """The model for profile/show: as classify opens it, plus ``--weights none`` for random weights."""
    from npmobile import applications

    if args.weights is not None and args.weights.lower() == "none":
        return _family_model(applications, args.model, args.alpha, args.size, args.minimalistic, None)
    return open_model(args.model, args.alpha, args.size, args.minimalistic, args.weights)


def _model_input(model, path: str, size: int) -> np.ndarray:
    """One image as the model wants it: resized to its input size (or --size) and preprocessed."""
    from npmobile.applications.common import preprocess_tf
    from npmobile.image import load_img

    height, width = (d or size for d in model.input_shape[1:3])
    x = load_img(path, target_size=(height, width))[None].astype(np.float32)
    return preprocess_tf(x) if preprocess_for(model) == "tf" else x


def profile(args) -> int:
    from npmobile import applications, profiling

    model = _teaching_model(args)
    x = _model_input(model, args.image, args.size)
    # Probe the machine before the model runs, so neither measurement disturbs the other.
    machine = profiling.measure_machine()
    rows = model.profile(x, repeats=args.repeats)
    steps = profiling.profile_steps(model, rows, x.shape)
    v1 = applications.MobileNet(weights=None, input_shape=(x.shape[1], x.shape[2], 3))
    print(profiling.profile_text(model, steps, machine, args.image, x.shape, args.repeats,
                                 profiling.bytes_per_mac(v1, x.shape[1:3])))
    if args.plot or args.roofline:
        from npmobile import visualize

        title = f"{model.name}, {x.shape[1]}x{x.shape[2]}"
        if args.plot:
            visualize.plot_times(steps, args.plot, title=f"time per layer: {title}")
            print(f"wrote {args.plot}")
        if args.roofline:
            visualize.plot_roofline(steps, machine, args.roofline, title=f"roofline: {title}")
            print(f"wrote {args.roofline}")
    return 0


def show(args) -> int:
    from npmobile import visualize

    model = _teaching_model(args)
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
        x = _model_input(model, args.image, args.size)
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


# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"classify": classify, "summary": summary, "profile": profile, "show": show}
    try:
        return handlers[args.command](args)
    except NpmobileError as error:
        if args.debug:
            raise
        print(f"npmobile: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
