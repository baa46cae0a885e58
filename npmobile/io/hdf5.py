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

import io
from typing import Any

import h5py
import numpy as np

from npmobile.errors import ModelFileError
from npmobile.io.bounds import ReadBudget, parse_json
from npmobile.spec import StoredLayer


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


# What libhdf5 itself builds in. Any other filter id makes it search its plugin folders and load a shared
# library from there to decode the data: a file would choose code to run. Refused by id before reading.
BUILTIN_FILTERS = {1: "deflate", 2: "shuffle", 3: "fletcher32", 4: "szip", 5: "nbit", 6: "scaleoffset"}


def _no_external_files() -> h5py.h5p.PropLAID:
    """Link access for every object the readers open: should libhdf5 ever follow an external link
    through it (the readers follow hard links only, but this is the second wall), the file it opens
    is an empty buffer in memory, never the one the link names."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_fileobj_driver(h5py.h5fd.fileobj_driver, _NOTHING)
    lapl = h5py.h5p.create(h5py.h5p.LINK_ACCESS)
    lapl.set_elink_fapl(fapl)
    return lapl


_NOTHING = io.BytesIO()  # what an external link opens instead of its target (kept alive with the list)
NO_EXTERNAL_FILES = _no_external_files()


def no_plugin_search() -> None:
    """Empty libhdf5's plugin search path for the rest of this process, so that no filter can load a shared
    library from HDF5_PLUGIN_PATH or the default folders. For the isolated reader's child only: a caller's
    own process keeps its plugins (there, the filter check in read_dataset is the wall)."""
    while h5py.h5pl.size():
        h5py.h5pl.remove(0)


def _link(group: h5py.Group, name: str, where: str) -> int | None:
    """The kind of the link ``name`` in ``group`` (None if there is none); anything but a hard link -- a link
    to another file, or a soft link, which may lead there through one -- is refused, whatever it points to."""
    key = name.encode("utf-8")
    if not group.id.links.exists(key):
        return None
    kind = group.id.links.get_info(key).type
    if kind == h5py.h5l.TYPE_EXTERNAL:
        filename, target = group.id.links.get_val(key)
        raise ModelFileError(f"{where}: {name!r} links to another file ({text(filename)}, {text(target)}); npmobile "
                             "reads nothing outside the file: refusing it")
    if kind != h5py.h5l.TYPE_HARD:
        what = f"a soft link (to {text(group.id.links.get_val(key))})" if kind == h5py.h5l.TYPE_SOFT \
            else f"a user-defined link (type {kind})"
        raise ModelFileError(f"{where}: {name!r} is {what}; npmobile follows no links (a soft link can lead to "
                             "another file through one): refusing it")
    return kind


def member(group: h5py.Group, path: str, where: str) -> h5py.Group | h5py.Dataset | None:
    """The group or dataset at ``path`` below ``group`` (None if it is missing), reached one name at a time
    through hard links only (see _link), each opened with NO_EXTERNAL_FILES."""
    item: h5py.Group | h5py.Dataset = group
    for name in (part for part in path.split("/") if part not in ("", ".")):
        if not isinstance(item, h5py.Group) or _link(item, name, where) is None:
            return None
        oid = h5py.h5o.open(item.id, name.encode("utf-8"), lapl=NO_EXTERNAL_FILES)
        kind = h5py.h5i.get_type(oid)
        if kind == h5py.h5i.GROUP:
            item = h5py.Group(oid)
        elif kind == h5py.h5i.DATASET:
            item = h5py.Dataset(oid)
        else:  # a named datatype: nothing a reader wants
            return None
    return item


def has(group: h5py.Group, name: str, where: str) -> bool:
    """Whether ``group`` holds ``name`` (through a hard link; any other link is refused)."""
    return _link(group, name, where) is not None


def _check_storage(dataset: h5py.Dataset, path: str, where: str) -> None:
    """Refuse data kept in other files, and filters libhdf5 would look for among its plugins, from the
    dataset's creation properties alone (its shape is not asked yet: for a virtual dataset that alone can
    open the files it maps)."""
    dcpl = dataset.id.get_create_plist()
    if dcpl.get_layout() == h5py.h5d.VIRTUAL or dcpl.get_external_count():
        # A view of, or raw storage in, other files: reading it would read any file on this machine.
        raise ModelFileError(f"{where}: weight {path!r} keeps its data outside the file; refusing it")
    for index in range(dcpl.get_nfilters()):
        code, _, _, name = dcpl.get_filter(index)
        if code not in BUILTIN_FILTERS:
            raise ModelFileError(
                f"{where}: weight {path!r} is stored with HDF5 filter {code} ({text(name) or 'unnamed'}), which "
                f"is not built into libhdf5 ({', '.join(BUILTIN_FILTERS.values())}); npmobile loads no HDF5 "
                "plugins: refusing it (re-save the file without that filter)")


def read_dataset(group: h5py.Group, path: str, where: str, budget: ReadBudget) -> np.ndarray:
    dataset = member(group, path, where)
    if dataset is None:
        raise ModelFileError(f"{where}: weight {path!r} is listed but missing from the file")
    if not isinstance(dataset, h5py.Dataset):
        raise ModelFileError(f"{where}: weight {path!r} is not a dataset")
    _check_storage(dataset, path, where)
    if dataset.dtype.kind not in "fiu":
        raise ModelFileError(f"{where}: weight {path!r} is not numeric (dtype {dataset.dtype})")
    # The shape the file declares bounds what is decompressed: counted before a byte of it is read.
    budget.take(dataset.size, f"{where}: weight {path!r}")
    return np.asarray(dataset[()], dtype=np.float32)


def model_config(f: h5py.File, source: str) -> dict | None:
    raw = f.attrs.get("model_config")
    if raw is None:
        return None
    if not isinstance(raw, (bytes, str)):
        raise ModelFileError(f"{source}: model_config is not a text")
    return parse_json(raw, f"{source}: model_config")


def legacy_layers(f: h5py.File, source: str, budget: ReadBudget) -> list[StoredLayer]:
    """The per-layer weights of a legacy .h5 (full model or weights only), in the file's layer order."""
    root = member(f, "model_weights", source) if has(f, "model_weights", source) else f
    if not isinstance(root, h5py.Group):
        raise ModelFileError(f"{source}: 'model_weights' is not a group")
    names = list_attr(root, "layer_names")
    if "layer_names" not in root.attrs and "layer_names0" not in root.attrs:
        raise ModelFileError(f"{source}: no 'layer_names' attribute; not a Keras weights file")
    layers = []
    for name in names:
        where = f"{source}: layer {name!r}"
        budget.take_layer(where)
        group = member(root, name, where)
        if not isinstance(group, h5py.Group):
            raise ModelFileError(f"{where} is listed but its group is missing")
        stored = StoredLayer(name)
        for weight_name in list_attr(group, "weight_names"):
            stored.variables.append((weight_name, read_dataset(group, weight_name, where, budget)))
        layers.append(stored)
    return layers


def keras3_layers(f: h5py.File, source: str, budget: ReadBudget) -> list[StoredLayer]:
    """The per-layer weights of a Keras 3 .weights.h5 (or a .keras's model.weights.h5), flattened:
    nested models' layers come in place, under their own names."""
    top = member(f, "layers", source)
    if not isinstance(top, h5py.Group):
        raise ModelFileError(f"{source}: no 'layers' group; not a Keras 3 weights file")
    layers: list[StoredLayer] = []

    def walk(group: h5py.Group, prefix: str) -> None:
        for key in group:
            where = f"{source}: {prefix}{key}"
            item = member(group, key, where)
            if not isinstance(item, h5py.Group):
                continue
            vars_group, inner = member(item, "vars", where), member(item, "layers", where)
            if isinstance(vars_group, h5py.Group):
                budget.take_layer(where)
                name = text(vars_group.attrs.get("name", key))
                numbered = sorted((k for k in vars_group if k.isdigit()), key=int)
                variables = [(None, read_dataset(vars_group, k, where, budget)) for k in numbered]
                layers.append(StoredLayer(name, variables))
            if isinstance(inner, h5py.Group):
                walk(inner, f"{prefix}{key}/layers/")

    walk(top, "layers/")
    return layers
