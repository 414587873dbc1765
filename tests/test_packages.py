"""Existing Core ML packages diagnose: on their own, with the torch model they came from, compressed, from the CLI
and the panel; bad packages, feeds and source models are refused with errors naming what was expected.

How the culprits are compared with the kit's own diagnosis of the same model (the kit converts the sample at
FP16 for iOS18; the plain package is that very conversion saved, the palettized one is it palettized to 4 bits
with coremltools, both then loaded from disk):

* plain package + its torch model: the same program against the same reference, so the culprit table must be
  the kit's, row for row (unit, op, op type, module, reason);
* package on its own (plain or palettized): its reference is its own program in exact FP32, so what the
  package bakes in (weights rounded to FP16, or palettized) is invisible, while every FP16 execution hazard
  stays. The kit's top culprit among those not blamed on a constant (a constant is already rounded in the
  package) must be the package's top culprit; a sample the kit finds no culprit in has none here either;
* palettized package + its torch model: the 4-bit weights are real error against the torch model's FP32
  conversion. The kit's top culprit must still be among the culprits, and every culprit the kit does not
  have must be an op that reads a palettized weight: compression is blamed on the compressed ops only.
"""

from __future__ import annotations

import functools

import coremltools as ct
import coremltools.optimize.coreml as cto
import numpy as np
import pytest
import torch

import coreml_lab as cl
import sample_models
from coreml_lab import cli
from coreml_lab.packages import NO_FRAMEWORK_NOTE, PackageError

#: CPU_ONLY (exact on the CPU, nearly free: it shares the reference's steps) and the Neural Engine, where
#: FP16 trouble shows; the GPU adds time and no new culprit on these samples
UNITS = ("CPU_ONLY", "CPU_AND_NE")
#: samples run in the quick suite; the others are `slow`
QUICK = ("fp16_overflow", "healthy")
#: weights with more than this many elements are palettized (coremltools' default, 2048, leaves most of
#: the samples' small layers alone)
WEIGHT_THRESHOLD = 256


def _samples():
    return [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow) for n in sample_models.SAMPLES]


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """name -> the sample, the kit's FP16 (iOS18) conversion and its diagnosis, the saved plain and 4-bit
    palettized packages and their feeds; made once per sample."""
    root = tmp_path_factory.mktemp("packages")

    @functools.cache
    def make(name):
        model, inputs, _ = sample_models.build(name)
        conversion = cl.convert(model, inputs, cl.ConversionOptions(precision="fp16", target="iOS18"))
        plain = root / f"{name}.mlpackage"
        conversion.mlmodel.save(str(plain))
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(
            nbits=4, mode="kmeans", weight_threshold=WEIGHT_THRESHOLD))
        palettized = root / f"{name}_palettized.mlpackage"
        cto.palettize_weights(conversion.mlmodel, config).save(str(palettized))
        kit = cl.diagnose(conversion, compute_units=UNITS, progress=False)
        return {"model": model, "inputs": inputs, "conversion": conversion, "kit": kit, "plain": plain,
                "palettized": palettized, "feeds": conversion.example_inputs.as_numpy()}

    return make


def _rows(report, n=10):
    return [(r.compute_unit, r.op, r.op_type, r.module, r.reason) for r in report.culprits(n).itertuples()]


def _ops(report, n=10):
    return [r.op for r in report.culprits(n).itertuples()]


def _top_hazard(report):
    """The top culprit op not blamed on a constant (a constant is rounded already in a saved package)."""
    for r in report.culprits(10).itertuples():
        if not r.reason.startswith("its constant"):
            return r.op
    return None


def _largest_weight(program):
    """Elements of the largest weight of a conv / linear / matmul (what the palettizer compresses)."""
    sizes = [np.size(v.val) for op in next(iter(program.functions.values())).operations
             if op.op_type in ("conv", "linear", "matmul", "conv_transpose")
             for v in op.inputs.values() if not isinstance(v, (list, tuple)) and v.op is not None
             and v.op.op_type == "const" and v.val is not None]
    return max(sizes, default=0)


def _reads_compressed_weight(program, op_name):
    function = next(iter(program.functions.values()))
    op = next(o for o in function.operations if o.name == op_name)
    return any(v.op is not None and v.op.op_type.startswith("constexpr_")
               for x in op.inputs.values() for v in (x if isinstance(x, (list, tuple)) else (x,)))


def _check_own_reference(report, package_path):
    assert report.ok and report.reference == "package program (exact FP32)"
    assert NO_FRAMEWORK_NOTE in report.notes and "no framework reference" in report.summary()
    layers = report.layers
    paired = layers.dropna(subset=["reference"])
    assert len(paired) and (paired["reference"] == paired["output"]).all()  # identity pairing
    assert len(report.fp16_range) and set(report.divergence["pair"]) == {"CPU_ONLY vs CPU_AND_NE"}
    assert report.conversion.method == "loaded" and report.conversion.source.path == package_path


@pytest.mark.parametrize("name", _samples())
def test_a_saved_package_diagnoses_like_the_kits_own_conversion(subject, name):
    s = subject(name)
    kit = s["kit"]
    alone = cl.diagnose(str(s["plain"]), s["feeds"], compute_units=UNITS, progress=False)
    _check_own_reference(alone, s["plain"])
    with_source = cl.diagnose(s["model"], s["inputs"], mlmodel=str(s["plain"]), compute_units=UNITS, progress=False)
    assert with_source.reference == "framework" and NO_FRAMEWORK_NOTE not in with_source.notes
    assert _rows(with_source) == _rows(kit)  # the same program against the same reference
    if len(kit.culprits(10)):
        assert with_source.layers["module"].notna().any()  # ops named by torch modules, paired by structure
    assert _top_hazard(alone) == _top_hazard(kit)
    if not len(kit.culprits(10)):
        assert not len(alone.culprits(10))


@pytest.mark.parametrize("name", _samples())
def test_a_palettized_package_diagnoses_with_and_without_its_torch_model(subject, name):
    s = subject(name)
    kit = s["kit"]
    alone = cl.diagnose(str(s["palettized"]), s["feeds"], compute_units=UNITS, progress=False)
    _check_own_reference(alone, s["palettized"])
    if _largest_weight(s["conversion"].program) > WEIGHT_THRESHOLD:
        assert "constexpr_lut_to_dense" in alone.conversion.op_types()
    assert _top_hazard(alone) == _top_hazard(kit)
    if not len(kit.culprits(10)):
        assert not len(alone.culprits(10))
    with_source = cl.diagnose(s["model"], s["inputs"], mlmodel=str(s["palettized"]), compute_units=UNITS,
                              progress=False)
    if _top_hazard(kit) is not None:
        assert _top_hazard(kit) in _ops(with_source, 20)
    program = with_source.conversion.program
    new = [op for op in _ops(with_source, 20) if op not in _ops(kit, 20)]
    assert all(_reads_compressed_weight(program, op) for op in new), new


def test_a_package_made_with_plain_coremltools_diagnoses(tmp_path):
    class Net(torch.nn.Module):  # the forward's argument is not named as the package's input
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 16)
            self.out = torch.nn.Linear(16, 4)

        def forward(self, features):
            return self.out(torch.exp(self.proj(features)) * 3000.0)

    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(1, 8) * 4
    mlmodel = ct.convert(torch.jit.trace(model, x), inputs=[ct.TensorType(name="x", shape=(1, 8))],
                         convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16)
    path = tmp_path / "plain.mlpackage"
    mlmodel.save(str(path))
    alone = cl.diagnose(str(path), {"x": x.numpy()}, compute_units=UNITS, progress=False)
    assert alone.ok and alone.reference != "framework"
    with_source = cl.diagnose(model, (x,), mlmodel=str(path), compute_units=UNITS, progress=False)
    assert with_source.reference == "framework"
    assert set(with_source.layers["module"].dropna()) >= {"proj", "out"}
    # the same blame either way: the op whose FP16 result overflows
    assert _top_hazard(alone) == _top_hazard(with_source) is not None
    # an in-memory MLModel is diagnosed too, and is not modified
    loaded = ct.models.MLModel(str(path), skip_model_load=True)
    report = cl.diagnose(loaded, {"x": x.numpy()}, compute_units=UNITS, progress=False)
    assert _top_hazard(report) == _top_hazard(alone) and getattr(loaded, "_mil_program", None) is None


def test_a_report_of_a_package_saves_and_loads_what_it_was_measured_against(subject, tmp_path):
    s = subject("fp16_overflow")
    report = cl.diagnose(str(s["plain"]), s["feeds"], compute_units=UNITS, progress=False, local=False)
    loaded = cl.load_report(report.save(tmp_path / "run.zip"))
    assert loaded.reference == report.reference and NO_FRAMEWORK_NOTE in loaded.notes


# ------------------------------------------------------------------------------------------- bad input

def test_a_neural_network_model_is_refused_with_how_to_reconvert(tmp_path):
    model, inputs, _ = sample_models.build("healthy")
    nn_model = ct.convert(torch.jit.trace(model, inputs), inputs=[ct.TensorType(name="x", shape=inputs[0].shape)],
                          convert_to="neuralnetwork")
    path = tmp_path / "old.mlmodel"
    nn_model.save(str(path))
    feeds = {"x": inputs[0].numpy()}
    for given in (str(path), nn_model):
        with pytest.raises(PackageError, match="not an ML Program.*convert_to='mlprogram'"):
            cl.diagnose(given, feeds, progress=False)
    with pytest.raises(PackageError, match="not an ML Program"):
        cl.diagnose(model, inputs, mlmodel=str(path), progress=False)


def test_a_folder_that_is_not_a_package_is_refused(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    with pytest.raises(PackageError, match="folder but not a Core ML package: it has no Manifest.json"):
        cl.diagnose(str(folder), {"x": np.zeros(3, np.float32)}, progress=False)
    with pytest.raises(FileNotFoundError, match="expected a .mlpackage"):
        cl.diagnose(str(tmp_path / "missing.mlpackage"), {"x": np.zeros(3, np.float32)}, progress=False)


def test_feeds_that_do_not_match_the_package_list_what_it_expects(subject):
    s = subject("fp16_overflow")
    path, feeds = str(s["plain"]), s["feeds"]
    (name, value), = feeds.items()
    expected = f"{name}: fp32 {tuple(value.shape)}"
    kept = value.copy()
    cases = [
        ({"wrong": value}, r"missing \['frames'\]; unexpected \['wrong'\]"),
        ({name: value[..., :10]}, r"'frames' has shape \(1, 8, 10\)"),
        ({name: value.astype(np.int32)}, r"'frames' has dtype int32 \(expected fp32\)"),
    ]
    for bad, words in cases:
        with pytest.raises(PackageError, match=words) as err:
            cl.diagnose(path, bad, progress=False)
        assert expected in str(err.value)
    with pytest.raises(PackageError, match=r"inputs\[1\] do not match"):
        cl.diagnose(path, feeds, inputs=[feeds, {name: value[:, :4]}], progress=False)
    with pytest.raises(PackageError, match="needs example inputs"):
        cl.diagnose(path, None, progress=False)
    assert np.array_equal(feeds[name], kept)  # nothing the user gave was changed


def test_a_torch_model_the_package_did_not_come_from_is_refused(subject):
    s = subject("fp16_overflow")
    frames = s["inputs"][0]
    other = torch.nn.Sequential(torch.nn.Linear(frames.shape[-1], 5), torch.nn.ReLU()).eval()
    with pytest.raises(PackageError, match=r"not the one the package came from.*the outputs differ \(the package's: var_\d+ \(1, 4\); "
                       r"the torch model's conversion: var_\d+ \(1, 8, 5\)") as err:
        cl.diagnose(other, (frames,), mlmodel=str(s["plain"]), progress=False)
    assert "ops have no counterpart" in str(err.value)
    wider = torch.nn.Linear(3, 3).eval()
    with pytest.raises(PackageError, match="its inputs differ.*the package expects frames: fp32"):
        cl.diagnose(wider, (torch.zeros(1, 3),), mlmodel=str(s["plain"]), progress=False)


# ------------------------------------------------------------------------------------------- CLI and panel

def test_the_cli_diagnoses_a_package_from_an_npz_or_random_inputs(subject, tmp_path, capsys):
    s = subject("fp16_overflow")
    npz = tmp_path / "inputs.npz"
    np.savez(npz, **s["feeds"])
    units = ["--compute-units", ",".join(UNITS), "--quiet"]
    assert cli.main(["diagnose", str(s["plain"]), "--inputs", str(npz), *units]) == 1  # overflows: the gate fails
    out = capsys.readouterr().out
    assert "no framework reference" in out and "FAIL" in out and "mul" in out
    (name, value), = s["feeds"].items()
    shape = ",".join(str(d) for d in value.shape)
    assert cli.main(["diagnose", str(s["plain"]), "--input", f"{name}={shape}", *units]) == 0  # small random
    assert "OK: worst output error" in capsys.readouterr().out
    assert cli.main(["diagnose", "sample_models.fp16_overflow:build", "--mlmodel", str(s["plain"]), *units]) == 1
    assert "energy" in capsys.readouterr().out  # culprit named by its torch module
    np.savez(tmp_path / "bad.npz", nope=value)
    assert cli.main(["diagnose", str(s["plain"]), "--inputs", str(tmp_path / "bad.npz"), *units]) == 2
    assert f"The package expects: {name}: fp32" in capsys.readouterr().err


def test_the_panel_diagnoses_a_package_path(subject):
    from coreml_lab.widgets import lab

    s = subject("fp16_overflow")
    panel = lab(s["model"], s["feeds"], package=str(s["plain"]))
    panel.compute_units.value = UNITS
    report = panel.run()
    assert report.reference != "framework" and NO_FRAMEWORK_NOTE in report.notes
    assert not panel.error.value and "done" in panel.status.value
    panel.with_source.value = True
    panel.user_inputs = s["inputs"]
    report = panel.run()
    assert report.reference == "framework" and "energy" in set(report.layers["module"].dropna())
