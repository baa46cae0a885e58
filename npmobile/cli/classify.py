"""``npmobile classify``: top-K ImageNet classes (or your own model's classes) for image files and folders."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from importlib import import_module
from pathlib import Path

from npmobile.cli.models import add_model_options, notice_first_compile, positive_int
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
    parser.add_argument("--labels", metavar="FILE",
                        help="class names, one per line in class order (a fine-tuned model's classes); "
                             "default: ImageNet's for 1000 classes, class numbers otherwise")
    parser.add_argument("--interpolation", default="nearest",
                        choices=["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"],
                        help="resize filter, as keras.utils.load_img (default nearest, Keras's default; "
                             "PyTorch weights always use torchvision's bilinear resize and crop)")
    parser.add_argument("--crop", choices=["none", "center"], default="none",
                        help="center: keep the central 87.5%% before resizing (the published evaluations do)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads, 1 to the CPUs this process may use (default: all of them: its "
                             "affinity mask, capped by its cgroup CPU quota rounded up; or NUMBA_NUM_THREADS "
                             "when set); more is refused. With --engine, per worker")
    parser.add_argument("--output", choices=["top", "probabilities", "features"], default="top",
                        help="top: the top-K classes (default); probabilities: the whole output row; "
                             "features: the global average pooling's output, an embedding (needs --json or --out)")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="also write the results to FILE: .parquet or .jsonl (JSON lines), one row per image")
    cluster = parser.add_argument_group("cluster", "run on Ray or Dask (pip install 'npmobile[ray]' or '[dask]')")
    cluster.add_argument("--engine", choices=["ray", "dask"], default=None,
                         help="classify on a Ray Data or Dask cluster; the answers are the same as without")
    cluster.add_argument("--address", default=None,
                         help="the cluster to join (ray://host:10001 or auto; tcp://scheduler:8786); "
                              "default: start a local cluster on this machine for this run")
    cluster.add_argument("--workers", type=positive_int, default=None, metavar="N",
                         help="Ray actors, or the worker processes of a local Dask cluster (a Dask cluster "
                              "at --address keeps its own); default: the CPUs / --threads")
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
    from npmobile.batch import BatchClassifier, ModelRef, output_format

    images = [str(p) for p in find_images(args.images)]
    if not images:
        raise NpmobileError(f"no images found in {', '.join(args.images)}")
    if args.engine is None and (args.address or args.workers):
        raise NpmobileError("--address and --workers need --engine ray or --engine dask")
    if args.threads is not None and args.address is None:  # a cluster elsewhere: its workers check their own
        from npmobile.kernels import cpus

        cpus.checked_thread_count(args.threads, cpus.default_thread_count())
    if args.output != "top" and not (args.json or args.out):
        raise NpmobileError(f"--output {args.output} needs --json or --out: its values are for programs")
    if args.out:
        output_format(args.out)  # a wrong suffix fails now, not after the work
    classifier = BatchClassifier(
        ModelRef(args.model, args.weights, args.alpha, args.size, args.minimalistic, args.load_timeout,
                 args.trusted, tuple(args.custom_objects)), output=args.output,
        top=args.top, threads=args.threads, interpolation=args.interpolation,
        crop=None if args.crop == "none" else args.crop, labels=read_labels(args.labels) if args.labels else None,
    )
    results: list[dict] = []
    with progress_bar(len(images), "classifying") as progress:
        for rows in classified_batches(args, classifier, images):
            for row in rows:
                if row["error"] is not None:
                    progress.write(f"npmobile: {row['error']}", file=sys.stderr)
            results.extend(rows)
            progress.update(len(rows))
    return report(args, images, results)


def read_labels(path: str) -> tuple[str, ...]:
    """Class names from a text file, one per line (blank lines at the end ignored)."""
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f.read().splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise NpmobileError(f"{path}: cannot read the labels ({getattr(error, 'strerror', None) or error})") from None
    while names and not names[-1]:
        names.pop()
    if not names:
        raise NpmobileError(f"{path}: no labels in the file")
    return tuple(names)


def classified_batches(args, classifier, images: list[str]) -> Iterator[list[dict]]:
    """Rows in batches as they are done: in this process, or on a Ray or Dask cluster."""
    if args.engine is not None:
        engine = import_module(f"npmobile.{args.engine}")
        yield from engine.classify_paths(images, classifier, address=args.address, workers=args.workers,
                                         batch_size=BATCH)
        return
    classifier.load(before_warming=notice_first_compile)  # a file that fails to open says only that
    for start in range(0, len(images), BATCH):
        yield classifier(images[start : start + BATCH])


def report(args, images: list[str], results: list[dict]) -> int:
    """Write --out, print the results (in the order the images were given); exit 1 if any failed."""
    from npmobile.batch import record, write_rows

    # Engines answer in any order: the order given wins.
    order = {path: i for i, path in enumerate(images)}
    results.sort(key=lambda r: order[r["path"]])
    if args.out:
        write_rows(results, args.out, args.output)
    if args.json:
        print(json.dumps([record(r) for r in results], indent=2))
    elif not args.out:
        print_results([r for r in results if r["error"] is None])
    return 1 if any(r["error"] is not None for r in results) else 0


def print_results(results: list[dict]) -> None:
    for n, result in enumerate(results):
        if n:
            print()
        print(result["path"])
        for entry in result["top"]:
            wnid = entry["wnid"] or "-"
            print(f"  {entry['rank']:>2}. {entry['label']:<28} {wnid:<10} {entry['probability']:.4f}")
