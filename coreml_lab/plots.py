"""Figures of a Report: one function per figure, each returning a matplotlib Figure.

Figures are built without pyplot (no global state, nothing leaks between
notebook cells); Jupyter displays a returned Figure, and ``fig.savefig`` writes it.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .error_histogram import HIST_EDGES
from .fp16 import FP16_MAX, FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL

CU_COLORS = {"CPU_ONLY": "#1f77b4", "CPU_AND_GPU": "#2ca02c", "CPU_AND_NE": "#d62728", "ALL": "#9467bd"}
METRIC_LABELS = {
    "rel_err": "relative error (max |err| / max |ref|)",
    "max_abs_err": "max absolute error",
    "mean_abs_err": "mean absolute error",
    "snr_db": "SNR (dB)",
    "local_rel_err": "local relative error (op alone)",
}


def _color(cu: str) -> str:
    return CU_COLORS.get(cu, "#7f7f7f")


def _empty(fig: Figure, text: str) -> Figure:
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    ax.set_axis_off()
    return fig


def _module_ticks(ax, rows, max_ticks: int = 14) -> None:
    """Label the x axis (program order) with module names at module boundaries."""
    seen, ticks, labels = set(), [], []
    for r in rows.itertuples():
        mod = r.module_output if isinstance(r.module_output, str) else None
        if mod and mod not in seen:
            seen.add(mod)
            ticks.append(r.index)
            labels.append(mod)
    if len(ticks) > max_ticks:
        step = math.ceil(len(ticks) / max_ticks)
        ticks, labels = ticks[::step], labels[::step]
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)


def layer_errors(report, metric: str = "rel_err", floor: float = 1e-9) -> Figure:
    """Error along depth: ``metric`` per op in program order, one line per compute unit."""
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    layers = report.layers
    if layers is None or not len(layers):
        return _empty(fig, "no layers (did the model convert?)")
    if metric not in layers.columns:
        raise ValueError(f"unknown metric {metric!r}; expected one of {[c for c in METRIC_LABELS if c in layers]}")
    ax = fig.add_subplot()
    log = metric != "snr_db"
    for cu in report.compute_units:
        rows = layers[(layers["compute_unit"] == cu) & layers[metric].notna()]
        if not len(rows):
            continue
        y = rows[metric].to_numpy(dtype=float)
        finite = np.isfinite(y)
        if log:
            y = np.where(finite, np.maximum(y, floor), np.nan)
        exact = bool(log and (y == floor).any())
        ax.plot(rows["index"], y, marker=".", lw=1, ms=3, color=_color(cu),
                label=cu + (f" (at {floor:g}: exact)" if exact else ""))
        bad = rows[~finite | (rows["nonfinite_frac"].fillna(0) > 0)]
        if len(bad):  # a band at the top of the axes: inf/NaN has no place on the error scale
            ax.scatter(bad["index"], [0.96] * len(bad), marker="x", color=_color(cu), label=f"{cu}: inf/NaN",
                       transform=ax.get_xaxis_transform(), clip_on=False)
    if log:
        ax.set_yscale("log")
        ax.axhline(2 ** -11, color="grey", ls=":", lw=1)
        ax.text(0.995, 2 ** -11, "FP16 rounding (2^-11) ", fontsize=7, color="grey", va="bottom", ha="right",
                transform=ax.get_yaxis_transform())
    ax.set_xlabel("op (program order; labels: module outputs)")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.set_title("Error along depth, per compute unit (vs the exact FP32 program)")
    ax.grid(True, which="major", alpha=0.3)
    _module_ticks(ax, layers[layers["compute_unit"] == report.compute_units[0]])
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _hist_series(h: dict):
    counts = np.asarray(h["counts"], dtype=float)
    total = counts.sum() + h.get("exact", 0) + h.get("below", 0) + h.get("above", 0) + h.get("nonfinite", 0)
    return counts / max(total, 1), total


def _hist_axes(ax, hists, xlabel: str, title: str) -> None:
    """Labels, the FP16 rounding line and the x range shared by the error histograms."""
    _trim_x(ax, hists)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of values")
    ax.set_title(title, fontsize=10)
    ax.axvline(math.log10(2 ** -11), color="grey", ls=":", lw=1)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)


def _trim_x(ax, hists) -> None:
    """Limit the x axis to the bins that hold values (plus one bin each side)."""
    used = [i for h in hists if h for i, c in enumerate(h["counts"]) if c]
    if used:
        lo, hi = max(min(used) - 2, 0), min(max(used) + 3, len(HIST_EDGES) - 1)
        ax.set_xlim(HIST_EDGES[lo], HIST_EDGES[hi])


def error_histograms(report) -> Figure:
    """Per-output histograms of log10 |error| vs torch FP32, one series per compute unit."""
    names = list(dict.fromkeys(report.outputs["output"])) if len(report.outputs) else []
    fig = Figure(figsize=(6 * min(max(len(names), 1), 2), 3.6 * math.ceil(max(len(names), 1) / 2)),
                 layout="constrained")
    if not names:
        return _empty(fig, "no outputs to show")
    centers = (HIST_EDGES[:-1] + HIST_EDGES[1:]) / 2
    cols = min(len(names), 2)
    for k, name in enumerate(names):
        ax = fig.add_subplot(math.ceil(len(names) / 2), cols, k + 1)
        for cu in report.compute_units:
            h = report.histograms.get(("output", cu, name))
            if not h:
                continue
            frac, total = _hist_series(h)
            extra = []
            if h.get("exact"):
                extra.append(f"{h['exact'] / total:.0%} exact")
            if h.get("nonfinite"):
                extra.append(f"{h['nonfinite'] / total:.0%} inf/NaN")
            ax.step(centers, frac, where="mid", color=_color(cu),
                    label=cu + (f" ({', '.join(extra)})" if extra else ""))
        _hist_axes(ax, [report.histograms.get(("output", cu, name)) for cu in report.compute_units],
                   "log10 |converted model - torch FP32| per value", f"output {name}")
    fig.suptitle("Output error distribution per compute unit")
    return fig


def layer_histogram(report, layer: str) -> Figure:
    """Histogram of log10 |error| of one layer (an op output name, op name or module path)."""
    rows = report.layers
    match = rows[(rows["output"] == layer) | (rows["op"] == layer) | (rows["module_output"] == layer)]
    if not len(match):
        mod = rows[rows["module"] == layer]
        match = mod[mod["index"] == mod["index"].max()] if len(mod) else mod
    if not len(match):
        raise ValueError(f"no layer {layer!r}: give an op output, op name or module path from report.layers")
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.add_subplot()
    centers = (HIST_EDGES[:-1] + HIST_EDGES[1:]) / 2
    for r in match.itertuples():
        h = report.histograms.get(("layer", r.compute_unit, r.output))
        if not h:
            continue
        frac, total = _hist_series(h)
        ax.step(centers, frac, where="mid", color=_color(r.compute_unit), label=r.compute_unit)
    first = match.iloc[0]
    _hist_axes(ax, [report.histograms.get(("layer", r.compute_unit, r.output)) for r in match.itertuples()],
               "log10 |device - exact FP32 program| per value",
               f"{first.op_type} {first.output} (module {first.module!r})")
    return fig


def fp16_range(report, kind: str = "activation") -> Figure:
    """max |x| (and smallest non-zero |x|) per op against FP16's limits, from FP32 reference values."""
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    rng = report.fp16_range
    if rng is None or not len(rng):
        return _empty(fig, "no FP16 range data")
    rows = rng[rng["kind"] == kind]
    if kind == "activation":
        rows = rows.sort_values("index")
        x = rows["index"].to_numpy(dtype=float)
    else:
        x = np.arange(len(rows), dtype=float)
    ax = fig.add_subplot()
    hi = rows["max_abs"].to_numpy(dtype=float)
    lo = rows["min_abs_nonzero"].to_numpy(dtype=float)
    over = rows["overflow_frac"].to_numpy(dtype=float) > 0
    flush = rows["flush_frac"].to_numpy(dtype=float) > 0
    ax.scatter(x[~over], np.maximum(hi[~over], 1e-30), s=10, color="#1f77b4", label="max |x|")
    ax.scatter(x[over], hi[over], s=28, color="#d62728", marker="^", label="max |x| above 65504")
    ax.scatter(x[~flush], np.where(np.isfinite(lo[~flush]), lo[~flush], np.nan), s=8, color="#9ecae1",
               label="smallest non-zero |x|")
    ax.scatter(x[flush], lo[flush], s=28, color="#ff7f0e", marker="v", label="flushes to 0 in FP16")
    ax.set_yscale("log")
    ax.axhline(FP16_MAX, color="#d62728", lw=1)
    ax.text(0.995, FP16_MAX, "FP16 max 65504 ", ha="right", va="bottom", fontsize=7, color="#d62728",
            transform=ax.get_yaxis_transform())
    ax.axhspan(FP16_MIN_SUBNORMAL, FP16_MIN_NORMAL, color="#ff7f0e", alpha=0.12)
    ax.text(0.995, FP16_MIN_NORMAL, "subnormal band (2^-24 .. 2^-14) ", ha="right", va="top", fontsize=7,
            color="#ff7f0e", transform=ax.get_yaxis_transform())
    ax.axhline(FP16_MIN_SUBNORMAL, color="#ff7f0e", lw=1, ls="--")
    ax.set_ylabel("|x| (FP32 reference values)")
    ax.set_xlabel("op (program order)" if kind == "activation" else "weight / constant")
    ax.set_title("FP16 range per op: what would overflow or flush if held in FP16")
    ax.grid(True, which="major", alpha=0.3)
    if kind == "activation":
        flagged = [f"op {int(r.index)}: {r.op_type}" + (f" ({r.module})" if r.module else "") +
                   (" > 65504" if r.overflow_frac > 0 else " flushes")
                   for r in rows.itertuples() if r.overflow_frac > 0 or r.flush_frac > 0]
        if flagged:  # one box, not labels that collide when flagged ops sit side by side
            more = f"\n... and {len(flagged) - 6} more" if len(flagged) > 6 else ""
            ax.text(0.995, 0.5, "\n".join(flagged[:6]) + more, transform=ax.transAxes, ha="right", va="center",
                    fontsize=7, bbox=dict(boxstyle="round", facecolor="white", alpha=0.85, edgecolor="#999"))
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def compute_unit_divergence(report, max_rows: int = 40) -> Figure:
    """Heatmap: relative difference between compute-unit pairs, per layer (module outputs first)."""
    div = report.divergence
    fig = Figure(figsize=(7, 6), layout="constrained")
    if div is None or not len(div):
        return _empty(fig, "needs at least two compute units")
    pairs = list(dict.fromkeys(div["pair"]))
    layers = report.layers[report.layers["compute_unit"] == report.compute_units[0]]
    outs = layers[layers["module_output"].notna()]["output"].tolist() or layers["output"].tolist()
    if len(outs) > max_rows:
        idx = np.linspace(0, len(outs) - 1, max_rows).round().astype(int)
        outs = [outs[i] for i in sorted(set(idx))]
    label = {r.output: (r.module_output or f"{r.op_type} {r.output}") for r in layers.itertuples()}
    grid = np.full((len(outs), len(pairs)), np.nan)
    table = div.set_index(["output", "pair"])["rel_diff"]
    for i, o in enumerate(outs):
        for j, p in enumerate(pairs):
            if (o, p) in table.index:
                v = table.loc[(o, p)]
                grid[i, j] = v if np.isfinite(v) else 1.0
    ax = fig.add_subplot()
    shown = np.where(grid > 0, grid, np.nan)
    finite = shown[np.isfinite(shown)]
    if finite.size:
        im = ax.imshow(shown, aspect="auto", cmap="magma_r",
                       norm=LogNorm(vmin=max(finite.min(), 1e-8), vmax=max(finite.max(), 1e-7)))
        fig.colorbar(im, ax=ax, label="relative difference (max |a-b| / max |b|)")
    else:
        ax.imshow(np.zeros_like(grid), aspect="auto", cmap="Greys")
    zero = grid == 0
    for i, j in zip(*np.nonzero(zero)):
        ax.text(j, i, "=", ha="center", va="center", fontsize=7, color="grey")
    ax.set_xticks(range(len(pairs)))
    ax.set_xticklabels(pairs, rotation=20, ha="right", fontsize=8)
    ax.set_yticks(range(len(outs)))
    ax.set_yticklabels([label.get(o, o) for o in outs], fontsize=7)
    ax.set_xlabel("compute-unit pair")
    ax.set_ylabel("layer (program order)")
    ax.set_title("Where compute units disagree (\"=\" identical)")
    return fig


def compression(report, tolerance: float = 1e-2) -> Figure:
    """Per compressed layer: the error its compressed weights add (local; a dash: the same op with its
    weights uncompressed, the precision's share) beside the error that arrives from upstream, per
    compute unit, and its weight SNR; from ``report.compression``."""
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    table = getattr(report, "compression", None)
    if table is None or not len(table):
        return _empty(fig, "no compressed weights in this conversion")
    ax, ax_snr = fig.subplots(1, 2, width_ratios=[2.2, 1])
    layers = list(dict.fromkeys(table.sort_values("index")["op"]))
    names = [f"{m or op}" for op, m in table.drop_duplicates("op").set_index("op").loc[layers, "module"].items()]
    units = [cu for cu in report.compute_units if cu in set(table["compute_unit"])] or \
        list(dict.fromkeys(table["compute_unit"]))
    width = 0.8 / max(len(units), 1)
    x = np.arange(len(layers))
    for i, cu in enumerate(units):
        rows = table[table.compute_unit == cu].drop_duplicates("op").set_index("op").reindex(layers)
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, rows.local_rel_err, width * 0.9, color=_color(cu), label=f"{cu}: added here (local)")
        plain = rows.uncompressed_local_rel_err.to_numpy(float) if "uncompressed_local_rel_err" in rows else pos * np.nan
        has = np.isfinite(plain) & (plain > 0)
        ax.scatter(pos[has], plain[has], marker="_", color="black", s=120, zorder=3,
                   label="same op, weights uncompressed" if i == 0 else None)
        up = rows.upstream_rel_err.to_numpy(float)
        shown = up > 0  # nothing arrives at the first layer: no marker on a log axis
        ax.scatter(pos[shown], up[shown], marker="v", color="black", s=18, zorder=3,
                   label="arrives from upstream" if i == 0 else None)
    ax.axhline(tolerance, color="#7f7f7f", ls="--", lw=1, label=f"tolerance {tolerance:g}")
    ax.set_yscale("log")
    columns = [c for c in ("local_rel_err", "upstream_rel_err", "uncompressed_local_rel_err") if c in table]
    values = np.concatenate([table[c].to_numpy(float) for c in columns] + [[tolerance]])
    values = values[np.isfinite(values) & (values > 0)]
    ax.set_ylim(values.min() / 3, values.max() * 3)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("relative error")
    kinds = ", ".join(dict.fromkeys(table["compression"]))
    ax.set_title(f"What each layer's compressed weights add ({kinds})", fontsize=9)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="outside lower center", ncol=3)
    snr = table.drop_duplicates("op").set_index("op").reindex(layers)
    ax_snr.barh(names, snr.weight_snr_db.fillna(0), color="#7f7f7f")
    ax_snr.invert_yaxis()
    ax_snr.set_xlabel("weight SNR (dB, higher is closer)")
    ax_snr.set_title("Weight error alone", fontsize=9)
    return fig


def step_errors(report, compute_unit: str | None = None, metric: str = "rel_err", floor: float = 1e-9) -> Figure:
    """A step x layer heatmap of ``metric`` for one compute unit (default: the one that goes wrong first),
    layers in program order, with the first bad step marked."""
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    steps = report.steps
    if steps is None or not len(steps):
        return _empty(fig, "no per-step numbers: diagnose with steps=[...] (one input dict per decoding step)")
    first = report.first_bad_step
    if compute_unit is None:
        bad = {cu: s for cu, s in first.items() if s is not None}
        compute_unit = min(bad, key=bad.get) if bad else report.compute_units[0]
    rows = steps[(steps["compute_unit"] == compute_unit) & (steps["kind"] == "layer")]
    if not len(rows):
        return _empty(fig, f"no per-step layer numbers for {compute_unit}")
    order = rows.groupby("name")["index"].min().sort_values().index.tolist()
    grid = rows.pivot_table(index="name", columns="step", values=metric, aggfunc="max").reindex(order)
    values = grid.to_numpy(dtype=float)
    shown = np.where(np.isfinite(values), np.maximum(values, floor), np.nan)
    ax = fig.add_subplot()
    finite = shown[np.isfinite(shown)]
    norm = LogNorm(vmin=max(float(finite.min()), floor), vmax=max(float(finite.max()), floor * 10)) if finite.size \
        else None
    im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm)
    nonfinite = ~np.isfinite(values) & ~np.isnan(values)
    ys, xs = np.nonzero(nonfinite)
    ax.scatter(xs, ys, marker="x", color="red", s=18, label="inf / NaN")
    ax.set_xticks(range(len(grid.columns)))
    ax.set_xticklabels([str(c) for c in grid.columns], fontsize=7)
    ax.set_yticks(range(len(order)))
    ax.set_yticklabels(order, fontsize=7)
    ax.set_xlabel("decoding step")
    bad_step = first.get(compute_unit)
    if bad_step is not None:
        ax.axvline(list(grid.columns).index(bad_step) - 0.5, color="red", lw=1.5, ls="--",
                   label=f"first bad step ({bad_step})")
    if len(xs) or bad_step is not None:  # below the heatmap, right of the axis label: inside it would hide cells
        ax.legend(loc="upper right", bbox_to_anchor=(1, -0.04), ncol=2, fontsize=7, frameon=False)
    ax.set_title(f"{compute_unit}: {METRIC_LABELS.get(metric, metric)} per layer and step")
    fig.colorbar(im, ax=ax, label=metric)
    return fig


def state_errors(report, metric: str = "rel_err", floor: float = 1e-9) -> Figure:
    """Each state's (and output's) ``metric`` along the steps, one panel per compute unit."""
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    steps = report.steps
    if steps is None or not len(steps):
        return _empty(fig, "no per-step numbers: diagnose with steps=[...] (one input dict per decoding step)")
    units = list(report.compute_units)
    axes = fig.subplots(1, len(units), sharey=True, squeeze=False)[0]
    for ax, cu in zip(axes, units):
        mine = steps[(steps["compute_unit"] == cu) & steps["kind"].isin(["state", "output"])]
        for (name, kind), rows in mine.groupby(["name", "kind"], sort=False):
            rows = rows.sort_values("step")
            vals = np.where(np.isfinite(rows[metric]), np.maximum(rows[metric].to_numpy(dtype=float), floor), np.nan)
            ax.plot(rows["step"], vals, marker="o", ms=3, lw=1.2 if kind == "state" else 2.2,
                    ls="-" if kind == "state" else "--", label=f"{kind} {name}")
        bad = report.first_bad_step.get(cu)
        if bad is not None:
            ax.axvline(bad, color="red", lw=1, ls=":")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.set_title(cu + (f" (first bad step {bad})" if bad is not None else ""), fontsize=9)
        ax.set_xlabel("decoding step")
    axes[0].set_ylabel(METRIC_LABELS.get(metric, metric))
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the panels, not over a curve
    return fig
