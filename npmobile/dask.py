"""npmobile on Dask (``pip install 'npmobile[dask]'``): classify a bag or dataframe of image paths.

    from npmobile.batch import BatchClassifier
    from npmobile.dask import classify_bag, local_client

    with local_client(workers=2) as client:                      # or distributed.Client("tcp://scheduler:8786")
        rows = classify_bag(paths, BatchClassifier("finetuned.keras")).compute()

Tasks carry the classifier's settings (the model's name or path, never its weights); each worker process
opens the model once, on its first task, and keeps it (npmobile.batch caches it per process). Run workers
with one thread each (``--nthreads 1``) and as many worker processes as the node has cores to share: a
worker's Numba pool takes its ``nthreads`` cores, BLAS one. A worker that dies has its tasks run again
elsewhere by the scheduler, and each partition's rows are kept once, so every image is answered once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence

from npmobile.batch import BatchClassifier, arrow_schema, folder_format, record
from npmobile.kernels.cpus import available_cpus

try:
    import dask.bag as db
    from distributed import Client, LocalCluster, as_completed
except ImportError as error:  # the extra is not installed
    from npmobile.errors import NpmobileError

    raise NpmobileError(f"npmobile.dask needs Dask: pip install 'npmobile[dask]' ({error})") from None


def worker_environment(threads: int) -> dict[str, str]:
    """Environment for a worker process that runs ``threads`` Numba threads: its pool is made that
    size (Dask sets no thread variables), OpenMP/BLAS pools one thread, so workers never spin on
    each other's cores."""
    return {"NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


def default_workers(threads: int) -> int:
    """Worker processes of ``threads`` Numba threads each that the CPUs this process may use hold (at least 1)."""
    return max(1, available_cpus() // threads)


@contextlib.contextmanager
def local_client(workers: int | None = None, threads: int = 1) -> Iterator[Client]:
    """A throwaway Dask cluster on this machine, on the loopback interface only (no dashboard):
    ``workers`` processes (default: the CPUs this process may use // threads: the affinity mask and the
    cgroup CPU quota, kernels/cpus.py) of one task thread, each running ``threads`` Numba threads."""
    workers = workers or default_workers(threads)
    # No dashboard; the scheduler's own HTTP routes on a free loopback port (its default is 8787 on all
    # interfaces). Failed tasks are raised to the caller, so the workers' log lines are silenced.
    scheduler = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, scheduler_kwargs=scheduler, env=worker_environment(threads),
                           silence_logs=logging.CRITICAL)
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def open_on_workers(client: Client, classifier: BatchClassifier) -> None:
    """Open (and warm) the model on every worker now rather than on each one's first task."""
    client.run(_open, classifier)


def _open(classifier: BatchClassifier) -> None:
    classifier.load()  # nothing returned: the model stays in the worker


def _classify_partition(paths: Sequence[str], classifier: BatchClassifier) -> list[dict]:
    return classifier([str(p) for p in paths])


def classify_bag(paths: db.Bag | Sequence[str], classifier: BatchClassifier, partition_size: int = 16) -> db.Bag:
    """A bag of rows (npmobile.batch's, one per path), lazily: ``.compute()`` it or write it."""
    bag = paths if isinstance(paths, db.Bag) else db.from_sequence(list(paths), partition_size=partition_size)
    return bag.map_partitions(_classify_partition, classifier)


def classify_dataframe(frame, classifier: BatchClassifier, column: str = "path"):
    """A dask dataframe of rows (path, error, and the classifier's output column) for a dask
    dataframe with image paths in ``column``."""
    import pandas as pd

    meta = pd.DataFrame({"path": pd.Series(dtype=object), "error": pd.Series(dtype=object),
                         classifier.output: pd.Series(dtype=object)})
    return frame[column].map_partitions(_classify_series, classifier, meta=meta)


def _classify_series(paths, classifier: BatchClassifier):
    import pandas as pd

    rows = classifier([str(p) for p in paths])
    return pd.DataFrame({name: pd.Series([row[name] for row in rows], dtype=object)
                         for name in ("path", "error", classifier.output)})


def write_bag(rows: db.Bag, out: str, output: str = "top") -> None:
    """Write a bag of rows as Dask writes files: a folder ``out`` of Parquet files (schema
    ``arrow_schema(output)``), or of JSON lines files when ``out`` ends in .jsonl; one file per partition,
    named by its position, so a task run again rewrites its own file rather than adding one."""
    if folder_format(out) == "jsonl":
        rows.map(lambda row: json.dumps(record(row))).to_textfiles(os.path.join(out, "part-*.jsonl"))
        return
    meta = {"path": object, "error": object, output: object}
    rows.to_dataframe(meta=meta).to_parquet(out, schema=arrow_schema(output), write_index=False)


def classify_paths(paths: Sequence[str], classifier: BatchClassifier, address: str | None = None,
                   workers: int | None = None, batch_size: int = 16,
                   client: Client | None = None) -> Iterator[list[dict]]:
    """Rows for ``paths`` in batches, as workers finish them (for a progress bar; the CLI's path).
    On ``client``, or the cluster at ``address``, or a local cluster of ``workers`` started for this."""
    if client is not None:
        yield from _stream(client, paths, classifier, batch_size)
    elif address is not None:
        with Client(address) as remote:
            yield from _stream(remote, paths, classifier, batch_size)
    else:
        with local_client(workers, classifier.threads or 1) as local:
            yield from _stream(local, paths, classifier, batch_size)


def _stream(client: Client, paths: Sequence[str], classifier: BatchClassifier, batch_size: int):
    chunks = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    # pure=False: two identical chunks (a path given twice) stay two tasks, each answered once.
    futures = client.map(_classify_partition, chunks, classifier=classifier, pure=False)
    try:
        for future in as_completed(futures):
            yield future.result()
    finally:
        client.cancel(futures)


__all__ = ["arrow_schema", "classify_bag", "classify_dataframe", "classify_paths", "local_client", "open_on_workers",
           "worker_environment", "write_bag"]
