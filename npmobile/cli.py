"""The command line: ``python -m npmobile classify|summary ...`` (also installed as ``npmobile``).

Expected failures (a bad file, a missing weights file, an unreadable image) print one line to stderr
and exit 1; usage errors exit 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
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
    classify.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    summary = commands.add_parser(
        "summary", help="print a model as a Keras-like table",
        description="Print a model's layers, output shapes and parameter counts.",
    )
    summary.add_argument("model", metavar="MODEL",
                         help="a Keras file (.h5, .keras) or a family name: " + ", ".join(FAMILIES))
    summary.add_argument("--alpha", type=float, default=1.0, help="width multiplier for a family name")
    summary.add_argument("--size", type=_positive_int, default=224, help="input size for a family name")
    summary.add_argument("--minimalistic", action="store_true", help="V3 minimalistic variant")
    summary.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


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

    if args.threads:
        os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
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
            probs = model.predict(preprocess_tf(x) if mode == "tf" else x)
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
    print(model.summary_text())
    return 0


# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"classify": classify, "summary": summary}
    try:
        return handlers[args.command](args)
    except NpmobileError as error:
        if args.debug:
            raise
        print(f"npmobile: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
