"""A Report as one self-contained HTML page (figures embedded as PNG): shareable without Python."""

from __future__ import annotations

import base64
import html
import io

import pandas as pd

from .environment import FACTS_DOC, facts_rows


def _figure(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'


def _table(df: pd.DataFrame, columns=None, max_rows: int = 60) -> str:
    if df is None or not len(df):
        return "<p><i>none</i></p>"
    view = df[columns] if columns else df
    return view.head(max_rows).to_html(index=False, float_format=lambda x: f"{x:.3g}", border=0, classes="t")


def _profiles(env: dict) -> list[str]:
    """The environment's device profiles: which profile and variant modelled each unit, and the
    facts they encode with their sources and chips."""
    units = env.get("compute_units") or {}
    if not units:
        return []
    items = "".join(f"<li>{html.escape(label)}: profile {html.escape(str(p.get('profile')))}"
                    + (f", Neural Engine generation {html.escape(str(p['variant']))} "
                       f"({html.escape(str(p.get('chip_generation')))})" if p.get("variant") else "")
                    + "</li>" for label, p in units.items())
    facts = pd.DataFrame(facts_rows(env), columns=["fact", "statement", "source", "chips", "compute_units"])
    return ["<h2>Device profiles</h2>", f"<ul>{items}</ul>",
            f"<p>Facts the profiles encode (all of them, with the sources' names: {html.escape(FACTS_DOC)}):</p>",
            _table(facts, max_rows=200)]


def render(report, title: str = "coreml_lab diagnosis") -> str:
    """The page: verdict, outputs, culprits, compressed weights, figures, FP16 range, messages, environment."""
    parts = [f"<h1>{html.escape(title)}</h1>", f"<pre>{html.escape(report.summary())}</pre>"]
    env = report.environment or {}
    if env:
        plain = {k: v for k, v in env.items() if k != "compute_units"}
        parts.append("<p>" + html.escape(", ".join(f"{k}: {v}" for k, v in plain.items())) + "</p>")
        parts += _profiles(env)
    if report.ok:
        parts += ["<h2>Outputs</h2>", _table(report.outputs, ["compute_unit", "output", "max_abs_err", "mean_abs_err",
                                                               "rel_err", "snr_db", "nonfinite_frac", "top1_agree"])]
        parts += ["<h2>Culprits</h2>", _table(report.culprits(10))]
        compression = getattr(report, "compression", None)
        if compression is not None and len(compression):
            parts += ["<h2>Compressed weights</h2>", _figure(report.plot_compression()),
                      _table(compression, ["compute_unit", "op", "module", "compression", "weight_snr_db",
                                           "weight_max_abs_err", "local_rel_err", "upstream_rel_err", "rel_err"])]
        parts += ["<h2>Error along depth</h2>", _figure(report.plot_layer_errors())]
        parts += ["<h2>Output error histograms</h2>", _figure(report.plot_error_histograms())]
        parts += ["<h2>FP16 range</h2>", _figure(report.plot_fp16_range())]
        if len(report.compute_units) > 1:
            parts += ["<h2>Compute-unit divergence</h2>", _figure(report.plot_compute_unit_divergence())]
        rng = report.fp16_range
        flagged = rng[(rng.overflow_frac > 0) | (rng.flush_frac > 0)] if len(rng) else rng
        parts += ["<h2>Values outside FP16 range</h2>", _table(flagged, ["kind", "op", "op_type", "module", "max_abs",
                                                                          "min_abs_nonzero", "overflow_frac",
                                                                          "flush_frac"])]
    explained = [m for m in report.messages if getattr(m, "explanation", None) is not None]
    if explained:
        parts.append("<h2>Converter messages</h2><ul>" + "".join(
            f"<li><code>{html.escape(m.text[:200])}</code><br/>{html.escape(m.explanation.title)}: "
            f"{html.escape(m.explanation.fix)}</li>" for m in explained) + "</ul>")
    style = ("<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
             "table.t{border-collapse:collapse;font-size:12px}table.t td,table.t th{padding:2px 6px;"
             "border-bottom:1px solid #ddd}img{max-width:100%}</style>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{style}</head>" \
           f"<body>{''.join(parts)}</body></html>"
