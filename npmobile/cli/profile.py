"""``npmobile profile``: time each step of the plan and explain it with FLOPs, bytes and a measured roofline."""

from __future__ import annotations

import argparse
import sys

from npmobile.cli.models import TEACHING_EXAMPLES, add_model_options, positive_int, teaching_model
from npmobile.opening import model_input


def add_parser(commands):
    parser = commands.add_parser(
        "profile", help="time each layer and explain it with FLOPs, bytes moved and a measured roofline",
        description="Run a model on one image and print, per step of the optimized plan, its time, GFLOP/s, "
                    "bytes moved and arithmetic intensity, against this machine's measured balance "
                    "(peak GFLOP/s / memory GB/s): which layers are memory-bound and which compute-bound.",
        epilog=TEACHING_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", metavar="IMAGE", help="an image file")
    add_model_options(parser)
    parser.add_argument("--repeats", type=positive_int, default=5, metavar="N",
                        help="timed runs after one warm-up; the median is shown (default 5)")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="run the model (and measure the roof) on N threads (default: all cores)")
    parser.add_argument("--plot", metavar="PNG", help="write a bar chart of time per layer (needs matplotlib)")
    parser.add_argument("--roofline", metavar="PNG", help="write a roofline chart (needs matplotlib)")
    return parser


def run(args) -> int:
    from npmobile import applications, profiling

    model = teaching_model(args)
    x = model_input(model, args.image, args.size)
    # Probe the machine before the model runs, so neither measurement disturbs the other.
    machine = profiling.measure_machine(args.threads)
    rows = model.profile(x, repeats=args.repeats, threads=args.threads)
    machine = machine.best(profiling.measure_machine(args.threads, memory=False))  # and after: the higher roof
    steps = profiling.profile_steps(model, rows, x.shape)
    v1 = applications.MobileNet(weights=None, input_shape=(x.shape[1], x.shape[2], 3))
    print(profiling.profile_text(model, steps, machine, args.image, x.shape, args.repeats,
                                 profiling.bytes_per_mac(v1, x.shape[1:3]),
                                 profiling.run_totals(rows)))
    warning = profiling.noise_warning(rows, steps)
    if warning:
        print(f"npmobile: {warning}", file=sys.stderr)
    if args.plot or args.roofline:
        from npmobile import visualize

        title = f"{model.name}, {x.shape[1]}x{x.shape[2]}, {machine.threads} thread{'s' if machine.threads > 1 else ''}"
        if args.plot:
            visualize.plot_times(steps, args.plot, title=f"time per layer: {title}")
            print(f"wrote {args.plot}")
        if args.roofline:
            visualize.plot_roofline(steps, machine, args.roofline, title=f"roofline: {title}")
            print(f"wrote {args.roofline}")
    return 0
