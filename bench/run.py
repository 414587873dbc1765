"""Speed and memory of the emulator and of diagnose(), as ratios against a torch forward, in one process.

    python bench/run.py [--repeats N] [--json out.json]

For a ResNet-style and a transformer sample (their ``size="bench"`` builds), a
torch eager forward (FP32) is the baseline.

* Emulator: the FP32 conversion under CPU_ONLY and the FP16 conversion under each of the
  three profiles; median of ``repeats`` ratios, each timed right next to its torch
  forwards, after a warm-up.
  Targets: <= 1.5 (FP32), <= 2.5 (FP16 profiles).
* diagnose(): three compute units, every layer, local re-runs on. Timed on the
  Conversion (``diagnose(conv)``: the diagnosis alone - the target: <= 4 torch
  forwards per compute-unit run) and on the model (``diagnose(model, inputs,
  options)``: adds the trace, the input check and the conversion-cache lookup;
  conversions are cached, their first-time cost is reported apart). Peak memory
  of ``diagnose(conv)``: the largest rise of the process's resident memory during
  the call (sampled every 0.5 ms, freed memory handed back to the OS before each
  measurement; median of 5 calls), divided by the same for one torch forward.
  "runs only" times ``diagnose(conv)`` with every statistic replaced by a no-op:
  the floor the runs themselves set under any statistics.
* Whole-model runs alone: the hooked torch FP32 forward, timed alone, plus the four emulator
  runs above (the FP32 program and each unit's FP16 run), summed and divided by three: what
  one diagnosis costs per unit before any op is re-run alone and before any statistic - a
  floor no bookkeeping can go under. The golden FP64 forward is timed beside it: a diagnosis
  makes it only where the FP32 program and torch FP32 disagree (``golden="auto"``), so it is
  not in the floor; "with golden" adds it.
* The transformer at BERT-base's shape (``size="base"``): ``diagnose(conv)``, its runs only
  and its memory, to show how the ratios move with model size.
* ``--malloc-env "MALLOC_...=..."`` (``make bench`` passes what ``make lab`` runs notebooks
  with): ``diagnose(conv)`` timed again in a fresh process under those glibc settings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rss import PeakRSS, parse_malloc_env, trim

import coreml_lab as cl
import sample_models
from coreml_lab.emulator import EmulatedModel

MODELS = {"resnet": "deep_residual", "transformer": "transformer_mask"}


def forward_of(model, inputs):
    """The baseline: one torch eager forward of ``model`` (no autograd)."""
    def forward():
        with torch.no_grad():
            model(*inputs)
    return forward


def median_ratio(fn, base_fn, repeats: int, per_base: int = 3) -> tuple[float, float, float]:
    """(median time of ``fn``, median time of ``base_fn``, median of their per-round ratios).

    Each round times ``fn`` once and ``base_fn`` (the median of ``per_base`` calls) right next to
    it, so a slow spell of this shared machine slows both and the ratio stays put.
    """
    fn()
    base_fn()
    times, bases, ratios = [], [], []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        b = []
        for _ in range(per_base):
            t = time.perf_counter()
            base_fn()
            b.append(time.perf_counter() - t)
        bases.append(statistics.median(b))
        ratios.append(times[-1] / bases[-1])
    return statistics.median(times), statistics.median(bases), statistics.median(ratios)


def bench_emulator(repeats: int) -> list[dict]:
    rows = []
    for label, sample in MODELS.items():
        model, inputs, _ = sample_models.build(sample, size="bench")
        conv32 = cl.convert(model, inputs, cl.ConversionOptions(precision="fp32"))
        conv16 = cl.convert(model, inputs, cl.ConversionOptions(precision="fp16"))
        feeds = conv32.example_inputs.as_numpy()
        torch_forward = forward_of(model, inputs)
        runs = [("fp32", "CPU_ONLY", conv32), ("fp16", "CPU_ONLY", conv16), ("fp16", "CPU_AND_GPU", conv16),
                ("fp16", "CPU_AND_NE", conv16)]
        for precision, cu, conv in runs:
            em = EmulatedModel(conv.mlmodel, cu)
            t, base, ratio = median_ratio(lambda: em.predict(feeds), torch_forward, repeats)
            rows.append({"model": label, "precision": precision, "compute_unit": cu,
                         "torch_ms": round(base * 1e3, 2), "emulator_ms": round(t * 1e3, 2),
                         "ratio": round(ratio, 2),
                         "target": 1.5 if precision == "fp32" else 2.5})
    return rows


@contextlib.contextmanager
def runs_only():
    """diagnose() with every statistic replaced by a no-op: what the runs alone cost (torch
    FP32, the golden FP64 forward where needed, the reference program, each unit and the local re-runs) - the
    floor under any statistics. An analysis aid for the bench, not a mode of the library."""
    from unittest import mock

    from coreml_lab import fp16, metrics, statistics

    no_measures = statistics.Measures(max_abs=lambda a: (0.0, True), reference_sums=lambda r: (0.0, 0.0))
    with mock.patch.object(metrics.ErrorStats, "add", lambda self, *a, **k: None), \
            mock.patch.object(metrics.DiffStats, "measure", staticmethod(lambda *a, **k: metrics.DiffStats())), \
            mock.patch.object(fp16.RangeStats, "add", lambda self, x: None), \
            statistics.measuring(no_measures):
        yield


def median_rise(fn, repeats: int) -> float:
    """Median over ``repeats`` calls of the rise of resident memory during ``fn`` (:class:`rss.PeakRSS`,
    freed memory handed back to the OS first; the allocator's reuse of freed memory makes single
    measurements vary by tens of percent)."""
    rises = []
    for _ in range(repeats):
        trim()
        with PeakRSS(interval=0.0005) as m:
            fn()
        rises.append(m.peak - m.start)
    return statistics.median(rises)


def bench_whole_runs(repeats: int, emulator_rows: list[dict]) -> list[dict]:
    """The whole-model runs a diagnosis is made of, each timed alone (ratio to a torch forward)."""
    from coreml_lab.reference import feed_tensors, lazy_double_copy, run_torch

    rows = []
    for label, sample in MODELS.items():
        model, inputs, _ = sample_models.build(sample, size="bench")
        conv = cl.convert(model, inputs, cl.ConversionOptions(precision="fp16"))
        tensors = feed_tensors(conv.example_inputs.as_numpy(), conv.example_inputs)
        leaves = {n for n, m in model.named_modules() if n and not any(True for _ in m.children())}
        twin = lazy_double_copy(model)

        torch_forward = forward_of(model, inputs)
        _, _, golden = median_ratio(lambda: run_torch(model, tensors, dtype=torch.float64, double_model=twin),
                                    torch_forward, repeats)
        _, _, hooked = median_ratio(lambda: run_torch(model, tensors, leaves), torch_forward, repeats)
        emulated = {(r["precision"], r["compute_unit"]): r["ratio"] for r in emulator_rows if r["model"] == label}
        total = hooked + sum(emulated.values())
        rows.append({"model": label, "golden_fp64": round(golden, 2), "torch_fp32_hooked": round(hooked, 2),
                     "fp32_program": emulated[("fp32", "CPU_ONLY")],
                     "units": [emulated[("fp16", cu)] for cu in ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")],
                     "sum_per_cu": round(total / 3, 2), "sum_with_golden_per_cu": round((total + golden) / 3, 2)})
    return rows


def diagnosis_figures(conv, torch_forward, repeats: int, rises: int) -> dict:
    """``diagnose(conv)`` against ``torch_forward``: time, ratio per unit, the same with statistics
    as no-ops, and peak memory (median of ``rises`` calls each)."""
    def diagnose_conversion():
        return cl.diagnose(conv, progress=False)

    diag_s, base, ratio = median_ratio(diagnose_conversion, torch_forward, repeats)
    with runs_only():
        _, _, runs_ratio = median_ratio(diagnose_conversion, torch_forward, repeats)
    torch_rise = median_rise(torch_forward, rises)
    diag_rise = median_rise(diagnose_conversion, rises)
    return {"torch_ms": round(base * 1e3, 2), "diagnose_s": round(diag_s, 3), "ratio_per_cu": round(ratio / 3, 2),
            "runs_only_ratio_per_cu": round(runs_ratio / 3, 2),
            "torch_peak_mb": round(torch_rise / 2 ** 20, 1), "diagnose_peak_mb": round(diag_rise / 2 ** 20, 1),
            "memory_ratio": round(diag_rise / max(torch_rise, 1), 2)}


def bench_diagnose(repeats: int) -> list[dict]:
    rows = []
    for label, sample in MODELS.items():
        model, inputs, _ = sample_models.build(sample, size="bench")
        options = cl.ConversionOptions(precision="fp16")
        t = time.perf_counter()
        conv = cl.convert(model, inputs, options)
        cl.convert(model, inputs, options.replace(precision="fp32"))
        convert_s = time.perf_counter() - t
        torch_forward = forward_of(model, inputs)
        row = {"model": label, "target": 4.0, **diagnosis_figures(conv, torch_forward, repeats, 5)}
        with runs_only():
            _, _, no_local_ratio = median_ratio(lambda: cl.diagnose(conv, progress=False, local=False),
                                                torch_forward, repeats)
        model_s, _, model_ratio = median_ratio(lambda: cl.diagnose(model, inputs, options, progress=False),
                                               torch_forward, max(3, repeats // 2))
        rows.append({**row, "runs_only_no_local_per_cu": round(no_local_ratio / 3, 2),
                     "diagnose_model_s": round(model_s, 3), "model_ratio_per_cu": round(model_ratio / 3, 2),
                     "conversion_s": round(convert_s, 2)})
    return rows


def bench_base(repeats: int) -> dict:
    """``diagnose(conv)`` of the transformer at BERT-base's shape: how the ratios move with size."""
    model, inputs, _ = sample_models.build("transformer_mask", size="base")
    conv = cl.convert(model, inputs, cl.ConversionOptions(precision="fp16"))
    return {"model": "transformer (base)", **diagnosis_figures(conv, forward_of(model, inputs), repeats, 3)}


def diagnose_ratios(repeats: int) -> dict:
    """Per model, ``diagnose(conv)``'s median ratio per compute unit (the subprocess of --malloc-env)."""
    out = {}
    for label, sample in MODELS.items():
        model, inputs, _ = sample_models.build(sample, size="bench")
        conv = cl.convert(model, inputs, cl.ConversionOptions(precision="fp16"))
        _, _, ratio = median_ratio(lambda: cl.diagnose(conv, progress=False), forward_of(model, inputs), repeats)
        out[label] = round(ratio / 3, 2)
    return out


def with_malloc_env(settings: dict, repeats: int) -> dict:
    """:func:`diagnose_ratios` in a fresh process under the glibc ``settings``: glibc reads them at
    start-up, so they cannot be switched on in this process."""
    env = {**os.environ, **settings}
    out = subprocess.run([sys.executable, __file__, "--ratios-only", "--repeats", str(repeats)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--malloc-env", default="",
                    help="glibc settings (NAME=value ...) to time diagnose(conv) under as well, as `make lab` runs it")
    ap.add_argument("--ratios-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    malloc_settings = parse_malloc_env(args.malloc_env)
    if args.ratios_only:
        print(json.dumps(diagnose_ratios(args.repeats)))
        return 0
    rows = bench_emulator(args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} interleaved rounds")
    print(f"{'model':12} {'precision':9} {'compute unit':13} {'torch ms':>9} {'emulator ms':>12} {'ratio':>6} {'target':>7}")
    for r in rows:
        flag = "" if r["ratio"] <= r["target"] else "  (above target)"
        print(f"{r['model']:12} {r['precision']:9} {r['compute_unit']:13} {r['torch_ms']:9.2f} "
              f"{r['emulator_ms']:12.2f} {r['ratio']:6.2f} {r['target']:7.1f}{flag}")
    whole = bench_whole_runs(args.repeats, rows)
    print()
    print("whole-model runs of one diagnosis, each alone (ratio to a torch forward); their sum per unit")
    print("  (the golden FP64 run is made only where the FP32 program and torch FP32 disagree: not in the sum)")
    print(f"{'model':12} {'golden FP64':>12} {'torch FP32':>11} {'FP32 prog':>10} {'CPU/GPU/NE FP16':>16} "
          f"{'sum / 3':>8} {'with golden':>12}")
    for r in whole:
        units = "/".join(f"{u:.2f}" for u in r["units"])
        print(f"{r['model']:12} {r['golden_fp64']:12.2f} {r['torch_fp32_hooked']:11.2f} {r['fp32_program']:10.2f} "
              f"{units:>16} {r['sum_per_cu']:8.2f} {r['sum_with_golden_per_cu']:12.2f}")
    diag = bench_diagnose(args.repeats)
    print()
    print("diagnose(): 3 compute units, every layer, local error")
    print("  of a Conversion (the diagnosis alone), and of the model (+ trace, input check, cache lookup)")
    print("  runs only: the same with statistics replaced by no-ops (the floor under any statistics);")
    print("  no local: the same without the per-op local re-runs")
    print(f"{'model':12} {'torch ms':>9} {'diagnose s':>11} {'per-CU ratio':>13} {'target':>7} "
          f"{'runs only':>10} {'no local':>9} {'of model s':>11} {'per-CU':>7} {'torch MB':>9} {'diagnose MB':>12} "
          f"{'mem ratio':>10} {'convert s':>10}")
    for r in diag:
        flag = "" if r["ratio_per_cu"] <= r["target"] else "  (above target)"
        print(f"{r['model']:12} {r['torch_ms']:9.2f} {r['diagnose_s']:11.3f} {r['ratio_per_cu']:13.2f} "
              f"{r['target']:7.1f} {r['runs_only_ratio_per_cu']:10.2f} {r['runs_only_no_local_per_cu']:9.2f} "
              f"{r['diagnose_model_s']:11.3f} {r['model_ratio_per_cu']:7.2f} "
              f"{r['torch_peak_mb']:9.1f} {r['diagnose_peak_mb']:12.1f} "
              f"{r['memory_ratio']:10.2f} {r['conversion_s']:10.2f}{flag}")
    base = bench_base(max(5, args.repeats // 2))
    print()
    print("the transformer at BERT-base's shape (12 layers, dim 768, 128 tokens): diagnose(conversion)")
    print(f"{'model':20} {'torch ms':>9} {'per-CU ratio':>13} {'runs only':>10} {'mem ratio':>10}")
    print(f"{base['model']:20} {base['torch_ms']:9.1f} {base['ratio_per_cu']:13.2f} "
          f"{base['runs_only_ratio_per_cu']:10.2f} {base['memory_ratio']:10.2f}")
    kept = {}
    if malloc_settings:
        kept = with_malloc_env(malloc_settings, args.repeats)
        print()
        print(f"diagnose(conversion) per compute unit with freed memory kept for reuse ({args.malloc_env}):")
        for label, ratio in kept.items():
            flag = "" if ratio <= 4.0 else "  (above target)"
            print(f"{label:12} {ratio:6.2f}{flag}")
    if args.json:
        args.json.write_text(json.dumps({"emulator": rows, "whole_runs": whole, "diagnose": diag,
                                         "diagnose_base": base, "diagnose_malloc_kept": kept}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
