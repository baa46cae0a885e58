"""npmobile on Ray Data (``pip install 'npmobile[ray]'``): Ray Data's batch-inference pattern.

    import ray
    from npmobile.batch import BatchClassifier
    from npmobile.ray import classify_files

    ray.init()                                                   # or ray.init("ray://head:10001")
    classify_files("s3://bucket/photos/", "s3://bucket/labels/", BatchClassifier("finetuned.keras"), workers=8)

``Classifier`` is the callable class for ``Dataset.map_batches``: each actor opens the model once, in its
``__init__``, from a name or a path every node can read (only the settings travel). Actors take
fractional CPUs (``actor_cpus``: half a CPU less than their threads) so Ray's read tasks are never
starved of a CPU -- two actors at one CPU each on two CPUs hung the read stage. A crashed actor is
restarted and its batch run again (execution is at least once); Ray Data keeps one result per batch and
the engine, never the UDF, writes the output, so every image is in it exactly once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np

from npmobile.batch import BatchClassifier, folder_format, record, rows_to_table
from npmobile.kernels.cpus import available_cpus

try:
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy
except ImportError as error:  # the extra is not installed
    from npmobile.errors import NpmobileError

    raise NpmobileError(f"npmobile.ray needs Ray Data: pip install 'npmobile[ray]' ({error})") from None

IMAGE_EXTENSIONS = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm"]


class Classifier:
    """``map_batches`` callable class: rows of npmobile.batch (a pyarrow Table: path, error, and the
    classifier's output column) for a batch with a ``path`` column and, when Ray read the files, ``bytes``."""

    def __init__(self, classifier: BatchClassifier):
        self.classifier = classifier
        classifier.load()  # once per actor: the model is opened and its kernels warmed before work arrives

    def __call__(self, batch: dict[str, np.ndarray]):
        paths = [str(p) for p in batch["path"]]
        data = list(batch["bytes"]) if "bytes" in batch else None
        return rows_to_table(self.classifier(paths, data), self.classifier.output)


def actor_cpus(threads: int) -> float:
    """Ray CPUs for an actor running ``threads`` Numba threads: half a CPU less (at least half), so
    reading and decoding keep a share (an actor's ``npmobile.batch.worker_threads`` rounds back up)."""
    return max(0.5, threads - 0.5)


def worker_environment(threads: int) -> dict[str, str]:
    """Environment for Ray's workers: Numba's pool made ``threads`` wide (Ray sets no
    NUMBA_NUM_THREADS), OpenMP/BLAS pools one thread, so workers never spin on each other's cores."""
    return {"NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


def read_images(paths: str | Sequence[str], **read_args) -> ray.data.Dataset:
    """Image files (a folder, files, or URIs Ray's readers take: s3://, gs://, ...) as a Dataset with
    ``bytes`` and ``path`` columns: Ray reads, npmobile decodes (Ray's own read_images resizes with its
    settings, not the CLI's)."""
    return ray.data.read_binary_files(paths, include_paths=True, file_extensions=IMAGE_EXTENSIONS, **read_args)


def classify_dataset(dataset: ray.data.Dataset, classifier: BatchClassifier, workers: int,
                     batch_size: int = 16, num_cpus: float | None = None) -> ray.data.Dataset:
    """``dataset`` (a ``path`` column, and ``bytes`` if read) classified by a pool of ``workers`` actors."""
    threads = classifier.threads or 1
    return dataset.map_batches(
        Classifier, fn_constructor_args=(classifier,), batch_size=batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=workers), num_cpus=num_cpus or actor_cpus(threads),
    )  # Ray Data's actor pools restart a dead actor and retry its batches by default (max_restarts=-1)


def classify_files(paths: str | Sequence[str], out: str, classifier: BatchClassifier, workers: int,
                   batch_size: int = 16, **read_args) -> None:
    """Read image files, classify them and write the rows: one call, all through Ray. ``out`` is a
    folder Ray writes Parquet files into, or JSON lines files when it ends in .jsonl (local or a URI)."""
    rows = classify_dataset(read_images(paths, **read_args), classifier, workers, batch_size)
    if folder_format(out) == "jsonl":
        rows.write_datasink(JSONLinesDatasink(out))
    else:
        rows.write_parquet(out)


class JSONLinesDatasink(ray.data.datasource.BlockBasedFileDatasink):
    """Rows as ``npmobile classify --json`` prints them, one JSON object a line (a folder of files,
    written by Ray). Not Dataset.write_json: pandas rounds floats to 10 decimal places, and a
    probability of 1e-9 would keep one digit."""

    def __init__(self, path: str, **file_datasink_args):
        super().__init__(path, file_format="jsonl", **file_datasink_args)

    def write_block_to_file(self, block, file) -> None:
        for row in block.to_arrow().to_pylist():
            file.write((json.dumps(record(row)) + "\n").encode())


@contextlib.contextmanager
def local_ray(threads: int = 1, cpus: int | None = None) -> Iterator[None]:
    """A throwaway single-node Ray on the loopback interface, with no dashboard and no usage reports; its CPUs
    (default) those this process may use: the affinity mask and the cgroup CPU quota (kernels/cpus.py)."""
    saved = {k: os.environ.get(k) for k in LOOPBACK_ENVIRONMENT}
    os.environ.update(LOOPBACK_ENVIRONMENT)
    loopback = _only_loopback(True)
    try:
        ray.init(num_cpus=cpus or available_cpus(), _node_ip_address="127.0.0.1", include_dashboard=False,
                 runtime_env={"env_vars": worker_environment(threads)}, object_store_memory=256 * 2**20,
                 log_to_driver=False, logging_level=logging.ERROR, configure_logging=False)
        yield
    finally:
        ray.shutdown()
        _only_loopback(loopback)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# _node_ip_address="127.0.0.1" alone is not enough: Ray swaps a loopback address for the machine's
# routable one and its servers listen on every interface. Ray's switch for a node that is the whole
# cluster (named for Windows and macOS, where it is the default) makes the node's address 127.0.0.1
# and binds every server there; child processes read it from the environment.
LOOPBACK_ENVIRONMENT = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _only_loopback(on: bool) -> bool:
    """Set this process's copy of that switch (Ray read the environment when it was imported);
    returns the previous value."""
    from ray._private import ray_constants

    previous = not ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = not on
    return previous


def classify_paths(paths: Sequence[str], classifier: BatchClassifier, address: str | None = None,
                   workers: int | None = None, batch_size: int = 16) -> Iterator[list[dict]]:
    """Rows for ``paths`` in batches as Ray finishes them (for a progress bar; the CLI's path), on the
    cluster at ``address``, on Ray already initialized in this process, or on a local Ray started for this."""
    threads = classifier.threads or 1
    data_log = logging.getLogger("ray.data")
    with contextlib.ExitStack() as session:
        if address is not None:
            ray.init(address, runtime_env={"env_vars": worker_environment(threads)}, log_to_driver=False,
                     logging_level=logging.ERROR)
            session.callback(ray.shutdown)
        elif not ray.is_initialized():
            session.enter_context(local_ray(threads))
        session.callback(data_log.setLevel, data_log.level)
        data_log.setLevel(logging.CRITICAL)  # failures are raised (below) in one line
        workers = workers or max(1, math.floor(ray.cluster_resources().get("CPU", 1) / threads))
        ray.data.DataContext.get_current().enable_progress_bars = False  # the caller draws its own
        dataset = ray.data.from_items([{"path": p} for p in paths])
        try:
            for table in classify_dataset(dataset, classifier, workers, batch_size).iter_batches(
                    batch_size=None, batch_format="pyarrow"):
                yield table.to_pylist()
        except Exception as error:
            cause = npmobile_cause(error)
            if cause is None:
                raise
            raise cause from None  # the model could not be opened on a worker: say why in one line


def npmobile_cause(error: BaseException):
    """The NpmobileError a worker raised, out of the exceptions Ray wraps it in; None if there is none.

    A task's error keeps the exception (``cause``); an actor that died in ``__init__`` keeps only its
    traceback as text (ActorDiedError), where the error's last line is read back."""
    from npmobile import errors

    seen, outer = set(), error
    while error is not None and id(error) not in seen:
        if isinstance(error, errors.NpmobileError):
            return error
        seen.add(id(error))
        inner = getattr(error, "cause", None)
        error = inner if isinstance(inner, BaseException) else (error.__cause__ or error.__context__)
    found = re.findall(r"npmobile\.errors\.(\w+): ([^\n\x1b]+)", str(outer))
    kind = getattr(errors, found[-1][0], None) if found else None
    if isinstance(kind, type) and issubclass(kind, errors.NpmobileError):
        return kind(found[-1][1].strip())
    return None


__all__ = ["Classifier", "JSONLinesDatasink", "actor_cpus", "classify_dataset", "classify_files", "classify_paths",
           "local_ray", "read_images", "worker_environment"]
