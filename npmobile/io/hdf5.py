"""HDF5 files as Keras writes them.

- Legacy full model (``model.save("m.h5")``, Keras 2 and 3): a ``model_config`` JSON attribute at the
  root, weights under ``model_weights/<layer>/`` listed, in order, by that group's ``weight_names``.
- Legacy weights only (tf_keras ``save_weights("w.h5")``, the official keras-applications files):
  ``layer_names`` at the root and the same per-layer groups.
- Keras 3 ``.weights.h5`` (also inside a .keras zip): ``layers/<snake_class>[_N]/vars/<i>``, the real
  layer name in the ``name`` attribute of ``vars``; nested models under ``layers/<...>/layers/``.

Weight datasets are always found through ``weight_names`` (a name like ``Conv/BatchNorm/gamma:0``
sits in nested groups, because HDF5 reads slashes as paths), never by walking the groups.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from npmobile.errors import ModelFileError
from npmobile.spec import StoredLayer

# Larger than any MobileNet variable: a dataset bigger than this is refused before it is read.
MAX_DATASET_ELEMENTS = 64 * 1024 * 1024
# And all of one file's weights together (a full-size MobileNet holds under 6 M values).
MAX_FILE_ELEMENTS = 256 * 1024 * 1024


@dataclass
class ReadBudget:
    """Values one file may still have read from it. Chunks never written cost nothing on disk but read
    back as fill values, so a tiny file could list gigabytes of datasets that each pass the per-dataset
    limit (or one dataset many times over)."""

    left: int = MAX_FILE_ELEMENTS

    def take(self, size: int, where: str) -> None:
        if size > self.left:
            raise ModelFileError(f"{where}: the file's weights add up to more than {MAX_FILE_ELEMENTS:,} values; "
                                 "refusing it")
        self.left -= size


def text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def list_attr(obj: h5py.HLObject, name: str) -> list[str]:
    """A list-of-strings attribute; HDF5 caps attribute size, so Keras splits long ones into
    ``name0``, ``name1``, ... which are read back in order."""
    if name in obj.attrs:
        return [text(v) for v in np.atleast_1d(obj.attrs[name])]
    values: list[str] = []
    chunk = 0
    while f"{name}{chunk}" in obj.attrs:
        values.extend(text(v) for v in np.atleast_1d(obj.attrs[f"{name}{chunk}"]))
        chunk += 1
    return values


def keras_major_version(obj: h5py.HLObject, default: int = 3) -> int:
    version = obj.attrs.get("keras_version")
    if version is None:
        return default
    try:
        return int(text(version).split(".")[0])
    except ValueError:
        return default


def _inside(group: h5py.Group, path: str, where: str) -> None:
    """Refuse an external link on the way to ``path``: HDF5 would open whatever file it names."""
    for depth in range(1, len(path.split("/")) + 1):
        link = group.get("/".join(path.split("/")[:depth]), getlink=True)
        if isinstance(link, h5py.ExternalLink):
            raise ModelFileError(f"{where}: {path!r} links to another file ({link.filename}); refusing it")


def read_dataset(group: h5py.Group, path: str, where: str, budget: ReadBudget | None = None) -> np.ndarray:
    _inside(group, path, where)
    try:
        dataset = group[path]
    except (KeyError, ValueError):
        raise ModelFileError(f"{where}: weight {path!r} is listed but missing from the file") from None
    if not isinstance(dataset, h5py.Dataset):
        raise ModelFileError(f"{where}: weight {path!r} is not a dataset")
    if dataset.external or dataset.is_virtual:
        # Raw storage in, or a view of, other files: reading it would read any file on this machine.
        raise ModelFileError(f"{where}: weight {path!r} keeps its data outside the file; refusing it")
    if dataset.size > MAX_DATASET_ELEMENTS:
        raise ModelFileError(f"{where}: weight {path!r} has {dataset.size:,} values, more than any MobileNet layer")
    if dataset.dtype.kind not in "fiu":
        raise ModelFileError(f"{where}: weight {path!r} is not numeric (dtype {dataset.dtype})")
    if budget is not None:
        budget.take(dataset.size, where)
    return np.asarray(dataset[()], dtype=np.float32)


def model_config(f: h5py.File, source: str) -> dict | None:
    raw = f.attrs.get("model_config")
    if raw is None:
        return None
    try:
        return json.loads(text(raw))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{source}: model_config is not valid JSON ({error})") from None


def legacy_layers(f: h5py.File, source: str) -> list[StoredLayer]:
    """The per-layer weights of a legacy .h5 (full model or weights only), in the file's layer order."""
    root = f["model_weights"] if "model_weights" in f else f
    names = list_attr(root, "layer_names")
    if "layer_names" not in root.attrs and "layer_names0" not in root.attrs:
        raise ModelFileError(f"{source}: no 'layer_names' attribute; not a Keras weights file")
    layers = []
    budget = ReadBudget()
    for name in names:
        where = f"{source}: layer {name!r}"
        _inside(root, name, where)
        try:
            group = root[name]
        except (KeyError, ValueError):
            raise ModelFileError(f"{where} is listed but its group is missing") from None
        stored = StoredLayer(name)
        for weight_name in list_attr(group, "weight_names"):
            stored.variables.append((weight_name, read_dataset(group, weight_name, where, budget)))
        layers.append(stored)
    return layers


def keras3_layers(f: h5py.File, source: str) -> list[StoredLayer]:
    """The per-layer weights of a Keras 3 .weights.h5 (or a .keras's model.weights.h5), flattened:
    nested models' layers come in place, under their own names."""
    if "layers" not in f:
        raise ModelFileError(f"{source}: no 'layers' group; not a Keras 3 weights file")
    layers: list[StoredLayer] = []
    budget = ReadBudget()

    def walk(group: h5py.Group, prefix: str) -> None:
        for key in group:
            where = f"{source}: {prefix}{key}"
            _inside(group, key, where)
            item = group[key]
            if not isinstance(item, h5py.Group):
                continue
            for child in ("vars", "layers"):
                if child in item.keys():
                    _inside(item, child, where)
            if "vars" in item and isinstance(item["vars"], h5py.Group):
                vars_group = item["vars"]
                name = text(vars_group.attrs.get("name", key))
                numbered = sorted((k for k in vars_group if k.isdigit()), key=int)
                variables = [(None, read_dataset(vars_group, k, where, budget)) for k in numbered]
                layers.append(StoredLayer(name, variables))
            if "layers" in item and isinstance(item["layers"], h5py.Group):
                walk(item["layers"], f"{prefix}{key}/layers/")

    walk(f["layers"], "layers/")
    return layers
