"""``npmobile classify``: top-K ImageNet classes (or your own model's classes) for image files and folders."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from npmobile.cli.models import add_model_options, notice_first_compile, open_model, positive_int, preprocess_for
from npmobile.errors import NpmobileError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
BATCH = 16


def add_parser(commands) -> argparse.ArgumentParser:
    from npmobile.cli import EXAMPLES

    parser = commands.add_parser(
        "classify", help="classify images with an ImageNet MobileNet or your own Keras model",
        description="Classify images (files or folders). Prints rank, label, WordNet id and probability.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE|DIR", help="image files and/or folders of images")
    add_model_options(parser)
    parser.add_argument("--top", type=positive_int, default=5, metavar="K", help="how many classes (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON: per image its path and top-K list")
    parser.add_argument("--interpolation", default="nearest",
                        choices=["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"],
                        help="resize filter, as keras.utils.load_img (default nearest, Keras's default)")
    parser.add_argument("--crop", choices=["none", "center"], default="none",
                        help="center: keep the central 87.5%% before resizing (the published evaluations do)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads (default: all cores, or NUMBA_NUM_THREADS)")
    return parser


def find_images(paths: Sequence[str]) -> Iterator[Path]:
    """Files as given; folders expanded to the images in them (sorted, not recursive)."""
    for text in paths:
        path = Path(text)
        if path.is_dir():
            yield from sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            yield path


def progress_bar(total: int, label: str):
    """tqdm's bar on stderr, drawn only when stderr is a terminal and there is more than one image."""
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="img", file=sys.stderr, leave=True,
                disable=total <= 1 or not sys.stderr.isatty())


def run(args) -> int:
    from npmobile.applications.common import preprocess_tf
    from npmobile.image import load_img

    images = list(find_images(args.images))
    if not images:
        raise NpmobileError(f"no images found in {', '.join(args.images)}")
    model = open_model(args.model, args.alpha, args.size, args.minimalistic, args.weights, args.load_timeout,
                       args.trusted, args.custom_objects)
    height, width = (d or args.size for d in model.input_shape[1:3])
    mode = preprocess_for(model)

    results: list[dict] = []
    failed = 0
    with progress_bar(len(images), "classifying") as progress:
        for start in range(0, len(images), BATCH):
            chunk, batch = [], []
            for path in images[start : start + BATCH]:
                try:
                    batch.append(load_img(path, target_size=(height, width), interpolation=args.interpolation,
                                          crop=None if args.crop == "none" else args.crop))
                    chunk.append(path)
                except NpmobileError as error:
                    failed += 1
                    progress.write(f"npmobile: {error}", file=sys.stderr)
                    results.append({"path": str(path), "error": str(error)})
            if batch:
                x = np.stack(batch)
                if start == 0:
                    notice_first_compile()
                probs = model.predict(preprocess_tf(x) if mode == "tf" else x, threads=args.threads)
                for path, p in zip(chunk, np.asarray(probs).reshape(len(chunk), -1)):
                    results.append({"path": str(path), "top": top_classes(p, args.top)})
            progress.update(len(images[start : start + BATCH]))

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
