"""Bench row for PyTorch state dicts: a torchvision-named MobileNetV3-Large, npmobile reading the .pth against
PyTorch itself, eager and TorchScript, on the same weights and inputs.

    .venv/bin/pip install -e ".[test]"        # torch==2.13.0 (the CPU wheel)
    .venv/bin/python bench/torchvision_pth.py     # batch 1 and 8, 1 and 2 threads (a few minutes on 2 cores)
    .venv/bin/python bench/torchvision_pth.py --batches 1 --threads 1 --rounds 3

The parent builds the model in PyTorch with torchvision's module names
(npmobile/applications/torchvision_modules.py: the torchvision wheel does not import beside the CPU torch
here), gives it random weights and BatchNorm statistics, and saves ``torch.save(model.state_dict(), "v3l.pth")``
and a traced TorchScript copy. Engines, each in its own process with its own thread settings, interleaved in
rotating order per round as in bench/run.py:
- npmobile: ``npmobile.load_model("v3l.pth")``, ``predict(x, data_format="channels_first", threads=N)``;
- PyTorch eager: the module with ``load_state_dict``, ``eval()``, under ``torch.inference_mode()``;
- TorchScript: the traced module, ``torch.jit.freeze``d (BatchNorm folded), under ``inference_mode``.
All take the same NCHW float32 array, as a PyTorch user has it. Reported: median ms per call and
npmobile / peer (below 1: npmobile faster), and npmobile's max |difference| from eager PyTorch.
Results: bench/results/torchvision-<date>-<host>.json. Timing goals live here, never in tests.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
ENGINES = ("npmobile", "pytorch_eager", "torchscript")
NAMES = {"npmobile": "npmobile", "pytorch_eager": "PyTorch eager", "torchscript": "TorchScript"}


def torch_module():
    from npmobile.applications import torchvision_modules

    return torchvision_modules


def prepare(folder: Path) -> dict:
    import torch

    tvm = torch_module()
    model = tvm.randomize(tvm.build("mobilenet_v3_large"), seed=0)
    pth, script = folder / "v3l.pth", folder / "v3l.pt"
    torch.save(model.state_dict(), pth)
    with torch.inference_mode():
        torch.jit.trace(model, torch.zeros(1, 3, 224, 224)).save(str(script))
    return {"pth": str(pth), "torchscript": str(script)}


def load_engine(engine: str, files: dict, threads: int):
    if engine == "npmobile":
        import npmobile

        model = npmobile.load_model(files["pth"])
        return lambda x: model.predict(x, data_format="channels_first", threads=threads)
    import torch

    if engine == "torchscript":
        module = torch.jit.freeze(torch.jit.load(files["torchscript"]).eval())
    else:
        module = torch_module().build("mobilenet_v3_large")
        module.load_state_dict(torch.load(files["pth"], weights_only=True))
        module.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return run


def model_input(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).normal(0, 1, (batch, 3, 224, 224)).astype(np.float32)


def serve(engine: str, threads: int, files_path: str) -> None:
    """An engine process: ``run BATCH COUNT OUT`` on stdin -> one JSON line of timings on stdout."""
    if engine != "npmobile":
        import torch

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
    files = json.loads(Path(files_path).read_text())
    run = load_engine(engine, files, threads)
    for line in sys.stdin:
        _, batch, count, out = line.split()
        x = model_input(int(batch))
        np.save(out, np.asarray(run(x)))
        times = []
        for _ in range(int(count)):
            start = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - start)
        print(json.dumps({"times": times}), flush=True)


def measure(files_path: Path, folder: Path, batches: list[int], threads_list: list[int], rounds: int,
            per_round: int) -> list[dict]:
    cells = []
    for threads in threads_list:
        procs = {e: subprocess.Popen([sys.executable, __file__, "--serve", e, str(threads), str(files_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
                 for e in ENGINES}
        try:
            for batch in batches:
                times: dict[str, list[float]] = {e: [] for e in ENGINES}
                for r in range(rounds):
                    order = ENGINES[r % len(ENGINES):] + ENGINES[: r % len(ENGINES)]
                    for engine in order:
                        time.sleep(0.2)
                        out = folder / f"{engine}-{batch}.npy"
                        procs[engine].stdin.write(f"run {batch} {per_round} {out}\n")
                        procs[engine].stdin.flush()
                        times[engine] += json.loads(procs[engine].stdout.readline())["times"]
                outputs = {e: np.load(folder / f"{e}-{batch}.npy") for e in ENGINES}
                reference = outputs["pytorch_eager"]
                cells.append({
                    "batch": batch, "threads": threads,
                    "ms": {e: statistics.median(t) * 1000 for e, t in times.items()},
                    "max_abs_diff": {e: float(np.abs(o - reference).max()) for e, o in outputs.items()},
                    "same_top5": {e: bool((np.argsort(-o)[:, :5] == np.argsort(-reference)[:, :5]).all())
                                  for e, o in outputs.items()},
                })
        finally:
            for proc in procs.values():
                proc.stdin.close()
                proc.wait(timeout=60)
    return cells


def table(cells: list[dict]) -> str:
    peers = ENGINES[1:]
    lines = ["| model | batch | threads | npmobile | " + " | ".join(NAMES[p] for p in peers) + " |",
             "|---|---|---|---|" + "---|" * len(peers)]
    for c in cells:
        ms = c["ms"]
        row = [f"{ms[p]:.3g} ({ms['npmobile'] / ms[p]:.2f}×)" for p in peers]
        lines.append(f"| v3l (torchvision .pth) | {c['batch']} | {c['threads']} | {ms['npmobile']:.3g} | "
                     + " | ".join(row) + " |")
    worst = max(c["max_abs_diff"]["npmobile"] for c in cells)
    top5 = all(c["same_top5"]["npmobile"] for c in cells)
    lines.append(f"\nnpmobile vs PyTorch eager: max |difference| {worst:.1e}, same top-5: {'yes' if top5 else 'NO'}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", nargs=3, metavar=("ENGINE", "THREADS", "FILES"), help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=6)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.serve[2])
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files_path = folder / "files.json"
        files_path.write_text(json.dumps(prepare(folder)))
        cells = measure(files_path, folder, args.batches, args.threads, args.rounds, args.per_round)
    import torch

    report = {"date": datetime.date.today().isoformat(), "host": socket.gethostname(), "torch": torch.__version__,
              "model": "torchvision-named MobileNetV3-Large, 224 px, random weights", "cells": cells}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"torchvision-{report['date']}-{report['host']}.json"
    path.write_text(json.dumps(report, indent=2))
    print(table(cells))
    print(f"\nwrote {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
