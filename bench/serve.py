"""A MobileNet behind a web server: the example of docs/serving.md (FastAPI + uvicorn), and a loopback
load test of it.

    .venv/bin/pip install -e ".[bench]"           # fastapi, uvicorn and httpx among the rest
    .venv/bin/python bench/serve.py                # 1 and 2 workers x 1 and 2 threads, concurrency 1, 4, 16
    .venv/bin/python bench/serve.py --requests 40  # fewer requests per cell
    .venv/bin/python bench/serve.py --markdown     # docs/serving.md's table from bench/results/serve-latest.json
    SERVE_THREADS=1 .venv/bin/uvicorn serve_app:app --app-dir bench --workers 2 --port 8000   # the server alone

The server (bench/serve_app.py) opens the model, calls ``Model.warmup`` and runs one request's path in
its lifespan, before uvicorn accepts a connection, so ``/health`` answering at all means the kernels are
loaded; ``/classify`` takes an image as the request body, refuses one of more than ``MAX_PIXELS`` from its
header (400), and returns the top 5 classes. Each worker runs ``SERVE_THREADS`` Numba threads (its pool
made that size through ``npmobile.dask.worker_environment``, BLAS one thread).

The client starts uvicorn (127.0.0.1 only) for each configuration, waits for ``/health``, then measures:
- **the first requests after warm-up**: one new connection per request until every worker has answered
  once, each worker's first request timed, against the median of the next sequential requests (steady);
- **load** at each concurrency: that many keep-alive connections each sending requests back to back, a
  bounded number of requests (and seconds) per cell: requests per second, p50 and p99 latency, and the
  server's CPU time per request (its workers' user + system time from /proc: threads that spin waiting for
  work show there, and it depends less than the rate on what else the machine runs).
Each configuration's server is started ``--rounds`` times, the configurations taking turns, so that a busy
minute on a shared machine falls on all of them: rates are the rounds' medians, latencies percentiles of
all the rounds' requests; the best round's rate beside the median (on a shared machine, the round the
neighbours disturbed least).
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


def first_requests(url: str, body: bytes, workers: int, steady: int = 10, limit: int = 40) -> tuple[dict, list]:
    """Each worker's first request after warm-up (a new connection per request, until every worker has
    answered; the kernel spreads new connections over the workers), and ``steady`` more after them:
    ({worker pid: its first request's seconds}, the later requests' seconds)."""
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
    return firsts, later


def cpu_seconds(pids) -> float:
    """CPU time (user + system, every thread) the processes have used so far, from /proc."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime and stime: the line's 14th and 15th fields
    return ticks / os.sysconf("SC_CLK_TCK")


async def load(url: str, body: bytes, concurrency: int, requests: int, seconds: float, servers: list) -> dict:
    """``concurrency`` connections sending back to back until ``requests`` are done or ``seconds`` pass:
    {"rate": requests per second, "latencies": seconds of each, "cpu": the ``servers`` processes' CPU
    seconds per request, "workers": pids answering, "answers": the distinct top-5 lists}."""
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

        started, cpu = time.perf_counter(), cpu_seconds(servers)
        await asyncio.gather(*[user() for _ in range(concurrency)])
        wall, cpu = time.perf_counter() - started, cpu_seconds(servers) - cpu
    return {"rate": len(latencies) / wall, "latencies": latencies, "cpu": cpu / len(latencies), "workers": pids,
            "answers": answers}


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 1)


def summary(workers: int, threads: int, rounds: list[dict]) -> dict:
    """One configuration over its rounds: medians of the rounds' rates, percentiles of all latencies."""
    firsts = [s for r in rounds for s in r["firsts"].values()]
    later = [s for r in rounds for s in r["later"]]
    cells = []
    for k, concurrency in enumerate(rounds[0]["concurrency"]):
        done = [r["load"][k] for r in rounds]
        latencies = np.asarray([s for d in done for s in d["latencies"]])
        cells.append({"concurrency": concurrency, "requests": len(latencies),
                      "req_per_s": round(statistics.median(d["rate"] for d in done), 1),
                      "req_per_s_best": round(max(d["rate"] for d in done), 1),  # the least disturbed round
                      "req_per_s_rounds": [round(d["rate"], 1) for d in done],
                      "p50_ms": ms(np.percentile(latencies, 50)), "p99_ms": ms(np.percentile(latencies, 99)),
                      "server_cpu_ms_per_request": ms(statistics.median(d["cpu"] for d in done)),
                      "workers_answering": max(len(d["workers"]) for d in done),
                      "distinct_answers": len(set().union(*(d["answers"] for d in done)))})
    return {"workers": workers, "threads": threads, "rounds": len(rounds),
            "ready_s": round(statistics.median(r["ready_s"] for r in rounds), 2),
            "kernels": rounds[0]["kernels"], "warmup_s": round(statistics.median(r["warmup_s"] for r in rounds), 3),
            "first_after_warmup_ms": ms(statistics.median(firsts)), "steady_ms": ms(statistics.median(later)),
            "first_over_steady": round(statistics.median(firsts) / statistics.median(later), 2),
            "first_after_warmup_max_ms": ms(max(firsts)), "load": cells}


def machine() -> dict:
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    packages = ("numpy", "numba", "pillow", "fastapi", "uvicorn", "httpx")
    return {"cpu": cpu, "cores": os.cpu_count(), "host": socket.gethostname(), "python": platform.python_version(),
            "versions": {name: version(name) for name in packages}}


def markdown(results: dict) -> str:
    """docs/serving.md's table of a run: per configuration, its ready time, its first request after warm-up against
    steady state, and per concurrency the median (best) round's rate with p50 / p99 latency."""
    concurrency = [c["concurrency"] for c in results["runs"][0]["load"]]
    lines = ["| workers × threads | ready | first request after warm-up | "
             + " | ".join(f"concurrency {c}: req/s median (best), p50 / p99" for c in concurrency)
             + " | server CPU per request |",
             "|---" * (4 + len(concurrency)) + "|"]
    for run in results["runs"]:
        cells = [f"{c['req_per_s']:.0f} ({c.get('req_per_s_best', max(c['req_per_s_rounds'])):.0f}), "
                 f"{c['p50_ms']:.0f} / {c['p99_ms']:.0f} ms" for c in run["load"]]
        cpu = [c["server_cpu_ms_per_request"] for c in run["load"]]
        first = f"{run['first_after_warmup_ms']:.0f} ms, {run['first_over_steady']:.2f}× steady"
        lines.append(f"| {run['workers']} × {run['threads']} | {run['ready_s']:.1f} s | {first} | " + " | ".join(cells)
                     + f" | {min(cpu):.1f}–{max(cpu):.1f} ms |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="Numba threads per worker")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=150, help="requests per cell and round (at most)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per cell and round (at most)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="each configuration's server started this many times, the configurations alternated")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--image", default=str(REPO / "samples" / "chelsea.jpg"))
    parser.add_argument("--markdown", action="store_true",
                        help="print docs/serving.md's table of the latest run and stop")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads((HERE / "results" / "serve-latest.json").read_text())))
        return

    body = Path(args.image).read_bytes()
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine(), "load_average_before": os.getloadavg(), "model": args.model,
               "image": Path(args.image).name, "requests_per_cell": args.requests, "runs": []}
    configs = [(workers, threads) for workers in args.workers for threads in args.threads]
    rounds: dict[tuple[int, int], list[dict]] = {config: [] for config in configs}
    for round_number in range(args.rounds):
        for workers, threads in configs:
            with server(workers, threads, args.model) as (url, ready_s, health):
                firsts, later = first_requests(url, body, workers)
                done = [asyncio.run(load(url, body, c, args.requests, args.seconds, list(firsts)))
                        for c in args.concurrency]
            rounds[workers, threads].append({"ready_s": ready_s, "kernels": health["kernels"],
                                             "warmup_s": health["warmup_s"], "firsts": firsts, "later": later,
                                             "concurrency": args.concurrency, "load": done})
            print(f"round {round_number + 1}: {workers} worker(s) x {threads} thread(s): "
                  + "  ".join(f"c{c} {d['rate']:.1f} req/s" for c, d in zip(args.concurrency, done)), flush=True)
    results["runs"] = [summary(workers, threads, rounds[workers, threads]) for workers, threads in configs]
    results["load_average_after"] = os.getloadavg()
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.date.today().isoformat()
    for path in (out / f"serve-{stamp}-{socket.gethostname()}.json", out / "serve-latest.json"):
        path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{results['machine']['cpu']}, {results['machine']['cores']} cores; load average "
          f"{results['load_average_before'][0]:.1f} before, {results['load_average_after'][0]:.1f} after")
    for run in results["runs"]:
        cells = "  ".join(f"c{c['concurrency']}: {c['req_per_s']} req/s p50 {c['p50_ms']} p99 {c['p99_ms']} ms "
                          f"cpu {c['server_cpu_ms_per_request']} ms/req" for c in run["load"])
        print(f"{run['workers']} worker(s) x {run['threads']} thread(s): ready {run['ready_s']} s, first after "
              f"warm-up {run['first_after_warmup_ms']} ms = {run['first_over_steady']}x steady ({run['steady_ms']} "
              f"ms)  {cells}")


if __name__ == "__main__":
    main()
