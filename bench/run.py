"""Side-by-side benchmark: npmobile against Keras (predict and tf.function), ONNX Runtime, LiteRT (XNNPACK)
and, when installed, PyTorch (traced), on the same weights and inputs, in one run.

    .venv/bin/pip install -e ".[bench]"
    .venv/bin/pip install torch                        # optional (here: torch==2.13.0, the CPU wheel on disk)
    .venv/bin/python bench/run.py                      # everything (about 10 minutes on 2 cores)
    .venv/bin/python bench/run.py --runs 3             # that three times over; each cell the median (issue 27)
    .venv/bin/python bench/run.py --quick --models v2 --batches 1 --threads 1
    .venv/bin/python bench/run.py --profile --models v2 --threads 2     # where the time goes, npmobile beside ORT

How it measures: the parent builds each model with keras.applications (weights=None, BatchNorm given
non-trivial statistics), saves it as .keras (npmobile loads that file) and exports it to ONNX and to
LiteRT's .tflite (Keras's own `model.export(format="litert")`; LiteRT runs it with its default XNNPACK
delegate). Each engine runs in a process of its own (thread settings are per process, and idle thread pools of one
engine would steal cores from another), and the parent interleaves them: each round asks every
engine in turn, in rotating order, for a few timed predictions, so drift on this shared machine
hits all engines alike. With --runs N the whole measurement is made N times, one after another (each run its own
engine processes and peak), and each cell reports the median of the runs' medians. Reported: medians (ms) with
interquartile range, npmobile/peer ratios
(below 1: npmobile faster), each engine's GFLOP/s and share of the machine's measured compute peak
(npmobile.profiling.measure_machine, the roof `npmobile profile --roofline` draws), output agreement with Keras
per engine, peak RSS per engine (a separate process each), `python -m npmobile classify` as a whole process (wall
time and peak memory with a warm Numba cache, with the kernels built ahead of time, and the first-ever run's: every
kernel compiled) and each engine's start-up: a fresh process, from its start to its first answer, with its peak
memory (npmobile on built kernels, its file read in a child and with trusted=True). Results are
written to bench/results/<date>-<host>.json and bench/results/latest.json. No timing is ever
asserted in tests; goals live in bench/README.md.

PyTorch is optional: `pip install torch` (here: `torch==2.13.0`, the CPU wheel on disk); when
importable, it is benchmarked. bench/torch_model.py builds a torch module from the same .keras file
(read by npmobile) and the parent saves it traced with TorchScript, as it exports ONNX; the PyTorch
process loads and freezes it, with torch alone (no TensorFlow, npmobile or Numba).
It is not in the `bench` extra: a plain `pip install torch` pulls a CUDA build of several GB on most
machines.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import py_compile
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from engines import load_engine, model_input, quiet_tf, set_process_threads  # bench/engines.py, beside this file

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MODELS = {"v1": "MobileNet", "v2": "MobileNetV2", "v3s": "MobileNetV3Small", "v3l": "MobileNetV3Large"}
ENGINES = ("npmobile", "keras_predict", "keras_tf_function", "onnxruntime", "litert", "pytorch")
PEERS = ENGINES[1:]
# Start-up: npmobile reading its file in a child (the default) and in its own process (trusted=True), against the
# peers that load a file of their own; Keras as `model.predict` (its tf.function twin starts the same way).
STARTUP_ENGINES = ("npmobile", "npmobile_trusted", "onnxruntime", "litert", "keras_predict", "pytorch")


def torch_installed() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def engines_to_run(files: dict) -> list[str]:
    """Every engine, less ONNX Runtime and PyTorch where their exports failed (or PyTorch is not installed)."""
    skip = set()
    if not all(f["onnx"] for f in files.values()):
        skip.add("onnxruntime")
    if not all(f.get("litert") for f in files.values()):
        skip.add("litert")
    if not all(f["torchscript"] for f in files.values()):
        skip.add("pytorch")
    return [e for e in ENGINES if e not in skip]


# --------------------------------------------------------------------------------------------------
# Preparing the models (parent process)
# --------------------------------------------------------------------------------------------------


def prepare(models: list[str], folder: Path) -> dict[str, dict]:
    """Save each model as .keras, .onnx and (PyTorch installed) TorchScript .pt in ``folder``; returns
    paths per model key."""
    quiet_tf()
    import keras

    rng = np.random.default_rng(0)
    files = {}
    for key in models:
        model = getattr(keras.applications, MODELS[key])(weights=None, input_shape=(224, 224, 3))
        for layer in model.layers:
            if type(layer).__name__ == "BatchNormalization":
                c = layer.gamma.shape[0]
                layer.set_weights([rng.uniform(0.5, 1.5, c).astype("f4"), rng.normal(0, 0.1, c).astype("f4"),
                                   rng.normal(0, 0.1, c).astype("f4"), rng.uniform(0.5, 2, c).astype("f4")])
        model.predict(np.zeros((1, 224, 224, 3), np.float32), verbose=0)  # export needs a called model
        keras_path, onnx_path = folder / f"{key}.keras", folder / f"{key}.onnx"
        model.save(keras_path)
        try:
            model.export(str(onnx_path), format="onnx", verbose=False)
        except Exception as error:  # ONNX export is a peer's tooling: report, don't stop the bench
            print(f"  {key}: ONNX export failed ({type(error).__name__}: {error})", file=sys.stderr)
            onnx_path = None
        files[key] = {"keras": str(keras_path), "onnx": str(onnx_path) if onnx_path else None,
                      "litert": litert_file(model, key, folder),
                      "torchscript": torchscript_file(key, keras_path, folder) if torch_installed() else None}
    return files


def litert_file(model, key: str, folder: Path) -> str | None:
    """The model as a .tflite flatbuffer (Keras's own LiteRT export), or None without ai-edge-litert
    or when the export failed."""
    try:
        import ai_edge_litert  # noqa: F401 -- the engine that will run it
    except ImportError:
        return None
    path = folder / f"{key}.tflite"
    try:
        model.export(str(path), format="litert", verbose=False)
    except Exception as error:  # like the ONNX export: report, don't stop the bench
        print(f"  {key}: LiteRT export failed ({type(error).__name__}: {error})", file=sys.stderr)
        return None
    return str(path)


def torchscript_file(key: str, keras_path: Path, folder: Path) -> str | None:
    """The model saved for the PyTorch engine (bench/torch_model.py), or None if that failed."""
    import torch_model  # bench/ is on sys.path: this file runs as a script

    path = folder / f"{key}.pt"
    try:
        torch_model.export_torchscript(str(keras_path), str(path))
    except Exception as error:  # like the ONNX export: report, don't stop the bench
        print(f"  {key}: TorchScript export failed ({type(error).__name__}: {error})", file=sys.stderr)
        return None
    return str(path)


# --------------------------------------------------------------------------------------------------
# Engines: each in its own process, driven by the parent
# --------------------------------------------------------------------------------------------------
# Every engine keeps a thread pool whose idle workers spin for a while after each call (OpenMP,
# Eigen, ONNX Runtime): in one process they steal each other's cores. So each engine runs in its own
# process, with its own thread settings, and the parent interleaves them: one round asks every
# engine in turn (rotating the order) for a few timed predictions.


def serve(engine: str, threads: int, files_path: str) -> None:
    """An engine process: reads commands on stdin, answers one JSON line each on stdout."""
    set_process_threads(engine, threads)
    files = json.loads(Path(files_path).read_text())
    loaded: dict[str, object] = {}
    for line in sys.stdin:
        command, *args = line.split()
        if command == "run":  # run KEY BATCH COUNT OUT: COUNT timed calls after one untimed call
            key, batch, count = args[0], int(args[1]), int(args[2])
            if key not in loaded:
                loaded[key] = load_engine(engine, files[key], threads)
            run, x = loaded[key], model_input(key, batch)
            out = np.asarray(run(x))
            np.save(args[3], out)
            times = []
            for _ in range(count):
                start = time.perf_counter()
                run(x)
                times.append(time.perf_counter() - start)
            answer = {"times": times}
        elif command == "rss":
            answer = {"rss_mb": peak_rss_of_this_process()}
        else:
            answer = {"error": f"unknown command {command}"}
        print(json.dumps(answer), flush=True)


def peak_rss_of_this_process() -> float:
    """VmHWM in MB. (getrusage's ru_maxrss is not used: a child started by a big parent can report
    the parent's high-water mark.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class EngineProcess:
    def __init__(self, engine: str, threads: int, files_path: Path):
        self.engine = engine
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", engine, "--threads", str(threads), "--files", str(files_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=bench_env())

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.engine} process died")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def time_cell(procs: dict[str, EngineProcess], key: str, batch: int, rounds: int, per_round: int,
              folder: Path) -> dict:
    names = list(procs)
    outputs = {}
    for name in names:  # warm-up (loads, compiles) and the outputs to compare
        path = folder / f"{name}-{key}-{batch}.npy"
        procs[name].ask(f"run {key} {batch} 2 {path}")
        outputs[name] = np.load(path)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            time.sleep(0.05)  # let the previous engine's spinning workers go to sleep first
            times[name] += procs[name].ask(f"run {key} {batch} {per_round} {folder / 'scratch.npy'}")["times"]
    reference = outputs["keras_predict"]
    agreement = {name: {"max_abs_diff": float(np.abs(out - reference).max()),
                        "same_top5": bool(np.array_equal(np.argsort(-out, 1)[:, :5], np.argsort(-reference, 1)[:, :5]))}
                 for name, out in outputs.items()}
    return {"agreement": agreement, "ms": {name: summary(ts) for name, ts in times.items()}}


def summary(seconds: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in seconds)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 4 else [ms[0], statistics.median(ms), ms[-1]]
    return {"median": statistics.median(ms), "iqr": q[2] - q[0], "n": len(ms)}


def measure(files: dict, folder: Path, models: list[str], batches: list[int], threads_list: list[int],
            rounds: int, per_round: int, label: str = "") -> tuple[list[dict], dict[str, float]]:
    """The cells, and the machine's compute peak per thread count (GFLOP/s, keyed by the count as text, as JSON
    keeps it): measured before the engines' processes start and after they end, the higher of the two. ``label``
    heads each progress line (which run of several)."""
    files_path = folder / "files.json"
    files_path.write_text(json.dumps(files))
    engines = engines_to_run(files)
    cells, roofs = [], {}
    for threads in threads_list:
        roofs[str(threads)] = measure_roof(threads)
        procs = {e: EngineProcess(e, threads, files_path) for e in engines}
        try:
            for key in models:
                for batch in batches:
                    cell = {"model": key, "batch": batch, "threads": threads,
                            **time_cell(procs, key, batch, rounds, per_round, folder)}
                    cells.append(cell)
                    print(f"  {label}threads {threads} {key} batch {batch}: " + ", ".join(
                        f"{n} {r['median']:.1f}" for n, r in cell["ms"].items()), file=sys.stderr, flush=True)
        finally:
            for proc in procs.values():
                proc.close()
        roofs[str(threads)] = max(roofs[str(threads)], measure_roof(threads))  # a busy neighbour only lowers it
    return cells, roofs


def measure_runs(files: dict, folder: Path, models: list[str], batches: list[int], threads_list: list[int],
                 rounds: int, per_round: int, runs: int) -> tuple[list[list[dict]], dict[str, float]]:
    """``runs`` full measurements, one after the other (each every cell, with engine processes of its own), and the
    machine's peak per thread count: the highest any run measured (a busy neighbour only lowers it)."""
    cells_of_runs, roofs = [], {}
    for run in range(runs):
        label = f"run {run + 1}/{runs}: " if runs > 1 else ""
        cells, run_roofs = measure(files, folder, models, batches, threads_list, rounds, per_round, label)
        cells_of_runs.append(cells)
        roofs = {t: max(roofs.get(t, 0.0), roof) for t, roof in run_roofs.items()}
    return cells_of_runs, roofs


def cell_key(cell: dict) -> tuple[str, int, int]:
    return cell["model"], cell["batch"], cell["threads"]


def median_cells(runs: list[list[dict]]) -> list[dict]:
    """One cell per (model, batch, threads) of several runs: each engine's ms the median across the runs of its
    median in each (``iqr`` the median of the runs' interquartile ranges, the spread within a run; ``n`` its calls
    per run), the outputs' agreement the worst any run saw; in the first run's order, engines that every run
    measured. One run gives its own figures."""
    by_key: dict[tuple, list[dict]] = {}
    for cells in runs:
        for cell in cells:
            by_key.setdefault(cell_key(cell), []).append(cell)
    combined = []
    for key, cells in by_key.items():
        engines = [e for e in cells[0]["ms"] if all(e in cell["ms"] for cell in cells)]
        ms = {e: {"median": statistics.median(cell["ms"][e]["median"] for cell in cells),
                  "iqr": statistics.median(cell["ms"][e]["iqr"] for cell in cells),
                  "n": min(cell["ms"][e]["n"] for cell in cells)} for e in engines}
        agreement = {e: {"max_abs_diff": max(cell["agreement"][e]["max_abs_diff"] for cell in cells),
                         "same_top5": all(cell["agreement"][e]["same_top5"] for cell in cells)} for e in engines}
        combined.append({"model": key[0], "batch": key[1], "threads": key[2], "agreement": agreement, "ms": ms})
    return combined


def measure_roof(threads: int) -> float:
    """The machine's measured compute peak on ``threads`` threads, GFLOP/s: npmobile.profiling.measure_machine (the
    roof `npmobile profile --roofline` draws) in a process of its own."""
    done = subprocess.run([sys.executable, __file__, "--roof", "--threads", str(threads)], capture_output=True,
                          text=True, check=True, env=bench_env())
    return float(done.stdout.split()[-1])


def model_flops(files: dict) -> dict[str, int]:
    """Floating-point operations of one image through each model: 2 x its multiply-accumulates, as npmobile.costs
    counts them (convolutions, depthwise, dense; squeeze-excite's 1x1 layers included)."""
    import npmobile
    from npmobile.costs import layer_costs, total_macs

    return {key: 2 * total_macs(layer_costs(npmobile.load_model(f["keras"], trusted=True))) for key, f in files.items()}


def add_peak_shares(cells: list[dict], flops: dict[str, int], roofs: dict[str, float]) -> None:
    """Each engine's GFLOP/s in each cell (the model's FLOPs x batch / its median time) and that over the peak
    measured on the cell's thread count."""
    for cell in cells:
        work = flops[cell["model"]] * cell["batch"]
        cell["gflops"] = {e: work / (r["median"] * 1e-3) / 1e9 for e, r in cell["ms"].items()}
        cell["peak_share"] = {e: g / roofs[str(cell["threads"])] for e, g in cell["gflops"].items()}


def peak_rss(files: dict, folder: Path, key: str = "v2") -> dict[str, float]:
    """Peak resident memory of each engine's own process: load one model, 20 predictions."""
    files_path = folder / "files-rss.json"
    files_path.write_text(json.dumps({key: files[key]}))
    result = {}
    for engine in engines_to_run({key: files[key]}):
        proc = EngineProcess(engine, 2, files_path)
        try:
            proc.ask(f"run {key} 1 20 {folder / 'rss.npy'}")
            result[engine] = proc.ask("rss")["rss_mb"]
        finally:
            proc.close()
    return result


# Runs COMMAND and prints, as JSON, when it started (time.monotonic: CLOCK_MONOTONIC on Linux, one clock for every
# process, so the command can say when it answered), its wall seconds to its exit, its peak resident KB and what it
# printed. A process started from this bench's big parent inherits the parent's high-water mark (Linux records the
# pre-exec RSS in ru_maxrss), so the command is started from this small trampoline instead; RUSAGE_CHILDREN then
# covers the command and every process it started and waited for (the bounded reader's child included).
_MEASURE = """
import json, resource, subprocess, sys, time
start = time.monotonic()
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
out, err = process.communicate()
seconds = time.monotonic() - start
print(json.dumps({"start": start, "seconds": seconds, "code": process.returncode, "stdout": out, "stderr": err,
                  "peak_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def measured_run(command: list[str], env: dict) -> dict:
    """One whole process through _MEASURE: its start, wall seconds, peak resident MB (the largest of it and its
    children) and what it printed."""
    result = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, env=env,
                            check=True)
    done = json.loads(result.stdout)
    if done["code"] != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done['code']}: {done['stderr'][-2000:]}")
    return {**done, "peak_mb": done["peak_kb"] / 1024}


def classify_once(command: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak resident MB of one whole process."""
    done = measured_run(command, env)
    return done["seconds"], done["peak_mb"]


# The start-up child of one engine: it imports bench/engines.py as a module, compiled beforehand (startup) as an
# installed library is, and calls engines.first_answer.
_FIRST_ANSWER = "import sys; sys.path.insert(0, sys.argv[1]); import engines; engines.first_answer(*sys.argv[2:])"


def built_kernels(folder: Path) -> dict:
    """`npmobile build-kernels` into ``folder`` (a kernel cache of its own); the environment that runs on it, the
    build's seconds and the module's MB."""
    env = {**bench_env(), "NPMOBILE_KERNELS": "", "NPMOBILE_KERNELS_DIR": str(folder)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "npmobile", "build-kernels"], env=env, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return {"env": env, "seconds": seconds, "module_mb": sum(f.stat().st_size for f in folder.rglob("*.so")) / 2**20}


def startup(files: dict, folder: Path, image: Path, runs: int = 7, threads: int = 1) -> dict:
    """Start-up, each a fresh process, with the kernels built ahead of time (``npmobile build-kernels``, into a
    temporary kernel cache; the build's time and the module's size too):

    - `python -m npmobile classify IMAGE --weights FILE` on MobileNetV2, whole process: the first-ever run (an
      empty Numba cache: every kernel compiled), then ``runs`` warm runs on the JIT (a warm Numba cache) and on the
      built kernels;
    - each engine of STARTUP_ENGINES on each model (Keras on one): process start -> engine imported -> its model
      file loaded -> one answer to a batch-1 input on ``threads`` threads (first_answer), ``runs`` times.

    Every round takes each measurement once, in a rotating order; medians, with peak memory."""
    files_path = folder / "files-startup.json"
    files_path.write_text(json.dumps(files))
    # The children import engines.py compiled, as an installed library is (under PYTHONDONTWRITEBYTECODE each would
    # compile it again).
    py_compile.compile(str(REPO / "bench" / "engines.py"), doraise=True)
    available = engines_to_run(files)
    engines = [e for e in STARTUP_ENGINES if e.removesuffix("_trusted") in available]
    jobs = [("classify", kind) for kind in ("jit", "aot") if "v2" in files]
    # Keras's start-up is mostly TensorFlow's import, seconds long whatever the model: timed on one model only.
    keras_key = "v2" if "v2" in files else next(iter(files))
    jobs += [(engine, key) for key in files for engine in engines if engine != "keras_predict" or key == keras_key]
    classify = [sys.executable, "-m", "npmobile", "classify", str(image), "--weights", files.get("v2", {}).get("keras")]
    jit_env = {**bench_env(), "NPMOBILE_KERNELS": "jit"}
    cold_seconds = None
    if "v2" in files:
        with tempfile.TemporaryDirectory(prefix="npmobile-numba-cache-") as cache:
            cold_seconds, _ = classify_once(classify, {**jit_env, "NUMBA_CACHE_DIR": cache})
        classify_once(classify, jit_env)  # warm the usual cache
    with tempfile.TemporaryDirectory(prefix="npmobile-kernels-") as kernels:
        build = built_kernels(Path(kernels))
        if "v2" in files:
            classify_once(classify, build["env"])  # the module into the page cache
        done: dict[tuple, list[dict]] = {job: [] for job in jobs}
        for r in range(runs):
            for job in jobs[r % len(jobs):] + jobs[: r % len(jobs)]:
                if job[0] == "classify":
                    done[job].append(measured_run(classify, jit_env if job[1] == "jit" else build["env"]))
                    continue
                engine, key = job
                run = measured_run([sys.executable, "-c", _FIRST_ANSWER, str(REPO / "bench"), engine, str(threads),
                                    str(files_path), key], build["env"])
                said = json.loads(run["stdout"].strip().splitlines()[-1])
                done[job].append({**said, "seconds": said["answered"] - run["start"],
                                  "ready_seconds": said["ready"] - run["start"], "peak_mb": run["peak_mb"]})
    result = {"runs": runs, "build_kernels_seconds": build["seconds"], "aot_module_mb": build["module_mb"]}
    if "v2" in files:
        jit, aot = done[("classify", "jit")], done[("classify", "aot")]
        result.update(first_run_seconds=cold_seconds, seconds=statistics.median(d["seconds"] for d in jit),
                      peak_mb=statistics.median(d["peak_mb"] for d in jit),
                      aot_seconds=statistics.median(d["seconds"] for d in aot),
                      aot_peak_mb=statistics.median(d["peak_mb"] for d in aot))
    firsts = [d for job in jobs if job[0] != "classify" for d in done[job]]
    result["engines"] = {
        "threads": threads, "batch": 1,
        "ready_seconds": statistics.median(d["ready_seconds"] for d in firsts),
        "same_top5": all(len({tuple(d["top5"]) for job in jobs if job[1] == key for d in done[job]}) == 1
                         for key in files),
        "models": {key: {engine: {"seconds": statistics.median(d["seconds"] for d in done[(engine, key)]),
                                  "peak_mb": statistics.median(d["peak_mb"] for d in done[(engine, key)])}
                         for engine in engines if (engine, key) in done} for key in files}}
    return result


def bench_env() -> dict:
    # No kernel build in the background (npmobile/cli/build_kernels.py) while anything is measured: the JIT runs
    # set NPMOBILE_KERNELS=jit, which rules it out anyway; this also covers an AOT module that is not current.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", NPMOBILE_AUTO_BUILD="0")
    # Older OpenBLAS builds need these on some CPUs; they slow a current one. Benchmarks only.
    if "OPENBLAS_CORETYPE" in env or "OPENBLAS_L2_SIZE" in env:
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    return env


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    versions = {}
    for module in ("numpy", "numba", "tensorflow", "keras", "onnxruntime", "ai_edge_litert", "torch"):
        try:  # the installed distribution's version: ai_edge_litert has no __version__
            versions[module] = importlib.metadata.version(module.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[module] = None
    if versions["tensorflow"] is None:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions["tensorflow"] = importlib.metadata.version("tensorflow-cpu")
    try:
        import threadpoolctl

        blas = [{k: info.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                for info in threadpoolctl.threadpool_info() if info.get("user_api") == "blas"]
    except ImportError:
        blas = []
    return {"cpu": cpu, "cores": os.cpu_count(), "host": socket.gethostname(), "python": platform.python_version(),
            "versions": versions, "blas": blas,
            "openblas_env_unset": "OPENBLAS_CORETYPE" in os.environ or "OPENBLAS_L2_SIZE" in os.environ}


# Issue 27's measure: npmobile against the faster of these two peers, cell by cell.
GOAL_PEERS = ("onnxruntime", "litert")


def ratio_to_faster_peer(cell: dict) -> float | None:
    """npmobile's median ms over the faster GOAL_PEERS' in the cell; None where a peer was not measured."""
    ms = cell["ms"]
    if not all(peer in ms for peer in GOAL_PEERS):
        return None
    return ms["npmobile"]["median"] / min(ms[peer]["median"] for peer in GOAL_PEERS)


def goal_text(cells: list[dict]) -> str | None:
    """Issue 27's figures from the cells: the geometric mean of npmobile / the faster peer and how many cells are at or
    below both peers; None without both peers."""
    ratios = [r for r in map(ratio_to_faster_peer, cells) if r is not None]
    if not ratios:
        return None
    cells_text = f"{len(ratios)} cell{'s' * (len(ratios) > 1)}"
    return (f"Against the faster of {' and '.join(TITLES[p] for p in GOAL_PEERS)} in each cell: npmobile / that peer "
            f"{statistics.geometric_mean(ratios):.3f} (geometric mean over {cells_text}); at or below both peers in "
            f"{sum(r <= 1 for r in ratios)} of {len(ratios)} (unrounded ratios).")


def runs_text(report: dict) -> str:
    """How many runs the cells are the median of (a results file without the count is one run)."""
    runs = report.get("median_of_runs", 1)
    if runs == 1:
        return ("One run; issue 27 is judged on `python bench/run.py --runs 3`: three runs, one after another, each "
                "figure their median.")
    return (f"Each figure: the median across {runs} runs of `bench/run.py`, one after another (every cell in each, "
            "with engine processes of its own), of that run's median.")


def run_ratio_lines(runs: list[list[dict]]) -> list[str]:
    """Per cell, npmobile / each of GOAL_PEERS in every run, then the ratio of the runs' medians: the spread behind
    the median."""
    lines = []
    for cell in median_cells(runs):
        per_run = [next(c for c in cells if cell_key(c) == cell_key(cell)) for cells in runs]
        parts = [f"/{TITLES[peer]} " + " ".join(f"{c['ms']['npmobile']['median'] / c['ms'][peer]['median']:.2f}"
                                                  for c in per_run)
                 + f" (medians {cell['ms']['npmobile']['median'] / cell['ms'][peer]['median']:.2f})"
                 for peer in GOAL_PEERS if peer in cell["ms"]]
        lines.append(f"  {cell['model']} b{cell['batch']} t{cell['threads']}: " + "; ".join(parts))
    return lines


def table(cells: list[dict]) -> str:
    peers = [p for p in PEERS if p != "pytorch" or any(p in cell["ms"] for cell in cells)]
    header = f"{'model':<5}{'batch':>6}{'thr':>4}  {'npmobile':>9}" + "".join(f"{p:>19}" for p in peers)
    lines = [header, "-" * len(header)]
    for cell in cells:
        ms = cell["ms"]
        ours = ms["npmobile"]["median"]
        row = f"{cell['model']:<5}{cell['batch']:>6}{cell['threads']:>4}  {ours:>7.2f}ms"
        for peer in peers:
            if peer in ms:
                row += f"{ms[peer]['median']:>9.2f}ms ({ours / ms[peer]['median']:.2f}x)"
            else:
                row += f"{'n/a':>19}"
        lines.append(row)
    if "pytorch" in peers:
        note = ""
    else:
        note = " PyTorch: export failed." if torch_installed() else " PyTorch: not installed here."
    lines.append(f"ratio = npmobile / peer: below 1 means npmobile is faster.{note}")
    return "\n".join(lines)


def npmobile_kind(node) -> str:
    """The kind of layer a node of npmobile's optimized plan is, for the per-kind profile."""
    if node.op == "Conv2D":
        return "pointwise 1x1" if node.weights["kernel"].shape[:2] == (1, 1) else "stem conv"
    return {"DepthwiseConv2D": "depthwise", "Dense": "dense (+softmax)", "SqueezeExcite": "squeeze-excite",
            "ExpandDepthwise": "1x1 + depthwise fused"}.get(node.op, "other")


def onnx_kind(op: str, weight_shape: list[int] | None) -> str:
    """The same kinds for an ONNX Runtime node (its Conv weights are [Cout, Cin/groups, KH, KW])."""
    if op in ("Conv", "FusedConv") and weight_shape:
        if weight_shape[1] == 1 and weight_shape[2:] != [1, 1]:
            return "depthwise"
        return "pointwise 1x1" if weight_shape[2:] == [1, 1] else "stem conv"
    if op in ("MatMul", "Gemm", "FusedMatMul", "Softmax"):
        return "dense (+softmax)"
    return "other"  # ORT runs squeeze-excite and hard-swish as separate Mul/Add/Clip/ReduceMean nodes


def onnx_profile(onnx_path: str, key: str, threads: int, repeats: int = 30) -> dict[str, float]:
    """Seconds per run by kind of layer from ONNX Runtime's own profiler (which adds a little time per
    node), measured as npmobile's Model.profile is: one warm-up run left out, then each node's
    median over ``repeats`` runs; "total" is the median whole run (same profiler overhead)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "npmobile-ort-profile")
    session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = model_input(key, 1)
    for _ in range(1 + repeats):
        session.run(None, {name: x})
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[1:]
    per_node: dict[str, list[float]] = {}  # node name -> seconds in each timed run
    kind_of: dict[str, str] = {}
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        if not any(start <= event["ts"] <= stop for start, stop in runs):
            continue  # the warm-up run
        shapes = event["args"].get("input_type_shape", [])
        weight = next(iter(shapes[1].values())) if len(shapes) > 1 else None
        kind_of[event["name"]] = onnx_kind(event["args"]["op_name"], weight)
        per_node.setdefault(event["name"], []).append(event["dur"] * 1e-6)
    result: dict[str, float] = {}
    for node, seconds in per_node.items():
        result[kind_of[node]] = result.get(kind_of[node], 0.0) + statistics.median(seconds)
    result["total"] = statistics.median((stop - start) * 1e-6 for start, stop in runs)
    return result


def profile(models: list[str], threads: int) -> None:
    """npmobile's time per kind of layer beside ONNX Runtime's, on the same model and input."""
    folder = Path(tempfile.mkdtemp(prefix="npmobile-profile-"))
    try:
        print(f"preparing {', '.join(models)} (Keras models, .keras files, ONNX exports)...", file=sys.stderr)
        files = prepare(models, folder)
        for key in models:
            import npmobile

            model = npmobile.load_model(files[key]["keras"])
            rows = model.profile(model_input(key, 1), repeats=30, threads=threads)
            ours: dict[str, float] = {}
            for r in rows:
                ours[npmobile_kind(r["node"])] = ours.get(npmobile_kind(r["node"]), 0.0) + r["seconds"]
            ours["total"] = sum(r["seconds"] for r in rows)
            # ONNX Runtime in a process of its own: its spinning workers must not share ours' cores.
            theirs = {}
            if files[key]["onnx"]:
                done = subprocess.run([sys.executable, __file__, "--onnx-profile", files[key]["onnx"],
                                       "--models", key, "--threads", str(threads)],
                                      capture_output=True, text=True, check=True)
                theirs = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"\n{MODELS[key]} at 224, batch 1, {threads} thread(s): ms per kind of layer")
            print(f"  {'kind':<20}{'npmobile':>10}{'ORT':>10}{'difference':>12}")
            kinds = sorted((set(ours) | set(theirs)) - {"total"}, key=lambda k: -ours.get(k, 0.0))
            for kind in kinds + ["total"]:
                mine, peer = ours.get(kind, 0.0) * 1e3, theirs.get(kind, float("nan")) * 1e3
                print(f"  {kind:<20}{mine:10.2f}{peer:10.2f}{mine - peer:+12.2f}" if kind in theirs else
                      f"  {kind:<20}{mine:10.2f}{'-':>10}{'':>12}")
        print("\nORT's times come from its profiler (a few us added per node); it runs squeeze-excite and\n"
              "hard-swish as separate Mul/Add/Clip nodes, counted under 'other'.\n"
              "Per layer, with GFLOP/s and arithmetic intensity: python -m npmobile profile IMAGE --weights none")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


PEER_TITLES = {"keras_predict": "Keras predict", "keras_tf_function": "Keras tf.function",
               "onnxruntime": "ONNX Runtime", "litert": "LiteRT", "pytorch": "PyTorch"}
TITLES = {"npmobile": "npmobile", "npmobile_trusted": "npmobile trusted", **PEER_TITLES}


def thread_text(threads: int) -> str:
    return f"{threads} thread{'s' if threads > 1 else ''}"


def peak_share_lines(report: dict) -> list[str]:
    """Each engine's share of the machine's measured compute peak, % per model and batch (one figure per thread
    count), as a Markdown table and the line that says what it is; nothing for results written before it."""
    cells = [cell for cell in report["cells"] if "peak_share" in cell]
    if not cells:
        return []
    threads = sorted({cell["threads"] for cell in cells})
    engines = [e for e in ENGINES if any(e in cell["peak_share"] for cell in cells)]
    rows: dict[tuple, dict[int, dict]] = {}  # (model, batch) -> thread count -> share per engine
    for cell in cells:
        rows.setdefault((cell["model"], cell["batch"]), {})[cell["threads"]] = cell["peak_share"]
    lines = [f"Share of the machine's measured compute peak, % on {' / '.join(thread_text(t) for t in threads)}:", "",
             "| model | batch | " + " | ".join(TITLES[e] for e in engines) + " |", "|---" * (2 + len(engines)) + "|"]
    for (model, batch), shares in rows.items():
        row = [model, str(batch)]
        row += [" / ".join(f"{shares[t][e] * 100:.0f}" if e in shares.get(t, {}) else "n/a" for t in threads)
                for e in engines]
        lines.append("| " + " | ".join(row) + " |")
    roofs = ", ".join(f"{report['roof_gflops'][str(t)]:.0f} GFLOP/s on {thread_text(t)}" for t in threads)
    work = ", ".join(f"{key} {flops / 1e9:.2f}" for key, flops in report["model_flops"].items())
    lines += ["", f"An engine's GFLOP/s (2 × MACs per image × batch / its median time; GFLOP per image: {work}) over "
              "the peak `npmobile.profiling.measure_machine` measures, the roof `npmobile profile --roofline` draws "
              f"(npmobile's pointwise kernel on cache-resident products): {roofs}."]
    return lines


def startup_engine_lines(report: dict) -> list[str]:
    """Each engine's start-up per model (seconds to the first answer, peak MB; npmobile's over ONNX Runtime's) as a
    Markdown table and the line that says what it is; nothing for results without it."""
    startup = report.get("startup") or {}
    measured = startup.get("engines")
    if not measured:
        return []
    engines = [e for e in STARTUP_ENGINES if any(e in by_engine for by_engine in measured["models"].values())]
    lines = ["| start-up | " + " | ".join(TITLES[e] for e in engines) + " |", "|---" * (1 + len(engines)) + "|"]
    for key, by_engine in measured["models"].items():
        ort = by_engine.get("onnxruntime", {}).get("seconds")
        row = [key]
        for engine in engines:
            if engine not in by_engine:
                row.append("n/a")
                continue
            seconds = by_engine[engine]["seconds"]
            ratio = f" ({seconds / ort:.2f}×)" if ort and engine.startswith("npmobile") else ""
            row.append(f"{seconds:.2f} s, {by_engine[engine]['peak_mb']:.0f} MB{ratio}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Start-up: a fresh process imports the engine, loads its file (npmobile and Keras the .keras, "
              "npmobile on kernels built ahead of time; ONNX Runtime the .onnx; LiteRT the .tflite; PyTorch the "
              f"TorchScript) and answers one batch-{measured['batch']} input on {thread_text(measured['threads'])}: "
              f"seconds from process start to that answer (median of {startup['runs']}, interleaved) and peak memory; "
              "in brackets npmobile / ONNX Runtime. npmobile reads a file it has read before from its read cache "
              "(npmobile/read_cache.py), as a user's second run does: no reader child, so isolated and trusted meet. "
              "Keras, mostly TensorFlow's import, on one model. Python, NumPy "
              f"and the harness take {measured['ready_seconds']:.2f} s of each; the first answers "
              f"{'have the same' if measured['same_top5'] else 'DO NOT have the same'} top 5."]
    return lines


def startup_text(measured: dict) -> str:
    text = (f"`python -m npmobile classify` on one photo, MobileNetV2, whole process: {measured['seconds']:.2f} s "
            f"and {measured['peak_mb']:.0f} MB peak with a warm Numba cache (median of {measured['runs']}); "
            f"the first-ever run, compiling every kernel, {measured['first_run_seconds']:.1f} s")
    if "aot_seconds" in measured:
        text += ("; with the kernels built ahead of time (`npmobile build-kernels`: "
                 f"{measured['build_kernels_seconds']:.0f} s, a {measured['aot_module_mb']:.1f} MB module) "
                 f"{measured['aot_seconds']:.2f} s and {measured['aot_peak_mb']:.0f} MB")
    return text


def markdown(report: dict) -> str:
    """The README's benchmark block for one results file (bench/results/latest.json)."""
    m = report["machine"]
    versions = m["versions"]
    names = {"numpy": "numpy", "numba": "numba", "tensorflow": "TensorFlow", "onnxruntime": "ONNX Runtime",
             "ai_edge_litert": "LiteRT", "torch": "PyTorch"}
    version_text = ", ".join(f"{title} {versions[key]}" for key, title in names.items() if versions.get(key))
    peers = [p for p in PEERS if any(p in cell["ms"] for cell in report["cells"])]
    calls = max(cell["ms"]["npmobile"]["n"] for cell in report["cells"])

    def ms(value: float) -> str:
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"

    lines = [
        f"Latest run: {report['date'][:10]}, {m['cpu']}, {m['cores']} cores (host {m['host']}), {version_text}.",
        f"224 px; milliseconds per call (median of {calls} calls); in brackets npmobile / peer — "
        "**below 1 means npmobile is faster**.",
        "",
        "| model | batch | threads | npmobile | " + " | ".join(PEER_TITLES[p] for p in peers) + " |",
        "|---" * (4 + len(peers)) + "|",
    ]
    for cell in report["cells"]:
        ours = cell["ms"]["npmobile"]["median"]
        row = [cell["model"], str(cell["batch"]), str(cell["threads"]), ms(ours)]
        for peer in peers:
            theirs = cell["ms"].get(peer, {}).get("median")
            row.append("n/a" if theirs is None else f"{ms(theirs)} ({ours / theirs:.2f}×)")
        lines.append("| " + " | ".join(row) + " |")
    goal = goal_text(report["cells"])
    lines += ["", runs_text(report)] + [goal] * bool(goal)
    worst = max(cell["agreement"]["npmobile"]["max_abs_diff"] for cell in report["cells"])
    same = all(a["same_top5"] for cell in report["cells"] for a in cell["agreement"].values())
    lines += [f"Outputs {'agree' if same else 'DO NOT agree'} with Keras in every cell "
              f"(same top-5: {'yes' if same else 'NO'}; npmobile's max |difference| {worst:.1e} on these "
              "random-weight models)."]
    if report.get("peak_rss_mb"):
        rss = ", ".join(f"{TITLES[k]} {v:.0f} MB" for k, v in report["peak_rss_mb"].items() if v)
        lines.append(f"Peak memory, MobileNetV2 batch 1: {rss}.")
    if report.get("startup") and "seconds" in report["startup"]:
        lines.append(startup_text(report["startup"]) + ".")
    elif report.get("startup_seconds"):  # results written before the start-up measurement grew
        lines.append("Process start → first prediction (`python -m npmobile classify`, warm Numba cache): "
                     f"{report['startup_seconds']:.2f} s.")
    share = peak_share_lines(report)
    engines = startup_engine_lines(report)
    return "\n".join(lines + [""] * bool(share) + share + [""] * bool(engines) + engines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1,
                        help="full runs, one after another; each cell the median of their medians (issue 27: 3)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2, no memory/start-up measurements")
    parser.add_argument("--startup", action="store_true",
                        help="with --quick: measure start-up all the same (3 rounds; it builds the kernels, ~1 min)")
    parser.add_argument("--profile", action="store_true",
                        help="npmobile's time per kind of layer, beside ONNX Runtime's")
    parser.add_argument("--onnx-profile", help=argparse.SUPPRESS)
    parser.add_argument("--markdown", nargs="?", const=str(RESULTS / "latest.json"), metavar="RESULTS_JSON",
                        help="print the README's benchmark block for a results file (default: latest.json)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--roof", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.threads[0], args.files)
    if args.roof:
        from npmobile.profiling import measure_machine

        return print(measure_machine(args.threads[0], memory=False).peak_gflops)
    if args.markdown:
        return print(markdown(json.loads(Path(args.markdown).read_text())))
    if args.onnx_profile:
        return print(json.dumps(onnx_profile(args.onnx_profile, args.models[0], args.threads[-1])))
    if args.profile:
        return profile(args.models, args.threads[-1])
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.quick:
        args.rounds, args.per_round = min(args.rounds, 3), 2

    folder = Path(tempfile.mkdtemp(prefix="npmobile-bench-"))
    try:
        print(f"preparing {', '.join(args.models)} (Keras models, .keras files, ONNX exports)...", file=sys.stderr)
        files = prepare(args.models, folder)
        runs, roofs = measure_runs(files, folder, args.models, args.batches, args.threads, args.rounds,
                                   args.per_round, args.runs)
        cells = median_cells(runs)
        flops = model_flops(files)
        for run_cells in [cells, *runs]:
            add_peak_shares(run_cells, flops, roofs)
        report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
                  "cells": cells, "median_of_runs": len(runs), "runs": runs, "roof_gflops": roofs,
                  "model_flops": flops, "peak_rss_mb": {}, "startup": None}
        if not args.quick and "v2" in files:
            print("measuring peak RSS...", file=sys.stderr)
            report["peak_rss_mb"] = peak_rss(files, folder)
        if not args.quick or args.startup:
            print("measuring start-up...", file=sys.stderr)
            report["startup"] = startup(files, folder, REPO / "samples" / "chelsea.jpg", runs=3 if args.quick else 7)
        print(table(cells))
        print(runs_text(report))
        if goal_text(cells):
            print(goal_text(cells))
        for cell in cells:
            bad = [k for k, v in cell["agreement"].items() if not v["same_top5"]]
            diffs = ", ".join(f"{k} {v['max_abs_diff']:.1e}" for k, v in cell["agreement"].items()
                              if k != "keras_predict")
            print(f"  {cell['model']} b{cell['batch']} t{cell['threads']}: outputs agree "
                  f"(max |diff| vs Keras: {diffs}{'; TOP-5 DIFFERS: ' + str(bad) if bad else ''})")
        if report["peak_rss_mb"]:
            print("peak RSS, MobileNetV2 b1 (MB): " + ", ".join(
                f"{k} {v:.0f}" for k, v in report["peak_rss_mb"].items() if v))
        if report["startup"] and "seconds" in report["startup"]:
            print(startup_text(report["startup"]))
        for lines in (peak_share_lines(report), startup_engine_lines(report)):
            if lines:
                print("\n" + "\n".join(lines))
        if len(runs) > 1:
            print("npmobile / peer in each run:\n" + "\n".join(run_ratio_lines(runs)), file=sys.stderr)
        RESULTS.mkdir(parents=True, exist_ok=True)
        # A quick or partial run is a smoke test: it never replaces latest.json, which the README shows.
        partial = args.quick or set(args.models) != set(MODELS) or args.batches != [1, 8] or args.threads != [1, 2]
        name = f"{datetime.date.today().isoformat()}-{socket.gethostname()}{'-partial' if partial else ''}.json"
        (RESULTS / name).write_text(json.dumps(report, indent=1))
        if partial:
            print(f"written {RESULTS / name} (a partial run: latest.json is left alone)")
        else:
            shutil.copy(RESULTS / name, RESULTS / "latest.json")
            print(f"written {RESULTS / name} and latest.json; README table: python bench/run.py --markdown")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
