"""Runs coremltools' own MIL op tests with the emulator in place of Core ML (a test helper only).

coremltools ships its op tests under ``coremltools/converters/mil/mil/ops/tests``; each
builds a MIL program, converts it, and - on macOS only - compares Core ML's prediction with
the values the test expects (``testing_utils.compare_backend``). On any OS this plugin makes
that comparison run, with :class:`coreml_lab.emulator.EmulatedModel` producing the
prediction for the model's compute unit. Nothing in the product is patched.

Use it as a pytest plugin (``-p tests.emulator.coremltools_harness``) or call
:func:`install` in a test module before importing coremltools' test classes. The
environment must say which backends the test parametrisations are built for before
``coremltools.converters.mil.testing_reqs`` is imported: ML Programs only (the emulator
runs no neural networks), FP32 as well as FP16.
"""

from __future__ import annotations

import os

#: read by coremltools.converters.mil.testing_reqs when it is first imported
ENVIRONMENT = {"PYMIL_TEST_TARGETS": "mlprogram", "INCLUDE_MIL_FP32_UNIT_TESTS": "1"}

#: coremltools' op tests, the folder the selections name files under
OP_TESTS = "coremltools/converters/mil/mil/ops/tests"


def set_environment() -> None:
    for key, value in ENVIRONMENT.items():
        os.environ[key] = value


def _emulated_predict(self, data, state=None):
    """``MLModel.predict`` on a Mac, by the emulator under the model's compute unit."""
    from coreml_lab.emulator import EmulatedModel

    unit = getattr(self, "compute_unit", None)
    return EmulatedModel(self, unit.name if unit is not None else "CPU_ONLY").predict(data, state=state)


def _make_state(self):
    from coreml_lab.emulator import EmulatedModel

    return EmulatedModel(self).make_state()


def install(monkeypatch=None) -> None:
    """Route coremltools' op-test comparisons through the emulator (``monkeypatch`` undoes it).

    The MIL op tests compare in ``converters/mil/testing_utils.compare_backend``, the torch
    frontend tests in ``frontend/torch/test/testing_utils.convert_and_compare``: both only on
    macOS (``_IS_MACOS``), both through ``MLModel.predict``.
    """
    import coremltools as ct
    import coremltools.models.utils as ct_utils
    from coremltools.converters.mil import testing_utils

    setter = monkeypatch.setattr if monkeypatch is not None else setattr
    setter(testing_utils, "_IS_MACOS", True)
    try:
        from coremltools.converters.mil.frontend.torch.test import testing_utils as torch_testing_utils
    except ImportError:  # the torch frontend tests are optional
        torch_testing_utils = None
    if torch_testing_utils is not None:
        setter(torch_testing_utils, "_IS_MACOS", True)
    # compare_backend asks for macOS >= 12 for packages
    setter(ct_utils, "_macos_version", lambda: (15, 0))
    setter(ct.models.MLModel, "predict", _emulated_predict)
    setter(ct.models.MLModel, "make_state", _make_state)


def pytest_configure(config):  # as a plugin: patch for the whole run
    set_environment()
    install()
