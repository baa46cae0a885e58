"""Classify batches of image files anywhere: the engine-free core the Ray and Dask integrations (and
``npmobile classify``) share.

A ``BatchClassifier`` is a small picklable description -- which model (a family name or a file path,
never arrays of weights), how to read the images, what to return -- and loads its model lazily, in the
process that first calls it: a Ray actor, a Dask worker, or this one. Models are cached per process,
so a Dask worker running many tasks loads one once. Called on a batch of paths (or of the files'
bytes), it returns one row per image:

    {"path": ..., "error": None, "top": [{"rank", "wnid", "label", "probability"}, ...]}
    {"path": ..., "error": "broken.jpg: cannot be decoded (...)", "top": None}

or ``"probabilities"`` / ``"features"`` (the global average pooling's output, which the classifier
reads: an embedding) in place of ``"top"``. A corrupt image is an error row, never an exception, so
one bad file cannot kill a job over millions.

Threads: a worker's Numba pool takes the CPUs the engine gave the worker (Ray: the actor's
``num_cpus``, rounded up; Dask: the worker's ``nthreads``), and BLAS one thread (kernels/threads.py):
engines set neither, and pools of several workers spinning on the same cores were measured 8-13x slower.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from npmobile.errors import ImageError, NpmobileError, unreadable
from npmobile.isolation import DEFAULT_TIMEOUT

OUTPUTS = ("top", "probabilities", "features")


@dataclass(frozen=True)
class ModelRef:
    """What a worker needs to open a model, as the CLI's options say it: a family name with its
    options, and ``weights`` -- a Keras file path every worker can read (a whole model or weights
    for the family; or a PyTorch state dict of a torchvision MobileNet), None for the official ImageNet
    weights, "none" for seeded random weights."""

    model: str = "mobilenet_v2"
    weights: str | None = None
    alpha: float = 1.0
    size: int = 224
    minimalistic: bool = False
    load_timeout: float | None = DEFAULT_TIMEOUT  # the bounded reader's limit (npmobile.isolation)
    trusted: bool = False  # read the file in-process, without the bounded reader
    # (name in the file, npmobile built-in) for each of the user's own activation functions (load_model's
    # custom_objects), as a tuple so the reference stays hashable
    custom_objects: tuple[tuple[str, str], ...] = ()
    given: tuple[str, ...] = ()  # the architecture options the user typed (opening.check_whole_model)

    def open(self):
        """The model, built in this process."""
        # cli.models is where the CLI's rules for opening a model live; reused so a cluster run opens
        # exactly what `npmobile classify` opens.
        from npmobile.opening import family_model, open_model

        if self.weights is not None and self.weights.lower() == "none":
            return family_model(self.model, self.alpha, self.size, self.minimalistic, None)
        weights = None if self.weights is None else shipped_file(self.weights)
        return open_model(self.model, self.alpha, self.size, self.minimalistic, weights, self.load_timeout,
                          self.trusted, list(self.custom_objects), self.given)


def shipped_file(path: str) -> str:
    """``path``, or where a Dask worker keeps the file of that name when it was shipped to every worker
    with ``client.register_plugin(UploadFile(path))`` (the worker's local directory, not its cwd)."""
    if os.path.exists(path) or "distributed" not in sys.modules:
        return path
    try:
        from distributed import get_worker

        uploaded = os.path.join(get_worker().local_directory, os.path.basename(path))
    except Exception:  # not in a Dask worker, or distributed not installed
        return path
    return uploaded if os.path.exists(uploaded) else path


def model_ref(model: str | os.PathLike | ModelRef = "mobilenet_v2", **options) -> ModelRef:
    """A ModelRef from a family name, a Keras file path, or a ModelRef."""
    from npmobile.weights.registry import FAMILIES

    if isinstance(model, ModelRef):
        return model
    text = os.fspath(model)
    if text in FAMILIES:
        return ModelRef(model=text, **options)
    return ModelRef(weights=text, **options)


_MODELS: dict[ModelRef, object] = {}
_MODELS_LOCK = threading.Lock()


def cached_model(ref: ModelRef, threads: int, before_warming: Callable[[object], None] | None = None,
                 warmed: bool = True):
    """The model ``ref`` names, opened and warmed once per process (a Dask worker runs many tasks).

    ``before_warming(model)`` is called once the model has opened, before its kernels load (or compile).
    ``warmed=False``: not warmed, for a caller whose first batch comes at once (the command line): warming
    would run the model one more time before it."""
    with _MODELS_LOCK:
        if ref not in _MODELS:
            model = ref.open()
            if before_warming is not None:
                before_warming(model)
            if warmed:
                warm(model, ref.size, threads)
            _MODELS[ref] = model
        return _MODELS[ref]


def warm(model, size: int, threads: int) -> None:
    """Run one image through the model so its kernels are loaded (or compiled) before work arrives."""
    height, width = input_size(model, size)
    model.predict(np.zeros((1, height, width, 3), np.float32), threads=threads)


def warm_cache(families: Sequence[str] = ("mobilenet_v2", "mobilenet_v3_small")) -> None:
    """Compile every kernel the MobileNets use into Numba's on-disk cache (or load it from there): run
    once per node (or while building its image) before workers start, so none of them compiles.
    Small random-weight models suffice: kernels are compiled per array type, not per shape; V1 uses
    V2's kernels, V3-Large V3-Small's."""
    for family in families:
        model = ModelRef(family, "none", alpha=0.35 if family == "mobilenet_v2" else 1.0, size=96).open()
        warm(model, 96, 1)


def input_size(model, size: int) -> tuple[int, int]:
    """(height, width) the images are resized to: the model's, or ``size`` where it takes any."""
    height, width = (d or size for d in model.input_shape[1:3])
    return height, width


def worker_threads(requested: int | None = None) -> int:
    """Numba threads for this worker: ``requested`` (more than this process may use: ThreadCountError), else
    the CPUs the engine gave it, else all it may use."""
    from npmobile.kernels.threads import checked_threads, max_threads

    if requested is not None:
        return checked_threads(requested)
    given = _ray_cpus() or _dask_threads()
    return max(1, min(given, max_threads())) if given else max_threads()


def _ray_cpus() -> int | None:
    """The actor's CPUs (fractional CPUs round up: an actor given 0.5 CPU still runs one thread)."""
    if "ray" not in sys.modules:  # not in a Ray worker; and importing Ray to find out costs a second
        return None
    try:
        import ray

        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # not in a Ray worker, or Ray not installed
        return None
    return math.ceil(cpus) if cpus else None


def _dask_threads() -> int | None:
    if "distributed" not in sys.modules:  # not in a Dask worker
        return None
    try:
        from distributed import get_worker

        return int(get_worker().state.nthreads)
    except Exception:  # not in a Dask worker, or distributed not installed
        return None


def read_image_bytes(path: str) -> bytes:
    """A file's bytes: a local path, or a URI (s3://, gs://, ...) read with fsspec when it is installed."""
    try:
        if "://" in path:
            import fsspec

            with fsspec.open(path, "rb") as f:
                return f.read()
        return Path(path).read_bytes()
    except ImportError:
        raise ImageError(f"{path}: reading URIs needs fsspec (and s3fs/gcsfs): pip install fsspec") from None
    except OSError as error:
        raise unreadable(ImageError, path, error, "an image") from None


@dataclass
class BatchClassifier:
    """Classify (or embed) batches of images; picklable, loads its model where it is first called.

    ``output``: "top" (the ``top`` most likely classes, labelled as ``npmobile classify`` labels them),
    "probabilities" (the model's whole output row) or "features" (the global average pooling's output).
    ``threads``: Numba threads; default, the CPUs the engine gave the worker (see worker_threads).
    """

    model: ModelRef = field(default_factory=ModelRef)
    output: str = "top"
    top: int = 5
    threads: int | None = None
    interpolation: str = "nearest"
    crop: str | None = None
    labels: tuple[str, ...] | None = None  # class names in class order (``classify --labels``)
    max_pixels: int | None = None  # images of more pixels are refused before decoding (npmobile.image.load_img)

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise NpmobileError(f"unknown output {self.output!r} (choose from {', '.join(OUTPUTS)})")
        self.model = model_ref(self.model)
        self._loaded = None

    # The model stays where it was loaded: a pickled classifier (shipped to a worker) carries only its settings.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_loaded"] = None
        return state

    def load(self, before_warming: Callable[[object], None] | None = None, warmed: bool = True):
        """Open and warm the model in this process (once per process), with this worker's threads.
        ``before_warming(model)``: called once the model has opened, before its kernels load or compile;
        ``warmed=False``: not warmed (``cached_model``)."""
        if self._loaded is None:
            from npmobile.kernels.threads import set_threads
            from npmobile.opening import binary_head, preprocess_for

            threads = set_threads(worker_threads(self.threads))
            model = cached_model(self.model, threads, before_warming, warmed)
            classes = model.shapes[model.graph.outputs[0]][-1]
            if binary_head(model) is not None:  # shown as two classes: 1 - p and p
                classes = 2
            if self.labels is not None and len(self.labels) != classes:
                raise NpmobileError(f"{len(self.labels)} labels, the model has {classes} classes")
            layer = pooled_layer(model) if self.output == "features" else None
            if layer is not None and warmed:
                warm_outputs(model, self.model.size, threads, [layer])
            self._loaded = (model, threads, preprocess_for(model), layer)
        return self._loaded[0]

    def __call__(self, paths: Sequence[str], data: Sequence[bytes | None] | None = None) -> list[dict]:
        """One row per image, in the order given. ``data``: the files' bytes, where the engine read
        them (paths then only name the rows); otherwise each path is read here."""
        self.load()
        model, threads, mode, layer = self._loaded
        size = input_size(model, self.model.size)
        rows: list[dict] = [{"path": str(p), "error": None, self.output: None} for p in paths]
        images, ok = [], []
        for i, row in enumerate(rows):
            try:
                raw = data[i] if data is not None and data[i] is not None else read_image_bytes(row["path"])
                images.append(decode(raw, row["path"], size, self.interpolation, self.crop, mode, self.max_pixels))
                ok.append(i)
            except ImageError as error:
                row["error"] = str(error)
        if images:
            for i, value in zip(ok, self._predict(model, np.stack(images), threads, mode, layer)):
                rows[i][self.output] = value
        return rows

    def _predict(self, model, x: np.ndarray, threads: int, mode: str, layer: str | None) -> list:
        from npmobile.applications.common import preprocess_tf
        from npmobile.opening import binary_head, two_class_probabilities

        x = preprocess_tf(x) if mode == "tf" else x
        if layer is not None:
            out = model.predict(x, outputs=[layer], threads=threads)[layer]
        else:
            out = model.predict(x, threads=threads)
        out = np.asarray(out, dtype=np.float32).reshape(len(x), -1)
        if layer is None and getattr(model, "outputs_logits", False):  # PyTorch models end at the logits
            from npmobile.kernels.reference import softmax

            out = softmax(out.astype(np.float64)).astype(np.float32)
        if layer is None and binary_head(model) is not None:  # Dense(1): the probability of class 1, and 0's
            out = two_class_probabilities(model, out)
        if self.output == "top":
            return [top_classes(p, self.top, self.labels) for p in out]
        return [row.tolist() for row in out]


def decode(raw: bytes, name: str, size: tuple[int, int], interpolation: str, crop: str | None,
           mode: str = "", max_pixels: int | None = None) -> np.ndarray:
    """Bytes of an image file as the model's H x W x 3 input (npmobile's image pipeline, as the CLI);
    ``mode`` "torchvision" (a PyTorch state dict's model): torchvision's resize, crop and normalization.
    ``max_pixels``: load_img's limit (default Pillow's)."""
    from npmobile.image import load_img

    stream = io.BytesIO(raw)
    stream.name = name  # load_img's errors name the file
    if mode == "torchvision":
        from npmobile.opening import load_torchvision_sized

        return load_torchvision_sized(stream, size[0], max_pixels)
    return load_img(stream, target_size=size, interpolation=interpolation, crop=crop, max_pixels=max_pixels)


def pooled_layer(model) -> str:
    """The Keras name of the global average pooling the classifier reads (the embedding)."""
    from npmobile.ops import layer_type

    pools = [n for n in model.graph.nodes if layer_type(n.op).global_pool == "average"]
    if not pools:
        raise NpmobileError(f"{model.graph.source or model.name}: no GlobalAveragePooling2D layer to embed with")
    return pools[-1].keras_names[0]


def warm_outputs(model, size: int, threads: int, outputs: list[str]) -> None:
    height, width = input_size(model, size)
    model.predict(np.zeros((1, height, width, 3), np.float32), outputs=outputs, threads=threads)


def top_classes(probabilities: np.ndarray, k: int, labels: Sequence[str] | None = None) -> list[dict]:
    """The k most likely classes: named by ``labels`` if given, with ImageNet labels when there are 1000
    classes, by index otherwise."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    if labels is not None:
        return [{"rank": i + 1, "wnid": None, "label": labels[c], "probability": float(probabilities[c])}
                for i, c in enumerate(order)]
    if probabilities.shape[0] == 1000:
        from npmobile.applications.imagenet_utils import decode_predictions

        decoded = decode_predictions(probabilities[None], top=k)[0]
        return [{"rank": i + 1, "wnid": wnid, "label": label, "probability": float(p)}
                for i, (wnid, label, p) in enumerate(decoded)]
    return [{"rank": i + 1, "wnid": None, "label": f"class {c}", "probability": float(probabilities[c])}
            for i, c in enumerate(order)]


# ---------------------------------------------------------------------------------------------------
# Rows as records, Arrow tables and files.

def record(row: dict) -> dict:
    """A row as ``npmobile classify --json`` prints it: {"path", "top"} or {"path", "error"}."""
    return {k: v for k, v in row.items() if v is not None}


def arrow_schema(output: str = "top"):
    """The Arrow schema of rows: the same for every batch, so error-only batches join the rest."""
    import pyarrow as pa

    if output == "top":
        value = pa.list_(pa.struct([("rank", pa.int32()), ("wnid", pa.string()), ("label", pa.string()),
                                    ("probability", pa.float64())]))
    else:
        value = pa.list_(pa.float32())
    return pa.schema([("path", pa.string()), ("error", pa.string()), (output, value)])


def rows_to_table(rows: Sequence[dict], output: str = "top"):
    """Rows as a pyarrow Table with ``arrow_schema(output)``."""
    import pyarrow as pa

    schema = arrow_schema(output)
    return pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)


def table_rows(table) -> list[dict]:
    """A pyarrow Table of rows back as row dicts (float32 values come back as the same floats)."""
    return table.to_pylist()


def output_format(path: str | os.PathLike) -> str:
    """"parquet" or "jsonl", from the file name's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    raise NpmobileError(f"{path}: write .parquet or .jsonl (JSON lines)")


def folder_format(path: str | os.PathLike) -> str:
    """"jsonl" for a folder of JSON lines files (its name ends in .jsonl), else "parquet"."""
    return "jsonl" if Path(path).suffix.lower() in (".jsonl", ".ndjson") else "parquet"


def _pyarrow_parquet(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise NpmobileError(f"{path}: writing Parquet needs pyarrow: pip install 'npmobile[ray]' or pyarrow") from None
    return pq


class RowWriter:
    """Rows written to one file as they come, batch by batch, Parquet or JSON lines by its suffix: what was
    written before an interruption stays readable (``close`` ends the Parquet file properly).

    Made before any work: a wrong suffix, a missing pyarrow or an existing file (without ``overwrite``)
    fails then, not after the last image. The file itself is created by the first ``write``."""

    def __init__(self, path: str | os.PathLike, output: str = "top", overwrite: bool = False):
        from npmobile.errors import UsageError

        self.path, self.output, self.kind = path, output, output_format(path)
        self.rows = 0
        self._file = None
        if self.kind == "parquet":
            _pyarrow_parquet(path)
        if not overwrite and os.path.lexists(path):
            raise UsageError(f"{path} exists: add --overwrite to replace it, or choose another file")
        if os.path.isdir(path):
            raise UsageError(f"{path} is a folder: --out takes a file name ending in .parquet or .jsonl")

    def write(self, rows: Sequence[dict]) -> None:
        if not rows:
            return
        try:
            if self.kind == "jsonl":
                if self._file is None:
                    self._file = open(self.path, "w", encoding="utf-8")
                self._file.write("".join(json.dumps(record(row)) + "\n" for row in rows))
                self._file.flush()
            else:
                table = rows_to_table(rows, self.output)
                if self._file is None:
                    self._file = _pyarrow_parquet(self.path).ParquetWriter(self.path, table.schema)
                self._file.write_table(table)
        except OSError as error:
            raise NpmobileError(f"{self.path}: cannot write ({error.strerror or error})") from None
        self.rows += len(rows)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_rows(rows: Iterable[dict], path: str | os.PathLike, output: str = "top") -> int:
    """Write rows to one file, Parquet or JSON lines by its suffix; returns how many were written."""
    kind = output_format(path)
    rows = list(rows)
    if kind == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(record(row)) + "\n")
        return len(rows)
    _pyarrow_parquet(path).write_table(rows_to_table(rows, output), path)
    return len(rows)
