"""Peak memory of a multi-step diagnosis against the number of steps (issue 16): not a timed test.

Each measurement runs in a fresh process: the ``kv_decoder`` sample (64 cache slots) is
converted and diagnosed for one step first (conversion, compilation, imports: the baseline
high-water mark), then ``diagnose(..., steps=...)`` runs N steps; the figure is the rise of the
process's peak RSS (``resource.getrusage``) over that baseline, and tracemalloc's peak of
Python allocations during the N-step run. Usage: ``python bench/steps_memory.py [4 64]``.
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, tracemalloc
import coreml_lab as cl
from sample_models import kv_decoder
n = int(sys.argv[1])
model, example, _ = kv_decoder.build(max_len=64)
opts = cl.ConversionOptions(target="iOS18")
cl.diagnose(model, example, opts, steps=kv_decoder.step_inputs(1, max_len=64), progress=False)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
rep = cl.diagnose(model, example, opts, steps=kv_decoder.step_inputs(n, max_len=64), progress=False)
_, py_peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"steps": n, "rows": len(rep.steps), "baseline_kib": base, "peak_kib": peak,
                  "rise_kib": peak - base, "python_peak_kib": py_peak // 1024}))
"""


def measure(n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    counts = [int(a) for a in sys.argv[1:]] or [4, 64]
    for n in counts:
        print(measure(n))
