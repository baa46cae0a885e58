"""Images per second on one machine: one process against two workers of Ray Data and of Dask, same
model, same images, in one run.

    .venv/bin/pip install -e ".[ray,dask]"
    .venv/bin/python bench/cluster.py                      # 1000 generated JPEGs, MobileNetV2 alpha 0.35 at 96 px
    .venv/bin/python bench/cluster.py --images 4000 --alpha 1.0 --size 224

Every run reads and decodes the files with npmobile's pipeline and classifies them (top-5), end to end.
Reported per configuration: images per second over the job, from submitting it to its last row, with the
cluster already started and the kernels in Numba's cache (the cache is warmed in this process first), and
after the first rows came back; the cluster's start-up beside it. One process and Dask's workers have
the model open before the job; Ray starts its actors (each opening the model) inside the job, as a user
sees it: the rate after the first rows leaves that out. The machine's load average is recorded: on a
shared machine, compare within one run.
The model has seeded random weights (weights="none"): speed does not depend on the weights. Results go to
bench/results/cluster-<date>-<host>.json and bench/results/cluster-latest.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's npmobile, and its workers' (PYTHONPATH below)


def make_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    """``n`` JPEGs of mixed sizes (40-480 px a side), smooth patterns with noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        height, width = (int(v) for v in rng.integers(40, 480, size=2))
        yy, xx = np.mgrid[0:height, 0:width]
        base = np.stack([(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, (xx + yy + 13 * i) % 256], -1)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=85)
        paths.append(str(path))
    return paths


def machine() -> dict:
    """The CPU by name, its cores and the versions that matter here (bench/run.py's machine() imports
    TensorFlow for its version; not wanted in a process that times Numba)."""
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    packages = ("numpy", "numba", "ray", "dask", "distributed", "pyarrow")
    return {"cpu": cpu, "cores": os.cpu_count(), "host": socket.gethostname(), "python": platform.python_version(),
            "versions": {name: version(name) for name in packages}}


def timed(rows_in_batches) -> dict:
    """Images per second over the whole job, and over its steady part (from the first batch's rows on:
    actors starting and opening the model are behind it)."""
    start, n, first = time.perf_counter(), 0, None
    for rows in rows_in_batches:
        if first is None:
            first, n_first = time.perf_counter(), len(rows)
        n += len(rows)
    seconds = time.perf_counter() - start
    steady = (n - n_first) / (start + seconds - first) if n > n_first else None
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds, "steady_images_per_s": steady,
            "first_rows_after_s": first - start}


def one_process(paths: list[str], classifier, batch: int) -> dict:
    classifier.load()  # opened and warmed, as a worker's __init__ does (outside the timed job)
    return timed(classifier(paths[i : i + batch]) for i in range(0, len(paths), batch))


def on_dask(paths: list[str], classifier, workers: int, batch: int) -> dict:
    from npmobile.dask import classify_paths, local_client, open_on_workers

    start = time.perf_counter()
    with local_client(workers=workers, threads=1) as client:
        started = time.perf_counter() - start
        open_on_workers(client, classifier)  # as one_process: the model is open before the job
        result = timed(classify_paths(paths, classifier, client=client, batch_size=batch))
    return {**result, "cluster_start_s": started}


def on_ray(paths: list[str], classifier, workers: int, batch: int) -> dict:
    from npmobile.ray import classify_paths, local_ray

    start = time.perf_counter()
    with local_ray(threads=1):
        started = time.perf_counter() - start
        result = timed(classify_paths(paths, classifier, workers=workers, batch_size=batch))
    return {**result, "cluster_start_s": started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--alpha", type=float, default=0.35)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=["dask", "ray"], choices=["dask", "ray"])
    args = parser.parse_args(argv)

    from npmobile.batch import BatchClassifier, ModelRef

    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)
    ref = ModelRef(args.model, "none", args.alpha, args.size)
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "images": args.images,
               "model": {"family": args.model, "alpha": args.alpha, "size": args.size, "weights": "random"},
               "batch": args.batch, "workers": args.workers, "runs": {}}
    results["load_average_before"] = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        paths = make_images(Path(folder), args.images)
        runs = results["runs"]
        runs["1 process, 1 thread"] = one_process(paths, BatchClassifier(ref, threads=1), args.batch)
        runs["1 process, 2 threads"] = one_process(paths, BatchClassifier(ref, threads=2), args.batch)
        for engine in args.engines:
            run = on_dask if engine == "dask" else on_ray
            runs[f"{engine}, {args.workers} workers x 1 thread"] = run(paths, BatchClassifier(ref, threads=1),
                                                                       args.workers, args.batch)
    results["load_average_after"] = os.getloadavg()
    print(f"{results['machine']['cpu']}, {results['machine']['cores']} cores; load average "
          f"{results['load_average_before'][0]:.1f} before, {results['load_average_after'][0]:.1f} after")
    for name, run in results["runs"].items():
        start = f", cluster start {run['cluster_start_s']:.1f} s" if "cluster_start_s" in run else ""
        print(f"{name:<30} {run['images_per_s']:7.1f} images/s over the job ({run['seconds']:.2f} s), "
              f"{run['steady_images_per_s'] or 0:7.1f} after the first rows ({run['first_rows_after_s']:.2f} s{start})")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    text = json.dumps(results, indent=2)
    (out / f"cluster-{results['date']}-{results['machine']['host']}.json").write_text(text)
    (out / "cluster-latest.json").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
