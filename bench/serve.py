"""A MobileNet behind a web server: the README's "Serving" example (FastAPI + uvicorn), and a loopback
load test of it.

    .venv/bin/pip install -e ".[bench]"           # fastapi, uvicorn and httpx among the rest
    .venv/bin/python bench/serve.py                # 1 and 2 workers x 1 and 2 threads, concurrency 1, 4, 16
    .venv/bin/python bench/serve.py --requests 40  # fewer requests per cell
    SERVE_THREADS=1 .venv/bin/uvicorn serve_app:app --app-dir bench --workers 2 --port 8000   # the server alone

The server (bench/serve_app.py) opens the model, calls ``Model.warmup`` and runs one request's path in
its lifespan, before uvicorn accepts a connection, so ``/health`` answering at all means the kernels are
loaded; ``/classify`` takes an image as the request body, refuses one of more than ``MAX_PIXELS`` from its
header (400), and returns the top 5 classes. Each worker runs ``SERVE_THREADS`` Numba threads (its pool
made that size through ``npmobile.dask.worker_environment``, BLAS one thread).

The client starts uvicorn (127.0.0.1 only) for each configuration, waits for ``/health``, then measures:
- **the first requests after warm-up**: one new connection per request until every worker has answered
  once, each worker's first request timed, against the median of the next sequential requests (steady);
- **load** at each concurrency: that many connections each sending requests back to back, a bounded number
  of requests (and seconds) per cell: requests per second, p50 and p99 latency.
The image is samples/chelsea.jpg (451x300 JPEG, decoded and resized per request); the model MobileNetV2
(alpha 1.0, 224 px) with seeded random weights: speed does not depend on the weights. Client and server
share the machine's cores, and on a shared machine other jobs too: the load average is recorded; compare
ratios within one run. Results go to bench/results/serve-<date>-<host>.json and serve-latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# --------------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(workers: int, threads: int, model: str):
    """uvicorn on a free loopback port with ``workers`` processes of ``threads`` Numba threads; yields
    (base URL, seconds from start to /health answering, /health's body)."""
    import httpx

    from npmobile.dask import worker_environment

    port = free_port()
    env = {**os.environ, **worker_environment(threads), "SERVE_THREADS": str(threads),
           "SERVE_MODEL": model, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "uvicorn", "serve_app:app", "--app-dir", str(HERE), "--host", "127.0.0.1",
               "--port", str(port), "--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, cwd=str(HERE))
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {process.returncode}")
            try:
                health = httpx.get(url + "/health", timeout=5).json()
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url, time.perf_counter() - started, health
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def first_requests(url: str, body: bytes, workers: int, steady: int = 15, limit: int = 40) -> dict:
    """Each worker's first request after warm-up (a new connection per request, until every worker has
    answered; the kernel spreads new connections over the workers), then ``steady`` more: their median."""
    import httpx

    firsts: dict[int, float] = {}
    later: list[float] = []
    for _ in range(limit):
        if len(firsts) == workers and len(later) >= steady:
            break
        with httpx.Client(timeout=60) as client:
            start = time.perf_counter()
            response = client.post(url + "/classify", content=body)
            elapsed = time.perf_counter() - start
        response.raise_for_status()
        pid = response.json()["pid"]
        if pid not in firsts:
            firsts[pid] = elapsed
        else:
            later.append(elapsed)
    steady_s = statistics.median(later)
    return {"first_ms": [round(s * 1e3, 2) for s in firsts.values()], "steady_ms": round(steady_s * 1e3, 2),
            "first_over_steady": round(max(firsts.values()) / steady_s, 2), "workers_seen": len(firsts)}


async def load(url: str, body: bytes, concurrency: int, requests: int, seconds: float) -> dict:
    """``concurrency`` connections sending back to back until ``requests`` are done or ``seconds`` pass."""
    import httpx

    latencies: list[float] = []
    answers: set = set()
    pids: set = set()
    tickets = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        await asyncio.gather(*[client.post(url + "/classify", content=body) for _ in range(concurrency)])  # connect
        deadline = time.perf_counter() + seconds

        async def user() -> None:
            for _ in tickets:
                if time.perf_counter() > deadline:
                    return
                start = time.perf_counter()
                response = await client.post(url + "/classify", content=body)
                latencies.append(time.perf_counter() - start)
                response.raise_for_status()
                reply = response.json()
                pids.add(reply["pid"])
                answers.add(tuple((t["wnid"], t["probability"]) for t in reply["top"]))

        started = time.perf_counter()
        await asyncio.gather(*[user() for _ in range(concurrency)])
        wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1e3
    return {"concurrency": concurrency, "requests": len(latencies), "seconds": round(wall, 2),
            "req_per_s": round(len(latencies) / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "workers_answering": len(pids),
            "distinct_answers": len(answers)}


def machine() -> dict:
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    packages = ("numpy", "numba", "pillow", "fastapi", "uvicorn", "httpx")
    return {"cpu": cpu, "cores": os.cpu_count(), "host": socket.gethostname(), "python": platform.python_version(),
            "versions": {name: version(name) for name in packages}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="Numba threads per worker")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=120, help="requests per cell (at most)")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds per cell (at most)")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--image", default=str(REPO / "samples" / "chelsea.jpg"))
    args = parser.parse_args()

    body = Path(args.image).read_bytes()
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine(), "load_average_before": os.getloadavg(), "model": args.model,
               "image": Path(args.image).name, "runs": []}
    for workers in args.workers:
        for threads in args.threads:
            with server(workers, threads, args.model) as (url, ready_s, health):
                run = {"workers": workers, "threads": threads, "ready_s": round(ready_s, 2),
                       "kernels": health["kernels"], "warmup_s": health["warmup_s"],
                       "first": first_requests(url, body, workers), "load": []}
                for concurrency in args.concurrency:
                    run["load"].append(asyncio.run(load(url, body, concurrency, args.requests, args.seconds)))
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    results["load_average_after"] = os.getloadavg()
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.date.today().isoformat()
    for path in (out / f"serve-{stamp}-{socket.gethostname()}.json", out / "serve-latest.json"):
        path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{results['machine']['cpu']}, {results['machine']['cores']} cores; load average "
          f"{results['load_average_before'][0]:.1f} before, {results['load_average_after'][0]:.1f} after")
    for run in results["runs"]:
        cells = "  ".join(f"c{c['concurrency']}: {c['req_per_s']} req/s p50 {c['p50_ms']} p99 {c['p99_ms']} ms"
                          for c in run["load"])
        print(f"{run['workers']} worker(s) x {run['threads']} thread(s): ready {run['ready_s']} s, first after "
              f"warm-up {run['first']['first_over_steady']}x steady ({run['first']['steady_ms']} ms)  {cells}")


if __name__ == "__main__":
    main()
