"""The read cache (npmobile/read_cache.py): a file read once is not read again -- no child, no HDF5 -- and what
comes out of an entry is exactly what the child sent for those bytes, checked the same way; an entry that is
not whole, a file that changed, an error, a folder others may write to: the file is read as without a cache.

The rest of the suite runs with the cache off (conftest.py); these tests turn it on in a folder of their own."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import npmobile
from npmobile import isolation, read_cache
from npmobile.errors import ModelFileError

SMALL_V2 = dict(input_shape=(96, 96, 3), alpha=0.35)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The read cache, on, in a private folder of this test's."""
    monkeypatch.setenv("NPMOBILE_READ_CACHE", "1")
    monkeypatch.setenv("NPMOBILE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "reads"


@pytest.fixture
def children(monkeypatch):
    """The command lines of the isolated readers started from now on."""
    started = []
    popen = isolation.subprocess.Popen

    def counting(command, *args, **kwargs):
        if isolation._BOOT in command:  # not another library's (platform's uname, say)
            started.append(command)
        return popen(command, *args, **kwargs)

    monkeypatch.setattr(isolation.subprocess, "Popen", counting)
    return started


def copy_of(keras_files, folder, writer="keras3_h5"):
    """A small MobileNetV2 Keras wrote (its case: inputs and Keras's outputs), copied into ``folder``."""
    case = keras_files.get("MobileNetV2", writer, **SMALL_V2)
    path = folder / f"model{case.path.suffix}"
    shutil.copyfile(case.path, path)
    return case, path


def same_result(a, b) -> bool:
    """Two reader results hold the same configs, names and array bytes: what crosses the pipe is equal."""
    header_a, arrays_a = isolation.encode(a)
    header_b, arrays_b = isolation.encode(b)
    return header_a == header_b and all(x.tobytes() == y.tobytes() for x, y in zip(arrays_a.arrays, arrays_b.arrays))


def entries(cache) -> list:
    return sorted(p for p in cache.glob("*.read")) if cache.is_dir() else []


@pytest.mark.parametrize("writer,kind", [("keras3_h5", "model"), ("keras3_keras", "model"),
                                         ("official_h5", "weights"), ("official_h5", "any")])
def test_a_file_read_once_is_read_again_from_its_entry_without_a_child(keras_files, tmp_path, cache, children,
                                                                       writer, kind):
    _, path = copy_of(keras_files, tmp_path, writer)
    first = isolation.read_file(path, kind)
    assert len(children) == 1 and len(entries(cache)) == 1
    again = isolation.read_file(path, kind)
    assert len(children) == 1, "the second read started a child"
    assert type(again) is type(first) and same_result(again, first)
    assert same_result(again, isolation.read_in_process(str(path), kind))


def test_a_model_from_an_entry_predicts_the_same_bits(keras_files, tmp_path, cache, children):
    case, path = copy_of(keras_files, tmp_path)
    first = npmobile.load_model(path).predict(case.x)
    again = npmobile.load_model(path).predict(case.x)
    assert len(children) == 1 and again.tobytes() == first.tobytes()
    np.testing.assert_allclose(again, case.y, atol=1e-5)


def test_trusted_reads_keep_entries_too(keras_files, tmp_path, cache, children):
    _, path = copy_of(keras_files, tmp_path)
    first = isolation.read_file(str(path), "model", trusted=True)
    assert len(entries(cache)) == 1
    assert same_result(isolation.read_file(str(path), "model"), first) and not children  # absolute path: one entry


def test_other_bytes_are_another_entry(keras_files, tmp_path, cache, children):
    _, path = copy_of(keras_files, tmp_path)
    isolation.read_file(path, "model")
    shutil.copyfile(keras_files.get("MobileNetV3Small", "keras3_h5", input_shape=(96, 96, 3)).path, path)
    spec = isolation.read_file(path, "model")  # the same name, other bytes
    assert len(children) == 2 and len(entries(cache)) == 2
    assert same_result(spec, isolation.read_in_process(str(path), "model"))


@pytest.mark.parametrize("damage", ["cut-short", "flipped-magic", "huge-header", "garbled-header", "empty"])
def test_an_entry_that_is_not_whole_is_read_as_none_and_replaced(keras_files, tmp_path, cache, children, damage):
    _, path = copy_of(keras_files, tmp_path)
    first = isolation.read_file(path, "model")
    [entry] = entries(cache)
    whole = entry.read_bytes()
    data = bytearray(whole)
    if damage == "cut-short":
        data = data[: len(data) - 100]
    elif damage == "flipped-magic":
        data[0] ^= 1
    elif damage == "huge-header":
        data[16:24] = (2**62).to_bytes(8, "little")  # refused before anything of that size exists
    elif damage == "garbled-header":
        data[40:48] = b"\xff" * 8
    else:
        data = bytearray()
    entry.write_bytes(bytes(data))
    again = isolation.read_file(path, "model")
    assert len(children) == 2 and same_result(again, first)
    assert entries(cache) == [entry] and entry.read_bytes() == whole  # written again, whole


def test_errors_are_never_kept(tmp_path, cache, children):
    path = tmp_path / "not_a_model.h5"
    path.write_bytes(b"hello")
    for _ in range(2):
        with pytest.raises(ModelFileError):
            isolation.read_file(path, "model")
    assert len(children) == 2 and os.listdir(cache) == []  # no entry, no temporary file either


def test_a_file_changed_while_it_was_read_is_not_kept(keras_files, tmp_path, cache):
    _, path = copy_of(keras_files, tmp_path)
    new = read_cache.entry_for(str(path), "model").new()
    new.write(b"what the child sent")
    with open(path, "ab") as f:  # changed after it was hashed, before its result came
        f.write(b"\0")
    new.keep()
    assert not entries(cache) and os.listdir(cache) == []  # nor its temporary file


@pytest.mark.parametrize("folder", ["writable-by-others", "a-symlink"])
def test_a_folder_others_may_write_to_is_neither_read_nor_written(keras_files, tmp_path, cache, children, folder):
    _, path = copy_of(keras_files, tmp_path)
    isolation.read_file(path, "model")
    if folder == "writable-by-others":
        os.chmod(cache, 0o777)
    else:
        os.replace(cache, tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", cache)
    isolation.read_file(path, "model")
    assert len(children) == 2
    path.write_bytes(path.read_bytes() + b"\0")  # another file: nothing is written there either
    before = sorted(os.listdir(cache))
    isolation.read_file(path, "model")
    assert sorted(os.listdir(cache)) == before


def test_entries_are_private(keras_files, tmp_path, cache):
    _, path = copy_of(keras_files, tmp_path)
    isolation.read_file(path, "model")
    [entry] = entries(cache)
    assert os.stat(cache).st_mode & 0o777 == 0o700 and entry.stat().st_mode & 0o777 == 0o600


def test_the_least_recently_used_entries_go_past_the_size_bound(keras_files, tmp_path, cache, monkeypatch):
    _, path = copy_of(keras_files, tmp_path)
    isolation.read_file(path, "model")
    [first] = entries(cache)
    monkeypatch.setattr(read_cache, "MAX_BYTES", first.stat().st_size + 1)  # room for one
    path.write_bytes(path.read_bytes() + b"\0")
    isolation.read_file(path, "model")
    [second] = entries(cache)
    assert second != first


def test_off_means_no_entry(keras_files, tmp_path, cache, children, monkeypatch):
    monkeypatch.setenv("NPMOBILE_READ_CACHE", "0")
    _, path = copy_of(keras_files, tmp_path)
    isolation.read_file(path, "model")
    isolation.read_file(path, "model")
    assert len(children) == 2 and not entries(cache)


def test_a_fifo_or_a_huge_file_is_read_without_the_cache(tmp_path, cache, children, monkeypatch):
    """The caller hashes with no time limit: it must neither wait on a FIFO nor hash a file without bound."""
    fifo = tmp_path / "model.h5"
    os.mkfifo(fifo)
    with pytest.raises(ModelFileError, match="did not finish"):
        isolation.read_file(fifo, "model", timeout=3)  # the child waits on it, and is stopped
    monkeypatch.setattr(read_cache, "MAX_FILE_BYTES", 4)
    big = tmp_path / "big.h5"
    big.write_bytes(b"hello")
    assert read_cache.entry_for(str(big), "model") is None
    assert len(children) == 1 and not entries(cache)
