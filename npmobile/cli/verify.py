"""``npmobile verify``: parse the options, call ``npmobile.verify.verify``, print its report (text, or ``--json``).
The comparison itself (and every import of Keras or PyTorch) is in the ``npmobile.verify`` package."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from npmobile.cli.models import add_custom_object_option, add_load_options, positive_int
from npmobile.errors import CustomObjectError, NpmobileError
from npmobile.verify import EXIT_BEYOND, EXIT_COULD_NOT_RUN, EXIT_OK, EXIT_USAGE, CouldNotRun, UsageProblem, verify

EXAMPLES = """\
examples:
  npmobile verify my_model.keras                                  seeded random inputs
  npmobile verify tutorial.h5 cat.jpg --custom-object hard_swish=hard_swish --custom-object h_sig=hard_sigmoid
  npmobile verify tutorial.h5 --custom-object hard_swish=hard_swish --custom-objects-module my_activations.py
  npmobile verify my_model.h5 --json > parity.json
  npmobile verify best.pth cat.jpg                                a PyTorch state dict, against PyTorch
  npmobile verify best.safetensors --torch-model my_net.py:build  against your own PyTorch module

A mapped name is given Keras's built-in of that name (keras.activations.hard_swish): that checks npmobile
against Keras. --custom-objects-module gives Keras your own functions instead (your code, run by verify only):
that checks your mapping too. A PyTorch state dict (.pth, .safetensors) is run in PyTorch (pip install torch)
as torchvision's MobileNet of the architecture npmobile reads from the file, or as the module --torch-model
builds: your code, run by verify only; its module paths must be torchvision's (features.0, ..., classifier).
exit status: 0 within tolerance, 1 beyond it, 2 usage error, 3 could not run.
"""



# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "verify", help="check that npmobile answers like Keras (or PyTorch) on your model, layer by layer",
        description=textwrap.fill(
            "Load MODEL in npmobile and in Keras (a PyTorch state dict: in PyTorch), run both on the images (or on "
            "seeded random inputs in the model's range: 0..255 for a model that starts with a Rescaling layer, -1..1 "
            "otherwise, pixels 0..1 normalized with the ImageNet mean and std for a PyTorch state dict), and print, "
            "layer by layer, the largest absolute and relative difference, the first layer beyond the tolerances "
            "(probabilities 5e-5; feature maps and logits 1e-4 x max(1, max|reference|)), whether the top-5 agree, "
            "and each engine's distance from npmobile's float64 reference. Without Keras it compares npmobile's "
            "fast path with its reference path; without PyTorch it cannot check a state dict (exit 3).", 100),
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL",
                        help="a Keras file (.h5, .keras) or a PyTorch state dict of a torchvision MobileNetV2/V3 "
                             "(.pth, .safetensors; the architecture is read from the file)")
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="images to run (default: random inputs)")
    add_custom_object_option(parser)
    add_load_options(parser)
    parser.add_argument("--custom-objects-module", metavar="FILE.py",
                        help="a Python file defining your activation functions by the names the model file uses: "
                             "Keras runs them instead of its built-ins (your code, run by verify only)")
    parser.add_argument("--torch-model", metavar="FILE.py:NAME",
                        help="for a PyTorch state dict: PyTorch runs the module that NAME() in your FILE.py returns "
                             "(a class or function called with no arguments; your code, run by verify only) "
                             "instead of torchvision's architecture")
    parser.add_argument("--samples", type=positive_int, default=2, metavar="N",
                        help="random inputs when no IMAGE is given (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    parser.add_argument("--size", type=positive_int, default=224,
                        help="input size for a model that takes any size (default 224)")
    parser.add_argument("--without-keras", action="store_true",
                        help="compare npmobile's fast path with its own reference path only (what verify does "
                             "when Keras is not installed)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--all", action="store_true", dest="all_layers",
                        help="list every layer (default: the first and last few, every one beyond tolerance and "
                             "the closest to it; the others are counted)")
    return parser


def run(args) -> int:
    try:
        report = verify(args.model, args.images, custom_objects=dict(args.custom_objects),
                        custom_objects_module=args.custom_objects_module, torch_model=args.torch_model,
                        samples=args.samples, seed=args.seed, size=args.size, without_keras=args.without_keras,
                        load_timeout=args.load_timeout, trusted=args.trusted)
    except (UsageProblem, CustomObjectError) as error:
        if getattr(args, "debug", False):
            raise
        print(f"npmobile verify: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (CouldNotRun, NpmobileError) as error:
        if getattr(args, "debug", False):
            raise
        print(f"npmobile verify: could not run: {error}", file=sys.stderr)
        return EXIT_COULD_NOT_RUN
    data = report.as_dict()
    print(json.dumps(data, indent=2) if args.json else report_text(data, args.all_layers))
    return report.exit_status


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------


def shown_layers(rows: list[dict], all_layers: bool, head: int = 4, tail: int = 3) -> list[dict | int]:
    """The layer rows to print, with the count of ok rows left out between them (an int) where some are."""
    if all_layers:
        return list(rows)
    worst = max(range(len(rows)), key=lambda k: rows[k]["max_abs"] / rows[k]["tolerance"] if rows[k]["tolerance"]
                else 0, default=None)
    keep = {k for k in range(len(rows)) if k < head or k >= len(rows) - tail or not rows[k]["ok"] or k == worst}
    shown: list[dict | int] = []
    for k, row in enumerate(rows):
        if k in keep:
            shown.append(row)
        elif shown and isinstance(shown[-1], int):
            shown[-1] += 1
        else:
            shown.append(1)
    return shown


def report_text(report: dict, all_layers: bool = False) -> str:
    ref = report["reference"]
    lines = [f"npmobile verify: {report['model']} (model {report['model_name']!r}, written by {report['writer']})",
             f"inputs: {report['inputs']}",
             f"compared with: {report['reference_detail']}"]
    lines += [f"  {note}" for note in report["notes"]]
    width = max([len(row["name"]) for row in report["layers"]] + [5])
    lines.append("f64: npmobile's float64 reference run of the same graph (near-exact arithmetic); rel: max |diff| / "
                 "max(1, max |reference|)")
    lines.append("")
    lines.append(f"{'layer':<{width}}  {'class':<22} {'max |diff|':>10} {'rel':>9} {'tolerance':>9}      "
                 f"{'npmobile↔f64':>12} {ref + '↔f64':>12}")
    for row in shown_layers(report["layers"], all_layers):
        if isinstance(row, int):
            lines.append(f"{'…':<{width}}  ({row} more layer{'s' if row > 1 else ''}, every one ok; --all lists them)")
            continue
        mark = "ok" if row["ok"] else "BEYOND"
        lines.append(f"{row['name']:<{width}}  {row['class']:<22} {row['max_abs']:>10.2e} {row['rel']:>9.2e} "
                     f"{row['tolerance']:>9.1e} {mark:<6} {row['npmobile_vs_float64']:>12.2e} "
                     f"{row['reference_vs_float64']:>12.2e}")
    if report["skipped_layers"]:
        lines.append(f"not compared: {', '.join(report['skipped_layers'])}")
    lines.append("")
    worst = max(report["layers"], key=lambda r: r["max_abs"] / r["tolerance"] if r["tolerance"] else 0,
                default=None)
    first = report["first_layer_beyond_tolerance"]
    lines.append(f"first layer beyond tolerance: {first or 'none'}"
                 + (" (the layers after it inherit its difference)" if first else "")
                 + (f" (closest to it: {worst['name']}, {worst['max_abs']:.2e} of {worst['tolerance']:.1e})"
                    if worst and not first else ""))
    final = report["final"]
    lines.append(f"final output ({final['path']}): max |diff| {final['max_abs']:.2e}, rel {final['rel']:.2e}, "
                 f"tolerance {final['tolerance']:.1e}: {'ok' if final['ok'] else 'BEYOND'}; "
                 f"top-5 agree: {final['top5_agree']}")
    distances = ", ".join(f"{name} {value:.2e}" for name, value in report["float64"].items())
    lines.append(f"distance from the float64 reference (final output, max |diff|): {distances}")
    verdict = "within tolerance" if report["ok"] else "BEYOND tolerance"
    lines.append(f"verdict: {verdict} (exit {EXIT_OK if report['ok'] else EXIT_BEYOND})")
    return "\n".join(lines)
