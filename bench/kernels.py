"""Micro-benchmark: each fast kernel vs its reference twin and vs the obvious NumPy/BLAS baseline.

    .venv/bin/python bench/kernels.py [--rounds 15] [--quick] [--cases depthwise]

Shapes are MobileNetV2-224 (V3-Large for squeeze-excite), batch 1. Every case runs at 1 and 2
threads: Numba kernels under kernels.threads.thread_limits(n) (Numba n threads, BLAS 1), the
NumPy baselines with BLAS at n threads (their natural setting). Timings are medians of
interleaved rounds (every candidate once per round, so a noisy neighbour hits them all alike);
on a shared machine compare ratios, not absolute times.

The "pipeline" section runs MobileNetV2's 17 inverted-residual blocks (expand 1x1, depthwise 3x3,
project 1x1 + residual) under each thread-pool policy, each in a fresh process, because the
policies differ in which thread pools exist and spin: that is what decides the interpreter's
policy (kernels/threads.py).

Prints a table and writes bench/results/kernels-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import llvmlite.binding as llvm
import numba
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from npmobile.kernels import reference as ref
from npmobile.kernels.activations import ACT_HARD_SWISH, ACT_NONE, ACT_RELU, ACT_RELU6
from npmobile.kernels.conv import conv2d, indirection_table
from npmobile.kernels.depthwise import depthwise_conv2d
from npmobile.kernels.gemm import AVX512, choose_tile
from npmobile.kernels.pointwise import (
    gemm_matmul,
    gemm_tiles,
    pointwise_conv2d,
    pointwise_conv2d_numba,
    prepare_weights,
    tile_shape,
)
from npmobile.kernels.pooling import average_pool_rows, global_average_pool
from npmobile.kernels.squeeze_excite import squeeze_excite
from npmobile.kernels.threads import thread_limits
from npmobile.profiling import measure_machine

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_ACT = {ACT_RELU6: ref.relu6, ACT_HARD_SWISH: ref.hard_swish}
rng = np.random.default_rng(0)


def rand(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Cases: name, flops, {candidate: (callable, kind)} where kind "numba" or "blas" decides the threads
# --------------------------------------------------------------------------------------------------


def depthwise_case(h, c, k, s, pads, act=ACT_RELU6, label=""):
    (top, bottom), (left, right) = pads
    oh, ow = ref.conv_output_size(h, k, s, (top, bottom)), ref.conv_output_size(h, k, s, (left, right))
    x, ker, b = rand(1, h, h, c), rand(k, k, c), rand(c)
    out = np.empty((1, oh, oh, c), np.float32)
    run = depthwise_conv2d.bind(x, ker, b, out, s, s, top, left, act)  # as the plan calls it
    finish = ref.hard_swish if act == ACT_HARD_SWISH else ref.relu6
    return (
        f"depthwise {h}x{h}x{c} k{k} s{s}" + label,
        2 * oh * ow * c * k * k,
        {
            "numba": (lambda: depthwise_conv2d(x, ker, b, out, s, s, top, left, act), "numba"),
            "plan's bound call": (run, "numba"),
            "reference": (lambda: finish(ref.depthwise_conv2d(x, ker[..., None], b, (s, s), pads)), "blas"),
        },
    )


def blas_tiles(x, w, b, out, act, res=None):
    """The OpenBLAS path of pointwise.gemm (sgemm per tile on Numba's workers), whatever use_microkernel says."""
    cin, cout = w.shape
    rows = x.shape[1] * x.shape[2] if x.ndim == 4 else 1
    a, o = x.reshape(-1, cin), out.reshape(-1, cout)
    gemm_tiles(a, w, b, o, act, None if res is None else res.reshape(-1, cout), rows, *tile_shape(rows, cin, cout))


def pointwise_case(hw, cin, cout, residual=False, label=""):
    x, w, b = rand(1, hw, hw, cin), rand(cin, cout, scale=cin**-0.5), rand(cout)
    out = np.empty((1, hw, hw, cout), np.float32)
    res = rand(1, hw, hw, cout) if residual else None
    act = ACT_NONE if residual else ACT_RELU6
    x2, plain = x.reshape(-1, cin), np.empty((hw * hw, cout), np.float32)
    packed = prepare_weights(w, b, hw * hw)  # as the plan does, once
    mr, nr, _ = choose_tile(hw * hw, cout)
    return (
        f"pointwise {hw}x{hw} {cin}->{cout}" + (" +res" if residual else "") + label,
        2 * hw * hw * cin * cout,
        {
            f"ukernel {mr}x{nr}": (lambda: pointwise_conv2d(x, packed, None, out, act, res), "numba"),
            "blas tiles": (lambda: blas_tiles(x, w, b, out, act, res), "numba"),
            "np.matmul+epilogue": (lambda: gemm_matmul(x2, w, b, out.reshape(-1, cout), act,
                                                       None if res is None else res.reshape(-1, cout)), "numba"),
            "numba gemm": (lambda: pointwise_conv2d_numba(x, w, b, out, act, res), "numba"),
            "np.matmul only": (lambda: np.matmul(x2, w, out=plain), "blas"),
            "reference": (lambda: ref.relu6(ref.pointwise_conv2d(x, w, b)), "blas"),
        },
    )


def stem_case(cout, act, scale, offset, label):
    """The stem, 224x224x3 -> 112x112xCout, 3x3 stride 2, padding bottom/right, as the plan runs it."""
    x, ker, b = rand(1, 224, 224, 3) * 60 + 128, rand(3, 3, 3, cout), rand(cout)
    out = np.empty((1, 112, 112, cout), np.float32)
    pads = ((0, 1), (0, 1))
    rows = 112 * 112
    packed = prepare_weights(ker.reshape(27, cout), b, rows)  # the plan's weights, table and scratch, made once
    table = indirection_table(224, 224, 3, 112, 112, 3, 3, 2, 2, 0, 0, 1, 1, packed.tile.mr)
    rescaled, patches = np.empty(x.size, np.float32), np.empty(rows * 27, np.float32)
    reference = REFERENCE_ACT[act]
    return (
        f"conv2d stem 224x224x3 k3 s2 ->{cout}{label}",
        2 * rows * 27 * cout,
        {
            "indirect gemm": (lambda: conv2d(x, ker, b, out, 2, 2, 0, 0, act, 1, 1, scale, offset, None, packed,
                                             table, rescaled), "numba"),
            "im2col+ukernel": (lambda: conv2d(x, ker, b, out, 2, 2, 0, 0, act, 1, 1, scale, offset, patches,
                                              packed, indirect=False), "numba"),
            "im2col+blas tiles": (lambda: conv2d(x, ker, b, out, 2, 2, 0, 0, act, 1, 1, scale, offset, patches),
                                  "numba"),
            "reference": (lambda: reference(ref.conv2d(ref.rescale(x, scale, offset), ker, b, (2, 2), pads)), "blas"),
        },
    )


def se_case(hw, c, cr):
    x, w1, b1, w2, b2 = rand(1, hw, hw, c), rand(c, cr, scale=0.1), rand(cr), rand(cr, c, scale=0.1), rand(c)
    out = np.empty_like(x)
    return (
        f"squeeze_excite {hw}x{hw}x{c} r{cr}",
        2 * hw * hw * c + 4 * c * cr,
        {
            "numba": (lambda: squeeze_excite(x, w1, b1, w2, b2, out), "numba"),
            "reference": (lambda: ref.squeeze_excite(x, w1, b1, w2, b2), "blas"),
        },
    )


def gap_dense_cases():
    x = rand(1, 7, 7, 1280)
    pooled = np.empty((1, 1280), np.float32)
    w, b = rand(1280, 1000, scale=0.03), rand(1000)
    logits = np.empty((1, 1000), np.float32)
    packed = prepare_weights(w, b, 1)
    return [
        (
            "global_average_pool 7x7x1280",
            7 * 7 * 1280,
            {
                "numba": (lambda: global_average_pool(x, pooled), "numba"),
                "reference": (lambda: ref.global_average_pool(x), "blas"),
            },
        ),
        (
            "dense 1280->1000",
            2 * 1280 * 1000,
            {
                "ukernel 1x128": (lambda: pointwise_conv2d(pooled, packed, None, logits, ACT_NONE), "numba"),
            "blas tiles": (lambda: blas_tiles(pooled, w, b, logits, ACT_NONE), "numba"),
                "reference": (lambda: ref.dense(pooled, w, b), "blas"),
            },
        ),
    ]


def all_cases(quick: bool):
    cases = [
        stem_case(32, ACT_RELU6, 1.0, 0.0, " V2"),
        stem_case(16, ACT_HARD_SWISH, 1 / 127.5, -1.0, " V3 (rescaled)"),
        depthwise_case(112, 32, 3, 1, ((1, 1), (1, 1))),
        depthwise_case(112, 96, 3, 2, ((0, 1), (0, 1))),
        depthwise_case(56, 144, 3, 1, ((1, 1), (1, 1))),
        depthwise_case(28, 192, 3, 1, ((1, 1), (1, 1))),
        depthwise_case(14, 576, 3, 1, ((1, 1), (1, 1))),
        depthwise_case(7, 960, 3, 1, ((1, 1), (1, 1))),
        depthwise_case(14, 672, 5, 2, ((1, 2), (1, 2)), ACT_HARD_SWISH, " V3L"),
        # MobileNetV3's depthwise layers beside ONNX Runtime's: 5x5 windows, most pixels of the
        # small late maps on the border, and 3x3 stride 2 on wide maps.
        depthwise_case(112, 64, 3, 2, ((0, 1), (0, 1)), ACT_RELU, " V3L"),
        depthwise_case(56, 72, 3, 2, ((0, 1), (0, 1)), ACT_RELU, " V3S"),
        depthwise_case(56, 72, 5, 2, ((1, 2), (1, 2)), ACT_RELU, " V3L"),
        depthwise_case(28, 120, 5, 1, ((2, 2), (2, 2)), ACT_RELU, " V3L"),
        depthwise_case(28, 96, 5, 2, ((1, 2), (1, 2)), ACT_HARD_SWISH, " V3S"),
        depthwise_case(28, 240, 3, 2, ((0, 1), (0, 1)), ACT_HARD_SWISH, " V3L"),
        depthwise_case(14, 240, 5, 1, ((2, 2), (2, 2)), ACT_HARD_SWISH, " V3S"),
        depthwise_case(14, 288, 5, 2, ((1, 2), (1, 2)), ACT_HARD_SWISH, " V3S"),
        depthwise_case(7, 576, 5, 1, ((2, 2), (2, 2)), ACT_HARD_SWISH, " V3S"),
        depthwise_case(7, 960, 5, 1, ((2, 2), (2, 2)), ACT_HARD_SWISH, " V3L"),
        pointwise_case(112, 32, 16),
        pointwise_case(112, 16, 96),
        pointwise_case(56, 24, 144),
        pointwise_case(56, 144, 24, residual=True),
        pointwise_case(28, 192, 32, residual=True),
        pointwise_case(14, 576, 160),
        pointwise_case(7, 960, 160, residual=True),
        pointwise_case(7, 320, 1280),
        pointwise_case(112, 32, 64, label=" V1"),
        pointwise_case(56, 128, 128, label=" V1"),
        pointwise_case(28, 256, 256, label=" V1"),
        pointwise_case(14, 512, 512, label=" V1"),
        pointwise_case(7, 1024, 1024, label=" V1"),
        pointwise_case(56, 64, 24, label=" V3L"),
        pointwise_case(28, 40, 120, label=" V3L"),
        pointwise_case(14, 80, 240, label=" V3L"),
        pointwise_case(14, 672, 112, residual=True, label=" V3L"),
        pointwise_case(7, 160, 960, label=" V3L"),
        pointwise_case(1, 960, 1280, label=" V3L head"),
        se_case(28, 120, 32),  # V3-Large
        se_case(14, 672, 168),
        *gap_dense_cases(),
    ]
    return cases[:7] if quick else cases


def time_case(candidates, threads: int, rounds: int) -> dict[str, float]:
    """Median seconds per call of each candidate, interleaved over ``rounds`` rounds.

    Numba-kind and BLAS-kind candidates are timed in separate groups, the BLAS group last and
    followed by a pause: after a multi-threaded BLAS call OpenBLAS's workers keep spinning for a
    while, and a Numba kernel timed in that window would measure the two pools fighting (that
    effect is measured on purpose, in the pipeline section), not the kernel.
    """
    samples = {name: [] for name in candidates}
    for kind in ("numba", "blas"):
        group = {name: fn for name, (fn, k) in candidates.items() if k == kind}
        ctx = thread_limits(threads) if kind == "numba" else threadpool_limits(threads, user_api="blas")
        with ctx:
            for _ in range(rounds + 1):  # the first round is warm-up (compilation, page faults)
                for name, fn in group.items():
                    reps, t0 = 0, time.perf_counter()
                    while True:
                        fn()
                        reps += 1
                        elapsed = time.perf_counter() - t0
                        if elapsed > 0.004 or reps >= 50:
                            break
                    samples[name].append(elapsed / reps)
        if kind == "blas" and threads > 1:
            time.sleep(0.3)
    return {name: float(np.median(s[1:])) for name, s in samples.items()}


# --------------------------------------------------------------------------------------------------
# Pipeline: MobileNetV2's 17 blocks under each thread-pool policy (one process per policy)
# --------------------------------------------------------------------------------------------------

POLICIES = [
    # (label, BLAS threads, Numba threads, GEMM implementation): "tiles" is BLAS called per tile from
    # Numba's workers (the default), "matmul" one np.matmul per product (BLAS's own threads)
    ("1 thread: Numba 1, GEMM ukernel", 1, 1, "ukernel"),
    ("1 thread: BLAS 1, Numba 1, GEMM tiles", 1, 1, "tiles"),
    ("1 thread: BLAS 1, Numba 1, GEMM matmul", 1, 1, "matmul"),
    ("1 thread: Numba 1, GEMM numba", 1, 1, "numba"),
    ("2 threads: Numba 2, GEMM ukernel  [default]", 1, 2, "ukernel"),
    ("2 threads: BLAS 1, Numba 2, GEMM tiles", 1, 2, "tiles"),
    ("2 threads: BLAS 1, Numba 2, GEMM matmul", 1, 2, "matmul"),
    ("2 threads: Numba 2, GEMM numba", 1, 2, "numba"),
    ("2 threads: BLAS 2, Numba 1, GEMM matmul", 2, 1, "matmul"),
    ("2 threads: BLAS 2, Numba 2, GEMM matmul (pools fight)", 2, 2, "matmul"),
]


def _pointwise_matmul(x, w, b, out, act, res=None):
    cout = w.shape[1]
    gemm_matmul(x.reshape(-1, w.shape[0]), w, b, out.reshape(-1, cout), act,
                None if res is None else res.reshape(-1, cout))


def _weights(cin, cout, rows, packed):
    w, b = rand(cin, cout, scale=cin**-0.5), rand(cout)
    return (prepare_weights(w, b, rows), None) if packed else (w, b)


def pipeline_child(blas_threads: int, numba_threads: int, gemm: str, rounds: int) -> None:
    """Runs in a subprocess: prints the median ms of the 17-block body as JSON."""
    numba.set_num_threads(numba_threads)
    threadpool_limits(blas_threads, user_api="blas")
    pw = {"tiles": blas_tiles, "matmul": _pointwise_matmul, "numba": pointwise_conv2d_numba,
          "ukernel": pointwise_conv2d}[gemm]
    ukernel = gemm == "ukernel"  # weights packed beforehand, as the plan does
    table = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    steps = []
    h, cin = 112, 32
    for t, c, n, s in table:
        for i in range(n):
            stride = s if i == 0 else 1
            e = cin * t
            oh = (h + 1) // 2 if stride == 2 else h
            steps.append({
                "x": rand(1, h, h, cin),
                "expand": None if t == 1 else (_weights(cin, e, h * h, ukernel), np.empty((1, h, h, e), "f4")),
                "dw": (rand(3, 3, e), rand(e), np.empty((1, oh, oh, e), np.float32), stride, 0 if stride == 2 else 1),
                "project": (_weights(e, c, oh * oh, ukernel), np.empty((1, oh, oh, c), np.float32)),
                "res": rand(1, oh, oh, c) if stride == 1 and cin == c else None,
            })
            h, cin = oh, c

    def body():
        for st in steps:
            x = st["x"]
            if st["expand"] is not None:
                (w, b), out = st["expand"]
                pw(x, w, b, out, ACT_RELU6)
                x = out
            k, b, out, s, p = st["dw"]
            depthwise_conv2d(x, k, b, out, s, s, p, p, ACT_RELU6)
            (w, b), y = st["project"]
            pw(out, w, b, y, ACT_NONE, st["res"])

    for _ in range(3):
        body()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        body()
        ts.append(time.perf_counter() - t0)
    print(json.dumps({"median_ms": float(np.median(ts)) * 1e3, "min_ms": float(min(ts)) * 1e3}))


def run_pipelines(rounds: int) -> list[dict]:
    rows = []
    for label, blas_t, numba_t, gemm in POLICIES:
        cmd = [sys.executable, __file__, "--pipeline-child", str(blas_t), str(numba_t), gemm, str(rounds)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"policy": label, "blas_threads": blas_t, "numba_threads": numba_t, "gemm": gemm, **result})
        print(f"  {label:58s} median {result['median_ms']:8.2f} ms   min {result['min_ms']:8.2f} ms", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="a few cases, fewer pipeline rounds")
    parser.add_argument("--cases", metavar="TEXT", help="only the cases whose name contains TEXT (e.g. 'depthwise', "
                        "'V3S'); no pipeline section and no JSON file")
    parser.add_argument("--pipeline-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pipeline_child:
        b, n, g, r = args.pipeline_child
        pipeline_child(int(b), int(n), g, int(r))
        return

    np.ones((2, 2)) @ np.ones((2, 2))  # load BLAS so threadpoolctl sees it
    blas = [{k: p.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for p in threadpool_info() if p["user_api"] == "blas"]
    env = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                                          "NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}
    print(f"numba {numba.__version__} ({numba.config.THREADING_LAYER} layer), numpy {np.__version__}, BLAS {blas}")
    print(f"env {env}; microkernel tiles for {'AVX-512' if AVX512 else 'AVX2'}")
    # The roof `npmobile profile --roofline` draws, from the same function: what the GF columns compare with.
    roofs = {n: measure_machine(n) for n in (1, 2)}
    for machine in roofs.values():
        print(f"roof: {machine.describe()}")
    print()

    results = []
    header = f"{'case':42s} {'candidate':16s} {'1 thread':>18s} {'2 threads':>18s} {'x ref (1t)':>10s}"
    print(header)
    print("-" * len(header))
    for name, flops, candidates in all_cases(args.quick):
        if args.cases and args.cases not in name:
            continue
        timings = {n: time_case(candidates, n, args.rounds) for n in (1, 2)}
        ref1 = timings[1].get("reference")
        for cand in candidates:
            t1, t2 = timings[1][cand], timings[2][cand]
            speedup = f"{ref1 / t1:9.1f}x" if ref1 else ""
            print(f"{name:42s} {cand:16s} {t1 * 1e3:8.3f} ms {flops / t1 / 1e9:5.1f} GF "
                  f"{t2 * 1e3:8.3f} ms {flops / t2 / 1e9:5.1f} GF {speedup}")
            results.append({"case": name, "candidate": cand, "flops": flops,
                            "ms_1_thread": t1 * 1e3, "ms_2_threads": t2 * 1e3,
                            "gflops_1_thread": flops / t1 / 1e9, "gflops_2_threads": flops / t2 / 1e9})
        print()

    if args.cases:
        return
    print("MobileNetV2 17-block body (batch 1, 224 px), by thread-pool policy:")
    pipelines = run_pipelines(15 if args.quick else 40)

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"kernels-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps({
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "cpu": llvm.get_host_cpu_name(), "avx512": AVX512,
                    "platform": platform.platform(), "python": platform.python_version()},
        "numba": numba.__version__, "numpy": np.__version__, "blas": blas, "env": env,
        "rounds": args.rounds, "kernels": results, "pipeline": pipelines,
        "roof": {n: {"peak_gflops": m.peak_gflops, "bandwidth_gbs": m.bandwidth_gbs, "memory_gbs": m.memory_gbs}
                 for n, m in roofs.items()},
    }, indent=1))
    print(f"\nwrote {path}")


# --------------------------------------------------------------------------------------------------
# Squeeze-and-excite at every MobileNetV3 shape: the kernel vs the one before it (serial gate)
#     .venv/bin/python -c "import bench.kernels as b; b.squeeze_excite_table()"   (or --se)
# --------------------------------------------------------------------------------------------------

# (map, channels, reduced) per SE block at 224 px; the map is the depthwise output the block reweights.
SE_SHAPES_V3_SMALL = [(56, 16, 8), (14, 96, 24), (14, 240, 64), (14, 240, 64), (14, 120, 32), (14, 144, 40),
                      (7, 288, 72), (7, 576, 144), (7, 576, 144)]
SE_SHAPES_V3_LARGE = [(28, 72, 24), (28, 120, 32), (28, 120, 32), (14, 480, 120), (14, 672, 168), (7, 672, 168),
                      (7, 960, 240), (7, 960, 240)]


@numba.njit(cache=True)
def _gates_before(x, reduce_kernel, reduce_bias, expand_kernel, expand_bias):
    """The [N, C] gates as the kernel before computed them (on one thread): pool pixel by pixel, then
    each dense layer one input row per pass, image by image."""
    n_images, c_count, cr = x.shape[0], x.shape[3], reduce_kernel.shape[1]
    s = np.empty((n_images, c_count), dtype=np.float32)
    average_pool_rows(x, s)
    z = np.empty(cr, dtype=np.float32)
    gate = np.empty((n_images, c_count), dtype=np.float32)
    for n in range(n_images):
        for r in range(cr):
            z[r] = np.float32(0.0)
        for c in range(c_count):
            sv = s[n, c]
            for r in range(cr):
                z[r] += sv * reduce_kernel[c, r]
        for r in range(cr):
            z[r] = max(z[r] + reduce_bias[r], np.float32(0.0))
        g = gate[n]
        for c in range(c_count):
            g[c] = np.float32(0.0)
        for r in range(cr):
            zv = z[r]
            for c in range(c_count):
                g[c] += zv * expand_kernel[r, c]
        for c in range(c_count):
            v = g[c] + expand_bias[c]
            g[c] = min(max(v + np.float32(3.0), np.float32(0.0)), np.float32(6.0)) * np.float32(1.0 / 6.0)
    return gate


@numba.njit(parallel=True, cache=True)
def _squeeze_excite_before(x, reduce_kernel, reduce_bias, expand_kernel, expand_bias, out):
    """The kernel before the phased one, for the ratio: the gate on one thread, then one prange over
    rows to scale."""
    n_images, h, w, c_count = x.shape
    gate = _gates_before(x, reduce_kernel, reduce_bias, expand_kernel, expand_bias)
    for job in numba.prange(n_images * h):
        n = job // h
        i = job % h
        g = gate[n]
        for j in range(w):
            xr = x[n, i, j]
            orow = out[n, i, j]
            for c in range(c_count):
                orow[c] = xr[c] * g[c]


def squeeze_excite_shape_case(batch, hw, c, cr, model):
    x, w1, b1 = rand(batch, hw, hw, c), rand(c, cr, scale=c**-0.5), rand(cr)
    w2, b2 = rand(cr, c, scale=cr**-0.5), rand(c)
    out, before = np.empty_like(x), np.empty_like(x)
    call = squeeze_excite.bind(x, w1, b1, w2, b2, out)
    return (
        f"se {model} b{batch} {hw}x{hw}x{c} r{cr}",
        batch * (2 * hw * hw * c + 4 * c * cr),
        {
            "phased": (call, "numba"),
            "before": (lambda: _squeeze_excite_before(x, w1, b1, w2, b2, before), "numba"),
        },
    )


def squeeze_excite_table(rounds: int = 21, batches=(1, 8)) -> list[dict]:
    """Each V3 SE shape, phased kernel vs before, 1 and 2 threads (hot caches: in the model the
    weights often come from memory, which bench/run.py --profile sees and this does not)."""
    rows = []
    print(f"{'case':40s} {'before 1t':>10s} {'now 1t':>8s} {'x':>5s} {'before 2t':>10s} {'now 2t':>8s} {'x':>5s}")
    for batch in batches:
        totals = {1: [0.0, 0.0], 2: [0.0, 0.0]}
        for model, shapes in (("V3-Small", SE_SHAPES_V3_SMALL), ("V3-Large", SE_SHAPES_V3_LARGE)):
            for hw, c, cr in shapes:
                name, _, candidates = squeeze_excite_shape_case(batch, hw, c, cr, model)
                t = {n: time_case(candidates, n, rounds) for n in (1, 2)}
                for n in (1, 2):
                    totals[n][0] += t[n]["before"]
                    totals[n][1] += t[n]["phased"]
                print(f"{name:40s} {t[1]['before'] * 1e6:8.1f}us {t[1]['phased'] * 1e6:6.1f}us "
                      f"{t[1]['before'] / t[1]['phased']:5.2f} {t[2]['before'] * 1e6:8.1f}us "
                      f"{t[2]['phased'] * 1e6:6.1f}us {t[2]['before'] / t[2]['phased']:5.2f}")
                rows.append({"case": name, "us_before_1_thread": t[1]["before"] * 1e6,
                             "us_1_thread": t[1]["phased"] * 1e6, "us_before_2_threads": t[2]["before"] * 1e6,
                             "us_2_threads": t[2]["phased"] * 1e6})
        print(f"{'all 17 SE blocks, batch ' + str(batch):40s} {totals[1][0] * 1e6:8.1f}us {totals[1][1] * 1e6:6.1f}us "
              f"{totals[1][0] / totals[1][1]:5.2f} {totals[2][0] * 1e6:8.1f}us {totals[2][1] * 1e6:6.1f}us "
              f"{totals[2][0] / totals[2][1]:5.2f}\n")
    return rows


if "--se" in sys.argv:  # only the squeeze-and-excite table
    squeeze_excite_table()
    sys.exit(0)


if __name__ == "__main__":
    main()
