"""Reports name the device profile and Neural Engine generation behind every emulated unit, with the facts' sources."""

from __future__ import annotations

import json

import pytest
import torch

import coreml_lab as cl
from coreml_lab import htmlreport
from coreml_lab.emulator import ne_profile
from coreml_lab.environment import environment, facts_rows, profile_lines


@pytest.fixture(scope="module")
def m1_report():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    return cl.diagnose(model, (torch.rand(1, 4),), cl.ConversionOptions(),
                       compute_units=("CPU_ONLY", "CPU_AND_NE", ne_profile("M1")), runtime="emulator", progress=False)


def test_environment_names_each_units_profile_and_variant(m1_report):
    units = m1_report.environment["compute_units"]
    assert list(units) == m1_report.compute_units and len(units) == 3
    assert units["CPU_ONLY"]["variant"] is None and units["CPU_ONLY"]["devices"] == ["CPU"]
    assert units["CPU_AND_NE"]["variant"] == "M5" and units["CPU_AND_NE"]["default_variant"] is True
    m1 = next(p for label, p in units.items() if label not in ("CPU_ONLY", "CPU_AND_NE"))
    assert m1["variant"] == "M1" and m1["default_variant"] is False and "A14" in m1["chip_generation"]
    # the M1-only width-slice gain is a fact of the M1 profile alone; the 2^15 ceiling of both
    m1_facts = {f["fact"] for f in m1["facts"]}
    m5_facts = {f["fact"] for f in units["CPU_AND_NE"]["facts"]}
    assert "width_slice_gain" in m1_facts and "width_slice_gain" not in m5_facts
    assert {"mac_ceiling", "nan_to_inf"} <= m1_facts & m5_facts
    assert all(f["source"] and f["chips"] for f in m1["facts"])


def test_summary_says_which_generation_modelled_the_neural_engine(m1_report):
    text = m1_report.summary()
    assert "CPU_AND_NE modelled as Neural Engine generation M5 (A15 and later, M2 and later); facts and sources: "\
        "docs/device_profiles.md" in text
    assert "modelled as Neural Engine generation M1 (M1 and A14); facts" in text
    assert "facts and sources: docs/device_profiles.md" in text
    assert "CPU_ONLY modelled" not in text


def test_bundle_keeps_the_provenance(m1_report, tmp_path):
    json.dumps(m1_report.environment, allow_nan=False)  # plain JSON
    back = cl.load_report(m1_report.save(tmp_path / "run"))
    assert back.environment == m1_report.environment
    assert profile_lines(back.environment) == profile_lines(m1_report.environment)


def test_html_environment_has_the_facts_table(m1_report):
    page = htmlreport.render(m1_report)
    assert "<h2>Device profiles</h2>" in page and "Neural Engine generation M1" in page
    rows = facts_rows(m1_report.environment)
    slice_row = next(r for r in rows if r["fact"] == "width_slice_gain")
    assert "ane-guide" in slice_row["source"] and slice_row["chips"] == "M1, A14"
    assert "CPU_AND_NE" not in slice_row["compute_units"].split(", ")
    assert len({r["fact"] for r in rows}) == len(rows)  # each fact once
    for r in rows:
        assert f"<td>{r['fact']}</td>" in page
    assert "ane-guide (github.com/sbryngelson/ane-guide)" in page


def test_measured_runs_carry_no_profile():
    assert "compute_units" not in environment("coreml", {"CPU_AND_NE": ne_profile()})
    assert profile_lines(environment("coreml", {"CPU_AND_NE": ne_profile()})) == []
    assert environment("emulator", {"CPU_AND_NE": ne_profile()})["compute_units"]["CPU_AND_NE"]["variant"] == "M5"
