"""A selection of coremltools' own op tests, run with the emulator in place of Core ML.

The selection covers the op semantics coremltools' tests found off in the emulator (issue 11,
point 6): invalid scatter indices with and without ``validate_indices`` (iOS17 and iOS18
definitions), and LSTMs fed packed batch-first sequences through the torch frontend. Each case
is one of coremltools' own parametrisations, called as coremltools defines it; the comparison
with the values it expects runs through :mod:`coremltools_harness`. A case coremltools itself
marks xfail (a device regression it tracks) stays xfail.
"""

from __future__ import annotations

import coremltools_harness as harness

harness.set_environment()  # before coremltools' testing_reqs builds the backend lists

import coremltools as ct  # noqa: E402
import pytest  # noqa: E402

# modules, not classes: a Test* class in this namespace would be collected whole
from coremltools.converters.mil.frontend.torch.test import test_torch_ops as torch_ops  # noqa: E402
from coremltools.converters.mil.mil.ops.tests.iOS17 import test_scatter_gather as ios17  # noqa: E402

pytestmark = pytest.mark.slow


def _cases(method, keep=lambda args: True):
    """coremltools' own parametrisation of ``method``: ML Program backends only."""
    (mark,) = [m for m in method.pytestmark if m.name == "parametrize"]
    out = []
    for args in mark.args[1]:
        backend = args[1]
        name = getattr(backend, "backend", backend[0] if isinstance(backend, tuple) else None)
        if name == "mlprogram" and keep(args):
            out.append(args)
    return out


def _id(args) -> str:
    parts = []
    for a in args[1:]:
        if hasattr(a, "opset_version"):
            parts.append(f"{a.opset_version.name}-{a.precision}")
        elif isinstance(a, tuple):
            parts.append("-".join(map(str, a)))
        else:
            parts.append(str(a).replace(" ", ""))
    return "-".join(parts)


@pytest.fixture(autouse=True)
def _emulator_for_core_ml(monkeypatch):
    harness.install(monkeypatch)


SCATTER = _cases(ios17.TestScatter.test_ios17_invalid_indices)
ALONG = _cases(ios17.TestScatterAlongAxis.test_ios17_invalid_indices)
ND = _cases(ios17.TestScatterNd.test_ios17_invalid_indices)
# FP32 backends: the FP16 ones compare at 0.5 / 5e-2 and would hide a state mix-up
PACKED = _cases(torch_ops.TestLSTMWithPackedSequence.test_lstm, keep=lambda args: args[1][1] == "fp32")


def test_the_selection_is_coremltools_own():
    # coremltools runs its iOS17 tests on the iOS17 opset only (RUN_BACKWARD_COMPATIBILITY unset)
    assert len(SCATTER) == 16 and len(ALONG) == 8 and len(ND) == 8 and len(PACKED) == 16
    assert {a[1].opset_version for a in SCATTER + ALONG + ND} == {ct.target.iOS17}
    assert {a[1].precision for a in SCATTER} == {"fp16", "fp32"}


@pytest.mark.parametrize("args", SCATTER, ids=_id)
def test_scatter_invalid_indices(args):
    ios17.TestScatter().test_ios17_invalid_indices(*args)


@pytest.mark.parametrize("args", ALONG, ids=_id)
def test_scatter_along_axis_invalid_indices(args):
    ios17.TestScatterAlongAxis().test_ios17_invalid_indices(*args)


@pytest.mark.parametrize("args", ND, ids=_id)
def test_scatter_nd_invalid_indices(args):
    ios17.TestScatterNd().test_ios17_invalid_indices(*args)


@pytest.mark.parametrize("args", PACKED, ids=_id)
def test_lstm_with_packed_sequence(args):
    torch_ops.TestLSTMWithPackedSequence().test_lstm(*args)
