"""Ray Data and Dask on real local clusters (loopback only): the same answers as one process, bit for bit,
as the CLI's, corrupt files as error rows, and every image answered exactly once when a worker is killed.

The kernels are compiled (or loaded from Numba's cache) in this process before any cluster starts, so
workers only load them; each cluster test runs under a hard deadline so a hang fails fast. Ray and Dask
come with the test extra: without them these tests fail (with the pip command), never skip.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_cli import run_cli

IMAGES = 240
CORRUPT = {"truncated.jpg", "text.jpg", "empty.jpg"}
SIZE = 96
REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail the test after ``seconds``: SIGALRM raises in Python; if the process is stuck where Python
    cannot run, faulthandler dumps every thread's stack and exits a little later."""
    def expire(signum, frame):
        raise TimeoutError(f"cluster test still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    faulthandler.dump_traceback_later(seconds + 60, exit=True)
    try:
        yield
    finally:
        signal.alarm(0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module", autouse=True)
def cluster_environment():
    """Workers import this checkout's npmobile and stay quiet and local."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), saved["PYTHONPATH"]) if p)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def model_file(keras_files) -> str:
    case = keras_files.get("MobileNetV2", "keras3_keras", input_shape=(SIZE, SIZE, 3), alpha=0.35)
    return str(case.path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A few hundred JPEGs of mixed sizes, shapes and modes, and three files that are not images."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(15)
    for i in range(IMAGES):
        height, width = (int(v) for v in rng.integers(40, 320, size=2))
        yy, xx = np.mgrid[0:height, 0:width]
        base = np.stack([(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, (xx + yy + 13 * i) % 256], -1)
        pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        image = image.convert("L") if i % 17 == 0 else image
        image.save(folder / f"img{i:04d}.jpg", quality=int(rng.integers(60, 95)))
    (folder / "truncated.jpg").write_bytes((folder / "img0001.jpg").read_bytes()[:300])
    (folder / "text.jpg").write_text("not a JPEG")
    (folder / "empty.jpg").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def expected(model_file, photos) -> dict[str, np.ndarray]:
    """Each image's probabilities from single-process predict (which also warms the kernel cache)."""
    import npmobile
    from npmobile.applications.common import preprocess_tf
    from npmobile.image import load_img

    model = npmobile.load_model(model_file)
    names = sorted(p.name for p in photos.iterdir() if p.name not in CORRUPT)
    x = np.stack([load_img(photos / name, target_size=(SIZE, SIZE)) for name in names])
    probabilities = model.predict(preprocess_tf(x), threads=1)
    return dict(zip(names, probabilities))


@pytest.fixture(scope="module")
def cli_json(model_file, photos, expected) -> str:
    """`npmobile classify DIR --json` in one process: what every engine's --json must print."""
    result = run_cli("classify", str(photos), "--weights", model_file, "--json", "--threads", "1")
    assert result.returncode == 1, result.stderr  # the corrupt files
    return result.stdout


def classifier(model_file: str, output: str = "probabilities"):
    from npmobile.batch import BatchClassifier

    return BatchClassifier(model_file, output=output)


def check_rows(rows: list[dict], expected: dict[str, np.ndarray], corrupt: set[str] = CORRUPT) -> None:
    """Every image exactly once; probabilities equal predict's bit for bit; corrupt files as error rows."""
    names = Counter(Path(row["path"]).name for row in rows)
    assert names == Counter(list(expected) + sorted(corrupt)), "each image exactly once"
    for row in rows:
        name = Path(row["path"]).name
        if name in corrupt:
            assert row.get("probabilities") is None and name in row["error"]
        else:
            assert row.get("error") is None, row["error"]
            got = np.asarray(row["probabilities"], dtype=np.float32)
            assert np.array_equal(got, expected[name]), f"{name}: max |diff| {np.abs(got - expected[name]).max()}"


def json_lines(folder: Path) -> list[dict]:
    """The rows of a folder of JSON lines files, as an engine writes them."""
    return [json.loads(line) for f in sorted(folder.iterdir()) for line in f.read_text().splitlines() if line.strip()]


LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def listening_addresses() -> set[str]:
    """Addresses this process and its descendants (the local cluster) listen on."""
    import psutil

    me = psutil.Process()
    addresses = set()
    for process in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            addresses |= {c.laddr.ip for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    return addresses


def check_cli(engine: str, model_file: str, photos: Path, cli_json: str, tmp_path: Path) -> None:
    out = tmp_path / "preds.parquet"
    result = run_cli("classify", str(photos), "--weights", model_file, "--json", "--engine", engine,
                     "--workers", "2", "--out", str(out), timeout=240)
    assert result.returncode == 1, result.stderr
    assert result.stdout == cli_json, "--engine prints the same records in the same order"
    import pyarrow.parquet as pq

    from npmobile.batch import record

    assert [record(row) for row in pq.read_table(out).to_pylist()] == json.loads(cli_json)


# ---------------------------------------------------------------------------------------------------
# Dask

def worker_pids(client) -> set[int]:
    return set(client.run(os.getpid).values())


def test_dask_answers_bit_for_bit_as_one_process(model_file, photos, expected, tmp_path):
    from npmobile.dask import classify_bag, local_client, write_bag

    paths = sorted(str(p) for p in photos.iterdir())
    with deadline(180), local_client(workers=2, threads=1) as client:
        check_rows(classify_bag(paths, classifier(model_file), partition_size=16).compute(), expected)
        write_bag(classify_bag(paths, classifier(model_file)), str(tmp_path / "out.parquet"), "probabilities")
        import pyarrow.parquet as pq

        check_rows(pq.read_table(tmp_path / "out.parquet").to_pylist(), expected)
        write_bag(classify_bag(paths, classifier(model_file)), str(tmp_path / "out.jsonl"), "probabilities")
        check_rows(json_lines(tmp_path / "out.jsonl"), expected)
        assert all(n == 1 for n in client.nthreads().values())
        assert listening_addresses() <= LOOPBACK


def test_dask_workers_open_a_model_file_shipped_to_them(model_file, photos, expected, tmp_path):
    import shutil

    from distributed.diagnostics.plugin import UploadFile

    from npmobile.dask import classify_bag, local_client

    shipped = tmp_path / "shipped-to-workers.keras"
    shutil.copy(model_file, shipped)
    paths = sorted(str(p) for p in photos.iterdir())[:20]
    with deadline(120), local_client(workers=2, threads=1) as client:
        client.register_plugin(UploadFile(str(shipped), load=False))
        shipped.unlink()  # the workers' copies only, found by name in their local directories
        rows = classify_bag(paths, classifier(shipped.name), partition_size=8).compute()
    subset = {Path(p).name: expected[Path(p).name] for p in paths if Path(p).name in expected}
    check_rows(rows, subset, corrupt=CORRUPT & {Path(p).name for p in paths})


def test_dask_cli_prints_what_one_process_prints(model_file, photos, cli_json, tmp_path):
    with deadline(300):
        check_cli("dask", model_file, photos, cli_json, tmp_path)


def test_dask_survives_a_killed_worker(model_file, photos, expected):
    from npmobile.dask import classify_paths, local_client

    paths = sorted(str(p) for p in photos.iterdir())
    with deadline(240), local_client(workers=2, threads=1) as client:
        before = worker_pids(client)
        rows: list[dict] = []
        for batch in classify_paths(paths, classifier(model_file), client=client, batch_size=8):
            if not rows:
                os.kill(min(before), signal.SIGKILL)  # mid-run: the first batch is in, the rest are not
            rows.extend(batch)
        check_rows(rows, expected)
        end = time.monotonic() + 60
        while time.monotonic() < end and not (worker_pids(client) - before):
            time.sleep(0.5)
        assert worker_pids(client) - before, "the nanny restarted the killed worker"


# ---------------------------------------------------------------------------------------------------
# Ray

@pytest.fixture(scope="module")
def ray_session(expected):
    """One local Ray (2 CPUs, loopback, no dashboard) for the Ray tests; kernels already compiled."""
    from npmobile.ray import local_ray

    with local_ray(threads=1, cpus=2):
        yield


def actor_pids() -> set[int]:
    """Processes running a Ray Data actor of npmobile's Classifier (Ray titles them after the UDF)."""
    import psutil

    pids = set()
    for process in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if "MapBatches(Classifier)" in " ".join(process.info["cmdline"] or ()):
                pids.add(process.info["pid"])
    return pids


def test_ray_reads_classifies_and_writes_bit_for_bit_as_one_process(ray_session, model_file, photos, expected,
                                                                     tmp_path):
    import pyarrow.parquet as pq

    from npmobile.ray import classify_files

    with deadline(180):
        classify_files(str(photos), str(tmp_path / "out"), classifier(model_file), workers=2)
        classify_files(str(photos), str(tmp_path / "out.jsonl"), classifier(model_file), workers=2)
    assert listening_addresses() <= LOOPBACK
    check_rows(pq.read_table(tmp_path / "out").to_pylist(), expected)
    check_rows(json_lines(tmp_path / "out.jsonl"), expected)


def test_ray_cli_prints_what_one_process_prints(model_file, photos, cli_json, tmp_path):
    with deadline(300):
        check_cli("ray", model_file, photos, cli_json, tmp_path)


def test_ray_survives_a_killed_actor(ray_session, model_file, photos, expected):
    from npmobile.ray import classify_paths

    paths = sorted(str(p) for p in photos.iterdir())
    rows: list[dict] = []
    seen: set[int] = set()
    earlier = actor_pids()  # an earlier dataset's actors may linger until it is collected
    killed = None
    with deadline(240):
        for batch in classify_paths(paths, classifier(model_file), workers=2, batch_size=4):
            seen |= actor_pids() - earlier
            if killed is None and len(seen) >= 2:
                killed = min(seen)
                os.kill(killed, signal.SIGKILL)  # mid-run: some batches are in, most are not
            rows.extend(batch)
    check_rows(rows, expected)
    assert killed is not None, "two actors were running"
    assert len(seen - {killed}) >= 2, f"a restarted actor answered (actors seen: {sorted(seen)})"


# ---------------------------------------------------------------------------------------------------
# The core, without an engine

def test_embeddings_are_the_pooled_features_bit_for_bit(model_file, photos, tmp_path):
    import npmobile
    from npmobile.applications.common import preprocess_tf
    from npmobile.batch import pooled_layer
    from npmobile.image import load_img

    out = tmp_path / "features.jsonl"
    result = run_cli("classify", str(photos), "--weights", model_file, "--output", "features", "--out", str(out))
    assert result.returncode == 1, result.stderr  # the corrupt files
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(r["path"]).name for r in rows if "error" in r) == sorted(CORRUPT)
    good = [r for r in rows if "error" not in r][:16]
    model = npmobile.load_model(model_file)
    layer = pooled_layer(model)
    x = np.stack([load_img(r["path"], target_size=(SIZE, SIZE)) for r in good])
    pooled = model.predict(preprocess_tf(x), outputs=[layer])[layer].reshape(len(good), -1)
    assert layer.startswith("global_average_pooling")
    assert np.array_equal(np.asarray([r["features"] for r in good], np.float32), pooled)


def test_a_classifier_not_warmed_runs_the_model_once_for_its_batch(model_file, photos, expected, monkeypatch):
    """The command line's classifier (``load(warmed=False)``): no run on zeros before its first batch, the same
    answers."""
    from npmobile.batch import BatchClassifier, ModelRef
    from npmobile.interpreter import Model

    runs = []
    predict = Model.predict

    def counting(self, x, *args, **kwargs):
        runs.append(len(x))
        return predict(self, x, *args, **kwargs)

    monkeypatch.setattr(Model, "predict", counting)
    # A reference of its own (another time limit), so that the model is opened here, not found warmed.
    unwarmed = BatchClassifier(ModelRef(weights=model_file, load_timeout=59.0), output="probabilities", threads=1)
    unwarmed.load(warmed=False)
    paths = sorted(str(p) for p in photos.iterdir())
    rows = unwarmed(paths)
    assert runs == [len(paths) - len(CORRUPT)]
    check_rows(rows, expected)


def test_output_values_need_json_or_out(model_file, photos):
    result = run_cli("classify", str(photos), "--weights", model_file, "--output", "probabilities")
    assert result.returncode == 2 and "needs --json or --out" in result.stderr  # a usage error
    result = run_cli("classify", str(photos), "--weights", model_file, "--out", "preds.csv")
    assert result.returncode == 1 and "preds.csv: write .parquet or .jsonl" in result.stderr
