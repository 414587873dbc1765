"""Compression fixes, verified: per-layer sensitivity, and a small set of layers to leave uncompressed.

``find_uncompressed_ops`` measures every compressed op alone (the model compressed with only
that op's weight compressed: its sensitivity), ranks the ops by it, then leaves the most
sensitive ones uncompressed (``op_name_configs[op] = None``) one at a time until the output error
is within tolerance, drops every op the fix does not need, and verifies the final config by a
real conversion and emulated run - the same shape as :func:`coreml_lab.fixes.find_fp32_ops`,
whose measuring helper it reuses.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .compressed_weights import describe
from .compression import Compression, more_bits_config, op_config_fields
from .conversion import Conversion
from .convert import convert
from .emulator.program import mil_program
from .fixes import measure, prepared_reference
from .options import ConversionOptions, as_options

CHECK_UNITS = ("CPU_ONLY", "CPU_AND_NE")


@dataclass
class CompressionFix:
    """The result of :func:`find_uncompressed_ops`.

    ops: names of the ops whose weights stay uncompressed (the consumer op names that
        ``OptimizationConfig.op_name_configs`` takes).
    more_bits: ops kept compressed, at 8 bits instead (where that is within tolerance too).
    config: the verified coremltools ``OptimizationConfig`` (a tuple of them for joint forms).
    conversion: the verified compressed Conversion (None when nothing was verified).
    error_before / error_after: worst output relative error (max |err| / max |ref|) against the
        torch FP32 output, over the checked compute units; ``error_uncompressed`` the same for
        the conversion without compression (the floor no compression fix can go below).
    sensitivity: one row per compressed op: op, op_type, module, mode, nbits, granularity,
        weight_snr_db, max_abs_weight_error, error_alone (output error with only that op
        compressed; NaN when the time budget ran out before it was measured), rank (1 = most
        sensitive).
    """

    ops: tuple
    more_bits: tuple
    compression: Compression | None
    conversion: Conversion | None
    error_before: float
    error_after: float
    error_uncompressed: float
    tolerance: float
    sensitivity: object
    found: bool
    message: str
    options: ConversionOptions | None = None
    trials: int = 0
    elapsed: float = 0.0
    history: list = field(default_factory=list, repr=False)

    @property
    def config(self):
        if self.compression is None:
            return None
        configs = self.compression.configs
        return configs[0] if len(configs) == 1 else configs

    @property
    def snippet(self) -> str:
        """Ready-to-paste coremltools code: convert, then compress with the verified config."""
        opts = self.options or ConversionOptions()
        precision = {"fp32": "ct.precision.FLOAT32", "fp16": "ct.precision.FLOAT16"}.get(opts.precision)
        lines = ["import coremltools as ct", "import coremltools.optimize.coreml as cto", "",
                 "mlmodel = ct.convert(", "    traced_model, inputs=inputs, convert_to=\"mlprogram\",",
                 f"    minimum_deployment_target=ct.target.{opts.target},"]
        if precision:
            lines.append(f"    compute_precision={precision},")
        else:
            lines.append("    # precision='mixed': pass the FP16ComputePrecision op_selector of your fix here")
        lines.append(")")
        if self.compression is not None:
            lines.append(f"# weights left uncompressed (coreml_lab.find_uncompressed_ops): {list(self.ops)}"
                         + (f", at 8 bits: {list(self.more_bits)}" if self.more_bits else ""))
            for i, (mode, config) in enumerate(self.compression.steps):
                fn = {"prune": "prune_weights", "palettize": "palettize_weights",
                      "quantize": "linear_quantize_weights"}[mode]
                joint = ", joint_compression=True" if i else ""
                lines.append(f"mlmodel = cto.{fn}(mlmodel, {_config_code(config)}{joint})")
        return "\n".join(lines) + "\n"

    def plot_sensitivity(self, ax=None):
        """Bar chart: output error with only that op compressed, most sensitive first; tolerance line."""
        import matplotlib.pyplot as plt

        df = self.sensitivity.sort_values("rank")
        if ax is None:
            fig, ax = plt.subplots(figsize=(7, 0.35 * max(len(df), 3) + 1.2))
        else:
            fig = ax.figure
        labels = [f"{r.module or r.op} ({r.mode} {r.nbits or ''})".replace(" )", ")") for r in df.itertuples()]
        kept, more = set(self.ops), set(self.more_bits)
        colors = ["tab:red" if op in kept else "tab:orange" if op in more else "tab:blue" for op in df.op]
        ax.barh(range(len(df)), df.error_alone, color=colors)
        ax.set_yticks(range(len(df)), labels)
        ax.invert_yaxis()
        ax.axvline(self.tolerance, color="k", ls="--", lw=1, label=f"tolerance {self.tolerance:g}")
        ax.set_xlabel("output relative error vs torch FP32, only this op compressed")
        ax.set_title(f"Compression sensitivity (red: left uncompressed, orange: 8 bits)\noutput error "
                     f"{self.error_before:.3g} -> {self.error_after:.3g}", fontsize=10)
        ax.legend(loc="lower right")
        fig.tight_layout()
        return fig

    def __repr__(self) -> str:
        return (f"CompressionFix(found={self.found}, {len(self.ops)} of {len(self.sensitivity)} compressed ops left "
                f"uncompressed, error {self.error_before:.3g} -> {self.error_after:.3g}, ops={list(self.ops)})")


def _config_code(config) -> str:
    """coremltools code building ``config`` (fields that differ from the op config's defaults)."""

    def op_code(op_config):
        if op_config is None:
            return "None"
        fields = op_config_fields(op_config)
        default = op_config_fields(type(op_config)(**_required(op_config)))
        args = [f"{k}={v!r}" for k, v in fields.items() if k != "type" and v != default.get(k)]
        return f"cto.{fields['type']}({', '.join(args)})"

    parts = [f"global_config={op_code(config.global_config)}"]
    if config.op_type_configs:
        parts.append("op_type_configs={" + ", ".join(f"{k!r}: {op_code(v)}"
                                                      for k, v in sorted(config.op_type_configs.items())) + "}")
    if config.op_name_configs:
        parts.append("op_name_configs={" + ", ".join(f"{k!r}: {op_code(v)}"
                                                      for k, v in sorted(config.op_name_configs.items())) + "}")
    return "cto.OptimizationConfig(" + ", ".join(parts) + ")"


def _required(op_config) -> dict:
    """Arguments an op config cannot be built without (so its defaults can be compared)."""
    import coremltools.optimize.coreml as cto

    if isinstance(op_config, cto.OpPalettizerConfig) and op_config.mode in ("kmeans", "uniform"):
        return {"nbits": op_config.nbits}
    if isinstance(op_config, cto.OpPalettizerConfig):
        return {"mode": op_config.mode, "lut_function": op_config.lut_function}
    if isinstance(op_config, cto.OpThresholdPrunerConfig):
        return {"threshold": op_config.threshold}
    return {}


class _Trials:
    """Compresses the uncompressed conversion with a Compression and measures it (memoised, budgeted)."""

    def __init__(self, plain: Conversion, options: ConversionOptions, feeds, want, units, budget: float, bar):
        self.plain, self.options, self.feeds, self.want, self.units = plain, options, feeds, want, units
        self.deadline = time.perf_counter() + budget
        self.memo: dict = {}
        self.trials = 0
        self.history: list = []
        self.bar = bar

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    def error(self, compression: Compression, label: str = "") -> float:
        from .compression import apply

        if compression in self.memo:
            return self.memo[compression]
        if self.out_of_time():
            return math.inf
        ml = apply(self.plain.mlmodel, compression, self.options.target)
        conv = dataclasses.replace(self.plain, mlmodel=ml, program=mil_program(ml),
                                   options=self.options.replace(compression=compression), from_cache=False)
        err = measure(conv, self.feeds, self.want, self.units)
        self.trials += 1
        self.history.append((label, err))
        self.bar.update(1)
        self.bar.set_postfix(trial=label[:30], err=f"{err:.2g}")
        self.memo[compression] = err
        return err


def _config_for(comp: Compression, op: str, table):
    """The op config the (single-step) compression gives ``op``."""
    config = comp.steps[0][1]
    if op in config.op_name_configs:
        return config.op_name_configs[op]
    op_type = table.op_type[table.op == op].iloc[0]
    return config.op_type_configs.get(op_type, config.global_config)


def find_uncompressed_ops(model, example_inputs=None, options: ConversionOptions | dict | None = None, *,
                          tolerance: float = 2e-2, time_budget: float = 300.0,
                          compute_units: Sequence[str] | None = None, inputs=None,
                          progress: bool = True) -> CompressionFix:
    """A small set of compressed ops to leave uncompressed so the outputs are within ``tolerance``.

    ``options.compression`` is the compression to fix. The output error is the worst output
    relative error (max |err| / max |ref|) against the **torch FP32 output** (as
    :func:`coreml_lab.find_fp32_ops` measures), not against the uncompressed conversion: the
    uncompressed conversion's own error is reported as ``error_uncompressed`` (a floor no
    compression fix goes below). Runs use the emulator under ``compute_units`` (default: the
    options' compute unit when it names one, else CPU_ONLY and CPU_AND_NE). Each op's
    sensitivity is the output error with only that op compressed; the search leaves the most
    sensitive ops uncompressed, one at a time, then drops every op the fix does not need, and
    verifies the final config by converting with it. ``time_budget`` bounds the search in seconds.
    """
    from tqdm.auto import tqdm


    start = time.perf_counter()
    opts = as_options(options)
    if opts.compression is None:
        raise ValueError("find_uncompressed_ops needs options with a compression, e.g. "
                         "ConversionOptions(compression='palettize4')")
    if compute_units is None:
        compute_units = CHECK_UNITS if opts.compute_units == "ALL" else (opts.compute_units,)
    compute_units = tuple(compute_units)
    prep, feeds, want = prepared_reference(model, example_inputs, inputs, "find_uncompressed_ops")
    compressed = convert(None, options=opts, prepared=prep)
    plain = convert(None, options=opts.replace(compression=None), prepared=prep)
    table = describe(compressed, plain)
    bar = tqdm(desc="find_uncompressed_ops", unit="trial", total=len(table) + 2, disable=not progress, miniters=1)
    trials = _Trials(plain, opts, feeds, want, compute_units, time_budget, bar)
    comp = opts.compression
    try:
        before = measure(compressed, feeds, want, compute_units)
        floor = measure(plain, feeds, want, compute_units)
        bar.update(2)
        # sensitivity: each op compressed alone
        alone = []
        for row in table.itertuples():  # NaN: not measured, the budget is spent
            alone.append(math.nan if trials.out_of_time() else
                         trials.error(comp.only(row.op, row.op_type), f"only {row.op}"))
        table = table.assign(error_alone=alone)
        table = table.assign(rank=table.error_alone.fillna(-1).rank(ascending=False, method="first").astype(int))
        table = table.sort_values("rank").reset_index(drop=True)
        ranked = list(table.op)
        chosen: list[str] = []
        err = before
        if before > tolerance and floor <= tolerance:
            for op in ranked:
                if err <= tolerance or trials.out_of_time():
                    break
                chosen.append(op)
                err = trials.error(comp.without(chosen), f"without {len(chosen)}")
            if err <= tolerance:  # drop every op the fix does not need (least sensitive first)
                for op in list(reversed(chosen)):
                    if trials.out_of_time() or len(chosen) == 1:
                        break
                    rest = [o for o in chosen if o != op]
                    e = trials.error(comp.without(rest), f"without {len(rest)}")
                    if e <= tolerance:
                        chosen, err = rest, e
        more: list[str] = []
        if err <= tolerance and not comp.joint:  # an op at 8 bits instead of uncompressed, where enough
            for op in list(chosen):
                if trials.out_of_time():
                    break
                if more_bits_config(_config_for(comp, op, table)) is None:
                    continue
                rest = [o for o in chosen if o != op]
                e = trials.error(comp.without(rest, more + [op]), f"{op} at 8 bits")
                if e <= tolerance:
                    chosen, more, err = rest, more + [op], e
        fixed = comp.without(chosen, more) if (chosen or more) else comp
        changed = bool(chosen or more)
        conv = convert(None, options=opts.replace(compression=fixed), prepared=prep) if changed else compressed
        after = measure(conv, feeds, want, compute_units) if changed else before  # verified by conversion
        found = after <= tolerance
        if before <= tolerance:
            message = (f"the compressed conversion is already within tolerance ({before:.3g} <= {tolerance:g}): "
                       "every op can stay compressed")
        elif floor > tolerance:
            message = (f"the uncompressed conversion itself has error {floor:.3g} > {tolerance:g}: no compression "
                       "fix can reach tolerance (see find_fp32_ops for precision)")
            conv, fixed, after = None, None, math.inf
        elif found:
            upgraded = f" and {len(more)} at 8 bits ({', '.join(more)})" if more else ""
            message = (f"leaving {len(chosen)} of {len(table)} compressed ops uncompressed ({', '.join(chosen)})"
                       f"{upgraded} brings the worst output error from {before:.3g} to {after:.3g} (tolerance {tolerance:g}, "
                       f"uncompressed {floor:.3g}), verified by conversion")
        elif trials.out_of_time():
            message = (f"no fix within the {time_budget:g}s budget: leaving {len(chosen)} ops uncompressed gives "
                       f"error {after:.3g} > {tolerance:g}; raise time_budget")
        else:
            message = f"no set of uncompressed ops reaches tolerance {tolerance:g} (best {after:.3g})"
        return CompressionFix(ops=tuple(chosen), more_bits=tuple(more), compression=fixed, conversion=conv, error_before=before,
                              error_after=after, error_uncompressed=floor, tolerance=tolerance, sensitivity=table,
                              found=found, message=message, options=opts.replace(compression=None),
                              trials=trials.trials, elapsed=time.perf_counter() - start,
                              history=list(trials.history))
    finally:
        bar.close()


__all__ = ["CompressionFix", "find_uncompressed_ops"]
