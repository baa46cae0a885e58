"""Fuzzing, bounded: mutated real Keras files and images either work or raise npmobile's own error.
Never a crash, a hang or a foreign exception type. The counts are printed at the end of the run.

Byte-level mutations run in a child process (tests/fuzz_worker.py) with a timeout, because a corrupt
HDF5 file could crash libhdf5 itself; config-level mutations run here under hypothesis. Every input's
reading is bounded on its own, by npmobile's isolated reader and its time limit (npmobile.isolation)."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import subprocess
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import record_fuzz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import npmobile
from npmobile.errors import NpmobileError

WORKER = Path(__file__).with_name("fuzz_worker.py")
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
SMALL = dict(input_shape=(64, 64, 3), alpha=0.75, minimalistic=True)
# A 64-pixel MobileNetV3 loads and runs in well under a second (after Numba's first compile).
PER_INPUT_SECONDS = 20
# Reading is bounded by npmobile itself (a child process that it kills past the limit): a loop inside
# libhdf5 holds the interpreter, so the SIGALRM of time_limit could never interrupt it.
READ_SECONDS = 10


def run_worker(kind: str, base: Path, count: int, seed: int, workdir: Path) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    # Each input is bounded on its own (the reader's time limit); this only bounds the whole batch.
    result = subprocess.run([sys.executable, str(WORKER), kind, str(base), str(count), str(seed), str(workdir)],
                            capture_output=True, text=True, timeout=240 + count * READ_SECONDS)
    assert result.returncode == 0, f"fuzz worker crashed on {base.name} (exit {result.returncode}): " \
                                   f"{result.stderr[-2000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    record_fuzz(f"{kind}:{base.name}", report["ran"], report["outcomes"])
    return report


@pytest.mark.parametrize(
    "writer,kind,count",
    [("keras3_h5", "model", 40), ("keras3_keras", "model", 30), ("tfkeras_h5", "model", 40),
     ("official_h5", "weights", 40), ("keras3_weights", "weights", 40)],
)
def test_mutated_model_files_never_crash(keras_files, tmp_path, writer, kind, count):
    case = keras_files.get("MobileNetV3Large", writer, **SMALL)
    report = run_worker(kind, case.path, count, seed=zlib.crc32(writer.encode()), workdir=tmp_path)
    assert report["foreign"] == [], report["foreign"]
    assert report["ran"] == count


@pytest.mark.parametrize("source", ["chelsea.jpg", "png", "gif", "webp"])
def test_mutated_images_never_crash(tmp_path, source):
    from PIL import Image

    if source == "chelsea.jpg":
        base = SAMPLES / source
    else:
        base = tmp_path / f"base.{source}"
        Image.open(SAMPLES / "coffee.jpg").resize((60, 40)).save(base)
    report = run_worker("image", base, 60, seed=7, workdir=tmp_path / "fuzz")
    assert report["foreign"] == [], report["foreign"]


# --------------------------------------------------------------------------------------------------
# Config mutations under hypothesis: what a hostile or careless writer could put in config.json
# --------------------------------------------------------------------------------------------------

VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.integers(min_value=-3, max_value=10**7), max_size=4),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)


def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree."""
    yield prefix, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, prefix + (index,))


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree[key]
    if isinstance(tree, dict) or (isinstance(tree, list) and path[-1] < len(tree)):
        tree[path[-1]] = value


@pytest.fixture(scope="module")
def keras_zips(keras_files, tmp_path_factory):
    """A MobileNetV3-Large and a segmentation head with UpSampling2D (bilinear), as .keras archives."""
    import keras
    from keras_files import segmentation_head

    head = tmp_path_factory.mktemp("segmentation") / "segmentation.keras"
    segmentation_head(keras, "bilinear").save(str(head))
    return [keras_files.get("MobileNetV3Large", "keras3_keras", **SMALL).path, head]


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_configs_load_or_raise_our_error(keras_zips, tmp_path_factory, data):
    keras_zip = data.draw(st.sampled_from(keras_zips), label="file")
    with zipfile.ZipFile(keras_zip) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    paths = [p for p, _ in _paths(config) if p]
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        path = data.draw(st.sampled_from(paths))
        if data.draw(st.booleans()) and isinstance(path[-1], str):
            parent = config
            for key in path[:-1]:
                parent = parent[key]
            parent.pop(path[-1], None)  # a missing key
        else:
            _set(config, path, data.draw(VALUES))
        paths = [p for p, _ in _paths(config) if p]
    target = tmp_path_factory.mktemp("cfg") / "mutated.keras"
    with zipfile.ZipFile(target, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, json.dumps(config) if name == "config.json" else content)
    record_fuzz(f"config:{keras_zip.name}", 1, {load_and_predict(target): 1})


class Hang(Exception):
    """An input took longer than any file should: a bug, whatever the input."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail the example instead of hanging the run (SIGALRM interrupts Python code between bytecodes, and
    the wait for the reader's child process)."""
    def expire(signum, frame):
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_and_predict(path: Path) -> str:
    """"ok", "npmobile-error" or "npmobile-timeout"; anything else (another exception type, a hang) fails the test."""
    try:
        with time_limit(PER_INPUT_SECONDS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NaN/Inf weights warn: an outcome, not a failure
            model = npmobile.load_model(path, timeout=READ_SECONDS)
            shape = [d or 32 for d in model.input_shape[1:]]
            if int(np.prod(shape)) <= 1_000_000:
                model.predict(np.zeros([1, *shape], np.float32))
        return "ok"
    except NpmobileError as error:
        return "npmobile-timeout" if "did not finish" in str(error) else "npmobile-error"


# --------------------------------------------------------------------------------------------------
# Structured mutations of legacy .h5 files with h5py: the config attribute, datasets, attributes
# --------------------------------------------------------------------------------------------------


def _datasets(f: h5py.File) -> list[str]:
    found: list[str] = []
    f.visititems(lambda name, item: found.append(name) if isinstance(item, h5py.Dataset) else None)
    return found


def _mutate_config(f: h5py.File, data) -> None:
    config = json.loads(f.attrs["model_config"])
    for _ in range(data.draw(st.integers(min_value=1, max_value=3), label="edits")):
        paths = [p for p, _ in _paths(config) if p]  # an edit may remove paths drawn before it
        _set(config, data.draw(st.sampled_from(paths), label="path"), data.draw(VALUES, label="value"))
    f.attrs["model_config"] = json.dumps(config)


def _mutate_dataset(f: h5py.File, data) -> None:
    name = data.draw(st.sampled_from(_datasets(f)), label="dataset")
    action = data.draw(st.sampled_from(["delete", "resize", "retype", "nan", "group"]), label="action")
    array = f[name][()]
    del f[name]
    if action == "resize":
        shape = data.draw(st.lists(st.integers(min_value=0, max_value=6), max_size=4), label="shape")
        f.create_dataset(name, data=np.ones(shape, np.float32))
    elif action == "retype":
        f.create_dataset(name, data=np.array(["text"] * max(1, array.size), dtype=h5py.string_dtype()))
    elif action == "nan":
        f.create_dataset(name, data=np.full(array.shape, np.nan, array.dtype))
    elif action == "group":
        f.create_group(name)


def _mutate_attribute(f: h5py.File, data) -> None:
    groups: list[str] = ["/"]
    f.visititems(lambda name, item: groups.append(name) if isinstance(item, h5py.Group) else None)
    group = f[data.draw(st.sampled_from(groups), label="group")]
    names = [n for n in group.attrs if n != "model_config"] or ["weight_names"]
    text = st.text(st.characters(exclude_characters="\x00"), max_size=20)  # HDF5 strings cannot hold NUL
    value = data.draw(st.one_of(st.integers(-5, 10**6), text, st.lists(text, max_size=3)), label="attribute")
    group.attrs[data.draw(st.sampled_from(names), label="attribute name")] = value


H5_MUTATIONS = {"config": _mutate_config, "dataset": _mutate_dataset, "attribute": _mutate_attribute}


@pytest.fixture(scope="module")
def h5_models(keras_files):
    writers = ("keras3_h5", "tfkeras_h5", "keras3_keras")
    return [keras_files.get("MobileNetV3Large", writer, **SMALL).path for writer in writers]


def _mutated_copy(source: Path, folder: Path, kind: str, data) -> Path:
    """A copy of ``source`` with one structured mutation: of the .h5 itself, or of the
    model.weights.h5 inside a .keras zip (its config.json has its own test above)."""
    if source.suffix != ".keras":
        target = folder / "mutated.h5"
        shutil.copyfile(source, target)
        with h5py.File(target, "r+") as f:
            H5_MUTATIONS[kind](f, data)
        return target
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    inner = folder / "model.weights.h5"
    inner.write_bytes(members["model.weights.h5"])
    with h5py.File(inner, "r+") as f:
        H5_MUTATIONS[kind](f, data)
    members["model.weights.h5"] = inner.read_bytes()
    target = folder / "mutated.keras"
    with zipfile.ZipFile(target, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return target


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_h5_structures_load_or_raise_our_error(h5_models, tmp_path_factory, data):
    source = data.draw(st.sampled_from(h5_models), label="file")
    kinds = ["dataset", "attribute"] if source.suffix == ".keras" else sorted(H5_MUTATIONS)
    kind = data.draw(st.sampled_from(kinds), label="mutation")
    target = _mutated_copy(source, tmp_path_factory.mktemp("h5"), kind, data)
    record_fuzz(f"h5-{kind}:{source.name}", 1, {load_and_predict(target): 1})


# --------------------------------------------------------------------------------------------------
# Inputs of unknown size: the sizes a model computes are only known at predict, where the same rules hold
# --------------------------------------------------------------------------------------------------

# Config entries that set sizes without changing any weight's shape: a mutated one still loads.
SIZE_KEYS = ("strides", "padding", "size", "pool_size", "dilation_rate", "cropping")
# Plans whose layers' outputs add up to at most this many values are made and run (well inside the guard).
RUN_VALUES = 16 * 2**20


@pytest.fixture(scope="module")
def unknown_size_zip(tmp_path_factory) -> Path:
    """A small Keras-written model on a (None, None, 3) input: convolutions, padding, pooling, upsampling."""
    import keras

    layers = keras.layers
    inputs = keras.Input((None, None, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", activation="relu6")(inputs)
    x = layers.DepthwiseConv2D(3, padding="same", dilation_rate=1)(x)
    x = layers.ZeroPadding2D(((1, 2), (0, 1)))(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.UpSampling2D(2)(x)
    x = layers.Conv2D(4, 1)(x)
    outputs = layers.AveragePooling2D(3, strides=1, padding="same")(x)
    path = tmp_path_factory.mktemp("unknown-size") / "unknown.keras"
    keras.Model(inputs, outputs).save(path)
    return path


@contextlib.contextmanager
def address_space(extra: int):
    """Allow this process ``extra`` bytes of address space more than it uses now: a prediction that breaks
    the size rules ends in MemoryError (a foreign exception: the test fails) instead of filling the machine."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as status:
        in_use = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (in_use + extra if hard == resource.RLIM_INFINITY
                                            else min(in_use + extra, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def plan_and_predict(path: Path, sizes: list[tuple[int, int]]) -> str:
    """Load, then for each input size make the plan (refused in our error, or within the rules) and run the
    small ones. "ok", "npmobile-error" or "npmobile-timeout"; anything else fails the test."""
    from npmobile.layers import checked_shapes
    from npmobile.limits import MAX_PLAN_VALUES
    from npmobile.plan import build_plan

    try:
        with time_limit(PER_INPUT_SECONDS), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = npmobile.load_model(path, timeout=READ_SECONDS)
            graph = model.optimized_graph()
            refused = 0
            for height, width in sizes:
                shape = (1, height, width, 3)
                try:
                    shapes = checked_shapes(graph, [shape])
                    if sum(math.prod(s[1:]) for s in shapes.values()) > RUN_VALUES:
                        continue  # within the rules, too large to plan and run here (making a plan fills tables)
                    plan = build_plan(graph, [shape], list(graph.outputs))
                except NpmobileError:
                    refused += 1
                    continue
                assert sum(plan.buffer_sizes) <= MAX_PLAN_VALUES, (shape, plan.buffer_sizes)
                with address_space(2**30):
                    model.predict(np.zeros(shape, np.float32))
        return "npmobile-error" if refused else "ok"
    except NpmobileError as error:
        return "npmobile-timeout" if "did not finish" in str(error) else "npmobile-error"


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_unknown_size_inputs_meet_the_size_rules_at_predict(unknown_size_zip, tmp_path_factory, data):
    with zipfile.ZipFile(unknown_size_zip) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    paths = [p for p, v in _paths(config) if p and p[-1] in SIZE_KEYS]
    big = st.integers(min_value=0, max_value=10**5)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3), label="edits")):
        path = data.draw(st.sampled_from(paths), label="path")
        _set(config, path, data.draw(st.one_of(big, st.lists(big, min_size=2, max_size=2),
                                               st.lists(st.lists(big, min_size=2, max_size=2), min_size=2,
                                                        max_size=2)), label="value"))
    side = st.integers(min_value=1, max_value=96)
    sizes = data.draw(st.lists(st.tuples(side, side), min_size=1, max_size=3), label="input sizes")
    target = tmp_path_factory.mktemp("unknown") / "mutated.keras"
    with zipfile.ZipFile(target, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, json.dumps(config) if name == "config.json" else content)
    record_fuzz(f"unknown-size:{unknown_size_zip.name}", 1, {plan_and_predict(target, sizes): 1})
