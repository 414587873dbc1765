"""The ``coreml-lab`` command: diagnose, fix, compare and matrix from a shell or a CI job.

A model is given as ``package.module:function`` (a function returning ``(model, example_inputs)``
or ``(model, example_inputs, description)``, like the samples: ``sample_models.healthy:build``),
or as a model file (.pt/.ts TorchScript, .pt2, .onnx, .mlpackage) with ``--input name=1,3,224,224``
(repeatable; ``:int32`` after the shape for integer inputs) to make random example inputs, or
``--inputs feeds.npz`` (named arrays, ``np.savez``). An existing ``.mlpackage`` is diagnosed on
its own (against its own program run exactly in FP32); ``--mlmodel m.mlpackage`` diagnoses that
package against the model it came from.

Exit codes: 0 success; 1 the error exceeds ``--tolerance`` (or no fix was found): a CI gate;
2 bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path


class UsageError(Exception):
    pass


def _load_model(spec: str, input_specs: list[str], npz: str | None = None):
    if ":" in spec and not Path(spec).exists():
        mod_name, _, func = spec.partition(":")
        try:
            module = importlib.import_module(mod_name)
        except ImportError as exc:
            raise UsageError(f"cannot import {mod_name!r} from {spec!r}: {exc}") from exc
        fn = getattr(module, func, None)
        if not callable(fn):
            raise UsageError(f"{mod_name!r} has no function {func!r} (expected module:function returning "
                             "(model, example_inputs))")
        result = fn()
        if not isinstance(result, tuple) or len(result) < 2:
            raise UsageError(f"{spec} must return (model, example_inputs[, description]), got {type(result).__name__}")
        return result[0], _npz_inputs(npz) if npz else result[1]
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"{spec!r} is neither module:function nor an existing model file")
    if input_specs and npz:
        raise UsageError("give example inputs either with --input or with --inputs, not both")
    if npz:
        return str(path), _npz_inputs(npz)
    if not input_specs:
        raise UsageError(f"give example inputs for {path.name} with --inputs feeds.npz (named arrays) or "
                         "--input name=d1,d2,...[:dtype] (random values)")
    return str(path), _example_inputs(input_specs)


def _npz_inputs(path: str) -> dict:
    """Named arrays of an .npz file (``np.savez(path, name=array, ...)``)."""
    import numpy as np

    if not Path(path).is_file():
        raise UsageError(f"--inputs {path!r}: no such file (expected an .npz of named arrays, from np.savez)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: np.array(data[name]) for name in data.files}
    except (OSError, ValueError) as exc:
        raise UsageError(f"--inputs {path!r} is not an .npz of named arrays (np.savez writes one): {exc}") from exc
    if not isinstance(arrays, dict) or not arrays:
        raise UsageError(f"--inputs {path!r} holds no arrays; expected one array per model input, by name")
    return arrays


def _example_inputs(specs: list[str]) -> dict:
    import torch

    out = {}
    g = torch.Generator().manual_seed(0)
    for s in specs:
        name, eq, rest = s.partition("=")
        if not eq or not name:
            raise UsageError(f"--input {s!r}: expected name=d1,d2,... (e.g. image=1,3,224,224)")
        shape_text, _, dtype = rest.partition(":")
        try:
            shape = tuple(int(d) for d in shape_text.split(",") if d)
        except ValueError as exc:
            raise UsageError(f"--input {s!r}: the shape must be integers separated by commas") from exc
        if dtype in ("", "float32", "fp32"):
            out[name] = torch.rand(shape, generator=g)
        elif dtype in ("int32", "int64"):
            out[name] = torch.randint(0, 10, shape, generator=g)
        else:
            raise UsageError(f"--input {s!r}: dtype must be float32 or int32, got {dtype!r}")
    return out


def _options(args):
    import coreml_lab as cl

    fp32_ops = tuple(o for o in (args.fp32_ops or "").split(",") if o)
    try:
        return cl.ConversionOptions(precision=args.precision, target=args.target, fp32_ops=fp32_ops,
                                    compression=args.compression or None)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _add_model_args(p):
    p.add_argument("model", help="module:function returning (model, example_inputs), or a model file")
    p.add_argument("--input", action="append", default=[], metavar="NAME=SHAPE[:DTYPE]",
                   help="random example input for a model file (repeatable)")
    p.add_argument("--inputs", metavar="FEEDS.npz", help="example inputs for a model file: an .npz of named arrays")
    p.add_argument("--precision", default="fp16", help="fp16 | fp32 | mixed (default fp16)")
    p.add_argument("--fp32-ops", default="", help="with --precision mixed: comma-separated op types/names")
    p.add_argument("--target", default="iOS17", help="deployment target (default iOS17)")
    p.add_argument("--compression", default="", help="weight compression after conversion: palettize4, "
                   "int8-per-channel, int8-per-tensor, int4-per-block32 (iOS18), prune50, prune50+palettize4 ...")


def _worst(report) -> float:
    import math
    rows = report.outputs
    if not len(rows):
        return math.inf
    if (rows.nonfinite_frac > 0).any():
        return math.inf
    return float(rows.rel_err.max())


def _with_ne_chip(units: list[str], chip: str | None) -> list:
    """The compute units, with CPU_AND_NE / ALL modelling the Neural Engine of ``chip`` when given."""
    if not chip:
        return units
    from .emulator import ne_profile

    try:
        return [ne_profile(chip, u) if u.upper() in ("CPU_AND_NE", "ALL") else u for u in units]
    except ValueError as exc:
        raise UsageError(f"--ne-chip: {exc}") from exc


def cmd_diagnose(args) -> int:
    import coreml_lab as cl

    from .packages import is_package

    model, example = _load_model(args.model, args.input, args.inputs)
    units = _with_ne_chip([u for u in args.compute_units.split(",") if u], args.ne_chip)
    # an existing package is diagnosed as it is: conversion options do not apply to it
    options = None if is_package(model) else _options(args)
    try:
        report = cl.diagnose(model, example, options, compute_units=units, runtime=args.runtime,
                             progress=not args.quiet, mlmodel=args.mlmodel)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    print(report.summary())
    if args.html:
        Path(args.html).write_text(report.to_html(title=f"coreml_lab: {args.model}"))
        print(f"HTML report: {args.html}")
    if args.bundle:
        print(f"run bundle: {report.save(args.bundle)}")
    if not report.ok:
        return 1
    worst = _worst(report)
    if worst > args.tolerance:
        print(f"FAIL: worst output error {worst:.3g} > tolerance {args.tolerance:g}")
        return 1
    print(f"OK: worst output error {worst:.3g} <= tolerance {args.tolerance:g}")
    return 0


def cmd_fix(args) -> int:
    import coreml_lab as cl

    model, example = _load_model(args.model, args.input, args.inputs)
    if args.compression:  # a compression fix: weights to leave uncompressed
        fix = cl.find_uncompressed_ops(model, example, _options(args), tolerance=args.tolerance,
                                       time_budget=args.budget, progress=not args.quiet)
        print(fix.message)
        print(fix.sensitivity[["op", "module", "mode", "nbits", "weight_snr_db", "error_alone", "rank"]].to_string(
            index=False))
        if fix.found:
            print(fix.snippet)
        return 0 if fix.found else 1
    fix = cl.find_fp32_ops(model, example, _options(args), tolerance=args.tolerance, time_budget=args.budget,
                           progress=not args.quiet)
    print(fix.message)
    if fix.found:
        print(f"FP32 ops ({fix.n_fp32} of {fix.n_ops}): {list(fix.ops)}")
        print(fix.snippet)
        return 0
    return 1


def cmd_compare(args) -> int:
    import coreml_lab as cl

    a, b = cl.load_report(args.a), cl.load_report(args.b)
    table = cl.compare_reports(a, b, labels=(Path(args.a).stem, Path(args.b).stem))
    env_a, env_b = a.environment, b.environment
    print(f"A: {args.a} ({env_a.get('os')} {env_a.get('os_version')}, {env_a.get('runtime')})")
    print(f"B: {args.b} ({env_b.get('os')} {env_b.get('os_version')}, {env_b.get('runtime')})")
    print(table.to_string(index=False) if len(table) else "no common outputs to compare")
    outputs = table[table.kind == "output"]
    if len(outputs) and (outputs.rel_diff.isna() | (outputs.rel_diff > args.tolerance)).any():
        print(f"DIFFER: some outputs differ by more than {args.tolerance:g} (relative)")
        return 1
    return 0


def cmd_matrix(args) -> int:
    import pandas as pd

    import coreml_lab as cl

    model, example = _load_model(args.model, args.input, args.inputs)
    targets = [t for t in args.targets.split(",") if t]
    table = cl.target_matrix(model, example, _options(args), targets=targets, compute_unit=args.compute_unit)
    with pd.option_context("display.width", 200, "display.max_colwidth", 80):
        print(table[["target", "ok", "spec_version", "max_rel_error", "op_type_changes", "explanation"]].to_string(
            index=False))
    for row in table.itertuples():
        for f in row.findings or []:
            print(f"{row.target}: {f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="coreml-lab", description="Diagnose PyTorch/ONNX models converted to Core ML.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("diagnose", help="convert, run every compute unit, report where precision is lost")
    _add_model_args(p)
    p.add_argument("--mlmodel", metavar="M.mlpackage",
                   help="diagnose this existing package against MODEL, the torch model it came from")
    p.add_argument("--compute-units", default="CPU_ONLY,CPU_AND_GPU,CPU_AND_NE")
    p.add_argument("--ne-chip", default=None, metavar="CHIP",
                   help="Neural Engine generation CPU_AND_NE / ALL model: M1 (M1, A14) or M5 (A15 and later, "
                        "the default); emulator only")
    p.add_argument("--runtime", default="auto", help="auto | emulator | coreml")
    p.add_argument("--tolerance", type=float, default=1e-2, help="gate on the worst output relative error")
    p.add_argument("--html", help="write a self-contained HTML report here")
    p.add_argument("--bundle", help="save a run bundle here (directory, or .zip)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_diagnose)
    p = sub.add_parser("fix", help="find ops to keep in FP32 (verified mixed precision), or with --compression "
                       "the layers to leave uncompressed")
    _add_model_args(p)
    p.add_argument("--tolerance", type=float, default=1e-2)
    p.add_argument("--budget", type=float, default=300.0, help="time budget in seconds")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_fix)
    p = sub.add_parser("compare", help="compare two run bundles (e.g. two OS versions)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--tolerance", type=float, default=1e-2)
    p.set_defaults(run=cmd_compare)
    p = sub.add_parser("matrix", help="convert for several deployment targets and compare")
    _add_model_args(p)
    p.add_argument("--targets", default="iOS15,iOS16,iOS17,iOS18")
    p.add_argument("--compute-unit", default="CPU_AND_NE")
    p.set_defaults(run=cmd_matrix)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"coreml-lab: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, TypeError) as exc:
        from .bundle import BundleError
        kind = "bundle" if isinstance(exc, BundleError) else "input"
        print(f"coreml-lab: {kind} error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


__all__ = ["main", "build_parser"]
