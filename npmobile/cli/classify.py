"""``npmobile classify``: top-K ImageNet classes (or your own model's classes) for image files and folders."""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from importlib import import_module
from pathlib import Path

from npmobile.cli.models import EXAMPLES, add_model_options, notice_first_compile, positive_int
from npmobile.errors import NpmobileError, UsageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
BATCH = 16


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "classify", help="classify images with an ImageNet MobileNet or your own Keras model",
        description="Classify images (files or folders). Prints rank, label, WordNet id and probability.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="*", metavar="IMAGE|DIR", help="image files and/or folders of images")
    parser.add_argument("--from-file", metavar="PATH", default=None,
                        help="also classify the paths listed in PATH, one per line (- reads standard input)")
    parser.add_argument("--recursive", action="store_true", help="look for images in subfolders of folders too")
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
    parser.add_argument("--max-pixels", type=positive_int, default=None, metavar="N",
                        help="refuse images of more than N pixels, from their header, before decoding them "
                             "(default: Pillow's limit, 89,478,485); raise it for large images you trust")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads, 1 to the CPUs this process may use (default: all of them: its "
                             "affinity mask, capped by its cgroup CPU quota rounded up; or NUMBA_NUM_THREADS "
                             "when set); more is refused. With --engine, per worker")
    parser.add_argument("--output", choices=["top", "probabilities", "features"], default="top",
                        help="top: the top-K classes (default); probabilities: the whole output row; "
                             "features: the global average pooling's output, an embedding (needs --json or --out)")
    parser.add_argument("--out", metavar="FILE", default=None,
                        help="also write the results to FILE: .parquet or .jsonl (JSON lines), one row per image, "
                             "batch by batch as they are done (an interrupted run keeps what was written)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
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


def images_in(folder: Path, recursive: bool) -> list[Path]:
    """The image files in ``folder`` (and its subfolders when ``recursive``), sorted."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def find_images(paths: Sequence[str], recursive: bool = False) -> Iterator[Path]:
    """Files as given; folders expanded to the images in them (sorted; subfolders only when ``recursive``)."""
    for text in paths:
        path = Path(text)
        if path.is_dir():
            yield from images_in(path, recursive)
        else:
            yield path


def progress_bar(total: int, label: str):
    """tqdm's bar on stderr, drawn only when stderr is a terminal and there is more than one image."""
    if total <= 1 or not sys.stderr.isatty():
        return _NoBar()  # tqdm is not even imported
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="img", file=sys.stderr, leave=True)


class _NoBar:
    """The calls run makes on a progress bar, when none is drawn."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, count: int) -> None:
        pass

    @staticmethod
    def write(text: str, file=None) -> None:
        print(text, file=file)


def image_paths(args) -> list[str]:
    """The images to classify, in the order given (duplicates kept): the arguments, then --from-file's
    lines; folders expanded. None found: one line that says why."""
    given = list(args.images)
    if args.from_file:
        given += read_path_list(args.from_file)
    if not given:
        raise UsageError("give images or folders, or --from-file PATH (- for standard input)")
    images = [str(p) for p in find_images(given, args.recursive)]
    if not images:
        raise NpmobileError(no_images_message(given, args.recursive))
    return images


def read_path_list(source: str) -> list[str]:
    """Paths one per line from a file, or from standard input for "-" (blank lines skipped)."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise NpmobileError(f"{source}: cannot read the list of paths ({getattr(error, 'strerror', None) or error})"
                            ) from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def no_images_message(given: Sequence[str], recursive: bool) -> str:
    message = f"no images found in {', '.join(given)}"
    if recursive:
        return message
    nested = sum(1 for text in given if Path(text).is_dir() for _ in images_in(Path(text), True))
    if nested:
        return (f"{message} (folders are not searched recursively; {nested} image{'s' if nested > 1 else ''} in "
                "subfolders: add --recursive)")
    return message


def check_options(args) -> None:
    """Combinations that cannot work: usage errors (exit 2), before any work."""
    if args.engine is None and (args.address or args.workers):
        raise UsageError("--address and --workers need --engine ray or --engine dask")
    if args.threads is not None and args.address is None:  # a cluster elsewhere: its workers check their own
        from npmobile.kernels import cpus

        cpus.checked_thread_count(args.threads, cpus.default_thread_count())
    if args.output != "top" and not (args.json or args.out):
        raise UsageError(f"--output {args.output} needs --json or --out: its values are for programs")


class InOrder:
    """Rows back in the order the images were given, released as soon as they and all before them are done.
    Engines answer in any order; a path given twice gets two rows (the same answer, so which is which
    does not matter)."""

    def __init__(self, images: Sequence[str]):
        self.waiting: dict[str, deque[int]] = {}
        for index, path in enumerate(images):
            self.waiting.setdefault(path, deque()).append(index)
        self.done: dict[int, dict] = {}
        self.next = 0

    def add(self, rows: Sequence[dict]) -> list[dict]:
        for row in rows:
            self.done[self.waiting[row["path"]].popleft()] = row
        ready = []
        while self.next in self.done:
            ready.append(self.done.pop(self.next))
            self.next += 1
        return ready


def run(args) -> int:
    from npmobile.batch import BatchClassifier, ModelRef, RowWriter

    check_options(args)
    images = image_paths(args)
    writer = RowWriter(args.out, args.output, args.overwrite) if args.out else None  # checked before any work
    classifier = BatchClassifier(
        ModelRef(args.model, args.weights, args.alpha, args.size, args.minimalistic, args.load_timeout,
                 args.trusted, tuple(args.custom_objects), args.given_model_options), output=args.output,
        top=args.top, threads=args.threads, interpolation=args.interpolation,
        crop=None if args.crop == "none" else args.crop, labels=read_labels(args.labels) if args.labels else None,
        max_pixels=args.max_pixels,
    )
    in_order, results = InOrder(images), []
    text = not args.json and not args.out
    try:
        with progress_bar(len(images), "classifying") as progress:
            for rows in classified_batches(args, classifier, images):
                progress.update(len(rows))
                ready = in_order.add(rows)
                if writer is not None:
                    writer.write(ready)
                if text:
                    print_results(ready, first=not results)
                else:
                    for row in ready:
                        if row["error"] is not None:
                            progress.write(f"npmobile: {row['error']}", file=sys.stderr)
                results.extend(ready)
    except KeyboardInterrupt:
        kept = f"; {args.out} holds the first {writer.rows}" if writer is not None and writer.rows else ""
        print(f"npmobile: interrupted after {len(results)} of {len(images)} images{kept}", file=sys.stderr)
        return 130
    finally:
        if writer is not None:
            writer.close()
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
    # A file that fails to open says only that; the first batch, at once, loads the kernels itself.
    classifier.load(before_warming=notice_first_compile, warmed=False)
    for start in range(0, len(images), BATCH):
        yield classifier(images[start : start + BATCH])


def report(args, images: list[str], results: list[dict]) -> int:
    """The end of a run: the JSON document (one, whatever the number of images), or the count of classified
    and failed images; exit 1 if any failed."""
    from npmobile.batch import record

    failed = sum(1 for r in results if r["error"] is not None)
    if args.json:
        print(json.dumps([record(r) for r in results], indent=2))
    if not args.json and (len(images) > 1 or failed):  # --json: the document is all of stdout
        print(f"{'' if args.out else chr(10)}{len(results) - failed} classified, {failed} failed")
    return 1 if failed else 0


def print_results(results: list[dict], first: bool = True) -> None:
    """Results in text, each as it is ready (flushed: a pipe sees it now); a failed image says why in place."""
    for n, result in enumerate(results):
        if n or not first:
            print()
        print(result["path"])
        if result["error"] is not None:
            print(f"  failed: {result['error']}")
            continue
        for entry in result["top"]:
            wnid = entry["wnid"] or "-"
            print(f"  {entry['rank']:>2}. {entry['label']:<28} {wnid:<10} {entry['probability']:.4f}")
    sys.stdout.flush()
