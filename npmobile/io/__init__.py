"""Readers: Keras files in, ModelSpec out. They know file formats and nothing of math, and they
never execute anything a file contains.

- ``read_model(path)``: a whole model, legacy .h5 (Keras 2/tf_keras or Keras 3) or .keras zip.
- ``read_weights(path)``: weights only (official keras-applications .h5, tf_keras save_weights .h5,
  Keras 3 .weights.h5), or the weights of a whole-model file.
- ``bind_weights(spec, weights)``: put a WeightsFile's arrays on an architecture built in code.
The format is sniffed from the file's first bytes, not its name.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from npmobile.errors import ModelFileError, NpmobileError, WeightsError, WeightsOnlyFileError, unreadable
from npmobile.io.bounds import ReadBudget, parse_json
from npmobile.io.config import parse_model_config
from npmobile.io.kinds import HDF5_SIGNATURE, ZIP_SIGNATURE, foreign_archive, foreign_file, zip_members
from npmobile.io.torch import torch_format
from npmobile.io.variables import canonical_name, split_weight_name, variable_order
from npmobile.limits import MAX_CONFIG_BYTES, MAX_FILE_BYTES
from npmobile.spec import LayerSpec, ModelSpec, StoredLayer, WeightsFile

# h5py (and npmobile.io.hdf5) are imported where a file is read, not here: binding weights, all that the
# caller of an isolated read (npmobile.isolation) does with this module, needs no HDF5 library.
if TYPE_CHECKING:
    import h5py

# A .keras archive holds a config, metadata and the weights: nothing near this size in a MobileNet.
MAX_ZIP_MEMBER_BYTES = MAX_FILE_BYTES

__all__ = ["WeightsFile", "bind_weights", "read_model", "read_weights"]


# --------------------------------------------------------------------------------------------------
# Opening files
# --------------------------------------------------------------------------------------------------


def _kind(path: str) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as error:
        raise unreadable(ModelFileError, path, error, "a Keras file") from None
    if torch_format(path) is not None:  # the one hook for PyTorch files: say where they belong
        raise ModelFileError(f"{path}: is a PyTorch file, not a Keras file; load it with npmobile.load_model(PATH) "
                             "or npmobile.applications.torchvision")
    if head.startswith(HDF5_SIGNATURE):
        return "hdf5"
    if head.startswith(ZIP_SIGNATURE):
        return "zip"
    if not head:
        raise ModelFileError(f"{path}: the file is empty")
    raise ModelFileError(foreign_file(path, head))


# Set in the isolated reader's child (lock_down): libhdf5 there searches no plugin folder.
_NO_PLUGINS = False


def lock_down() -> None:
    """For a process that only reads files from strangers (the isolated reader's child): from the first
    HDF5 file it opens, libhdf5 loads no filter plugin, whatever HDF5_PLUGIN_PATH says."""
    global _NO_PLUGINS
    _NO_PLUGINS = True


def _open_hdf5(source, name: str) -> h5py.File:
    import h5py

    if _NO_PLUGINS:
        from npmobile.io.hdf5 import no_plugin_search

        no_plugin_search()
    try:
        return h5py.File(source, "r")
    except (OSError, ValueError) as error:
        raise ModelFileError(f"{name}: the HDF5 file is corrupt or truncated ({error})") from None


class _KerasArchive:
    """A .keras zip: config.json, metadata.json and model.weights.h5, read in memory, never extracted."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
            members = zip_members(path, self.zip.infolist())
        except (zipfile.BadZipFile, OSError, ValueError) as error:
            raise ModelFileError(f"{path}: the .keras archive is corrupt ({error})") from None
        for name, info in members.items():
            if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/") or ":" in name:
                raise ModelFileError(f"{path}: archive member {name!r} has an unsafe path; refusing the file")
            if info.file_size > MAX_ZIP_MEMBER_BYTES:
                raise ModelFileError(f"{path}: archive member {name!r} is {info.file_size:,} bytes; refusing it")
        foreign = foreign_archive(path, members)
        if foreign is not None:
            raise ModelFileError(foreign)
        self.members = members

    def read(self, name: str, limit: int) -> bytes:
        info = self.members.get(name)
        if info is None:
            raise ModelFileError(f"{self.path}: the .keras archive has no {name}")
        if info.file_size > limit:
            raise ModelFileError(f"{self.path}: {name} is {info.file_size:,} bytes; refusing it")
        try:
            with self.zip.open(info) as member:
                # The header's size may lie (a zip bomb): never decompress much past what it claims.
                data = member.read(info.file_size + 1)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
            raise ModelFileError(f"{self.path}: {name} cannot be read from the archive ({error})") from None
        if len(data) > limit:
            raise ModelFileError(f"{self.path}: {name} is larger than its header says; refusing it")
        return data

    def json(self, name: str) -> dict:
        return parse_json(self.read(name, MAX_CONFIG_BYTES), f"{self.path}: {name}")

    def keras_version(self) -> int:
        if "metadata.json" not in self.members:
            return 3
        version = str(self.json("metadata.json").get("keras_version", "3"))
        return 2 if version.startswith("2") else 3

    def weights(self) -> list[StoredLayer]:
        from npmobile.io.hdf5 import keras3_layers

        data = self.read("model.weights.h5", MAX_ZIP_MEMBER_BYTES)
        with _open_hdf5(io.BytesIO(data), f"{self.path}: model.weights.h5") as f:
            return keras3_layers(f, f"{self.path}: model.weights.h5", ReadBudget.for_file(self.path))


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


# What h5py and the HDF5 library raise on a corrupt file, at any point of reading it.
_CORRUPT = (OSError, RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError, UnicodeDecodeError)


_Read = TypeVar("_Read")


def _read_reporting_corruption(read: Callable[[str], _Read], path: str | os.PathLike) -> _Read:
    """``read(path)``, with whatever h5py or HDF5 raise on a corrupt file turned into one ModelFileError."""
    path = os.fspath(path)
    try:
        return read(path)
    except NpmobileError:
        raise
    except _CORRUPT as error:
        raise ModelFileError(f"{path}: the file is corrupt ({type(error).__name__}: {str(error)[:160]})") from None


def read_model(path: str | os.PathLike) -> ModelSpec:
    """A whole Keras model (architecture and weights) from a legacy .h5 or a .keras file."""
    return _read_reporting_corruption(_read_model, path)


def read_weights(path: str | os.PathLike) -> WeightsFile:
    """The weights of any Keras file npmobile reads, by layer, in file order."""
    return _read_reporting_corruption(_read_weights, path)


def _read_model(path: str) -> ModelSpec:
    from npmobile.io.hdf5 import has, keras_major_version, legacy_layers, model_config

    if _kind(path) == "zip":
        archive = _KerasArchive(path)
        spec = parse_model_config(archive.json("config.json"), archive.keras_version(), path)
        stored = archive.weights()
    else:
        with _open_hdf5(path, path) as f:
            config = model_config(f, path)
            if config is None:
                raise WeightsOnlyFileError(
                    f"{path}: holds weights only, no architecture; load it with an architecture, e.g. "
                    "npmobile.applications.MobileNetV2(weights=PATH, ...)"
                )
            spec = parse_model_config(config, keras_major_version(f), path)
            if not has(f, "model_weights", path):
                raise ModelFileError(f"{path}: the model has no 'model_weights' group")
            stored = legacy_layers(f, path, ReadBudget.for_file(path))
    _attach_by_name(spec, stored, path, nested_groups=_kind(path) == "hdf5")
    return spec


def _read_weights(path: str) -> WeightsFile:
    from npmobile.io.hdf5 import has, keras3_layers, legacy_layers

    if _kind(path) == "zip":
        return WeightsFile(_KerasArchive(path).weights(), path)
    with _open_hdf5(path, path) as f:
        if has(f, "layers", path) and "layer_names" not in f.attrs and not has(f, "model_weights", path):
            return WeightsFile(keras3_layers(f, path, ReadBudget.for_file(path)), path)
        return WeightsFile(_flatten_nested(legacy_layers(f, path, ReadBudget.for_file(path))), path)


def bind_weights(spec: ModelSpec, weights: WeightsFile) -> None:
    """Put ``weights`` on the layers of ``spec`` (an architecture built in code).

    By name when every weighted layer of the architecture is in the file; otherwise by order, as
    Keras 3 loads legacy files (the official MobileNetV3 files use tf_keras's names, ``Conv`` and
    ``expanded_conv_3/depthwise``, where Keras 3 says ``conv`` and ``expanded_conv_3_depthwise``).
    """
    targets = list(_weighted_layers(spec))
    stored = [layer for layer in weights.layers if layer.variables]
    by_name = {layer.name: layer for layer in stored}
    if all(target.name in by_name for target, _ in targets):
        pairs = [(target, owner, by_name[target.name]) for target, owner in targets]
    else:
        if len(stored) != len(targets):
            raise WeightsError(
                f"{weights.source}: holds weights for {len(stored)} layers, the architecture {spec.name!r} "
                f"has {len(targets)} layers with weights (a different model, alpha or include_top?)"
            )
        pairs = [(target, owner, layer) for (target, owner), layer in zip(targets, stored)]
    for target, owner, layer in pairs:
        owner.weights[target.name] = _variables_for(target, layer, weights.source)


# --------------------------------------------------------------------------------------------------
# Binding helpers
# --------------------------------------------------------------------------------------------------


def _weighted_layers(spec: ModelSpec):
    """(layer, the ModelSpec that owns it) for every layer with weights, nested models in place."""
    for layer in spec.layers:
        if layer.submodel is not None:
            yield from _weighted_layers(layer.submodel)
        elif variable_order(layer.class_name, layer.config):
            yield layer, spec


def _variables_for(target: LayerSpec, stored: StoredLayer, source: str) -> dict[str, np.ndarray]:
    expected = variable_order(target.class_name, target.config)
    where = f"{source}: layer {stored.name!r}"
    if stored.name != target.name:
        where += f" (bound to {target.name!r})"
    if len(stored.variables) != len(expected):
        raise WeightsError(f"{where} has {len(stored.variables)} weights, {target.class_name} "
                           f"{target.name!r} needs {len(expected)} ({', '.join(expected)})")
    if all(name is not None for name, _ in stored.variables):
        named = {canonical_name(target.class_name, name): array for name, array in stored.variables}
        if set(named) == set(expected):
            return named
    # Numbered (Keras 3) or differently named: Keras's creation order.
    return {var: array for var, (_, array) in zip(expected, stored.variables)}


def _split_by_sublayer(group: StoredLayer) -> dict[str, StoredLayer]:
    """A legacy file stores a nested model's weights in one group, named ``<sublayer>/<var>`` and
    ordered trainable-first (so a BatchNorm's moving statistics come long after its gamma and beta):
    regroup them by sublayer name, which is what binding by name needs."""
    split: dict[str, StoredLayer] = {}
    for name, array in group.variables:
        sub = split_weight_name(name or "")[0]
        split.setdefault(sub, StoredLayer(sub)).variables.append((name, array))
    return split


def _flatten_nested(layers: list[StoredLayer]) -> list[StoredLayer]:
    """Weights-only legacy files: a group whose weights belong to several layers is a nested model."""
    flat: list[StoredLayer] = []
    for layer in layers:
        split = _split_by_sublayer(layer)
        flat.extend(split.values() if len(split) > 1 else [layer])
    return flat


def _attach_by_name(spec: ModelSpec, stored: list[StoredLayer], source: str, nested_groups: bool) -> None:
    """Give every weighted layer of a whole-model file its weights, by name, nested models included.

    ``nested_groups``: a nested model's weights are one group named after it (legacy .h5), rather
    than stored under each sublayer's own name (.keras)."""
    lookup = {layer.name: layer for layer in stored}

    def attach(model: ModelSpec, table: dict[str, StoredLayer]) -> None:
        for layer in model.layers:
            if layer.submodel is not None:
                group = table.get(layer.name)
                inner = _split_by_sublayer(group) if nested_groups and group is not None else table
                attach(layer.submodel, inner)
                continue
            if not variable_order(layer.class_name, layer.config):
                continue
            found = table.get(layer.name)
            if found is None:  # a writer that scoped names under an outer name: "outer/conv1/kernel"
                found = next((v for k, v in table.items() if k.endswith("/" + layer.name)), None)
            if found is None:
                raise ModelFileError(f"{source}: no weights for layer {layer.name!r} ({layer.class_name})")
            model.weights[layer.name] = _variables_for(layer, found, source)

    attach(spec, lookup)
