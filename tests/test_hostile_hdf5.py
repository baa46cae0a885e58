"""HDF5 files that reach outside themselves: links to other files (at the root groups, at layer groups,
through soft links), virtual datasets, external raw storage, and filters that would make libhdf5 load a
shared library. Every file is written by plain h5py in the test run; each is refused in one line, through
the default isolated reader and in-process, and nothing of the other file ever loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pytest

import npmobile
from npmobile.errors import ModelFileError
from npmobile.io import hdf5
from npmobile.isolation import read_file

KERNEL_SHAPE = (3, 3, 3, 4)
SECRET = np.arange(np.prod(KERNEL_SHAPE), dtype=np.float32).reshape(KERNEL_SHAPE) + 1000


def _config() -> str:
    """A Keras 3 legacy .h5 model config: one 3x3 Conv2D named 'c' on a 32x32 RGB input."""
    tensor = {"class_name": "__keras_tensor__", "config": {"keras_history": ["in", 0, 0]}}
    layers = [
        {"class_name": "InputLayer", "name": "in", "config": {"name": "in", "batch_shape": [None, 32, 32, 3]},
         "inbound_nodes": []},
        {"class_name": "Conv2D", "name": "c", "inbound_nodes": [{"args": [tensor], "kwargs": {}}],
         "config": {"name": "c", "filters": 4, "kernel_size": [3, 3], "padding": "valid", "use_bias": False}},
    ]
    return json.dumps({"class_name": "Functional", "config": {"name": "m", "layers": layers,
                                                              "input_layers": [["in", 0, 0]],
                                                              "output_layers": [["c", 0, 0]]}})


def _legacy(path: Path, kernel: np.ndarray | None) -> Path:
    """A whole-model legacy .h5; ``kernel=None`` leaves model_weights for the caller to fill."""
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = _config()
        f.attrs["keras_version"] = "3.15.1"
        if kernel is not None:
            root = f.create_group("model_weights")
            root.attrs["layer_names"] = np.array(["in", "c"], dtype="S")
            root.create_group("in").attrs["weight_names"] = np.array([], dtype="S")
            group = root.create_group("c")
            group.attrs["weight_names"] = np.array(["c/kernel"], dtype="S")
            group.create_dataset("c/kernel", data=kernel)
    return path


@pytest.fixture()
def secret_model(tmp_path) -> Path:
    """Another HDF5 file on the machine: a valid model whose weights are the secret."""
    return _legacy(tmp_path / "secret.h5", SECRET)


def _root_is_a_link(folder: Path, secret: Path) -> Path:
    path = _legacy(folder / "root-link.h5", None)
    with h5py.File(path, "r+") as f:
        f["model_weights"] = h5py.ExternalLink(str(secret), "/model_weights")
    return path


def _soft_link_through_an_external_one(folder: Path, secret: Path, member: str) -> Path:
    """A model whose model_weights/``member`` (a layer group, or one weight) is a soft link into /elsewhere, an
    external link to the same place in ``secret``."""
    parent, _, leaf = f"/model_weights/{member}".rpartition("/")
    path = _legacy(folder / f"soft-{leaf}.h5", np.zeros(KERNEL_SHAPE, np.float32))
    with h5py.File(path, "r+") as f:
        f["elsewhere"] = h5py.ExternalLink(str(secret), parent)
        del f[f"model_weights/{member}"]
        f[f"model_weights/{member}"] = h5py.SoftLink(f"/elsewhere/{leaf}")
    return path


def _keras3_weights(path: Path, kernel: np.ndarray | None) -> Path:
    """A Keras 3 .weights.h5: layers/conv2d/vars/0 (the real name in vars' 'name' attribute)."""
    with h5py.File(path, "w") as f:
        if kernel is not None:
            variables = f.create_group("layers/conv2d/vars")
            variables.attrs["name"] = "c"
            variables.create_dataset("0", data=kernel)
    return path


def _keras3_root_is_a_link(folder: Path, secret: Path) -> Path:
    other = _keras3_weights(folder / "secret.weights.h5", SECRET)
    path = _keras3_weights(folder / "root-link.weights.h5", None)
    with h5py.File(path, "r+") as f:
        f["layers"] = h5py.ExternalLink(str(other), "/layers")
    return path


def _keras3_vars_is_a_link(folder: Path, secret: Path) -> Path:
    other = _keras3_weights(folder / "secret.weights.h5", SECRET)
    path = _keras3_weights(folder / "vars-link.weights.h5", None)
    with h5py.File(path, "r+") as f:
        f.create_group("layers/conv2d")["vars"] = h5py.ExternalLink(str(other), "/layers/conv2d/vars")
    return path


# The four files of issue 23 and two more: each took every weight from the other file before.
LINKED = {
    "model_weights-external": (_root_is_a_link, "model", "'model_weights' links to another file"),
    "layer-soft-through-external": (partial(_soft_link_through_an_external_one, member="c"), "model",
                                    "'c' is a soft link"),
    "weight-soft-through-external": (partial(_soft_link_through_an_external_one, member="c/c/kernel"), "model",
                                     "'kernel' is a soft link"),
    "keras3-layers-external": (_keras3_root_is_a_link, "weights", "'layers' links to another file"),
    "keras3-vars-external": (_keras3_vars_is_a_link, "weights", "'vars' links to another file"),
}


@pytest.mark.parametrize("trusted", [False, True], ids=["isolated", "in-process"])
@pytest.mark.parametrize("case", LINKED, ids=list(LINKED))
def test_links_out_of_the_file_are_refused_wherever_they_are(tmp_path, secret_model, case, trusted):
    make, kind, expected = LINKED[case]
    path = make(tmp_path, secret_model)
    with h5py.File(path, "r") as f:  # the attack works: plain h5py reads the secret through the file
        found = [f[name][()] for name in ("model_weights/c/c/kernel", "layers/conv2d/vars/0") if name in f]
        assert found and np.array_equal(found[0], SECRET)
    with pytest.raises(ModelFileError) as info:
        read_file(path, kind, trusted=trusted)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and expected in message, message


def test_a_linked_model_file_is_refused_by_load_model_and_the_cli(tmp_path, secret_model):
    path = _root_is_a_link(tmp_path, secret_model)
    with pytest.raises(ModelFileError, match="'model_weights' links to another file"):
        npmobile.load_model(path)
    photo = Path(__file__).resolve().parents[1] / "samples" / "chelsea.jpg"
    result = subprocess.run([sys.executable, "-m", "npmobile", "classify", str(photo), "--weights", str(path),
                             "--json"], capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and result.stdout == "", result.stdout
    assert len(lines) == 1 and "links to another file" in lines[0], result.stderr


def test_libhdf5_itself_follows_no_external_link_through_the_readers_link_access(tmp_path, secret_model):
    # The second wall, met without the first: the link access list the readers open every object with
    # makes an external link open an empty buffer, never the file it names.
    path = _root_is_a_link(tmp_path, secret_model)
    with h5py.File(path, "r") as f:
        assert isinstance(f["model_weights"], h5py.Group)  # h5py's own default follows it
        with pytest.raises(KeyError, match="signature"):
            h5py.h5o.open(f.id, b"model_weights", lapl=hdf5.NO_EXTERNAL_FILES)
    path = _soft_link_through_an_external_one(tmp_path, secret_model, "c")
    with h5py.File(path, "r") as f:
        with pytest.raises(KeyError, match="signature"):
            h5py.h5o.open(f["model_weights"].id, b"c", lapl=hdf5.NO_EXTERNAL_FILES)


def test_a_plain_soft_link_inside_the_file_is_refused_too(tmp_path):
    # Keras never writes links: the readers follow none, so none can lead outside.
    path = _legacy(tmp_path / "inside.h5", SECRET)
    with h5py.File(path, "r+") as f:
        f["model_weights"].move("c", "real_c")
        f["model_weights/c"] = h5py.SoftLink("/model_weights/real_c")
    with pytest.raises(ModelFileError, match="'c' is a soft link"):
        npmobile.load_model(path)


def test_the_same_file_without_links_loads(tmp_path):
    model = npmobile.load_model(_legacy(tmp_path / "plain.h5", SECRET))
    np.testing.assert_array_equal(model.graph.nodes[-1].weights["kernel"], SECRET)


@pytest.mark.parametrize("where", ["virtual", "external"])
def test_data_kept_in_other_files_is_refused_in_a_keras3_weights_file(tmp_path, secret_model, where):
    path = _keras3_weights(tmp_path / f"{where}.weights.h5", None)
    raw = tmp_path / "secret.bin"
    raw.write_bytes(SECRET.tobytes())
    with h5py.File(path, "r+") as f:
        variables = f.create_group("layers/conv2d/vars")
        if where == "virtual":
            layout = h5py.VirtualLayout(shape=KERNEL_SHAPE, dtype="f4")
            layout[...] = h5py.VirtualSource(str(secret_model), "model_weights/c/c/kernel", shape=KERNEL_SHAPE)
            variables.create_virtual_dataset("0", layout)
        else:
            variables.create_dataset("0", shape=KERNEL_SHAPE, dtype="f4", external=[(str(raw), 0, SECRET.nbytes)])
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["layers/conv2d/vars/0"][()], SECRET)  # the attack works in h5py
    for trusted in (False, True):
        with pytest.raises(ModelFileError, match="keeps its data outside the file"):
            read_file(path, "weights", trusted=trusted)


# --------------------------------------------------------------------------------------------------
# Filters: only libhdf5's own; a plugin library is never loaded
# --------------------------------------------------------------------------------------------------

UNKNOWN_FILTER = 31999  # registered to nobody (h5py brings LZF, 32000, itself)


def _filtered(path: Path, filter_id: int) -> Path:
    """A legacy model whose kernel names filter ``filter_id``, its one chunk written raw."""
    _legacy(path, np.zeros(KERNEL_SHAPE, np.float32))
    with h5py.File(path, "r+") as f:
        group = f["model_weights/c/c"]
        del group["kernel"]
        dataset = group.create_dataset("kernel", shape=KERNEL_SHAPE, dtype="f4", chunks=KERNEL_SHAPE,
                                       compression=filter_id, allow_unknown_filter=True)
        dataset.id.write_direct_chunk((0, 0, 0, 0), SECRET.tobytes())
    return path


@pytest.mark.parametrize("trusted", [False, True], ids=["isolated", "in-process"])
def test_a_filter_libhdf5_does_not_build_in_is_refused_by_id(tmp_path, trusted):
    with pytest.raises(ModelFileError) as info:
        npmobile.load_model(_filtered(tmp_path / "filter.h5", UNKNOWN_FILTER), trusted=trusted)
    message = str(info.value)
    assert "\n" not in message and f"filter {UNKNOWN_FILTER}" in message and "plugins" in message, message


def test_lzf_which_h5py_registers_is_refused_too(tmp_path):
    # Not built into libhdf5: the list is libhdf5's own filters, not whatever this process registered.
    with pytest.raises(ModelFileError, match="filter 32000"):
        npmobile.load_model(_filtered(tmp_path / "lzf.h5", 32000), trusted=True)


def test_built_in_filters_still_read(tmp_path):
    path = _legacy(tmp_path / "gzip.h5", None)
    with h5py.File(path, "r+") as f:
        root = f.create_group("model_weights")
        root.attrs["layer_names"] = np.array(["in", "c"], dtype="S")
        root.create_group("in").attrs["weight_names"] = np.array([], dtype="S")
        group = root.create_group("c")
        group.attrs["weight_names"] = np.array(["c/kernel"], dtype="S")
        group.create_dataset("c/kernel", data=SECRET, compression="gzip", shuffle=True, fletcher32=True)
    np.testing.assert_array_equal(npmobile.load_model(path).graph.nodes[-1].weights["kernel"], SECRET)


PLUGIN = r"""
#include <stdio.h>
#include <stdlib.h>
/* Runs when the library is loaded: what a planted plugin would do. */
__attribute__((constructor)) static void planted(void) {
    const char *marker = getenv("PLANTED_MARKER");
    FILE *f = marker ? fopen(marker, "a") : NULL;
    if (f) { fputs("loaded\n", f); fclose(f); }
}
int H5PLget_plugin_type(void) { return 0; }
const void *H5PLget_plugin_info(void) { return NULL; }
"""


@pytest.fixture()
def planted_plugin(tmp_path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the planted plugin with")
    folder = tmp_path / "plugins"
    folder.mkdir()
    source = tmp_path / "planted.c"
    source.write_text(PLUGIN)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(folder / "libplanted.so"), str(source)], check=True)
    return folder


def _run_with_plugin_path(code: str, folder: Path, marker: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HDF5_PLUGIN_PATH": str(folder), "PLANTED_MARKER": str(marker)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_a_planted_plugin_is_never_loaded(tmp_path, planted_plugin):
    path = _filtered(tmp_path / "filter.h5", UNKNOWN_FILTER)
    marker = tmp_path / "marker"
    # The attack: plain h5py reading the dataset loads the planted library (its constructor runs).
    control = _run_with_plugin_path(f"""
        import h5py
        try:
            h5py.File({str(path)!r}, "r")["model_weights/c/c/kernel"][()]
        except OSError:
            pass
        """, planted_plugin, marker)
    assert control.returncode == 0, control.stderr
    assert marker.exists(), "the planted plugin did not load even in plain h5py: the test proves nothing"
    marker.unlink()
    result = _run_with_plugin_path(f"""
        import npmobile
        from npmobile.errors import ModelFileError
        for trusted in (False, True):
            try:
                npmobile.load_model({str(path)!r}, trusted=trusted)
            except ModelFileError as error:
                assert "filter {UNKNOWN_FILTER}" in str(error), error
            else:
                raise SystemExit("loaded")
        """, planted_plugin, marker)
    assert result.returncode == 0, result.stderr
    assert not marker.exists()


def test_the_isolated_readers_child_searches_no_plugin_folder(tmp_path, planted_plugin):
    # Even a filter the first check let through would find no library: the child empties the search path.
    marker = tmp_path / "marker"
    result = _run_with_plugin_path("""
        import h5py
        from npmobile.io import hdf5
        assert h5py.h5pl.size() >= 1
        hdf5.no_plugin_search()
        print(h5py.h5pl.size())
        """, planted_plugin, marker)
    assert result.returncode == 0 and result.stdout.strip() == "0", result.stderr
