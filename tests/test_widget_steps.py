"""The panel's Steps control and Steps tab: stateful models are diagnosed step by step from the panel."""

from __future__ import annotations

import sample_models
from coreml_lab.widgets import STEPS_TAB, Lab
from sample_models import kv_decoder


def _tab(panel, title):
    titles = [panel.tabs.get_title(i) for i in range(len(panel.tabs.children))]
    assert title in titles, titles
    return panel.tabs.children[titles.index(title)]


def test_steps_tab_shows_the_first_bad_step_of_the_overflow_decoder(capsys):
    panel = Lab(sample="kv_decoder (overflow)")
    assert not panel.steps.disabled and panel.steps.layout.display != "none"
    assert panel.target.value == "iOS18"  # states need iOS18: a stateful sample sets it
    assert panel.steps.max == kv_decoder.MAX_LEN
    panel.steps.value = 10
    panel.compute_units.value = ("CPU_ONLY", "CPU_AND_NE")
    assert [sorted(f) for f in panel.step_feeds()] == [["pos", "token"]] * 10
    report = panel.run()
    assert report.first_bad_step == {"CPU_ONLY": None, "CPU_AND_NE": 8}
    tab = _tab(panel, STEPS_TAB)
    assert panel.steps_summary in tab.children and panel.steps_plots in tab.children
    text = panel.steps_summary.value
    assert "First bad step of 10" in text and "CPU_AND_NE step 8" in text and "blocks.1.attn" in text, text
    assert "CPU_ONLY none" in text and "<table" in text  # the line, then report.first_bad() as a table
    # the step x layer heatmap and the state errors are displayed in the tab (printed outside a notebook)
    shown = capsys.readouterr().out
    assert "Figure(1000x460)" in shown and "Figure(1000x360)" in shown, shown[-2000:]


def test_steps_control_follows_the_model_and_user_steps():
    panel = Lab(sample="healthy")
    assert panel.steps.disabled and panel.steps.layout.display == "none"
    assert panel.step_feeds() is None
    panel.model_choice.value = "kv_decoder"
    assert not panel.steps.disabled and panel.steps.layout.display != "none"
    assert len(panel.step_feeds()) == panel.steps.value
    panel.model_choice.value = "healthy"
    assert panel.steps.disabled
    panel.compute_units.value = ("CPU_ONLY",)
    panel.run()  # a model without steps: the tab says how to get them
    assert "no steps: pick a stateful model" in panel.steps_summary.value
    # your own model with its step inputs: the control picks how many of them, at most all
    model, example, _ = sample_models.build("kv_decoder", config="overflow")
    steps = kv_decoder.step_inputs(6)
    mine = Lab(model, example, steps=steps)
    assert not mine.steps.disabled and mine.steps.max == 6
    mine.steps.value = 4
    assert mine.step_feeds() == steps[:4]
