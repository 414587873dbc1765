"""Speed and memory of the emulator and of diagnose(), as ratios against a torch forward, in one process.

    python bench/run.py [--repeats N] [--json out.json]

For a ResNet-style and a transformer sample (their ``size="bench"`` builds), a
torch eager forward (FP32) is the baseline.

* Emulator: the FP32 conversion under CPU_ONLY and the FP16 conversion under the
  GPU and Neural Engine profiles; median of ``repeats`` timed runs after a warm-up.
  Targets: <= 1.5 (FP32), <= 2.5 (FP16 profiles).
* diagnose(): three compute units, every layer, local re-runs on. Timed on the
  Conversion (``diagnose(conv)``: the diagnosis alone - the target: <= 4 torch
  forwards per compute-unit run) and on the model (``diagnose(model, inputs,
  options)``: adds the trace, the input check and the conversion-cache lookup;
  conversions are cached, their first-time cost is reported apart). Peak memory
  of ``diagnose(conv)``: the largest rise of the process's resident memory during
  the call (sampled every 0.5 ms, freed memory handed back to the OS before each
  measurement), divided by the same for one torch forward.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import coreml_lab as cl  # noqa: E402
import sample_models  # noqa: E402
from coreml_lab.emulator import EmulatedModel  # noqa: E402

MODELS = {"resnet": "deep_residual", "transformer": "transformer_mask"}


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_emulator(repeats: int) -> list[dict]:
    rows = []
    for label, sample in MODELS.items():
        model, inputs, _ = sample_models.build(sample, size="bench")
        conv32 = cl.convert(model, inputs, cl.ConversionOptions(precision="fp32"))
        conv16 = cl.convert(model, inputs, cl.ConversionOptions(precision="fp16"))
        feeds = conv32.example_inputs.as_numpy()

        def torch_forward():
            with torch.no_grad():
                model(*inputs)

        base = median_time(torch_forward, repeats)
        runs = [("fp32", "CPU_ONLY", conv32), ("fp16", "CPU_AND_GPU", conv16), ("fp16", "CPU_AND_NE", conv16)]
        for precision, cu, conv in runs:
            em = EmulatedModel(conv.mlmodel, cu)
            t = median_time(lambda: em.predict(feeds), repeats)
            rows.append({"model": label, "precision": precision, "compute_unit": cu,
                         "torch_ms": round(base * 1e3, 2), "emulator_ms": round(t * 1e3, 2),
                         "ratio": round(t / base, 2),
                         "target": 1.5 if precision == "fp32" else 2.5})
    return rows


class PeakRSS:
    """Largest rise of resident memory while the block runs (Linux /proc sampling)."""

    def __enter__(self):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.rise = self.peak - self.base


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def bench_diagnose(repeats: int) -> list[dict]:
    rows = []
    for label, sample in MODELS.items():
        model, inputs, _ = sample_models.build(sample, size="bench")
        options = cl.ConversionOptions(precision="fp16")
        t = time.perf_counter()
        conv = cl.convert(model, inputs, options)
        cl.convert(model, inputs, options.replace(precision="fp32"))
        convert_s = time.perf_counter() - t

        def torch_forward():
            with torch.no_grad():
                model(*inputs)

        def diagnose_conversion():
            return cl.diagnose(conv, progress=False)

        def diagnose_model():
            return cl.diagnose(model, inputs, options, progress=False)

        base = median_time(torch_forward, repeats)
        diag_s = median_time(diagnose_conversion, max(3, repeats // 2))
        model_s = median_time(diagnose_model, max(3, repeats // 2))
        with PeakRSS() as m_torch:
            torch_forward()
        with PeakRSS() as m_diag:
            diagnose_conversion()
        rows.append({"model": label, "torch_ms": round(base * 1e3, 2), "diagnose_s": round(diag_s, 3),
                     "ratio_per_cu": round(diag_s / base / 3, 2), "target": 4.0,
                     "diagnose_model_s": round(model_s, 3), "model_ratio_per_cu": round(model_s / base / 3, 2),
                     "conversion_s": round(convert_s, 2),
                     "torch_peak_mb": round(m_torch.rise / 2 ** 20, 1),
                     "diagnose_peak_mb": round(m_diag.rise / 2 ** 20, 1),
                     "memory_ratio": round(m_diag.rise / max(m_torch.rise, 1), 2)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rows = bench_emulator(args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} runs")
    print(f"{'model':12} {'precision':9} {'compute unit':13} {'torch ms':>9} {'emulator ms':>12} {'ratio':>6} {'target':>7}")
    for r in rows:
        flag = "" if r["ratio"] <= r["target"] else "  (above target)"
        print(f"{r['model']:12} {r['precision']:9} {r['compute_unit']:13} {r['torch_ms']:9.2f} "
              f"{r['emulator_ms']:12.2f} {r['ratio']:6.2f} {r['target']:7.1f}{flag}")
    diag = bench_diagnose(args.repeats)
    print()
    print("diagnose(): 3 compute units, every layer, local error")
    print("  of a Conversion (the diagnosis alone), and of the model (+ trace, input check, cache lookup)")
    print(f"{'model':12} {'torch ms':>9} {'diagnose s':>11} {'per-CU ratio':>13} {'target':>7} "
          f"{'of model s':>11} {'per-CU':>7} {'torch MB':>9} {'diagnose MB':>12} {'mem ratio':>10} "
          f"{'convert s':>10}")
    for r in diag:
        flag = "" if r["ratio_per_cu"] <= r["target"] else "  (above target)"
        print(f"{r['model']:12} {r['torch_ms']:9.2f} {r['diagnose_s']:11.3f} {r['ratio_per_cu']:13.2f} "
              f"{r['target']:7.1f} {r['diagnose_model_s']:11.3f} {r['model_ratio_per_cu']:7.2f} "
              f"{r['torch_peak_mb']:9.1f} {r['diagnose_peak_mb']:12.1f} "
              f"{r['memory_ratio']:10.2f} {r['conversion_s']:10.2f}{flag}")
    if args.json:
        args.json.write_text(json.dumps({"emulator": rows, "diagnose": diag}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
