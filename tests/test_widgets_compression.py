"""The panel's compression controls and its Compression tab (issue 15)."""

from __future__ import annotations

import coremltools.optimize.coreml as cto
import pandas as pd
import pytest
from matplotlib.figure import Figure

import coreml_lab as cl
from coreml_lab import widgets
from coreml_lab.compression import SPEC_FORMS, as_compression


@pytest.fixture
def shown(monkeypatch):
    """What the dashboard displays (no kernel here to capture it in the tabs' Output widgets)."""
    items = []
    monkeypatch.setattr(widgets, "display", items.append)
    return items


def test_compression_dropdown_offers_the_specs_and_feeds_the_options():
    panel = widgets.lab(sample="compression_outlier")
    assert panel.compression.options == ("none", *SPEC_FORMS) and panel.compression.value == "none"
    assert panel.options().compression is None
    panel.compression.value = "palettize4"
    assert panel.options().compression == as_compression("palettize4")
    assert "Compression" in widgets.TABS
    # a panel opened with the user's own OptimizationConfig keeps it, as its own choice
    config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="uniform", nbits=6))
    own = widgets.lab(sample="compression_outlier", options=cl.ConversionOptions(compression=config))
    assert own.compression.value == widgets.YOUR_CONFIG
    assert own.options().compression == as_compression(config)
    spec = widgets.lab(sample="compression_outlier", options=cl.ConversionOptions(compression="int8-per-tensor"))
    assert spec.compression.value == "int8-per-tensor"


def test_run_shows_the_compression_table_plot_and_fix(shown):
    panel = widgets.lab(sample="compression_outlier")
    panel.target.value = "iOS18"
    panel.compression.value = "int8-per-tensor"
    panel.compute_units.value = ("CPU_ONLY",)
    panel.runtime.value = "emulator"
    report = panel.run()
    assert report.options.compression == as_compression("int8-per-tensor") and len(report.compression) == 4
    tables = [x for x in shown if isinstance(x, pd.DataFrame) and "weight_snr_db" in x.columns]
    assert len(tables) == 1 and list(tables[0].module) == [f"blocks.{i}" for i in range(4)]
    figures = [x for x in shown if isinstance(x, Figure)]
    assert any(f.axes and "compressed weights add" in f.axes[0].get_title() for f in figures)
    assert any(getattr(x, "description", "").startswith("Find layers to leave uncompressed") for x in shown)
    shown.clear()
    fix = panel.find_uncompressed(tolerance=0.05, time_budget=60)
    assert fix is panel.compression_fix and fix.found and fix.sensitivity.module.iloc[0] == "blocks.2"
    assert any(isinstance(x, Figure) for x in shown)
    assert any("op_name_configs" in getattr(x, "value", "") for x in shown)


def test_uncompressed_run_says_there_is_nothing_compressed(shown):
    panel = widgets.lab(sample="compression_outlier")
    panel.compute_units.value = ("CPU_ONLY",)
    panel.runtime.value = "emulator"
    panel.run()
    assert any("no compressed weights" in getattr(x, "value", "") for x in shown)


def test_a_spec_the_target_rejects_is_shown_in_the_panel():
    panel = widgets.lab(sample="compression_outlier")
    panel.target.value = "iOS16"
    panel.compression.value = "int4-per-block32"
    panel.compute_units.value = ("CPU_ONLY",)
    panel.runtime.value = "emulator"
    with pytest.raises(ValueError, match="minimum deployment target iOS18"):  # a CompressionError
        panel.run()
    assert "iOS18" in panel.error.value and "cl-error" in panel.error.value and not panel.button.disabled
