"""Command line: argument parsing and exit codes only.

Exit codes: 0 success, 1 a target or gate was not met, 2 bad input or options,
3 internal error (a bug: please report it with the traceback from ``-v``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .arch import architecture
from .calib import Color, ImageOptions, Layout
from .errors import NothingToPrune, PruneError
from .io import check_folder, check_output, save_model_atomic, write_text_atomic
from .select import Method

EXIT_OK, EXIT_TARGET, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(EXIT_INPUT, f"onnxprune: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxprune", description="Prune the channels of a trained ONNX CNN, "
                "reconstructing each layer from calibration data (no fine-tuning).",
                epilog="exit codes: 0 ok, 1 target not met, 2 bad input/options, 3 internal error")
    p.add_argument("model", type=Path, help="input .onnx model (never modified)")
    p.add_argument("-o", "--output", type=Path, help="pruned model path (default: <model>.pruned.onnx)")
    p.add_argument("--calib", type=Path, help=".npy/.npz file, a folder of them, or a folder of images")
    p.add_argument("--speedup", type=float, default=2.0, help="MACs reduction to reach, original/pruned (default 2)")
    p.add_argument("--method", choices=[m.value for m in Method], default=Method.LASSO.value,
                   help="channel selection (default lasso)")
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=True,
                   help="least-squares refit of the layers after each pruned group (default on)")
    p.add_argument("--prune-residual", dest="prune_coupled", action=argparse.BooleanOptionalAction, default=False,
                   help="also prune channels coupled across branches (residual joins), with one selection "
                        "over all their consumers (default off: block outputs keep their width)")
    p.add_argument("--allocation", choices=["uniform", "sensitivity"], default="uniform",
                   help="per-group widths: one keep ratio for all, or from measured error curves")
    p.add_argument("--refit-downstream", action=argparse.BooleanOptionalAction, default=True,
                   help="also refit unpruned layers whose inputs changed (producers' kept filters, "
                        "shortcuts, classifier) to their original outputs (default on)")
    p.add_argument("--residual-target", action=argparse.BooleanOptionalAction, default=True,
                   help="branch-final layers also absorb the skip path's error (He et al.; default on)")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of calibration data held out for verification")
    p.add_argument("--samples-per-image", type=int, default=10, help="spatial positions sampled per image (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    p.add_argument("--round-to", type=int, default=1, help="round kept channels to a multiple of N (default 1)")
    p.add_argument("--batch-size", type=int, default=32, help="calibration batch size for ONNX Runtime")
    p.add_argument("--slim-fallback", choices=["error", "l1"], default="error",
                   help="--method slim on a group without BatchNorm: stop with an error, or use l1")
    p.add_argument("--report", type=Path, help="write the run's report as JSON here")
    p.add_argument("--export-arch", type=Path, metavar="JSON",
                   help="write the pruned per-layer widths (to train the architecture from scratch)")
    p.add_argument("--no-latency", dest="latency", action="store_false", help="skip the latency measurement")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    img = p.add_argument_group("image folders")
    img.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize images to H W")
    img.add_argument("--mean", type=float, nargs="+", default=[0.0], help="per-channel mean on the [0,1] scale")
    img.add_argument("--std", type=float, nargs="+", default=[1.0], help="per-channel std on the [0,1] scale")
    img.add_argument("--layout", choices=[v.value for v in Layout], help="input layout (default: from the model)")
    img.add_argument("--color", choices=[v.value for v in Color], help="channel order (default: from the model)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("-v", "--verbose", action="store_true", help="log each step")
    out.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    return p


def _run(args: argparse.Namespace) -> int:
    from .prune import prune

    output = args.output or args.model.with_name(args.model.stem + ".pruned.onnx")
    check_output(output, force=args.force, protected=(args.model,))  # before any work is done
    for extra in (args.report, args.export_arch):
        if extra:
            check_folder(extra)
    images = ImageOptions(size=tuple(args.size) if args.size else None, mean=tuple(args.mean), std=tuple(args.std),
                          layout=Layout(args.layout) if args.layout else None,
                          color=Color(args.color) if args.color else None)
    result = prune(str(args.model), str(args.calib) if args.calib else None, image_options=images,
                   speedup=args.speedup, method=args.method, reconstruct=args.reconstruct,
                   residual_target=args.residual_target, prune_coupled=args.prune_coupled,
                   refit_downstream=args.refit_downstream, allocation=args.allocation, holdout=args.holdout,
                   samples_per_image=args.samples_per_image, seed=args.seed, round_to=args.round_to,
                   batch_size=args.batch_size, measure_latency=args.latency, slim_fallback=args.slim_fallback,
                   progress=None if not args.quiet else False)
    save_model_atomic(result.model, output, force=args.force, protected=(args.model,))
    if args.report:
        write_text_atomic(result.report.to_json(), args.report)
    if args.export_arch:
        write_text_atomic(json.dumps(architecture(result.report), indent=2), args.export_arch)
    if not args.quiet:
        print(result.report.table())
        print(f"wrote {output} in {result.report.seconds:.1f}s")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except NothingToPrune as exc:
        if not args.quiet:
            print(f"onnxprune: {exc}", file=sys.stderr)
        return EXIT_OK
    except PruneError as exc:
        print(f"onnxprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxprune: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so, keep the traceback for -v
        if args.verbose:
            raise
        print(f"onnxprune: internal error: {type(exc).__name__}: {exc} — please report it "
              "(rerun with -v for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
