"""Small files that asked for large allocations in the caller once the isolated reader's child returned: each
is refused, in the child and again in the parent, with the parent's memory measured (and limited, so that a
regression fails instead of filling the machine). The caps are npmobile.limits'."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from npmobile import isolation
from npmobile.errors import ModelFileError
from npmobile.limits import MAX_CONFIG_BYTES, MAX_CONFIG_VALUES, MAX_FILE_VALUES, MAX_TENSORS, VALUES_FLOOR

# The parent may grow by this much while it reads any one of these files: far less than any of them asked for
# (1 to 1.5 GB before), and a quarter of what the smallest file may give (VALUES_FLOOR float32 values).
PARENT_GROWTH = 64 * 2**20
# The parent's address space above what it uses before reading.
PARENT_HEADROOM = 512 * 2**20
# The child's peak: an interpreter with NumPy and h5py, and what it read before it refused (under 70 MiB
# measured; the child's own limit is isolation.MEMORY_LIMIT_BYTES).
CHILD_PEAK = 256 * 2**20

PARENT = """
    import json, resource, sys
    from npmobile.errors import NpmobileError
    from npmobile.isolation import read_file

    def vm_size():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))

    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm_size() + int(sys.argv[2]), hard))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        read_file(sys.argv[1], "any")
        outcome = "loaded"
    except NpmobileError as error:
        outcome = str(error)
    print(json.dumps({"outcome": outcome,
                      "parent_growth": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024,
                      "child_peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
"""


def read_in_a_measured_parent(path: Path) -> dict:
    """Read ``path`` through the isolated reader from a fresh parent process under an address-space limit:
    its outcome, how much the parent's peak memory grew, and the child's peak."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(PARENT), str(path), str(PARENT_HEADROOM)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{path.name}: {path.stat().st_size:,} bytes on disk; parent +{report['parent_growth'] / 2**20:.1f} MiB, "
          f"child peak {report['child_peak'] / 2**20:.0f} MiB: {report['outcome'][:160]}")
    return report


# --------------------------------------------------------------------------------------------------
# The attack files of issue 23, written in the test run
# --------------------------------------------------------------------------------------------------


def stride_zero_pth(folder: Path) -> Path:
    """torch.save of four 64 M-value tensors that each repeat one stored value (stride 0): about a KB."""
    torch = pytest.importorskip("torch")
    path = folder / "stride0.pth"
    torch.save({f"w{i}": torch.zeros(1).expand(64 * 2**20) for i in range(4)}, path)
    return path


def deflated_storage_pth(folder: Path) -> Path:
    """A torch.save zip whose one storage member is rewritten as 600 MB of deflated zeros (under 1 MB)."""
    torch = pytest.importorskip("torch")
    source = folder / "small.pth"
    torch.save({"w": torch.zeros(4)}, source)
    path = folder / "deflated.pth"
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(path, "w") as out:
        for info in archive.infolist():
            if not info.filename.endswith("/data/0"):
                out.writestr(info, archive.read(info))
                continue
            deflated = zipfile.ZipInfo(info.filename)
            deflated.compress_type = zipfile.ZIP_DEFLATED
            with out.open(deflated, "w", force_zip64=True) as member:
                for _ in range(600):
                    member.write(bytes(2**20))
    return path


def gzip_h5(folder: Path) -> Path:
    """A weights-only .h5 of four 64 M-value datasets of zeros, each chunk written deflated once (zlib of zeros
    shrinks a thousandfold): 1 GiB of float32 from about 1 MB."""
    path = folder / "gzip.h5"
    chunk = 16 * 2**20
    compressed = zlib.compress(bytes(chunk * 4), 9)
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array(["dense"], dtype="S")
        group = f.create_group("dense")
        names = [f"dense/kernel_{i}" for i in range(4)]
        group.attrs["weight_names"] = np.array(names, dtype="S")
        for name in names:
            dataset = group.create_dataset(name, shape=(4 * chunk,), dtype="f4", chunks=(chunk,), compression="gzip")
            for k in range(4):
                dataset.id.write_direct_chunk((k * chunk,), compressed)
    return path


def empty_objects_keras(folder: Path, count: int = 20_000_000) -> Path:
    """A .keras whose one layer config holds ``count`` empty objects: 60 MB of JSON in a 60 KB zip."""
    path = folder / f"objects-{count}.keras"
    junk = "[" + ",".join(["{}"] * count) + "]"
    config = ('{"class_name":"Functional","config":{"name":"m","layers":[{"class_name":"InputLayer","name":"in",'
              '"config":{"name":"in","batch_shape":[null,8,8,3],"junk":' + junk + '},"inbound_nodes":[]}],'
              '"input_layers":[["in",0,0]],"output_layers":[["in",0,0]]}}')
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("config.json", config)
        archive.writestr("metadata.json", '{"keras_version":"3.15.1"}')
        archive.writestr("model.weights.h5", b"")
    return path


def _safetensors(path: Path, header: dict, body_bytes: int) -> Path:
    text = json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + body_bytes)  # a sparse file: the zeros take no disk
    return path


def one_byte_safetensors(folder: Path) -> Path:
    """300 M one-byte (U8) values in five tensors (each within the per-tensor cap): 300 MB of file, 1.2 GB
    once widened to float32."""
    count = 60 * 10**6
    header = {f"w{i}": {"dtype": "U8", "shape": [count], "data_offsets": [i * count, (i + 1) * count]}
              for i in range(5)}
    return _safetensors(folder / "u8.safetensors", header, 5 * count)


def many_entries_safetensors(folder: Path) -> Path:
    """600,000 one-value tensors: seconds of JSON decoding, and as many arrays to send."""
    header = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(600_000)}
    return _safetensors(folder / "entries.safetensors", header, 600_000)


ATTACKS = {
    "stride-0 .pth": (stride_zero_pth, "holds more values than its storage"),
    "deflated .pth storage": (deflated_storage_pth, "storages add up to 629,145,600 bytes"),
    "gzip .h5": (gzip_h5, "add up to more than"),
    "20M empty objects .keras": (empty_objects_keras, "config.json is 60,000,"),
    "5M empty objects .keras": (lambda folder: empty_objects_keras(folder, 5_000_000), "JSON values, more than"),
    "300M one-byte .safetensors": (one_byte_safetensors, f"add up to more than {MAX_FILE_VALUES:,} values"),
    "600k entries .safetensors": (many_entries_safetensors, "bytes of JSON, more than"),
}


@pytest.mark.parametrize("case", ATTACKS, ids=list(ATTACKS))
def test_small_files_asking_for_large_allocations_are_refused_and_the_parent_stays_small(tmp_path, case):
    make, expected = ATTACKS[case]
    path = make(tmp_path)
    report = read_in_a_measured_parent(path)
    message = report["outcome"]
    assert "\n" not in message and str(path) in message and expected in message, message
    assert report["parent_growth"] < PARENT_GROWTH, report
    assert report["child_peak"] < CHILD_PEAK, report


def test_the_caps_leave_room_for_every_mobilenet():
    # V2 alpha 1.4 and V3-Large: under 6.2 M values in under 400 tensors, configs under 1 MB, 13 k values.
    assert MAX_FILE_VALUES > 40 * 6.2e6 and VALUES_FLOOR > 2 * 6.2e6 and MAX_TENSORS > 100 * 400
    assert MAX_CONFIG_BYTES > 16 * 2**20 - 1 and MAX_CONFIG_VALUES > 50 * 13_000


# --------------------------------------------------------------------------------------------------
# The parent checks again: a child that lies about its result is refused before anything is allocated
# --------------------------------------------------------------------------------------------------

LIAR = """
import struct, sys
header = open(sys.argv[-1], "rb").read()
sys.stdout.buffer.write(struct.pack("<16sQQ", b"NPMOBILE-READ-1\\n", {header_length}, {data_length}) + header)
sys.stdout.buffer.flush()
"""


def _lying_child(monkeypatch, folder: Path, header: str, header_length: int | None = None,
                 data_length: int = 0) -> None:
    """The isolated reader's child replaced by one that sends ``header`` and says the lengths given."""
    boot = LIAR.format(header_length=len(header) if header_length is None else header_length,
                       data_length=data_length)
    (folder / "header.json").write_text(header)
    popen = isolation.subprocess.Popen

    def with_header(args, **kwargs):
        return popen([sys.executable, "-c", boot, str(folder / "header.json")], **kwargs)

    monkeypatch.setattr(isolation.subprocess, "Popen", with_header)


def _table(values: int) -> str:
    arrays = [["<f4", [values], 0]]
    return json.dumps({"arrays": arrays, "weights": {"source": "x", "layers": [["d", [["k", 0]]]]}})


@pytest.mark.parametrize("lie,expected", [
    ("header-length", "result header"),
    ("json-values", "JSON values, more than"),
    ("json-depth", "nests JSON deeper"),
    ("arrays-for-the-file", "the most a file of"),
    ("arrays-past-the-cap", "more than 67,108,864"),
    ("data-length", "malformed"),
])
def test_the_parent_bounds_what_the_child_sends_before_allocating(tmp_path, monkeypatch, lie, expected):
    path = tmp_path / "small.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(1000))
    if lie == "header-length":
        _lying_child(monkeypatch, tmp_path, "{}", header_length=2**40)
    elif lie == "json-values":
        _lying_child(monkeypatch, tmp_path, "[" + ",".join(["0"] * (3 * MAX_CONFIG_VALUES)) + "]")
    elif lie == "json-depth":
        _lying_child(monkeypatch, tmp_path, "[" * 500 + "]" * 500)
    elif lie == "arrays-for-the-file":  # within the per-array cap, far over what a 1 KB file may give
        _lying_child(monkeypatch, tmp_path, _table(VALUES_FLOOR + 1), data_length=4 * (VALUES_FLOOR + 1))
    elif lie == "arrays-past-the-cap":
        _lying_child(monkeypatch, tmp_path, _table(2**40), data_length=2**42)
    else:  # a table of 4 values, a data length of 4 GiB
        _lying_child(monkeypatch, tmp_path, _table(4), data_length=4 * 2**30)
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError) as info:
            isolation.read_file(path, "any")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "\n" not in message and str(path) in message and expected in message, message
    assert peak < PARENT_GROWTH, f"{peak:,} bytes allocated before refusing"


def test_a_real_file_still_comes_back_whole(tmp_path):
    path = tmp_path / "real.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array(["dense"], dtype="S")
        group = f.create_group("dense")
        group.attrs["weight_names"] = np.array(["dense/kernel:0"], dtype="S")
        group.create_dataset("dense/kernel:0", data=np.arange(12, dtype=np.float32).reshape(3, 4))
    weights = isolation.read_file(path, "weights")
    np.testing.assert_array_equal(weights.layers[0].variables[0][1], np.arange(12).reshape(3, 4))
    assert os.path.getsize(path) < 2**20


def test_the_security_page_states_the_caps_of_npmobile_limits():
    from npmobile import limits

    readme = (Path(__file__).resolve().parents[1] / "docs" / "security.md").read_text()
    table = readme[readme.index("| bound (`npmobile/limits.py`)"):]
    stated = [f"{limits.MAX_FILE_BYTES // 2**20} MB", f"{limits.MAX_CONFIG_BYTES // 2**20} MB",
              f"2^{limits.MAX_CONFIG_VALUES.bit_length() - 1} values", f"{limits.MAX_CONFIG_DEPTH} deep",
              f"{limits.MAX_TENSORS:,} each", f"{limits.MAX_TENSOR_VALUES // 2**20} M |",
              f"{limits.MAX_FILE_VALUES // 2**20} M, and at most {limits.VALUES_PER_FILE_BYTE} per byte",
              f"floor of {limits.VALUES_FLOOR // 2**20} M", f"header {limits.MAX_RESULT_HEADER_BYTES // 2**20} MB",
              f"nested {limits.MAX_RESULT_DEPTH} deep", f"2^{limits.MAX_LAYER_VALUES.bit_length() - 1} values",
              f"{limits.MAX_WINDOW} pixels / 2^{limits.MAX_WINDOW_WORK.bit_length() - 1}",
              f"2^{limits.MAX_PLAN_VALUES.bit_length() - 1} values"]
    missing = [text for text in stated if text not in table]
    assert not missing, missing
