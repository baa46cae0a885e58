"""The command line: ``python -m npmobile COMMAND ...`` (also installed as ``npmobile``).

One module per command (classify, summary, profile, show, verify, build_kernels), each with ``add_parser(commands)`` and
``run(args)``; what they share -- opening a model from a family name, a file or weights -- is in
``npmobile.cli.models``. Expected failures (a bad file, a missing weights file, an unreadable image)
print one line to stderr and exit 1; usage errors exit 2; ``--debug`` shows the traceback instead. After a
command that ran a model on the JIT, the kernels may be built ahead of time in the background
(``build_kernels.start_in_background``: once per machine, one line on stderr, ``NPMOBILE_AUTO_BUILD=0`` off).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from npmobile.cli import build_kernels, classify, profile, show, summary, verify
from npmobile.errors import NpmobileError, UsageError

COMMANDS = (classify, summary, profile, show, verify, build_kernels)
# The commands that run a model: after one succeeds on the JIT, the kernels are built ahead of time in the
# background for later runs (build_kernels.start_in_background).
RUN_MODELS = (classify, profile, show, verify)

EXAMPLES = """\
examples:
  npmobile classify samples/chelsea.jpg                 top-5 ImageNet classes (MobileNetV2, official weights)
  npmobile classify photos/ --model mobilenet_v3_large --top 3 --json > labels.json
  npmobile classify cat.png --weights my_finetuned.keras
  npmobile classify cat.png --weights best.pth --labels classes.txt   a PyTorch state dict (torchvision's way)
  npmobile classify cat.png --model mobilenet --alpha 0.5 --size 160 --crop center
  npmobile classify photos/ --engine ray --workers 4 --out preds.parquet   on Ray Data (or --engine dask)
  find photos -name '*.jpg' | npmobile classify --from-file - --out preds.jsonl   paths from standard input
  npmobile summary mobilenet_v3_small
  npmobile summary my_model.h5
  npmobile summary mobilenet_v2 --costs                 params and MACs per layer, depthwise vs standard conv
  npmobile profile cat.jpg --size 160 --plot time.png --roofline roofline.png
  npmobile show cat.jpg --layer block_3_depthwise --out maps.png
  npmobile show cat.jpg --layer block_3_depthwise --filters --out kernels.png
  npmobile verify my_model.h5 cat.jpg --custom-object hard_swish=hard_swish   npmobile vs Keras, layer by layer
  npmobile build-kernels                                compile the kernels ahead of time: faster start-up

weights="imagenet" files are looked for in $NPMOBILE_WEIGHTS_DIR, then the Keras cache (~/.keras/models),
then downloaded once into ~/.cache/npmobile (checksummed).
exit status: 0 ok, 1 failure (any image that could not be classified), 2 usage error, 130 interrupted (Ctrl-C).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="npmobile",
        description="Run MobileNet V1/V2/V3 on the CPU without TensorFlow; reads Keras files.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = command.add_parser(commands)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sub.set_defaults(handler=command.run, runs_model=command in RUN_MODELS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "model_options", False):
        from npmobile.cli.models import settle_model_options

        settle_model_options(args)
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except NpmobileError as error:
        if args.debug:
            raise
        print(f"npmobile: {error}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1
    except KeyboardInterrupt:
        print("npmobile: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`npmobile classify ... | head -1`): stop quietly, as Unix tools do. Python would
        # flush stdout again at exit and fail once more: point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE: what a shell reports for a command a pipe closed on
    if code == 0 and args.runs_model:
        build_kernels.start_in_background()
    return code
