"""Official weights: the registry, the search order, and the download path, tested against a local
HTTP server on 127.0.0.1 serving a file Keras wrote during the test."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading

import h5py
import numpy as np
import pytest

from npmobile import applications
from npmobile.errors import WeightsError
from npmobile.weights import cache, official_file, resolve
from npmobile.weights.registry import BASE_URL, V1_ALPHAS, V1_SIZES, V2_ALPHAS, V2_SIZES

V2_SMALL = dict(alpha=0.35, input_shape=(96, 96, 3))
NOWHERE = "http://127.0.0.1:9/"  # the discard port: nothing listens there


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` (url path -> bytes); a path in ``cut`` announces its full length but sends
    only half, then hangs up, as a dropped connection does."""

    files: dict[str, bytes]
    cut: set[str]
    requests: list[str]
    timeout = 10  # a stuck client cannot hold the server

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.requests.append(self.path)
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if self.path in self.cut else data)
        self.close_connection = True

    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 in a thread; yields (base url, files, cut, request log). It stops
    at the end of the test, or by itself after a minute whatever happens."""
    files: dict[str, bytes] = {}
    cut: set[str] = set()
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"files": files, "cut": cut, "requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    deadline = threading.Timer(60, httpd.shutdown)
    thread.start()
    deadline.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", files, cut, requests
    finally:
        deadline.cancel()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Empty weights dir, Keras cache and npmobile cache: nothing is found until downloaded."""
    dirs = {name: tmp_path / name for name in ("weights", "keras", "cache")}
    monkeypatch.setenv("NPMOBILE_WEIGHTS_DIR", str(dirs["weights"]))
    monkeypatch.setenv("KERAS_HOME", str(dirs["keras"]))
    monkeypatch.setenv("NPMOBILE_CACHE_DIR", str(dirs["cache"]))
    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", NOWHERE)
    return dirs


@pytest.fixture
def official(keras_files):
    """A real official-layout file (tf_keras save_weights of MobileNetV2 0.35/96), its registry entry
    and its bytes."""
    case = keras_files.get("MobileNetV2", "official_h5", input_shape=(96, 96, 3), alpha=0.35)
    return case, official_file("mobilenet_v2", 0.35, 96, include_top=True), case.path.read_bytes()


def _publish(files: dict, info, data: bytes) -> str:
    files["/" + info.url] = data
    return "/" + info.url


def test_imagenet_weights_download_once_then_load_from_cache(official, server, isolated, monkeypatch):
    case, info, data = official
    base, files, _, requests = server
    _publish(files, info, data)
    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", base)

    model = applications.MobileNetV2(weights="imagenet", **V2_SMALL)
    np.testing.assert_allclose(model.predict(case.x), case.y, atol=5e-5)
    assert requests == ["/" + info.url]
    cached = isolated["cache"] / info.filename
    assert cached.read_bytes() == data
    assert [p.name for p in cached.parent.iterdir()] == [info.filename]  # no temporary file left behind

    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", NOWHERE)
    again = applications.MobileNetV2(weights="imagenet", **V2_SMALL)
    np.testing.assert_array_equal(again.predict(case.x), model.predict(case.x))
    assert len(requests) == 1


def test_search_order_weights_dir_then_keras_cache_then_own_cache(official, isolated):
    _, info, data = official
    for name in ("cache", "keras/models", "weights"):
        (isolated["weights"].parent / name).mkdir(parents=True)
        (isolated["weights"].parent / name / info.filename).write_bytes(data)
        assert resolve(info) == isolated["weights"].parent / name / info.filename


def test_cache_dir_argument_is_where_downloads_go(official, server, isolated, monkeypatch, tmp_path):
    _, info, data = official
    base, files, _, requests = server
    _publish(files, info, data)
    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", base)
    path = resolve(info, cache_dir=tmp_path / "mine")
    assert path == tmp_path / "mine" / info.filename and path.read_bytes() == data
    assert not isolated["cache"].exists()
    assert resolve(info, cache_dir=tmp_path / "mine") == path and len(requests) == 1


def test_progress_is_reported_up_to_the_full_size(official, server, isolated, monkeypatch):
    _, info, data = official
    base, files, _, _ = server
    _publish(files, info, data)
    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", base)
    seen: list[tuple[int, int | None]] = []
    resolve(info, progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1] == (len(data), len(data))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_progress_bar_draws_on_a_terminal_only():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert cache.terminal_progress("w.h5", io.StringIO()) is None  # a pipe or a log file: silent
    screen = Terminal()
    bar = cache.terminal_progress("w.h5", screen)
    bar(5, 10)
    bar(10, 10)
    assert "w.h5" in screen.getvalue() and "100%" in screen.getvalue() and screen.getvalue().endswith("\n")


def test_corrupt_cached_file_is_fetched_again(official, server, isolated, monkeypatch):
    _, info, data = official
    base, files, _, requests = server
    _publish(files, info, data)
    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", base)
    isolated["cache"].mkdir()
    (isolated["cache"] / info.filename).write_bytes(b"<html>captive portal</html>")
    path = resolve(info)
    assert path.read_bytes() == data and len(requests) == 1


def test_truncated_copy_in_the_keras_cache_is_skipped_and_fetched(official, server, isolated, monkeypatch):
    # keras.utils.get_file writes straight to its final name: a killed download leaves a short file.
    _, info, data = official
    base, files, _, requests = server
    _publish(files, info, data)
    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", base)
    (isolated["keras"] / "models").mkdir(parents=True)
    (isolated["keras"] / "models" / info.filename).write_bytes(data[: len(data) * 2 // 3])
    assert resolve(info) == isolated["cache"] / info.filename and len(requests) == 1
    assert (isolated["cache"] / info.filename).read_bytes() == data


def test_download_cut_short_is_refused_and_not_kept(official, server, isolated, monkeypatch):
    _, info, data = official
    base, files, cut, _ = server
    cut.add(_publish(files, info, data))
    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", base)
    with pytest.raises(WeightsError, match="bytes still to come") as error:
        resolve(info)
    assert info.filename in str(error.value) and "\n" not in str(error.value)
    assert not isolated["cache"].exists() or list(isolated["cache"].iterdir()) == []


def test_file_failing_the_published_md5_is_refused_and_not_kept(server, isolated, monkeypatch):
    base, files, _, _ = server
    info = official_file("mobilenet_v3_small", 1.0, 224, include_top=True)
    assert info.md5 is not None
    _publish(files, info, b"\x89HDF\r\n\x1a\n" + b"not the published file")
    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", base)
    with pytest.raises(WeightsError, match="md5"):
        resolve(info)
    assert list(isolated["cache"].iterdir()) == []


def test_file_matching_the_published_md5_is_accepted(isolated, monkeypatch):
    info = official_file("mobilenet_v3_large", 0.75, 224, include_top=False)
    content = b"pretend weights"
    monkeypatch.setattr(cache, "md5", lambda path: info.md5 if path.read_bytes() == content else "0" * 32)
    isolated["weights"].mkdir()
    (isolated["weights"] / info.filename).write_bytes(content)
    assert resolve(info) == isolated["weights"] / info.filename


def test_md5_is_computed_over_the_whole_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 10_000)
    assert cache.md5(path) == hashlib.md5(path.read_bytes()).hexdigest()


def test_link_in_the_cache_pointing_outside_is_neither_read_nor_written(official, server, isolated, monkeypatch,
                                                                        tmp_path):
    _, info, data = official
    base, files, _, requests = server
    _publish(files, info, data)
    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", base)
    outside = tmp_path / "elsewhere.h5"
    outside.write_bytes(data)  # a valid file: only where it lives is wrong
    isolated["cache"].mkdir()
    (isolated["cache"] / info.filename).symlink_to(outside)
    path = resolve(info)
    assert path == isolated["cache"] / info.filename and not path.is_symlink() and len(requests) == 1
    assert outside.read_bytes() == data


def test_offline_error_is_one_line_naming_the_file_and_where_to_put_it(isolated):
    info = official_file("mobilenet", 0.5, 160, include_top=False)
    with pytest.raises(WeightsError) as error:
        resolve(info)
    message = str(error.value)
    assert "\n" not in message
    assert "mobilenet_5_0_160_tf_no_top.h5" in message
    # the directories as they are now: the weights dir's value, and $KERAS_HOME/models (set here)
    assert f"$NPMOBILE_WEIGHTS_DIR ({isolated['weights']}) or {isolated['keras'] / 'models'}" in message
    assert list(isolated["cache"].iterdir()) == []


def test_offline_error_names_the_default_keras_cache(isolated, monkeypatch):
    monkeypatch.delenv("KERAS_HOME")
    monkeypatch.delenv("NPMOBILE_WEIGHTS_DIR")
    monkeypatch.setenv("HOME", str(isolated["keras"]))  # an empty home: nothing found there either
    info = official_file("mobilenet_v3_small", 1.0, 224, include_top=True)
    with pytest.raises(WeightsError) as error:
        resolve(info)
    assert str(error.value).endswith(f"put {info.filename} in $NPMOBILE_WEIGHTS_DIR or ~/.keras/models")


@pytest.mark.parametrize("base", ["http://[::1/", "http://127.0.0.1:notaport/", "ftp://127.0.0.1/"])
def test_malformed_weights_url_is_a_one_line_weights_error(isolated, monkeypatch, base):
    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", base)
    info = official_file("mobilenet_v2", 1.0, 224, include_top=True)
    with pytest.raises(WeightsError) as error:
        resolve(info)
    assert info.filename in str(error.value) and "\n" not in str(error.value)
    assert list(isolated["cache"].iterdir()) == []


def test_missing_file_on_the_server_names_the_status(server, isolated, monkeypatch):
    base, _, _, _ = server
    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", base)
    info = official_file("mobilenet_v2", 1.4, 224, include_top=True)
    with pytest.raises(WeightsError, match="HTTP 404") as error:
        resolve(info)
    assert info.filename in str(error.value) and "\n" not in str(error.value)


def test_hdf5_completeness_check(official, tmp_path):
    _, _, data = official
    path = tmp_path / "w.h5"
    for content, ok in [(data, True), (data + b"tail", True), (data[:-1], False), (b"GIF89a", False), (b"", False)]:
        path.write_bytes(content)
        assert cache.hdf5_complete(path) is ok
    for libver in ("earliest", "latest"):  # superblock versions 0 and 3
        with h5py.File(path, "w", libver=libver) as f:
            f["x"] = np.arange(100.0)
        assert cache.hdf5_complete(path)
        path.write_bytes(path.read_bytes()[:-8])
        assert not cache.hdf5_complete(path)


def test_registry_has_every_published_variant():
    names = set()
    for alpha in V1_ALPHAS:
        for rows in V1_SIZES:
            for top in (True, False):
                names.add(official_file("mobilenet", alpha, rows, top).filename)
    for alpha in V2_ALPHAS:
        for rows in V2_SIZES:
            for top in (True, False):
                names.add(official_file("mobilenet_v2", alpha, rows, top).filename)
    for family in ("mobilenet_v3_small", "mobilenet_v3_large"):
        for alpha, minimalistic in ((0.75, False), (1.0, False), (1.0, True)):
            for top in (True, False):
                info = official_file(family, alpha, 224, top, minimalistic=minimalistic)
                assert len(info.md5) == 32
                names.add(info.filename)
    assert len(names) == 32 + 60 + 12
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5" in names
    assert "weights_mobilenet_v3_large_minimalistic_224_1.0_float_no_top_v2.h5" in names


def test_registry_agrees_with_the_installed_keras_sources():
    from keras.src.applications import mobilenet, mobilenet_v2, mobilenet_v3

    for module, family in ((mobilenet, "mobilenet"), (mobilenet_v2, "mobilenet_v2")):
        info = official_file(family, 1.0, 224, include_top=False)
        assert BASE_URL + info.url == module.BASE_WEIGHT_PATH + info.filename and info.md5 is None
    assert official_file("mobilenet", 0.25, 128, True).filename == "mobilenet_2_5_128_tf.h5"
    assert official_file("mobilenet_v2", 1.3, 96, False).filename == (
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.3_96_no_top.h5")
    published = set()
    for model_name, (top_hash, no_top_hash) in mobilenet_v3.WEIGHTS_HASHES.items():
        kind, rest = model_name.split("_", 1)
        minimalistic = rest.startswith("minimalistic")
        alpha = float(model_name.split("_")[-2])
        for include_top, filename, md5 in ((True, f"weights_mobilenet_v3_{model_name}.h5", top_hash),
                                           (False, f"weights_mobilenet_v3_{model_name}_no_top_v2.h5", no_top_hash)):
            info = official_file(f"mobilenet_v3_{kind}", alpha, 224, include_top, minimalistic=minimalistic)
            assert (info.filename, info.md5) == (filename, md5)
            assert BASE_URL + info.url == mobilenet_v3.BASE_WEIGHT_PATH + filename
            published.add(filename)
    assert len(published) == 12


@pytest.mark.parametrize(
    "family,alpha,rows,minimalistic",
    [("mobilenet", 0.35, 224, False), ("mobilenet_v2", 1.0, 300, False), ("mobilenet_v3_small", 0.75, 224, True),
     ("resnet50", 1.0, 224, False)],
)
def test_unpublished_variants_say_what_exists(family, alpha, rows, minimalistic):
    with pytest.raises(WeightsError, match="publish|official") as error:
        official_file(family, alpha, rows, True, minimalistic=minimalistic)
    message = str(error.value)
    assert "\n" not in message
    expected = {"mobilenet": ["0.25", "0.75", "128", "224"], "mobilenet_v2": ["0.35", "1.4", "96", "224"],
                "mobilenet_v3_small": ["0.75", "1.0", "minimalistic"], "resnet50": ["mobilenet_v3_large"]}[family]
    assert all(text in message for text in expected), message
