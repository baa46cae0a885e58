"""Official weights: the registry, the search order, and the download path, tested against a local
HTTP server on 127.0.0.1 serving a file Keras wrote during the test."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from npmobile import applications
from npmobile.errors import WeightsError
from npmobile.weights import official_file, resolve
from npmobile.weights.registry import V1_ALPHAS, V1_SIZES, V2_ALPHAS, V2_SIZES

V2_SMALL = dict(alpha=0.35, input_shape=(96, 96, 3))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/'site'; yields (base url, site dir, request log)."""
    site = tmp_path / "site"
    site.mkdir()
    requests: list[str] = []

    class Handler(_QuietHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            requests.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(site)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", site, requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Empty weights dir, Keras cache and npmobile cache: nothing is found until downloaded."""
    dirs = {name: tmp_path / name for name in ("weights", "keras", "cache")}
    monkeypatch.setenv("NPMOBILE_WEIGHTS_DIR", str(dirs["weights"]))
    monkeypatch.setenv("KERAS_HOME", str(dirs["keras"]))
    monkeypatch.setenv("NPMOBILE_CACHE_DIR", str(dirs["cache"]))
    return dirs


def _publish(site: Path, info, data: bytes) -> None:
    target = site / info.url
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def test_imagenet_weights_download_once_then_load_from_cache(keras_files, server, isolated, monkeypatch):
    base, site, requests = server
    case = keras_files.get("MobileNetV2", "official_h5", input_shape=(96, 96, 3), alpha=0.35)
    info = official_file("mobilenet_v2", 0.35, 96, include_top=True)
    _publish(site, info, case.path.read_bytes())
    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", base)

    model = applications.MobileNetV2(weights="imagenet", **V2_SMALL)
    np.testing.assert_allclose(model.predict(case.x), case.y, atol=5e-5)
    assert requests == ["/" + info.url]
    cached = isolated["cache"] / info.filename
    assert cached.read_bytes() == case.path.read_bytes()
    assert not [p for p in cached.parent.iterdir() if p.name.endswith(".part")]

    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", "http://127.0.0.1:9/")  # nothing listens there
    again = applications.MobileNetV2(weights="imagenet", **V2_SMALL)
    np.testing.assert_array_equal(again.predict(case.x), model.predict(case.x))
    assert len(requests) == 1


def test_files_in_the_keras_cache_are_used_without_download(keras_files, isolated, monkeypatch):
    case = keras_files.get("MobileNetV2", "official_h5", input_shape=(96, 96, 3), alpha=0.35)
    info = official_file("mobilenet_v2", 0.35, 96, include_top=True)
    (isolated["keras"] / "models").mkdir(parents=True)
    (isolated["keras"] / "models" / info.filename).write_bytes(case.path.read_bytes())
    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", "http://127.0.0.1:9/")
    assert resolve(info) == isolated["keras"] / "models" / info.filename


def test_corrupt_cached_file_is_fetched_again(keras_files, server, isolated, monkeypatch):
    base, site, requests = server
    case = keras_files.get("MobileNetV2", "official_h5", input_shape=(96, 96, 3), alpha=0.35)
    info = official_file("mobilenet_v2", 0.35, 96, include_top=True)
    _publish(site, info, case.path.read_bytes())
    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", base)
    isolated["cache"].mkdir()
    (isolated["cache"] / info.filename).write_bytes(b"<html>captive portal</html>")
    path = resolve(info)
    assert path.read_bytes() == case.path.read_bytes() and len(requests) == 1


def test_file_failing_the_published_md5_is_refused_and_not_kept(server, isolated, monkeypatch):
    base, site, _ = server
    info = official_file("mobilenet_v3_small", 1.0, 224, include_top=True)
    assert info.md5 is not None
    _publish(site, info, b"\x89HDF\r\n\x1a\n" + b"not the published file")
    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", base)
    with pytest.raises(WeightsError, match="checksum"):
        resolve(info)
    assert not (isolated["cache"] / info.filename).exists()


def test_offline_error_is_one_line_naming_the_file_and_where_to_put_it(isolated, monkeypatch):
    monkeypatch.setenv("NPMOBILE_WEIGHTS_URL", "http://127.0.0.1:9/")
    info = official_file("mobilenet", 0.5, 160, include_top=False)
    with pytest.raises(WeightsError) as error:
        resolve(info)
    message = str(error.value)
    assert "\n" not in message
    assert "mobilenet_5_0_160_tf_no_top.h5" in message and "NPMOBILE_WEIGHTS_DIR" in message


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


@pytest.mark.parametrize(
    "family,alpha,rows,minimalistic",
    [("mobilenet", 0.35, 224, False), ("mobilenet_v2", 1.0, 300, False), ("mobilenet_v3_small", 0.75, 224, True),
     ("resnet50", 1.0, 224, False)],
)
def test_unpublished_variants_say_what_exists(family, alpha, rows, minimalistic):
    with pytest.raises(WeightsError, match="publish|official"):
        official_file(family, alpha, rows, True, minimalistic=minimalistic)
