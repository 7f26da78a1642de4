"""Command line: argument parsing and exit codes only.

Exit codes: 0 success, 1 a target or gate was not met, 2 bad input or options,
3 internal error (a bug: please report it with the traceback from ``-v``).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

# Only modules that load without ONNX Runtime here (the others are imported by the commands), so
# that `onnxprune` can say in one line that none is installed.
from .calib import Color, Fit, ImageOptions, Layout, parse_fixed_inputs
from .errors import NothingToPrune, PruneError
from .io import check_folder, check_output, save_model_atomic, write_text_atomic
from .runtime import (CALIBRATE_METHODS, PROVIDERS, QUANTIZE_FORMATS, MissingRuntimeError, default_round_to,
                      import_ort)
from .select import Method

if TYPE_CHECKING:
    from .options import PruneResult

EXIT_OK, EXIT_TARGET, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
FEW_SAMPLES_PER_UNKNOWN = 1.0  # below this a refit is under-determined and leans on its ridge
SLOWER = 0.9  # measured latency speedup below which the written model is called slower, clear of timing noise


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(EXIT_INPUT, f"onnxprune: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .options import ALLOCATIONS  # imports ONNX Runtime: main checks for it before building a parser

    p = _Parser(prog="onnxprune", description="Prune the channels of a trained ONNX CNN, "
                "reconstructing each layer from calibration data (no fine-tuning).",
                epilog="other commands: onnxprune inspect|gate|bench MODEL … (see onnxprune <command> -h). "
                       "exit codes: 0 ok, 1 target not met, 2 bad input/options, 3 internal error")
    p.add_argument("model", type=Path, help="input .onnx model (never modified)")
    p.add_argument("-o", "--output", type=Path, help="pruned model path (default: <model>.pruned.onnx)")
    p.add_argument("--calib", type=Path, help=".npy/.npz file, a folder of them, a folder of images (or of "
                   "subfolders of images: a data set's class folders), or a .txt list of images, one path a line")
    p.add_argument("--calib-samples", type=int, default=2048, metavar="N",
                   help="use at most N calibration samples, a random subset drawn with --seed where --calib holds "
                        "more (default 2048, past which the README's calibration study found little gain and the "
                        "run's time and memory grow with every sample; 0: all)")
    tg = p.add_argument_group("targets (every one given must hold; default --speedup 2)")
    tg.add_argument("--speedup", type=float, help="MACs reduction to reach, original/pruned")
    tg.add_argument("--params", type=float, metavar="R", help="keep at most this fraction of the parameters")
    tg.add_argument("--size-mb", type=float, metavar="M", help="pruned model file at most M megabytes (10^6 B)")
    tg.add_argument("--latency", type=float, metavar="S", help="measured latency speedup to reach on --provider (10th-percentile runs, as the report compares them)")
    tg.add_argument("--provider", choices=list(PROVIDERS), default="cpu",
                    help="ONNX Runtime execution provider for latency (default cpu)")
    tg.add_argument("--latency-batch", type=int, default=1, help="batch size of latency measurements (default 1)")
    tg.add_argument("--max-drop", type=float, metavar="D",
                    help="accuracy guard on held-out data: top-1 disagreement (class scores), 1 - IoU of the "
                         "regions a probability map (a Sigmoid output, or a Softmax over a map's classes, less its "
                         "background) marks above 0.5 (its logits' relative error where it marks too little), "
                         "or relative output error, at most D; width is given back until it holds")
    p.add_argument("--method", choices=[m.value for m in Method], default=Method.AUTO.value,
                   help="channel selection (default auto: obs on networks with depthwise convs and on plain "
                        "chains whose layers have < 2048 input columns, lasso otherwise)")
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=True,
                   help="least-squares refit of the layers after each pruned group (default on)")
    p.add_argument("--prune-residual", dest="prune_coupled", action=argparse.BooleanOptionalAction, default=None,
                   help="also prune channels coupled across branches (residual joins), with one selection "
                        "over all their consumers; default: only where the target cannot be reached with "
                        "block outputs at full width, or only by cutting a layer more than 4x (with a warning); "
                        "--no-prune-residual never")
    p.add_argument("--allocation", choices=list(ALLOCATIONS), default="sensitivity",
                   help="per-group widths: searched over measured error curves (default; data-driven methods), "
                        "one keep ratio for all, or the greedy descent over the curves alone (to compare)")
    p.add_argument("--sensitivity-images", type=int, default=256, metavar="N",
                   help="calibration images (a random subset) the sensitivity curves are measured on "
                        "(default 256); the reconstruction uses all of them")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="keep at full width every channel group touching a node, tensor or weight whose name "
                        "matches this glob (fnmatch, case-sensitive; repeatable), e.g. --exclude 'head.*'; "
                        "listed with the skipped groups in the report")
    p.add_argument("--refit-downstream", action=argparse.BooleanOptionalAction, default=True,
                   help="also refit unpruned layers whose inputs changed (producers' kept filters, "
                        "shortcuts, classifier) to their original outputs (default on)")
    p.add_argument("--refine", action=argparse.BooleanOptionalAction, default=True,
                   help="after the least-squares refits, tune each residual branch's convs together through "
                        "their activations (a basic block's two convs; an inverted residual block's expand, "
                        "depthwise and project convs) on the calibration samples, kept only where held-out "
                        "images confirm it (default on; --no-refine saves its time)")
    p.add_argument("--refine-tail", action=argparse.BooleanOptionalAction, default=False,
                   help="then tune the model's last layers together on its output, where they form a plain "
                        "chain to it (up to five convs and fully connected layers after the last residual join, "
                        "e.g. a VGG-style network's last convs and classifier), kept only where fresh blends of "
                        "images it did not fit confirm it and the held-out images do not contradict it "
                        "(default off: it costs a VGG-style model about two and a half times its prune time)")
    p.add_argument("--residual-target", action=argparse.BooleanOptionalAction, default=True,
                   help="branch-final layers also absorb the skip path's error (He et al.; default on)")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of calibration data held out for verification")
    p.add_argument("--samples-per-image", type=int, default=10, help="spatial positions sampled per image (default 10)")
    p.add_argument("--mixtures", type=float, default=1.0, metavar="R",
                   help="blends of two calibration samples added per fit sample, for the reconstruction "
                        "(default 1; 0 uses the samples alone); the held-out check reads real samples only")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    p.add_argument("--round-to", type=int, default=None, help="round kept channels up to a multiple of N "
                   "(default 16 for --provider cpu: ORT's NCHWc CPU kernels work in blocks of 16 channels on "
                   "AVX-512, 8 on AVX2; 8 for cuda/tensorrt: Tensor Cores; 1 for exact widths; where a target "
                   "cannot be met at the default, 8 and then 1 are tried, with a warning)")
    p.add_argument("--batch-size", type=int, default=32, help="calibration batch size for ONNX Runtime")
    p.add_argument("--slim-fallback", choices=["error", "l1"], default="error",
                   help="--method slim on a group without BatchNorm: stop with an error, or use l1")
    p.add_argument("--sparsity", choices=["2:4"],
                   help="after pruning, make Conv/Gemm/MatMul weights 2:4 sparse (TensorRT's sparse kernels), "
                        "choosing and refitting the kept weights on the calibration data")
    p.add_argument("--quantize", choices=list(QUANTIZE_FORMATS),
                   help="after pruning, ONNX Runtime static quantization (QDQ: int8 symmetric weights per channel; "
                        "activations uint8 asymmetric for --provider cpu, int8 symmetric for cuda/tensorrt; "
                        "float biases) calibrated on the fit part of --calib; "
                        "--max-drop and the report judge the quantized model")
    p.add_argument("--calibrate-method", choices=list(CALIBRATE_METHODS), default="minmax",
                   help="activation ranges for --quantize (default minmax)")
    p.add_argument("--report", type=Path, help="write the run's report as JSON here")
    p.add_argument("--export-arch", type=Path, metavar="JSON",
                   help="write the pruned per-layer widths (to train the architecture from scratch)")
    p.add_argument("--no-latency", dest="measure_latency", action="store_false",
                   help="skip the latency measurement in the report")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    _add_image_options(p)
    _add_verbosity(p)
    return p


def _add_image_options(p: argparse.ArgumentParser) -> None:
    img = p.add_argument_group("image folders")
    img.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="resize images to H W")
    img.add_argument("--mean", type=float, nargs="+", default=[0.0], help="per-channel mean on the [0,1] scale")
    img.add_argument("--std", type=float, nargs="+", default=[1.0], help="per-channel std on the [0,1] scale")
    img.add_argument("--layout", choices=[v.value for v in Layout], help="input layout (default: from the model)")
    img.add_argument("--color", choices=[v.value for v in Color], help="channel order (default: from the model)")
    img.add_argument("--fit", choices=[v.value for v in Fit], default=Fit.STRETCH.value,
                     help="how an image reaches the model's size: stretch (default: resized to it), crop (the "
                          "shorter side scaled to size / --crop-fraction, the centre taken: how ImageNet classifiers "
                          "are evaluated), letterbox (scaled to fit, the rest grey 114: how YOLO detectors are fed); "
                          "give the one your deployment uses")
    img.add_argument("--crop-fraction", type=float, default=0.875, metavar="F",
                     help="--fit crop: the share of the scaled shorter side kept (default 0.875: 224 of 256)")
    p.add_argument("--fixed-input", action="append", default=[], metavar="NAME=V[,V…]",
                   help="a value for a model input the calibration data does not feed (repeatable), the same in "
                        "every sample: one number, or one per element of a sample, e.g. exposure=0.5 or "
                        "scale_factor=1,1")


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    out = p.add_mutually_exclusive_group()
    out.add_argument("-v", "--verbose", action="store_true", help="log each step")
    out.add_argument("-q", "--quiet", action="store_true", help="print only errors")


def _image_options(args: argparse.Namespace) -> ImageOptions:
    return ImageOptions(size=tuple(args.size) if args.size else None, mean=tuple(args.mean), std=tuple(args.std),
                        layout=Layout(args.layout) if args.layout else None,
                        color=Color(args.color) if args.color else None, fit=Fit(args.fit),
                        crop_fraction=args.crop_fraction, fixed=parse_fixed_inputs(args.fixed_input))


def _add_shape(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", action="append", metavar="[NAME:]DIMS",
                   help="input shape for runs without --calib, e.g. 1x3x224x224, or NAME:1x3x224x224 per input "
                        "(repeatable); dynamic dims not given: batch 1, others the first of 224, 32, 64 … the "
                        "model runs at")


def build_inspect_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxprune inspect", description="Print a model's MACs, params, size, prunable channel "
                "groups, the share of its MACs pruning can reach, and the barrier ops keeping the rest.")
    p.add_argument("model", type=Path)
    p.add_argument("--calib", type=Path, help="calibration data fixing dynamic input dims (else zeros at the "
                   "model's static shape, or --shape)")
    _add_shape(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_image_options(p)
    _add_verbosity(p)
    return p


def build_gate_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxprune gate", description="Check a (pruned) model against CI limits; exit 0 when "
                "every limit holds, 1 with a one-line reason otherwise.",
                epilog="exit codes: 0 every limit holds, 1 a limit failed, 2 bad input/options")
    p.add_argument("model", type=Path)
    p.add_argument("--reference", type=Path, help="the original model, for --min-agreement / --min-iou / "
                   "--max-error / --min-speedup")
    p.add_argument("--calib", type=Path, help="data to run both models on")
    p.add_argument("--max-size-mb", type=float, metavar="M")
    p.add_argument("--max-macs", type=float, metavar="G", help="at most G·10^9 MACs per sample")
    p.add_argument("--max-params", type=float, metavar="M", help="at most M·10^6 parameters")
    p.add_argument("--min-agreement", type=float, metavar="A", help="top-1 agreement with --reference at least A "
                   "(fraction) on every class-score output")
    p.add_argument("--min-iou", type=float, metavar="U", help="on every probability map (a Sigmoid output, or a Softmax "
                   "over a map's classes), IoU of the regions above 0.5 in the model and in --reference at least U")
    p.add_argument("--max-error", type=float, metavar="E", help="relative output error vs --reference at most E")
    p.add_argument("--min-speedup", type=float, metavar="S", help="measured latency speedup vs --reference (10th-percentile runs)")
    p.add_argument("--provider", choices=list(PROVIDERS), default="cpu")
    _add_shape(p)
    _add_image_options(p)
    _add_verbosity(p)
    return p


def build_bench_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onnxprune bench", description="Latency (median, p90) and throughput of one or more "
                "models, runs in alternating blocks, at several batch sizes.")
    p.add_argument("models", type=Path, nargs="+", help="the first one is the baseline")
    p.add_argument("--calib", type=Path, help="inputs to feed (else zeros at the model's static shape)")
    p.add_argument("--provider", choices=list(PROVIDERS), default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes (default 1 16)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per model and batch (default 30)")
    p.add_argument("--by-op", action="store_true",
                   help="also where the time goes: each op type's kernels per run (ONNX Runtime's profiler, "
                        "after its fusions), and each one's speedup against the first model")
    _add_shape(p)
    _add_image_options(p)
    _add_verbosity(p)
    return p


def _inputs(args: argparse.Namespace, model):
    """Calibration data, or zeros at ``--shape`` (and default sizes for dynamic dims)."""
    from .calib import parse_shapes
    from .summary import calibration_or_zeros

    return calibration_or_zeros(model, args.calib, _image_options(args), parse_shapes(args.shape or [], model))


def _inspect(args: argparse.Namespace) -> int:
    from .summary import load_checked, summarize

    model = load_checked(args.model)
    summary = summarize(model, _inputs(args, model))
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.text())
    return EXIT_OK


def _gate(args: argparse.Namespace) -> int:
    from .latency import busy_note, is_busy, measure, speedup
    from .budget import count_params
    from .graphview import GraphView
    from .quantize import dequantized
    from .summary import fidelity, load_checked, model_macs, runnable
    from .verify import MARKED, MIN_MARKED

    needs_ref = [f for f in ("min_agreement", "min_iou", "max_error", "min_speedup") if getattr(args, f) is not None]
    if needs_ref and args.reference is None:
        raise PruneError(f"--{needs_ref[0].replace('_', '-')} needs --reference (the original model)")
    if not needs_ref and all(getattr(args, f) is None for f in ("max_size_mb", "max_macs", "max_params")):
        raise PruneError("no limit given; pass --max-size-mb, --max-macs, --max-params, --min-agreement, "
                         "--min-iou, --max-error or --min-speedup")
    model = load_checked(args.model)
    # --max-params and --max-size-mb run nothing: no default input shape is looked for them
    runs = args.max_macs is not None or needs_ref or args.calib is not None or args.shape
    cal = _inputs(args, model) if runs else None
    checks: list[tuple[str, float, float, bool]] = []  # (what, value, limit, ok)
    if args.max_size_mb is not None:
        size = args.model.stat().st_size / 1e6
        checks.append(("size MB", size, args.max_size_mb, size <= args.max_size_mb))
    if args.max_macs is not None:
        macs = model_macs(model, cal) / 1e9
        checks.append(("GMACs", macs, args.max_macs, macs <= args.max_macs))
    if args.max_params is not None:
        params = count_params(GraphView(dequantized(model))) / 1e6  # QDQ: the weights it dequantizes
        checks.append(("M params", params, args.max_params, params <= args.max_params))
    if needs_ref:
        reference = load_checked(args.reference)
        if args.min_agreement is not None or args.min_iou is not None or args.max_error is not None:
            if args.calib is None:
                raise PruneError("--min-agreement / --min-iou / --max-error need --calib (data to compare the "
                                 "models on)")
            fid = fidelity(reference, model, cal)
            if args.min_agreement is not None:
                agree = min((f.top1_agreement for f in fid if f.top1_agreement is not None), default=None)
                if agree is None:
                    raise PruneError("--min-agreement needs a class-score output ([N, K]); use --max-error")
                checks.append(("top-1 agreement", agree, args.min_agreement, agree >= args.min_agreement))
            if args.min_iou is not None:
                iou = min((f.marked_iou for f in fid if f.marked_iou is not None), default=None)
                if iou is None:
                    raise PruneError(f"--min-iou needs a probability map (a Sigmoid output, or a Softmax over a map's "
                                     f"classes) whose reference marks "
                                     f"at least {MIN_MARKED} elements above {MARKED:g} on --calib; use --max-error")
                checks.append(("marked-region IoU", iou, args.min_iou, iou >= args.min_iou))
            if args.max_error is not None:
                err = max(f.relative_error for f in fid)
                checks.append(("relative error", err, args.max_error, err <= args.max_error))
        if args.min_speedup is not None:
            before, after = measure([runnable(reference, cal), runnable(model, cal)], cal.take([0]), args.provider)
            if is_busy(before.busy):
                print(f"onnxprune: warning: latency speedup {busy_note(before.busy)}", file=sys.stderr)
            ratio = speedup(before, after)
            checks.append((f"latency speedup ({args.provider})", ratio, args.min_speedup, ratio >= args.min_speedup))
    failed = [c for c in checks if not c[3]]
    if not args.quiet:
        for what, value, limit, ok in checks:
            print(f"{'PASS' if ok else 'FAIL'} {what}: {value:.4g} (limit {limit:g})")
    if failed:
        print("onnxprune: gate failed: " + "; ".join(f"{w} {v:.4g} vs limit {lim:g}" for w, v, lim, _ in failed),
              file=sys.stderr)
        return EXIT_TARGET
    return EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    from .latency import busy_note, is_busy, speedup
    from .summary import bench, bench_ops, load_checked

    models = [load_checked(m) for m in args.models]
    cal = _inputs(args, models[0])
    if any(b < 1 for b in args.batch) or args.repeats < 1:
        raise PruneError("--batch sizes and --repeats must be >= 1")
    # the speedup compares the 10th percentiles, the runs nothing interrupted (latency.speedup)
    print(f"{'model':<40} {'batch':>5} {'p10 ms':>9} {'median ms':>10} {'p90 ms':>9} {'samples/s':>10} "
          f"{'p10 speedup':>12}")
    for batch, results in bench(models, cal, args.provider, args.batch, args.repeats).items():
        for path, lat in zip(args.models, results):
            print(f"{str(path)[-40:]:<40} {batch:>5} {lat.ms:>9.3f} {lat.median_ms:>10.3f} {lat.p90_ms:>9.3f} "
                  f"{1e3 * batch / lat.median_ms:>10.1f} {speedup(results[0], lat):>11.2f}x")
        if is_busy(results[0].busy):
            print(f"onnxprune: warning: batch {batch}: {busy_note(results[0].busy)}", file=sys.stderr)
    if args.by_op:
        for batch, times in bench_ops(models, cal, args.provider, args.batch).items():
            print(f"\ntime by op type at batch {batch}, ms in a run, 10th percentile over the profiled runs "
                  f"(ONNX Runtime's profiler; speedup against {args.models[0].name})")
            _print_op_times(args.models, times)
    return EXIT_OK


def _print_op_times(paths: list[Path], times) -> None:
    """One row per op type (the first model's costliest first), a column per model."""
    ops = list(dict.fromkeys(op for t in times for op in t.by_op))
    width = max(14, *(len(str(p.name)[-24:]) for p in paths))
    print(f"{'op type':<24}" + "".join(f" {str(p.name)[-24:]:>{width}}" for p in paths) +
          ("" if len(paths) < 2 else f" {'speedup':>8}" * (len(paths) - 1)))

    def row(label: str, values: list[float]) -> None:
        ratios = [f" {values[0] / v:>7.2f}x" if v > 0 and values[0] > 0 else f" {'-':>8}" for v in values[1:]]
        print(f"{label[:24]:<24}" + "".join(f" {v:>{width}.3f}" for v in values) + "".join(ratios))

    for op in ops:
        row(op, [t.by_op.get(op, 0.0) for t in times])
    row("(between kernels)", [t.between_ms for t in times])
    row("whole run", [t.run_ms for t in times])


def _run(args: argparse.Namespace) -> int:
    from .arch import architecture
    from .latency import busy_note, is_busy
    from .pipeline import prune
    from .verify import poor_fidelity, too_few_to_vouch, uninformative

    output = args.output or args.model.with_name(args.model.stem + ".pruned.onnx")
    check_output(output, force=args.force, protected=(args.model,))  # before any work is done
    for extra in (args.report, args.export_arch):
        if extra:
            check_folder(extra)
    images = _image_options(args)
    result = prune(str(args.model), str(args.calib) if args.calib else None, image_options=images,
                   speedup=args.speedup, params=args.params, size_mb=args.size_mb, latency=args.latency,
                   provider=args.provider, latency_batch=args.latency_batch, max_drop=args.max_drop, method=args.method, reconstruct=args.reconstruct,
                   residual_target=args.residual_target, prune_coupled=args.prune_coupled,
                   refit_downstream=args.refit_downstream, refine=args.refine, refine_tail=args.refine_tail,
                   allocation=args.allocation,
                   sensitivity_images=args.sensitivity_images, calib_samples=args.calib_samples or None,
                   holdout=args.holdout,
                   samples_per_image=args.samples_per_image, mixtures=args.mixtures, seed=args.seed,
                   round_to=args.round_to if args.round_to is not None else default_round_to(args.provider),
                   relax_round_to=args.round_to is None,
                   batch_size=args.batch_size, measure_latency=args.measure_latency, slim_fallback=args.slim_fallback,
                   exclude=tuple(args.exclude or ()), progress=None if not args.quiet else False,
                   quantize=args.quantize, calibrate_method=args.calibrate_method, sparsity=args.sparsity)
    save_model_atomic(result.model, output, force=args.force, protected=(args.model,))
    if args.report:
        write_text_atomic(result.report.to_json(), args.report)
    if args.export_arch:
        write_text_atomic(json.dumps(architecture(result.report), indent=2), args.export_arch)
    poor = poor_fidelity(result.report.fidelity) if args.max_drop is None else ""
    if not args.quiet:
        print(result.report.table())
        print(f"wrote {output} in {result.report.seconds:.1f}s")
        print(f"onnxprune: {result.report.phases_line()}", file=sys.stderr)
        thin = result.report.thinnest_refit()
        if thin is not None and thin.samples_per_unknown < FEW_SAMPLES_PER_UNKNOWN:
            print(f"onnxprune: warning: few calibration samples: the refit after '{thin.name}' had "
                  f"{thin.samples_per_unknown:.2f} samples per unknown (regularised on held-out samples); "
                  f"more images make it closer to the original (see README, calibration size)", file=sys.stderr)
        unvouched = too_few_to_vouch(result.report.calibration.get("holdout", 0), args.holdout) if args.calib else ""
        if unvouched and not poor:  # a broken result says so itself, below
            print(f"onnxprune: warning: {unvouched}", file=sys.stderr)
        blind = uninformative(result.report.fidelity)
        if blind:
            print(f"onnxprune: warning: {blind}", file=sys.stderr)
    goal, measured = result.report.targets.get("latency"), result.report.totals.latency_speedup
    loaded = is_busy(result.report.totals.latency_busy)
    if goal is None and measured is not None and measured < SLOWER and not args.quiet:
        why = f"; {busy_note(result.report.totals.latency_busy)}" if loaded else _why_slower(result)
        print(f"onnxprune: warning: the written model measured {measured:.2f}x: slower than the original on "
              f"ORT {result.report.provider}{why}", file=sys.stderr)
    if goal is not None and measured is not None and measured < goal:
        why = busy_note(result.report.totals.latency_busy) if loaded else \
            "latency varies between runs on a busy machine; re-measure with `onnxprune bench`, or ask a little more"
        print(f"onnxprune: warning: the written model measured {measured:.2f}x in the final check, below --latency "
              f"{goal:g} (the search measured it above): {why}", file=sys.stderr)
    if not result.report.targets_met:
        t = result.report.totals
        print(f"onnxprune: targets not met under --max-drop {args.max_drop:g}: the written model is the most "
              f"pruned one that holds it ({t.macs_speedup:.2f}x fewer MACs, "
              f"{t.params[1] / max(t.params[0], 1):.1%} params, {t.size_bytes[1] / 1e6:.2f} MB)", file=sys.stderr)
        return EXIT_TARGET
    if poor:
        print(f"onnxprune: the pruned model looks broken: on {result.report.calibration.get('holdout', 0)} held-out "
              f"samples {poor}; try more calibration images, a milder target or --allocation uniform, or set your "
              f"own limit with --max-drop (model written to {output})", file=sys.stderr)
        return EXIT_TARGET
    return EXIT_OK


def _why_slower(result: PruneResult) -> str:
    """The likely reason a written model runs slower than the original, for the warning that says so."""
    from .summary import grouped_convs_cut_inside

    cut = grouped_convs_cut_inside(result.report.layers)
    if cut:
        return (f": {len(cut)} grouped convs were cut inside their conv groups ('{cut[0]}'"
                f"{', …' if len(cut) > 1 else ''}), which ONNX Runtime runs slower than whole ones; --exclude "
                f"them to keep their groups whole (the cut then falls on the other layers: docs/latency.md)")
    return ": widths off the runtime's channel blocks or per-node overhead; --latency S targets measured speed"


COMMANDS = {"prune": (build_parser, _run), "inspect": (build_inspect_parser, _inspect),
            "gate": (build_gate_parser, _gate), "bench": (build_bench_parser, _bench)}


def configure_logging(level: int) -> logging.Logger:
    """Send the records of onnxprune's loggers at ``level`` or above to the current stderr, in
    one line each. Only the ``onnxprune`` logger is set up (and it stops propagating): the root
    logger belongs to whatever program runs onnxprune, and is left alone. Repeated calls (several
    ``main`` runs in one process) replace the handler rather than add another."""
    logger = logging.getLogger("onnxprune")
    for old in [h for h in logger.handlers if getattr(h, "onnxprune_cli", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.onnxprune_cli = True
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger


class Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``, a container stopping) raised in the main thread, so that
    every ``with`` and ``finally`` on the way out runs as for Ctrl-C: the carried activations'
    temporary folder and a half-written output go. Not an ``Exception``: nothing may swallow it."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    try:  # only the main thread may set handlers (an embedding caller's thread keeps its own)
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:
        previous = None
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:  # every command runs models: without ONNX Runtime, say so first (--help included), in one line
        import_ort()
    except MissingRuntimeError as exc:
        print(f"onnxprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    command = argv[0] if argv and argv[0] in COMMANDS else "prune"
    if argv and argv[0] == command:
        argv = argv[1:]
    make_parser, run = COMMANDS[command]
    args = make_parser().parse_args(argv)
    configure_logging(logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING)
    try:
        return run(args)
    except NothingToPrune as exc:
        if not args.quiet:
            print(f"onnxprune: {exc}", file=sys.stderr)
        return EXIT_OK
    except PruneError as exc:
        print(f"onnxprune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # output piped into e.g. `head`: not an error
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        print("onnxprune: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("onnxprune: terminated; nothing was written", file=sys.stderr)
        return 143
    except Exception as exc:  # a bug: say so, keep the traceback for -v
        if args.verbose:
            raise
        print(f"onnxprune: internal error: {type(exc).__name__}: {exc} — please report it "
              "(rerun with -v for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
