"""Cold diagnose(model, inputs, options) and the conversion alone, with the FP16 program derived from the FP32
conversion (one conversion from torch) against the former two conversions, as ratios in one process.

    python bench/one_conversion.py [--repeats N] [--units CPU_ONLY,...]

"before" switches the derivation off and takes the FP32 reference through coremltools' op-mapping helper, as
diagnose did before; "after" is today's path. Each run starts from an empty conversion cache. The two are timed
alternately, so a slow spell of the shared machine slows both.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import coreml_lab as cl
import sample_models
from coreml_lab.convert import prepare, reference_options

derivation = importlib.import_module("coreml_lab.derivation")
diagnosis = importlib.import_module("coreml_lab.diagnosis")
conversion_cache = importlib.import_module("coreml_lab.conversion_cache")

CASES = [("deep_residual", "bench"), ("transformer_mask", "bench"), ("transformer_mask", "base")]


def former_reference(options, prep):
    """The FP32 reference as diagnose made it before: a second conversion, through the op-mapping helper."""
    return cl.convert(None, options=reference_options(options), prepared=prep, layer_mapping=True)


class Before:
    """The former path: the FP16 program converted from torch, the FP32 reference through the op-mapping helper."""

    def __enter__(self):
        self.wanted, self.reference = derivation.wanted, diagnosis._reference_conversion
        derivation.wanted = lambda *a: False
        diagnosis._reference_conversion = lambda conv, opts, prep: former_reference(opts, prep)

    def __exit__(self, *exc):
        derivation.wanted, diagnosis._reference_conversion = self.wanted, self.reference


def cold(fn):
    with tempfile.TemporaryDirectory() as root:
        os.environ["COREML_LAB_CACHE"] = root
        conversion_cache._RECENT.clear()
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--units", default="CPU_ONLY,CPU_AND_GPU,CPU_AND_NE")
    parser.add_argument("--cases", default=",".join(f"{n}:{s}" for n, s in CASES))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    units = args.units.split(",")
    options = cl.ConversionOptions()
    for case in args.cases.split(","):
        name, size = case.split(":")
        model, inputs, _ = sample_models.build(name, size=size)
        rows = {"diagnose": ([], []), "convert": ([], [])}
        for _ in range(args.repeats):
            for which, ctx in ((0, Before), (1, None)):
                def run_diagnose():
                    cl.diagnose(model, inputs, options, compute_units=units, progress=False)

                def run_convert():
                    prep = prepare(model, inputs)
                    conv = cl.convert(None, options=options, prepared=prep)
                    if ctx is not None:  # the former path converted the reference too
                        former_reference(options, prep)
                    return conv

                for key, fn in (("convert", run_convert), ("diagnose", run_diagnose)):
                    if ctx is not None:
                        with ctx():
                            rows[key][which].append(cold(fn))
                    else:
                        rows[key][which].append(cold(fn))
        for key, (before, after) in rows.items():
            b, a = statistics.median(before), statistics.median(after)
            print(f"{name}:{size:5s} {key:9s} before {b:7.2f}s  after {a:7.2f}s  after/before {a / b:.2f}", flush=True)


if __name__ == "__main__":
    main()
