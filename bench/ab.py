"""Paired, interleaved A/B of two git revisions of npmobile: is B slower than A, beyond the noise?

    .venv/bin/python bench/ab.py 7722acd main                          # every model, batch 1 and 8, 1 and 2 threads
    .venv/bin/python bench/ab.py main~3 main --models v3s --batches 1 --threads 1 --rounds 3    # a smoke test
    .venv/bin/python bench/ab.py main main                             # A/A: the noise floor of this machine

How it measures: each revision is checked out with `git worktree add --detach` into a temporary folder and
installed from there with `pip install --no-deps --target` into a folder of its own (the worktree is removed once
installed). An installed copy, not the checkout on PYTHONPATH: pyproject maps kernels/ and weights/ to
npmobile.kernels and npmobile.weights, and npmobile's children (the isolated reader, the kernel build) find the
npmobile they were started from by its installed distribution. Everything else (NumPy, Numba, Keras) is this
venv's, shared by both. Each revision has its own Numba cache, in its install folder, so both compile their kernels
at first (a few minutes).

The models are bench/run.py's (its `prepare`: keras.applications, BatchNorm given non-trivial statistics, saved as
.keras), and so is each worker: `bench/run.py --serve npmobile` in a process of its own per revision and thread
count, with that revision's install first on PYTHONPATH; it loads the .keras file, and each request is one untimed
call and then timed `predict(x, threads=N)` calls on run.py's input. After a warm-up request (the JIT compiles),
every round asks A, B, B, A (ABBA, which cancels a drift that is linear within the round) for --per-round timed
calls each. Per cell: each revision's median, the paired ratio B/A as the median of the per-round ratios (each
round's median B over its median A), and its 95% interval by resampling the rounds (bootstrap). "slower" means the
whole interval lies above 1, "faster" below 1, "same" that it contains 1. The two revisions' outputs on the same
input are compared too (identical bits, else the largest |difference| and whether the top-5 agree).

--kernels jit (the default) runs both on Numba's JIT (NPMOBILE_KERNELS=jit: a kernel module built ahead of time
in the user's cache never stands in); --kernels built builds each revision's own module first
(`python -m npmobile build-kernels` into a kernel folder of its own) and runs on it.

Writes bench/results/ab-<A>-<B>.json (short commit hashes; ab-<A>-<B>-built.json with --kernels built) and
prints a table. No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import run  # bench/run.py: bench/ is on sys.path, this file runs as a script

REPO = Path(__file__).resolve().parents[1]
SIDES = ("A", "B")
ORDER = ("A", "B", "B", "A")  # one round
BOOTSTRAP_RESAMPLES = 4000


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()


def resolve(rev: str) -> dict:
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    return {"name": rev, "sha": sha, "short": sha[:7], "subject": git("log", "-1", "--format=%s", sha)}


def install(revision: dict, folder: Path) -> Path:
    """The revision installed (no dependencies) into ``folder``/site-<sha>; its worktree removed afterwards."""
    checkout, site = folder / f"worktree-{revision['short']}", folder / f"site-{revision['short']}"
    git("worktree", "add", "--detach", str(checkout), revision["sha"])
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-compile", "--target", str(site), str(checkout)], check=True)
    finally:
        git("worktree", "remove", "--force", str(checkout))
    return site


def revision_env(site: Path, kernels: str, kernel_dir: Path) -> dict[str, str]:
    """The variables a revision's processes run with, on top of bench/run.py's bench_env()."""
    env = {"PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if kernels == "jit":
        env["NPMOBILE_KERNELS"] = "jit"
    else:
        env.update(NPMOBILE_KERNELS="", NPMOBILE_KERNELS_DIR=str(kernel_dir))
    return env


@contextlib.contextmanager
def environment(changes: dict[str, str]):
    """os.environ with ``changes`` while the block runs (bench/run.py's processes take their environment from it)."""
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# What a revision's process runs: where npmobile comes from, and whether its kernels are the built module.
_PROBE = ("import json, npmobile, npmobile.kernels.backend as backend; "
          "print(json.dumps({'npmobile_file': npmobile.__file__, 'aot': getattr(backend, 'AOT', None)}))")


def probe(env: dict[str, str]) -> dict:
    """Where a process with ``env`` imports npmobile from, and whether it runs the built kernel module."""
    with environment(env):
        done = subprocess.run([sys.executable, "-c", _PROBE], check=True, capture_output=True, text=True,
                              env=run.bench_env(), cwd=tempfile.gettempdir())
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_kernels(env: dict[str, str]) -> float:
    """`npmobile build-kernels` for one revision into its own kernel folder; seconds taken."""
    start = time.perf_counter()
    with environment(env):
        subprocess.run([sys.executable, "-m", "npmobile", "build-kernels"], check=True, env=run.bench_env(),
                       stdout=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    return time.perf_counter() - start


def paired_ratio(rounds: list[dict[str, list[float]]], seed: int = 0) -> dict:
    """B/A as the median of the per-round ratios of medians, with a bootstrap 95% interval over rounds."""
    ratios = np.array([statistics.median(r["B"]) / statistics.median(r["A"]) for r in rounds])
    rng = np.random.default_rng(seed)
    resampled = np.median(rng.choice(ratios, size=(BOOTSTRAP_RESAMPLES, len(ratios))), axis=1)
    low, high = np.quantile(resampled, [0.025, 0.975])
    verdict = "slower" if low > 1 else "faster" if high < 1 else "same"
    return {"ratio": float(np.median(ratios)), "ci95": [float(low), float(high)], "verdict": verdict,
            "per_round": [float(r) for r in ratios]}


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    top5 = [np.argsort(-out, axis=1)[:, :5] for out in (a, b)]
    return {"identical": bool(a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()),
            "max_abs_diff": float(np.abs(a.astype(np.float64) - b).max()), "same_top5": bool(np.array_equal(*top5))}


def time_cell(procs: dict[str, run.EngineProcess], key: str, batch: int, rounds: int, per_round: int,
              folder: Path) -> dict:
    outputs = {}
    for side in SIDES:  # warm-up (loads, compiles) and each revision's output
        path = folder / f"{side}-{key}-{batch}.npy"
        procs[side].ask(f"run {key} {batch} 2 {path}")
        outputs[side] = np.load(path)
    measured = []
    for _ in range(rounds):
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        for side in ORDER:
            time.sleep(0.05)  # let the other process's spinning workers go to sleep first
            times[side] += procs[side].ask(f"run {key} {batch} {per_round} {folder / 'scratch.npy'}")["times"]
        measured.append(times)
    return {"ms": {side: run.summary([t for r in measured for t in r[side]]) for side in SIDES},
            **paired_ratio(measured), "outputs": agreement(outputs["A"], outputs["B"])}


def measure(files: dict, envs: dict[str, dict], folder: Path, models: list[str], batches: list[int],
            threads_list: list[int], rounds: int, per_round: int) -> list[dict]:
    files_path = folder / "files.json"
    files_path.write_text(json.dumps(files))
    cells = []
    for threads in threads_list:
        procs = {}
        try:
            for side in SIDES:
                with environment(envs[side]):
                    procs[side] = run.EngineProcess("npmobile", threads, files_path)
            for key in models:
                for batch in batches:
                    cell = {"model": key, "batch": batch, "threads": threads,
                            **time_cell(procs, key, batch, rounds, per_round, folder)}
                    cells.append(cell)
                    print(f"  {key} batch {batch} threads {threads}: A {cell['ms']['A']['median']:.2f} ms, "
                          f"B {cell['ms']['B']['median']:.2f} ms, B/A {cell['ratio']:.3f}", file=sys.stderr, flush=True)
        finally:
            for proc in procs.values():
                proc.close()
    return cells


def table(report: dict) -> str:
    a, b = report["revisions"]["A"], report["revisions"]["B"]
    lines = [f"A = {a['name']} ({a['short']}), B = {b['name']} ({b['short']}); kernels: {report['kernels']}; "
             f"{report['rounds']} rounds x {report['per_round']} calls per side (ABBA)",
             f"{'model':<6}{'batch':>5}{'thr':>4}{'A ms':>9}{'B ms':>9}{'B/A':>7}  {'95% interval':<15}"
             f"{'verdict':<9}outputs",
             "-" * 86]
    for cell in report["cells"]:
        out = cell["outputs"]
        bits = "identical" if out["identical"] else (f"max |diff| {out['max_abs_diff']:.1e}, top-5 "
                                                      f"{'same' if out['same_top5'] else 'DIFFERS'}")
        low, high = cell["ci95"]
        lines.append(f"{cell['model']:<6}{cell['batch']:>5}{cell['threads']:>4}{cell['ms']['A']['median']:>9.2f}"
                     f"{cell['ms']['B']['median']:>9.2f}{cell['ratio']:>7.3f}  [{low:.3f}, {high:.3f}]  "
                     f"{cell['verdict']:<9}{bits}")
    slower = [f"{c['model']} b{c['batch']} t{c['threads']}" for c in report["cells"] if c["verdict"] == "slower"]
    lines.append(f"B slower beyond the noise in: {', '.join(slower)}" if slower else
                 "B slower beyond the noise in no cell.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev_a", help="revision A (the before), anything git rev-parse takes")
    parser.add_argument("rev_b", help="revision B (the after)")
    parser.add_argument("--models", nargs="+", default=list(run.MODELS), choices=list(run.MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=3, help="timed calls per side in each quarter of a round")
    parser.add_argument("--kernels", choices=("jit", "built"), default="jit",
                        help="Numba's JIT for both, or each revision's own module built ahead of time")
    args = parser.parse_args()

    revisions = dict(zip(SIDES, (resolve(args.rev_a), resolve(args.rev_b))))
    folder = Path(tempfile.mkdtemp(prefix="npmobile-ab-"))
    try:
        envs = {}
        for side, revision in revisions.items():
            print(f"installing {side} = {revision['name']} ({revision['short']}: {revision['subject'][:60]})...",
                  file=sys.stderr, flush=True)
            site = install(revision, folder / side)
            envs[side] = revision_env(site, args.kernels, folder / side / "kernels")
            if args.kernels == "built":
                print(f"building {side}'s kernel module...", file=sys.stderr, flush=True)
                revision["build_kernels_seconds"] = build_kernels(envs[side])
            revision.update(probe(envs[side]))
            if not revision["npmobile_file"].startswith(str(site)):
                raise SystemExit(f"{side} imports npmobile from {revision['npmobile_file']}, not from {site}")
            if revision["aot"] != (args.kernels == "built"):
                raise SystemExit(f"{side} runs {'the built module' if revision['aot'] else 'the JIT'}, "
                                 f"not what --kernels {args.kernels} asks for")
        print(f"preparing {', '.join(args.models)} (bench/run.py's models)...", file=sys.stderr, flush=True)
        files = run.prepare(args.models, folder)
        cells = measure(files, envs, folder, args.models, args.batches, args.threads, args.rounds, args.per_round)
        report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": run.machine(),
                  "revisions": revisions, "kernels": args.kernels, "rounds": args.rounds,
                  "per_round": args.per_round, "cells": cells}
        print(table(report))
        run.RESULTS.mkdir(parents=True, exist_ok=True)
        suffix = "-built" if args.kernels == "built" else ""
        path = run.RESULTS / f"ab-{revisions['A']['short']}-{revisions['B']['short']}{suffix}.json"
        path.write_text(json.dumps(report, indent=1))
        print(f"written {path}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
