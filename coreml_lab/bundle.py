"""Run bundles: a Report saved as data only (JSON + .npz, never pickle), to share and compare.

A bundle is a directory, or a ``.zip`` of one, holding:

* ``manifest.json`` - format, environment (OS and version, chip, coremltools/torch versions,
  runtime, whether the numbers were measured on Core ML or emulated), options, messages,
  every table's column layout, and the SHA-256 of every other file;
* ``tables.npz`` - the Report's DataFrames, one array per column (text and other objects as
  JSON strings), so NaN and inf survive exactly;
* ``histograms.npz`` and ``runs.npz`` - error histograms, and the inputs and outputs of each run;
* ``summary.txt`` - the verdict, for people.

Loading checks the format, every file's hash (a truncated or tampered bundle is refused), and
that no member path leaves the bundle. Zips are read in memory: loading writes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from .environment import environment
from .messages import Explanation, Message
from .metrics import compare
from .options import ConversionOptions

FORMAT = "coreml_lab-bundle"
VERSION = 1
TABLES = ("layers", "outputs", "fp16_range", "references", "first_nonfinite", "divergence", "torch_layers",
          "steps", "compression")
FILES = ("tables.npz", "histograms.npz", "runs.npz", "summary.txt")


class BundleError(ValueError):
    """A bundle that cannot be read: not a bundle, truncated, tampered with, or unsafe."""


# ----------------------------------------------------------------------------- encoding

def _json_safe(x):
    """Plain JSON values; non-finite floats become strings so the JSON stays standard."""
    if isinstance(x, float) and not math.isfinite(x):
        return {"__float__": repr(x)}
    if isinstance(x, (np.floating,)):
        return _json_safe(float(x))
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, tuple):
        return {"__tuple__": [_json_safe(v) for v in x]}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    return x


def _json_restore(x):
    if isinstance(x, dict):
        if set(x) == {"__float__"}:
            return float(x["__float__"])
        if set(x) == {"__tuple__"}:
            return tuple(_json_restore(v) for v in x["__tuple__"])
        return {k: _json_restore(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_restore(v) for v in x]
    return x


def _frame_arrays(name: str, df: pd.DataFrame, arrays: dict) -> dict:
    """Store each column as an array; returns the column layout for the manifest."""
    layout = []
    for i, col in enumerate(df.columns):
        key = f"{name}/{i}"
        values = df[col]
        if values.dtype.kind in "fiub":
            arrays[key] = values.to_numpy()
            layout.append({"name": str(col), "kind": "array", "dtype": str(values.dtype)})
        else:
            arrays[key] = np.array([json.dumps(_json_safe(_plain(v))) for v in values], dtype=np.str_)
            layout.append({"name": str(col), "kind": "json"})
    return {"columns": layout, "rows": int(len(df))}


def _plain(v):
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return v
    if isinstance(v, (np.generic,)):
        return v.item()
    return v


def _frame_from_arrays(name: str, layout: dict, arrays) -> pd.DataFrame:
    data = {}
    for i, col in enumerate(layout["columns"]):
        key = f"{name}/{i}"
        if key not in arrays:
            raise BundleError(f"table {name!r} lacks column {col['name']!r}")
        arr = arrays[key]
        if col["kind"] == "array":
            data[col["name"]] = pd.Series(arr, dtype=col["dtype"])
        else:
            data[col["name"]] = pd.Series([_json_restore(json.loads(s)) for s in arr.tolist()], dtype=object)
    df = pd.DataFrame(data, columns=[c["name"] for c in layout["columns"]])
    if len(df) != layout["rows"]:
        raise BundleError(f"table {name!r} has {len(df)} rows, the manifest says {layout['rows']}")
    return df


def _npz_bytes(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def _read_npz(data: bytes) -> dict:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:
        raise BundleError(f"an array file of the bundle cannot be read ({type(exc).__name__}: {exc})") from exc


# ----------------------------------------------------------------------------- save

def bundle_files(report) -> dict[str, bytes]:
    """The files of a bundle (name -> bytes) of a :class:`~.report.Report`, manifest last."""
    tables, layouts = {}, {}
    for name in TABLES:
        df = getattr(report, name, None)
        if df is None:
            df = pd.DataFrame()
        layouts[name] = _frame_arrays(name, df, tables)
    hist_arrays, hist_keys = {}, []
    for i, (key, h) in enumerate(report.histograms.items()):
        hist_keys.append({"key": list(key), **{k: v for k, v in h.items() if k != "counts"}})
        hist_arrays[f"h{i}"] = np.asarray(h["counts"], dtype=np.int64)
    run_arrays: dict = {}

    def store(per_input: list) -> list:
        """Arrays into run_arrays; per input a dict name -> array key."""
        index = []
        for values in per_input:
            index.append({})
            for name, arr in values.items():
                key = f"r{len(run_arrays)}"
                run_arrays[key] = np.asarray(arr)
                index[-1][name] = key
        return index

    run_index = {"inputs": store(report.runs.get("inputs", [])),
                 "outputs": {cu: store(per) for cu, per in report.runs.get("outputs", {}).items()},
                 "torch": store(report.runs.get("torch", []))}
    files = {
        "tables.npz": _npz_bytes(tables),
        "histograms.npz": _npz_bytes(hist_arrays),
        "runs.npz": _npz_bytes(run_arrays),
        "summary.txt": report.summary().encode(),
    }
    opts = report.options
    manifest = {
        "format": FORMAT, "version": VERSION,
        "environment": report.environment or environment(report.runtime),
        "options": opts.to_dict() if opts is not None else None,
        "compute_units": list(report.compute_units), "runtime": report.runtime, "n_inputs": report.n_inputs,
        "layer_source": report.layer_source, "error": report.error,
        "error_explanation": _json_safe(report.error_explanation.__dict__) if report.error_explanation else None,
        "messages": [_json_safe(m.to_dict()) for m in report.messages if hasattr(m, "to_dict")],
        "notes": list(report.notes), "reference": report.reference, "tables": layouts, "histograms": _json_safe(hist_keys),
        "runs": run_index,
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
    }
    files["manifest.json"] = json.dumps(manifest, indent=1, allow_nan=False).encode()
    return files


def save_report(report, path) -> Path:
    """Write ``report`` (a :class:`~.report.Report`) as a bundle directory, or a zip when ``path``
    ends with ``.zip``."""
    path = Path(path)
    files = bundle_files(report)
    if path.suffix == ".zip":
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for name, data in files.items():
                z.writestr(name, data)
        tmp.replace(path)
        return path
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{str(path)!r} exists and is not a directory; choose a new bundle path")
        extra = [p.name for p in path.iterdir() if p.name not in (*FILES, "manifest.json")]
        if extra:
            raise FileExistsError(f"{str(path)!r} holds files that are not part of a bundle ({extra[:5]}); "
                                  "refusing to write into it")
    path.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


# ----------------------------------------------------------------------------- load

def _safe_member(name: str) -> bool:
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts and "\\" not in name and name == p.name


def _read_files(path: Path) -> dict[str, bytes]:
    if not path.exists():
        raise FileNotFoundError(f"no bundle at {str(path)!r} (expected a directory or .zip made by report.save)")
    if path.is_dir():
        files = {}
        for p in path.iterdir():
            if p.is_symlink():
                raise BundleError(f"bundle member {p.name!r} is a link; refusing to follow it out of the bundle")
            if p.is_file():
                files[p.name] = p.read_bytes()
        return files
    try:
        with zipfile.ZipFile(path) as z:
            files = {}
            for info in z.infolist():
                if info.is_dir():
                    continue
                if not _safe_member(info.filename):
                    raise BundleError(f"bundle member {info.filename!r} has a path that leaves the bundle; "
                                      "refusing to read it")
                files[info.filename] = z.read(info)
            return files
    except zipfile.BadZipFile as exc:
        raise BundleError(f"{str(path)!r} is not a readable bundle zip (truncated or damaged: {exc})") from exc


def read_bundle(path) -> dict:
    """Read a bundle written by :func:`save_report`: the keyword arguments of the Report it holds
    (tables, histograms, runs; :meth:`.report.Report.load` makes the Report)."""
    path = Path(path)
    files = _read_files(path)
    if "manifest.json" not in files:
        raise BundleError(f"{str(path)!r} has no manifest.json: not a coreml_lab bundle")
    try:
        manifest = json.loads(files["manifest.json"])
    except json.JSONDecodeError as exc:
        raise BundleError(f"the manifest of {str(path)!r} is damaged ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{str(path)!r} is not a coreml_lab bundle (format {manifest.get('format')!r})")
    if manifest.get("version", 0) > VERSION:
        raise BundleError(f"bundle version {manifest['version']} is newer than this coreml_lab reads ({VERSION})")
    for name, digest in manifest.get("sha256", {}).items():
        if not _safe_member(name):
            raise BundleError(f"the manifest names a file outside the bundle: {name!r}")
        if name not in files:
            raise BundleError(f"bundle file {name!r} is missing (truncated bundle?)")
        if hashlib.sha256(files[name]).hexdigest() != digest:
            raise BundleError(f"bundle file {name!r} does not match its recorded SHA-256: it was changed or "
                              "damaged after saving")
    tables = _read_npz(files["tables.npz"])
    frames = {name: _frame_from_arrays(name, layout, tables) for name, layout in manifest["tables"].items()}
    hist_arrays = _read_npz(files["histograms.npz"])
    histograms = {}
    for i, meta in enumerate(_json_restore(manifest.get("histograms", []))):
        key = tuple(meta.pop("key"))
        histograms[key] = {"counts": hist_arrays[f"h{i}"].tolist(), **meta}
    run_arrays = _read_npz(files["runs.npz"])
    idx = manifest.get("runs", {})
    def fetch(per_input: list) -> list:
        try:
            return [{n: run_arrays[k] for n, k in d.items()} for d in per_input]
        except KeyError as exc:
            raise BundleError(f"the run index names an array the bundle lacks ({exc})") from exc

    runs = {"inputs": fetch(idx.get("inputs", [])),
            "outputs": {cu: fetch(per) for cu, per in idx.get("outputs", {}).items()},
            "torch": fetch(idx.get("torch", []))}
    opts = ConversionOptions(**{k: (tuple(v) if k == "fp32_ops" else v) for k, v in manifest["options"].items()
                                if k not in ("inputs", "outputs")}) if manifest.get("options") else None
    explanation = None
    if manifest.get("error_explanation"):
        explanation = Explanation(**manifest["error_explanation"])
    return dict(
        layers=frames.get("layers", pd.DataFrame()), outputs=frames.get("outputs", pd.DataFrame()),
        fp16_range=frames.get("fp16_range", pd.DataFrame()), references=frames.get("references", pd.DataFrame()),
        first_nonfinite=frames.get("first_nonfinite", pd.DataFrame()),
        divergence=frames.get("divergence", pd.DataFrame()), torch_layers=frames.get("torch_layers", pd.DataFrame()),
        compression=frames.get("compression", pd.DataFrame()),
        **({"steps": frames["steps"]} if "steps" in frames else {}),
        histograms=histograms, options=opts, compute_units=manifest.get("compute_units", []),
        runtime=manifest.get("runtime", "emulator"), n_inputs=manifest.get("n_inputs", 0),
        messages=[Message.from_dict(_json_restore(m)) for m in manifest.get("messages", [])],
        layer_source=manifest.get("layer_source", "none"), error=manifest.get("error"),
        error_explanation=explanation, notes=manifest.get("notes", []), runs=runs,
        reference=manifest.get("reference", "framework"),
        environment=manifest.get("environment", {}),
    )


# ----------------------------------------------------------------------------- compare

def compare_reports(a, b, labels=("a", "b")) -> pd.DataFrame:
    """Align two runs of the same model (e.g. two OS versions, or a device vs the emulator).

    One row per (compute unit, output) present in both: how far apart the two runs' outputs
    are (max_abs_diff, rel_diff), each run's error against torch, and whether the inputs were
    the same (``same_inputs``). Then one row per (compute unit, layer output) whose error
    differs by more than 10x between the runs (``kind`` "layer").
    """
    la, lb = labels
    same_inputs = len(a.runs["inputs"]) == len(b.runs["inputs"]) and all(
        da.keys() == db.keys() and all(np.array_equal(da[k], db[k]) for k in da)
        for da, db in zip(a.runs["inputs"], b.runs["inputs"]))
    rows = []
    for cu in [c for c in a.compute_units if c in b.compute_units]:
        outs_a, outs_b = a.runs["outputs"].get(cu, []), b.runs["outputs"].get(cu, [])
        names = sorted(set().union(*[set(o) for o in outs_a]) & set().union(*[set(o) for o in outs_b])) \
            if outs_a and outs_b else []
        for name in names:
            pairs = [(oa[name], ob[name]) for oa, ob in zip(outs_a, outs_b) if name in oa and name in ob]
            if not pairs:
                continue
            m = compare(np.concatenate([p[0].reshape(-1) for p in pairs]),
                        np.concatenate([p[1].reshape(-1) for p in pairs]), classifier=False)
            ea = _metric(a.outputs, cu, name, "rel_err")
            eb = _metric(b.outputs, cu, name, "rel_err")
            rows.append({"kind": "output", "compute_unit": cu, "name": name, "max_abs_diff": m["max_abs_err"],
                         "rel_diff": m["rel_err"], f"rel_err_{la}": ea, f"rel_err_{lb}": eb,
                         "same_inputs": same_inputs})
        la_rows = a.layers[a.layers.compute_unit == cu] if len(a.layers) else a.layers
        lb_rows = b.layers[b.layers.compute_unit == cu] if len(b.layers) else b.layers
        if len(la_rows) and len(lb_rows):
            ja = la_rows.set_index("output")["rel_err"]
            jb = lb_rows.set_index("output")["rel_err"]
            for name in ja.index.intersection(jb.index):
                x, y = float(ja[name]), float(jb[name])
                if _far(x, y):
                    rows.append({"kind": "layer", "compute_unit": cu, "name": name, "max_abs_diff": math.nan,
                                 "rel_diff": math.nan, f"rel_err_{la}": x, f"rel_err_{lb}": y,
                                 "same_inputs": same_inputs})
    cols = ["kind", "compute_unit", "name", "max_abs_diff", "rel_diff", f"rel_err_{la}", f"rel_err_{lb}",
            "same_inputs"]
    return pd.DataFrame(rows, columns=cols)


def _metric(df: pd.DataFrame, cu: str, name: str, col: str) -> float:
    rows = df[(df.compute_unit == cu) & (df.output == name)] if len(df) else df
    return float(rows[col].iloc[0]) if len(rows) else math.nan


def _far(x: float, y: float) -> bool:
    if math.isnan(x) or math.isnan(y):
        return False
    if math.isinf(x) != math.isinf(y):
        return True
    lo, hi = sorted((abs(x), abs(y)))
    return hi > 1e-3 and hi > 10 * max(lo, 1e-12)
