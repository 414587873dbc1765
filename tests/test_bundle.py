"""Run bundles: exact round trips; truncated, tampered or escaping bundles are refused safely."""

import json
import math
import zipfile

import numpy as np
import pandas as pd
import pytest

import coreml_lab as cl
import sample_models
from coreml_lab.bundle import BundleError


@pytest.fixture(scope="module")
def report():
    model, inputs, _ = sample_models.build("fp16_overflow")
    return cl.diagnose(model, inputs, progress=False)


def _frames_equal(a: pd.DataFrame, b: pd.DataFrame):
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for col in a.columns:
        for x, y in zip(a[col].tolist(), b[col].tolist()):
            if isinstance(x, float) and math.isnan(x):
                assert isinstance(y, float) and math.isnan(y), col
            else:
                assert x == y, (col, x, y)


@pytest.mark.parametrize("suffix", ["", ".zip"])
def test_bundle_round_trips_exactly(report, tmp_path, suffix):
    path = report.save(tmp_path / f"run{suffix}")
    back = cl.load_report(path)
    for name in ("layers", "outputs", "fp16_range", "references", "first_nonfinite", "divergence"):
        _frames_equal(getattr(report, name), getattr(back, name))
    assert back.histograms == report.histograms
    assert back.summary() == report.summary()
    assert back.culprits().equals(report.culprits())
    assert back.options == report.options and back.compute_units == report.compute_units
    assert back.environment["runtime"] == "emulator" and back.environment["measured"] is False
    for cu in report.compute_units:
        for oa, ob in zip(report.runs["outputs"][cu], back.runs["outputs"][cu]):
            assert oa.keys() == ob.keys() and all(np.array_equal(oa[k], ob[k], equal_nan=True) for k in oa)
    assert np.array_equal(report.runs["inputs"][0]["frames"], back.runs["inputs"][0]["frames"])
    assert [m.text for m in back.messages] == [m.text for m in report.messages]
    # plots work from a loaded bundle too (a teammate without the model)
    assert back.plot_layer_errors() is not None and back.plot_fp16_range() is not None


def test_bundle_is_data_only(report, tmp_path):
    path = report.save(tmp_path / "run")
    assert sorted(p.name for p in path.iterdir()) == ["histograms.npz", "manifest.json", "runs.npz", "summary.txt",
                                                       "tables.npz"]
    json.loads((path / "manifest.json").read_text())  # standard JSON (no NaN literals)
    for npz in ("tables.npz", "histograms.npz", "runs.npz"):
        with np.load(path / npz, allow_pickle=False) as z:
            assert all(z[k].dtype != object for k in z.files)


def test_truncated_zip_is_refused(report, tmp_path):
    path = report.save(tmp_path / "run.zip")
    data = path.read_bytes()
    cut = tmp_path / "cut.zip"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated or damaged"):
        cl.load_report(cut)


def test_tampered_file_is_refused(report, tmp_path):
    path = report.save(tmp_path / "run")
    (path / "summary.txt").write_text("everything is fine")
    with pytest.raises(BundleError, match="summary.txt.*SHA-256"):
        cl.load_report(path)
    path = report.save(tmp_path / "run2")
    (path / "runs.npz").unlink()
    with pytest.raises(BundleError, match="missing"):
        cl.load_report(path)


def test_escaping_member_paths_are_refused_and_nothing_is_written(report, tmp_path):
    good = report.save(tmp_path / "run.zip")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr("../../escaped.txt", "gotcha")
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    with pytest.raises(BundleError, match="leaves the bundle"):
        cl.load_report(evil)
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before
    assert not (tmp_path.parent / "escaped.txt").exists()
    manifest = json.loads(zipfile.ZipFile(good).read("manifest.json"))
    manifest["sha256"]["../outside.txt"] = "0" * 64
    bad = tmp_path / "bad_manifest.zip"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, json.dumps(manifest) if info.filename == "manifest.json" else src.read(info))
    with pytest.raises(BundleError, match="outside the bundle"):
        cl.load_report(bad)


def test_not_a_bundle_and_foreign_folders(report, tmp_path):
    with pytest.raises(FileNotFoundError, match="no bundle"):
        cl.load_report(tmp_path / "missing")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to write"):
        report.save(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    with pytest.raises(BundleError, match="no manifest"):
        cl.load_report(tmp_path / "notes")


def test_compare_reports_finds_where_two_runs_differ(report, tmp_path):
    back = cl.load_report(report.save(tmp_path / "run"))
    same = cl.compare_reports(report, back)
    assert (same[same.kind == "output"].max_abs_diff.fillna(0) == 0).all() and same.same_inputs.all()
    # another "machine": FP32 conversion of the same model on the same inputs
    model, inputs, _ = sample_models.build("fp16_overflow")
    other = cl.diagnose(model, inputs, cl.ConversionOptions(precision="fp32"), progress=False)
    diff = cl.compare_reports(report, other, labels=("fp16", "fp32"))
    out = diff[diff.kind == "output"].set_index("compute_unit")
    assert out.loc["CPU_ONLY", "max_abs_diff"] < 1e-2
    assert not np.isfinite(out.loc["CPU_AND_NE", "max_abs_diff"])
    assert (diff.kind == "layer").any() and "rel_err_fp16" in diff.columns


def test_failed_report_round_trips(tmp_path):
    model, inputs, _ = sample_models.build("fp16_io")
    rep = cl.diagnose(model, inputs, cl.ConversionOptions(target="iOS15"), progress=False)
    back = cl.load_report(rep.save(tmp_path / "failed.zip"))
    assert not back.ok and back.error == rep.error and back.error_explanation == rep.error_explanation
