"""Mixed precision, verified: a small set of ops to keep in FP32 so the FP16 conversion is within tolerance.

``find_fp32_ops`` first looks at what FP16 cannot hold: it runs the FP32 program and marks every
value that leaves FP16 range (|x| > 65504, or mostly below 2^-24 so it flushes to zero). One op
in FP32 does not keep such a value: its FP32 result is cast back to FP16 for the next FP16 op.
So every op that produces or consumes such a value joins one FP32 *region*, which grows forward
through consumers until values are back in FP16 range (the first op whose output fits ends it)
and backward to the producers of out-of-range inputs. Each candidate set is checked by
converting with ``ct.transform.FP16ComputePrecision(op_selector=...)`` and re-running. If the
regions are not enough, the set grows by the ops the diagnosis blames, then by the largest local
error, in doubling batches, then bisects the batch; finally it drops every region and op the fix
does not need. A set is reported as a fix only when its own verification says so.
:mod:`.suggestions` ranks it among the other changes to try.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .conversion import Conversion, ConversionError
from .convert import convert, prepare
from .diagnosis import diagnose
from .emulator import EmulatedModel
from .feeds import dataset
from .fp16 import FP16_MAX
from .fp32_regions import fp32_ranges, fp32_regions, selector_view
from .options import ConversionOptions, as_options, final_op_name
from .reference import reference_outputs

CHECK_UNITS = ("CPU_AND_GPU", "CPU_AND_NE")


@dataclass
class MixedPrecisionFix:
    """The result of :func:`find_fp32_ops`.

    ops: MIL op names kept in FP32, as ``op_selector`` sees them (coremltools' final renaming rule
    applied); ``op_outputs`` maps each to its output var names in the converted program (a late
    pass may rename an op, e.g. a transpose to ``transpose_1``, but not its outputs).
    op_selector: ``op -> bool`` for ``ct.transform.FP16ComputePrecision`` (True = may be FP16).
    snippet: ready-to-paste coremltools code.
    conversion: the verified mixed-precision Conversion (None if no fix was found).
    error_before / error_after: worst output relative error vs torch over the checked compute
    units (inf when outputs have inf/NaN); error_after is the verified error of ``ops``.
    found: True only when that verification is within ``tolerance``; ``message`` says why not.
    regions: the FP32 regions kept (op names in program order): ops that only work in FP32
    together, because the values between them do not fit FP16 (see :func:`fp32_regions`).
    history: (number of FP32 ops, error) per verified trial; tried: frozenset of ops -> error.
    """

    ops: tuple
    op_types: dict
    conversion: Conversion | None
    error_before: float
    error_after: float
    tolerance: float
    n_fp32: int
    n_ops: int
    found: bool
    message: str
    trials: int = 0
    elapsed: float = 0.0
    history: list = field(default_factory=list, repr=False)
    tried: dict = field(default_factory=dict, repr=False)
    regions: list = field(default_factory=list)
    op_outputs: dict = field(default_factory=dict, repr=False)

    @property
    def fraction_fp32(self) -> float:
        return self.n_fp32 / self.n_ops if self.n_ops else 0.0

    @property
    def op_selector(self):
        keep = set(self.ops)
        return lambda op: final_op_name(op.name) not in keep

    @property
    def options(self) -> ConversionOptions | None:
        return self.conversion.options if self.conversion is not None else None

    @property
    def snippet(self) -> str:
        ops = "{" + ", ".join(repr(o) for o in self.ops) + "}" if self.ops else "set()"
        target = self.options.target if self.options else "iOS17"
        return (
            "import re\n"
            "import coremltools as ct\n\n"
            f"FP32_OPS = {ops}  # ops kept in FP32, named as op_selector sees them (coreml_lab.find_fp32_ops)\n\n\n"
            "def final_name(name):  # coremltools renames ops at the end of conversion (\"8\" -> \"op_8\")\n"
            "    name = re.sub(r\"[^a-zA-Z0-9_]\", \"_\", name)\n"
            "    return \"op_\" + name if re.match(r\"[^a-zA-Z_]\", name) else name\n\n\n"
            "mlmodel = ct.convert(\n"
            "    traced_model, inputs=inputs, convert_to=\"mlprogram\",\n"
            f"    minimum_deployment_target=ct.target.{target},\n"
            "    compute_precision=ct.transform.FP16ComputePrecision(\n"
            "        op_selector=lambda op: final_name(op.name) not in FP32_OPS),\n"
            ")\n"
        )

    def __repr__(self) -> str:
        return (f"MixedPrecisionFix(found={self.found}, {self.n_fp32}/{self.n_ops} ops FP32 "
                f"({self.fraction_fp32:.0%}), error {self.error_before:.3g} -> {self.error_after:.3g}, "
                f"ops={list(self.ops)})")


class _Checker:
    """Converts with a set of FP32 ops and measures the worst output error against torch FP32."""

    def __init__(self, prep, options: ConversionOptions, feeds: list, torch_outputs: list, units: Sequence[str],
                 budget: float, bar):
        self.prep, self.options, self.feeds, self.want, self.units = prep, options, feeds, torch_outputs, units
        self.deadline = time.perf_counter() + budget
        self.trials = 0
        self.history: list = []
        self.memo: dict = {}
        self.bar = bar

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    def error(self, ops: frozenset) -> tuple[float, Conversion | None]:
        if ops in self.memo:
            return self.memo[ops]
        if self.out_of_time():
            return math.inf, None  # not tried: the budget is spent
        opts = self.options.replace(precision="mixed", fp32_ops=tuple(sorted(ops))) if ops else \
            self.options.replace(precision="fp16", fp32_ops=())
        try:
            conv = convert(None, options=opts, prepared=self.prep, cache=False)
        except ConversionError:
            self.memo[ops] = (math.inf, None)
            return self.memo[ops]
        err = measure(conv, self.feeds, self.want, self.units)
        self.trials += 1
        self.history.append((len(ops), err))
        self.bar.update(1)
        self.bar.set_postfix(ops=len(ops), err=f"{err:.2g}")
        self.memo[ops] = (err, conv)
        return self.memo[ops]


def prepared_reference(model, example_inputs, inputs, caller: str) -> tuple:
    """(the prepared model, its feeds, torch's outputs for them): what a fix search measures against."""
    prep = prepare(model, example_inputs)
    if prep.source.reference is None:
        raise ValueError(f"{caller} needs the source model (a torch module, TorchScript, exported "
                         "program or ONNX file), not a loaded .mlpackage")
    feeds = dataset(inputs, prep.inputs)
    return prep, feeds, reference_outputs(prep.source.reference, prep.inputs, feeds)


def measure(conv: Conversion, feeds: list, torch_outputs: list, units: Sequence[str]) -> float:
    """Worst output relative error (max |err| / max |ref|) over inputs and units; inf on inf/NaN."""
    worst = 0.0
    names = [o.name for o in conv.mlmodel.get_spec().description.output]
    for unit in units:
        em = EmulatedModel(conv.mlmodel, unit)
        for feed, want in zip(feeds, torch_outputs):
            # a stateful model: each feed is a first step, from an empty state
            got = em.predict(feed, state=em.make_state() if em.state_specs else None)
            for name, w in zip(names, want):
                g = np.asarray(got[name], dtype=np.float64)
                w = np.asarray(w, dtype=np.float64).reshape(g.shape)
                if not np.isfinite(g).all():
                    return math.inf
                scale = np.abs(w).max() if w.size else 0.0
                err = float(np.abs(g - w).max()) / scale if scale else float(np.abs(g - w).max())
                worst = max(worst, err)
    return float(worst)


def _suspects(report, tolerance: float, names: list[str]) -> tuple[list, list]:
    """(ops that must be FP32 by range or blame, other ops ranked by local error).

    Ops are named as in the plain FP32 program (what ``op_selector`` sees): the diagnosed op's
    name without coremltools' ``_cast_fp16`` suffix. ``names`` lists that program's op names.
    """
    from .diagnosis import reference_key

    known = set(names)
    layers = report.layers
    rng = report.fp16_range
    act = rng[rng.kind.isin(["activation", "input"])]
    bad_ref = set(act[(act.overflow_frac > 0) | (act.max_abs > FP16_MAX) | (act.flush_frac > 0.01)].output)
    ref_of = dict(zip(layers.output, layers.reference))
    must = []
    for row in layers.drop_duplicates("output").itertuples():
        ins = [i for i in str(row.inputs).split(",") if i]
        if row.reference in bad_ref or any(ref_of.get(i, i) in bad_ref for i in ins):
            must.append(row.op)
    must += list(report.culprits(50, tolerance).op)
    checked = layers[layers.compute_unit.isin(CHECK_UNITS)]
    local = checked.groupby("op")["local_rel_err"].max().sort_values(ascending=False)
    ranked = [op for op, v in local.items() if v == v]

    def plain(ops):
        out = []
        for op in ops:
            name = op if op in known else reference_key(op)
            if name in known:
                out.append(name)
        return list(dict.fromkeys(out))

    must = plain(must)
    ranked = [o for o in plain(ranked) if o not in must]
    ranked += [o for o in names if o not in must and o not in ranked]
    return must, ranked


def find_fp32_ops(model, example_inputs=None, options: ConversionOptions | dict | None = None, *,
                  tolerance: float = 1e-2, time_budget: float = 300.0, compute_units: Sequence[str] = CHECK_UNITS,
                  inputs=None, progress: bool = True) -> MixedPrecisionFix:
    """A small set of ops to keep in FP32 so the FP16 conversion's outputs are within ``tolerance``.

    ``tolerance`` is on the worst output relative error (max |err| / max |ref|) against torch FP32
    under ``compute_units`` (emulated GPU and Neural Engine by default). ``time_budget`` bounds
    the search in seconds. ``found`` is True only when the returned set's own verification
    (a real conversion, re-run) is within tolerance; otherwise ``message`` says why, and
    ``conversion`` / ``error_after`` are those of the best set tried. ``regions`` lists the FP32
    regions found from the FP32 program's value ranges (see :func:`fp32_regions`).
    """
    from tqdm.auto import tqdm


    start = time.perf_counter()
    opts = as_options(options)
    if opts.convert_to != "mlprogram":
        raise ValueError(f"find_fp32_ops needs convert_to='mlprogram', got {opts.convert_to!r}: a neural network "
                         "has no compute precision to choose per op (Core ML picks FP16 on GPU/NE at run time)")
    if opts.precision == "fp32":
        opts = opts.replace(precision="fp16")
    prep, feeds, want = prepared_reference(model, example_inputs, inputs, "find_fp32_ops")
    bar = tqdm(desc="find_fp32_ops", unit="trial", disable=not progress, miniters=1)
    check = _Checker(prep, opts, feeds, want, compute_units, time_budget, bar)
    try:
        before, conv16 = check.error(frozenset())
        view, consts, mlmodel32 = selector_view(prep, opts)
        all_ops = [op.name for op in view]
        n_ops = len(all_ops)
        if before <= tolerance:
            return _result((), conv16, before, before, tolerance, view, True,
                           f"the FP16 conversion is already within tolerance ({before:.3g} <= {tolerance:g}): "
                           "no op needs FP32", check, start)
        regions = fp32_regions(view, fp32_ranges(mlmodel32, feeds), consts)
        chosen = frozenset(o for region in regions for o in region)
        err, conv = check.error(chosen) if chosen else (before, conv16)
        region_note = (f"; the FP32 regions where FP16 range is exceeded ({len(chosen)} ops) alone leave "
                       f"{err:.3g}" if chosen and conv is not None else "")
        if err > tolerance and not check.out_of_time():
            report = diagnose(model, prep.inputs, opts, compute_units=tuple(compute_units), inputs=inputs,
                              progress=False)
            must, ranked = _suspects(report, tolerance, all_ops)
            ranked = [o for o in must + ranked if o not in chosen]
            err, chosen, conv = _grow(check, chosen, err, conv, ranked, tolerance)
        if err <= tolerance:
            err, chosen, conv = _shrink(check, chosen, err, conv, regions, all_ops, tolerance)
        else:  # no fix: report the best set that was really verified
            verified = [(e, len(ops), sorted(ops), c) for ops, (e, c) in check.memo.items() if c is not None]
            if verified:
                err, _, ordered_best, conv = min(verified, key=lambda v: v[:3])
                chosen = frozenset(ordered_best)
        found = err <= tolerance and conv is not None
        kept = set(chosen)
        regions = [r for r in (tuple(o for o in region if o in kept) for region in regions) if r]
        lone = _single_op_note(regions)
        if found:
            message = (f"keeping {len(chosen)} of {n_ops} ops in FP32 brings the worst output error from "
                       f"{before:.3g} to {err:.3g} (tolerance {tolerance:g}), verified by conversion"
                       + (f"; {lone}" if lone else ""))
        elif check.out_of_time():
            message = (f"no fix within the {time_budget:g}s budget: the best set tried ({len(chosen)} ops) leaves "
                       f"error {err:.3g} > {tolerance:g}{region_note}; raise time_budget, or use precision='fp32'")
        else:
            message = (f"no subset of ops in FP32 reaches tolerance {tolerance:g} (best {err:.3g} with "
                       f"{len(chosen)} ops{region_note}): the error comes from FP16 weights or I/O; "
                       "use precision='fp32'")
        ordered = tuple(o for o in all_ops if o in chosen) + tuple(sorted(o for o in chosen if o not in all_ops))
        return _result(ordered, conv, before, err, tolerance, view, found, message, check, start, regions)
    finally:
        bar.close()


def _grow(check: _Checker, chosen: frozenset, err: float, conv, ranked: list, tolerance: float):
    """Add ``ranked`` ops in doubling batches until the error is within tolerance, then bisect the
    last batch for its smallest sufficient prefix. Returns (error, set, conversion) of the last set."""
    batch = 1
    while err > tolerance and ranked and not check.out_of_time():
        take = ranked[:batch]
        trial = chosen | frozenset(take)
        e, c = check.error(trial)
        if e <= tolerance:
            lo, hi = 0, len(take)  # smallest prefix of this batch that is enough
            while hi - lo > 1 and not check.out_of_time():
                mid = (lo + hi) // 2
                if check.error(chosen | frozenset(take[:mid]))[0] <= tolerance:
                    hi = mid
                else:
                    lo = mid
            chosen = chosen | frozenset(take[:hi])
            err, conv = check.error(chosen)
            break
        chosen, err, conv = trial, e, c
        ranked = ranked[batch:]
        batch *= 2
    return err, chosen, conv


def _shrink(check: _Checker, chosen: frozenset, err: float, conv, regions: list, all_ops: list, tolerance: float):
    """Drop every region, then every op, the fix does not need (later ones first); each drop verified."""
    position = {o: i for i, o in enumerate(all_ops)}
    groups = [frozenset(r) for r in regions if len(r) > 1 and len(regions) > 1]
    groups += [frozenset([o]) for o in sorted(chosen, key=lambda o: -position.get(o, -1))]
    for group in groups:
        if check.out_of_time():
            break
        if not group <= chosen or group == chosen:
            continue
        e, c = check.error(chosen - group)
        if e <= tolerance and c is not None:
            chosen, err, conv = chosen - group, e, c
    return err, chosen, conv


def _single_op_note(regions: list) -> str:
    """Why a region, not one op, where a region has several ops."""
    longest = max(regions, key=len, default=())
    if len(longest) < 2:
        return ""
    return (f"FP16 cannot hold the values from {longest[0]!r} to {longest[-1]!r}: {len(longest)} ops form one "
            "FP32 region (one op alone in FP32 would have its result cast back to FP16)")


def _result(ops, conv, before, after, tolerance, view, found, message, check, start, regions=()) -> MixedPrecisionFix:
    kinds = {op.name: op.op_type for op in view}
    types: dict = {}
    for name in ops:
        if name in kinds:
            types[kinds[name]] = types.get(kinds[name], 0) + 1
    outputs = {op.name: op.outputs for op in view if op.name in set(ops)}
    return MixedPrecisionFix(ops=tuple(ops), op_types=types, conversion=conv, error_before=before,
                             error_after=after, tolerance=tolerance, n_fp32=len(ops), n_ops=len(view), found=found,
                             message=message, trials=check.trials, elapsed=time.perf_counter() - start,
                             history=list(check.history),
                             tried={k: v[0] for k, v in check.memo.items()}, regions=[tuple(r) for r in regions], op_outputs=outputs)
