"""Time to first report, warm diagnosis and peak memory of real architectures at full size, as ratios.

    python bench/real_scale.py [--models resnet50,bert_base] [--repeats N] [--cold-runs K]
                               [--json out.json] [--malloc-env "MALLOC_...=..."] [--tiny]

Hugging Face ``transformers`` models built from their default (standard-size) configs with
random weights - nothing is downloaded: ResNet-50, ConvNeXt-T, MobileViT-S, SegFormer-B0,
ViT-B/16, BERT-base, DistilBERT, CLIP text, T5-small encoder, Whisper-tiny encoder and
Wav2Vec2-base, each with the inputs it is used with (224x224 images, 256 for MobileViT-S,
512 for SegFormer-B0; 128 tokens, 77 for CLIP; 30 s of mel features; 1 s of 16 kHz audio).
FP16 conversion with the default ``ConversionOptions()``, diagnosed on CPU_ONLY,
CPU_AND_GPU and CPU_AND_NE (``diagnose``'s default), through the public API only, so the
figures are those of whatever library is on the path.

Each model runs in a fresh process of its own (memory isolated, conversion cache empty:
``COREML_LAB_CACHE`` points to a new directory). In it, after imports and one tiny
``coremltools.convert`` (the converter's one-time set-up, which both sides below would pay),
the model is built and run forward once; then:

(a) time to first report: the cold ``cl.diagnose(model, inputs, options)``, divided by one
    plain conversion (``torch.jit.trace`` + ``coremltools.convert`` with the same options;
    median of ``--convert-repeats``) plus three torch forwards (median forward x 3), all
    timed in that process. Target <= 1.5.
    Its first use of the model's sizes and op types is the cold diagnosis, so the plain conversion
    timed after it finds memory already faulted in and coremltools' and torch's first calls made:
    "(a) fresh" divides by a plain conversion made first, in a fresh process of its own, instead
    (median of ``--cold-runs`` such processes).
(b) warm ``cl.diagnose(conversion)`` (the conversion from the cache the cold run filled),
    wall time / one torch forward, divided by the three compute units; median of
    ``--repeats`` rounds, each timed right next to its torch forwards. Target <= 4.
(c) peak resident memory during the cold diagnosis over the resident memory after loading
    the model and running one forward (``bench/rss.py``: sampled in a thread, and the
    kernel's high-water mark). Target <= 2. The same for the first warm diagnosis is
    reported beside it.

Beside (a) and (b), their floors: the whole-model runs no diagnosis can do without (one torch FP32
forward, the FP32 program, the FP16 program under each unit's profile), each timed alone
(:func:`floors`); (a)'s floor adds them to the plain conversion. A target below its floor cannot be
met by making the statistics cheaper.

``--cold-runs K`` runs K fresh processes per model and reports the median of (a) and (c)
(the first process also measures (b)). ``--tiny`` builds every architecture at a few layers
and a few dozen channels: a quick check that each one builds, traces, converts and
diagnoses, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rss import parse_malloc_env

ROOT = Path(__file__).resolve().parents[1]
RESULT = "REAL_SCALE_RESULT "
UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
TARGETS = {"first_report_ratio": 1.5, "warm_ratio_per_cu": 4.0, "peak_rss_ratio": 2.0}


# ------------------------------------------------------------------ the architectures

@dataclass(frozen=True)
class Arch:
    """A Hugging Face architecture: its config and model classes, and how it is fed."""

    label: str
    config: str  # transformers config class
    model: str  # transformers model class (or a dotted path inside transformers)
    inputs: str  # image | text | text_ids | mel | audio
    size: int  # image side, tokens or samples at full size
    tiny: dict = field(default_factory=dict)  # config overrides of --tiny
    tiny_size: int = 0
    overrides: dict = field(default_factory=dict)  # config overrides at full size (none: the defaults)
    fan_in_init: bool = False


ARCHITECTURES = {
    "resnet50": Arch("ResNet-50", "ResNetConfig", "ResNetModel", "image", 224,
                     tiny={"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1]}, tiny_size=32),
    "convnext_t": Arch("ConvNeXt-T", "ConvNextConfig", "ConvNextModel", "image", 224,
                       tiny={"hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2}, tiny_size=32),
    # MobileViT's default init (weights and batch-norm scales of std 0.02) shrinks activations to
    # exactly 0 through its deep stack; weights scaled by fan-in keep them at unit scale
    "mobilevit_s": Arch("MobileViT-S", "MobileViTConfig", "MobileViTModel", "image", 256,
                        tiny={"image_size": 32, "hidden_sizes": [32, 40, 48],
                              "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64], "num_attention_heads": 2,
                              "mlp_ratio": 2.0}, tiny_size=32, fan_in_init=True),
    "segformer_b0": Arch("SegFormer-B0", "SegformerConfig", "SegformerForSemanticSegmentation", "image", 512,
                         tiny={"num_encoder_blocks": 2, "depths": [1, 1], "sr_ratios": [2, 1], "hidden_sizes": [16, 32],
                               "num_attention_heads": [1, 2], "patch_sizes": [7, 3], "strides": [4, 2],
                               "mlp_ratios": [2, 2], "decoder_hidden_size": 32}, tiny_size=32,
                         overrides={"num_labels": 150}),  # ADE20k's classes, as segformer-b0-...-ade-512-512
    "vit_b16": Arch("ViT-B/16", "ViTConfig", "ViTModel", "image", 224,
                    tiny={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "intermediate_size": 64, "image_size": 32, "patch_size": 8}, tiny_size=32),
    "bert_base": Arch("BERT-base", "BertConfig", "BertModel", "text", 128,
                      tiny={"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "intermediate_size": 64, "max_position_embeddings": 64}, tiny_size=12),
    "distilbert": Arch("DistilBERT", "DistilBertConfig", "DistilBertModel", "text", 128,
                       tiny={"vocab_size": 128, "dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 64,
                             "max_position_embeddings": 64}, tiny_size=12),
    "clip_text": Arch("CLIP text", "CLIPTextConfig", "CLIPTextModel", "text_ids", 77,
                      tiny={"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "max_position_embeddings": 12}, tiny_size=12),
    "t5_small_encoder": Arch("T5-small encoder", "T5Config", "T5EncoderModel", "text", 128,
                             tiny={"vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
                                   "num_heads": 4}, tiny_size=12),
    "whisper_tiny_encoder": Arch("Whisper-tiny encoder", "WhisperConfig",
                                 "models.whisper.modeling_whisper.WhisperEncoder", "mel", 3000,
                                 tiny={"num_mel_bins": 16, "d_model": 32, "encoder_layers": 2,
                                       "encoder_attention_heads": 4, "encoder_ffn_dim": 64, "decoder_layers": 1,
                                       "decoder_attention_heads": 4, "decoder_ffn_dim": 64,
                                       "max_source_positions": 16, "vocab_size": 128}, tiny_size=32),
    "wav2vec2_base": Arch("Wav2Vec2-base", "Wav2Vec2Config", "Wav2Vec2Model", "audio", 16000,
                          tiny={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "intermediate_size": 64, "conv_dim": (16, 16), "conv_stride": (5, 2),
                                "conv_kernel": (10, 3), "num_conv_pos_embeddings": 16,
                                "num_conv_pos_embedding_groups": 4}, tiny_size=400),
}


def _transformers_attr(dotted: str):
    import importlib

    module, _, name = ("transformers." + dotted).rpartition(".")
    return getattr(importlib.import_module(module), name)


def _fan_in_init(model):
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_parameters()
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.normal_(module.weight, std=1.4 / module.weight[0].numel() ** 0.5)
    return model


def build(name: str, tiny: bool = False):
    """(model in eval mode, inputs by keyword) of architecture ``name``; random weights, seeded."""
    import torch

    arch = ARCHITECTURES[name]
    torch.manual_seed(0)
    config = _transformers_attr(arch.config)(**(arch.tiny if tiny else arch.overrides))
    model = _transformers_attr(arch.model)(config)
    if arch.fan_in_init:
        _fan_in_init(model)
    model.eval().requires_grad_(False)
    size = arch.tiny_size if tiny else arch.size
    if arch.inputs == "image":
        inputs = {"pixel_values": torch.randn(1, 3, size, size)}
    elif arch.inputs in ("text", "text_ids"):
        inputs = {"input_ids": torch.randint(0, config.vocab_size, (1, size))}
        if arch.inputs == "text":
            inputs["attention_mask"] = torch.ones(1, size, dtype=torch.long)
    elif arch.inputs == "mel":  # Whisper's encoder takes exactly 2 x max_source_positions frames
        inputs = {"input_features": torch.randn(1, config.num_mel_bins, 2 * config.max_source_positions)}
    else:
        inputs = {"input_values": torch.randn(1, size)}
    return model, inputs


# ------------------------------------------------------------------ measurements (in the model's process)

def _positional(model, names):
    """``model`` called from positional tensors by keyword, returning its tensors (what a user traces)."""
    import torch

    class Positional(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *args):
            out = self.model(**dict(zip(names, args)), return_dict=False)
            return tuple(o for o in out if isinstance(o, torch.Tensor))

    return Positional().eval()


def plain_conversion(model, inputs, options):
    """``torch.jit.trace`` + ``coremltools.convert`` as a user writes them, with ``options``' arguments."""
    import coremltools as ct
    import numpy as np
    import torch

    ct_inputs = [ct.TensorType(name=n, shape=tuple(t.shape), dtype=np.int32 if not t.is_floating_point() else np.float32)
                 for n, t in inputs.items()]
    with torch.no_grad():
        traced = torch.jit.trace(_positional(model, list(inputs)), tuple(inputs.values()), check_trace=False)
    return ct.convert(traced, inputs=ct_inputs, **options.convert_kwargs())


def _warm_up_converter(options) -> None:
    """One tiny ``coremltools.convert``: the converter's one-time set-up (imports, op registries),
    paid here so that neither the plain conversion nor the cold diagnosis is charged for it."""
    import coremltools as ct
    import torch

    tiny = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    x = torch.randn(1, 4)
    ct.convert(torch.jit.trace(tiny, x), inputs=[ct.TensorType(name="x", shape=x.shape)], **options.convert_kwargs())


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(name: str, repeats: int, convert_repeats: int, tiny: bool, cold_only: bool,
            plain_first: bool = False) -> dict:
    """All figures of one model, in this (fresh) process (``plain_first``: only a plain conversion, the
    first one of this model in the process, and the torch forward)."""
    import torch
    from rss import MB, PeakRSS, rss, trim

    import coreml_lab as cl

    options = cl.ConversionOptions()
    _warm_up_converter(options)
    model, inputs = build(name, tiny)

    def forward():
        with torch.no_grad():
            model(**inputs)

    forward()
    trim()
    base_rss = rss()
    row = {"model": name, "label": ARCHITECTURES[name].label, "tiny": tiny,
           "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "base_rss_mb": round(base_rss / MB)}
    if plain_first:
        row["fresh_plain_convert_s"] = round(_timed(lambda: plain_conversion(model, inputs, options)), 2)
        row["torch_forward_ms"] = round(statistics.median(_timed(forward) for _ in range(5)) * 1e3, 2)
        return row

    with PeakRSS() as cold_memory:
        t = time.perf_counter()
        report = cl.diagnose(model, inputs, options, progress=False)
        cold_s = time.perf_counter() - t
    if not report.ok:
        raise RuntimeError(f"the cold diagnosis carries a conversion error: {report.error.splitlines()[0][:500]}")
    layers = len(report.layers)
    del report
    row.update(cold_diagnose_s=round(cold_s, 2), cold_peak_rss_mb=round(cold_memory.peak / MB),
               peak_rss_ratio=round(cold_memory.peak / base_rss, 2), layer_rows=layers)

    convert_s = statistics.median(_timed(lambda: plain_conversion(model, inputs, options))
                                  for _ in range(convert_repeats))
    forward_s = statistics.median(_timed(forward) for _ in range(5))
    row.update(plain_convert_s=round(convert_s, 2), torch_forward_ms=round(forward_s * 1e3, 2),
               first_report_ratio=round(cold_s / (convert_s + 3 * forward_s), 2))
    if cold_only:
        return row

    conversion = cl.convert(model, inputs, options)  # the cold run's, from the cache
    trim()
    with PeakRSS() as warm_memory:  # also the warm-up of the timed rounds
        cl.diagnose(conversion, progress=False)
    ratios, diag_times = [], []
    for _ in range(repeats):
        diag_s = _timed(lambda: cl.diagnose(conversion, progress=False))
        base_s = statistics.median(_timed(forward) for _ in range(3))
        diag_times.append(diag_s)
        ratios.append(diag_s / base_s / len(UNITS))
    row.update(warm_diagnose_s=round(statistics.median(diag_times), 2),
               warm_ratio_per_cu=round(statistics.median(ratios), 2),
               warm_peak_rss_mb=round(warm_memory.peak / MB), warm_peak_rss_ratio=round(warm_memory.peak / base_rss, 2))
    row.update(floors(model, inputs, options, conversion, forward, convert_s))
    return row


def floors(model, inputs, options, conversion, forward, convert_s: float) -> dict:
    """The floor under (a) and (b): the whole-model runs no diagnosis can do without, each timed alone
    (median of 2 after one untimed): one torch FP32 forward (the framework reference), the FP32 program
    and the FP16 program under each unit's profile - no statistics, no local re-runs, no trace, nothing
    shared between runs. (a)'s floor adds them to one plain conversion; both are lower bounds."""
    import coreml_lab as cl
    from coreml_lab.emulator import EmulatedModel

    feeds = conversion.example_inputs.as_numpy()
    conv32 = cl.convert(model, inputs, options.replace(precision="fp32"))
    programs = [EmulatedModel(conv32.mlmodel, "CPU_ONLY")] + [EmulatedModel(conversion.mlmodel, cu) for cu in UNITS]
    runs_s = 0.0
    for run in [forward] + [lambda p=p: p.predict(feeds) for p in programs]:
        run()
        runs_s += statistics.median(_timed(run) for _ in range(2))
    forward_s = statistics.median(_timed(forward) for _ in range(3))
    return {"runs_alone_s": round(runs_s, 2),
            "first_report_floor": round((convert_s + runs_s) / (convert_s + 3 * forward_s), 2),
            "warm_floor_per_cu": round(runs_s / forward_s / len(UNITS), 2)}


# ------------------------------------------------------------------ the driver

def run_model(name: str, args, cold_only: bool, plain_first: bool = False) -> dict:
    """:func:`measure` in a fresh process with an empty conversion cache; its row, or the error."""
    with tempfile.TemporaryDirectory(prefix=f"real_scale_{name}_") as cache:
        env = {**os.environ, **args.malloc_settings, "COREML_LAB_CACHE": cache}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, __file__, "--child", name, "--repeats", str(args.repeats),
               "--convert-repeats", str(args.convert_repeats)] + ["--tiny"] * args.tiny + ["--cold-only"] * cold_only \
            + ["--plain-first"] * plain_first
        t = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT):
            return {**json.loads(line[len(RESULT):]), "process_s": round(wall, 1)}
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
    return {"model": name, "label": ARCHITECTURES[name].label, "error": f"exit {done.returncode}: {tail}",
            "process_s": round(wall, 1)}


def combine(rows: list[dict]) -> dict:
    """The first process's row with (a) and (c) and their parts as medians over every process."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return rows[0]
    out = dict(ok[0])
    for key in ("cold_diagnose_s", "plain_convert_s", "torch_forward_ms", "first_report_ratio", "cold_peak_rss_mb",
                "peak_rss_ratio", "base_rss_mb"):
        out[key] = round(statistics.median(r[key] for r in ok), 2)
    out["cold_runs"] = len(ok)
    return out


def with_fresh_plain(row: dict, plains: list[dict]) -> dict:
    """(a) again, against a plain conversion that was, like the cold diagnosis, the first conversion of the
    model in a fresh process (median over ``plains``): the cold diagnosis pays first-use costs (memory
    faulted in from the OS, first calls into coremltools' passes and torch's tracer for these op types) that
    the plain conversion timed after it, in the same process, no longer pays."""
    ok = [p["fresh_plain_convert_s"] for p in plains if "error" not in p]
    if "error" in row or not ok:
        return row
    fresh = statistics.median(ok)
    return {**row, "fresh_plain_convert_s": round(fresh, 2),
            "first_report_vs_fresh_plain": round(row["cold_diagnose_s"] / (fresh + 3 * row["torch_forward_ms"] / 1e3),
                                                 2)}


COLUMNS = [  # (header, key, format)
    ("params M", "params_m", "{:.2f}"), ("torch ms", "torch_forward_ms", "{:.1f}"),
    ("convert s", "plain_convert_s", "{:.1f}"), ("cold diag s", "cold_diagnose_s", "{:.1f}"),
    ("fresh conv s", "fresh_plain_convert_s", "{:.1f}"), ("(a) first", "first_report_ratio", "{:.2f}"),
    ("(a) fresh", "first_report_vs_fresh_plain", "{:.2f}"), ("warm diag s", "warm_diagnose_s", "{:.1f}"),
    ("(b) per-CU", "warm_ratio_per_cu", "{:.2f}"), ("base MB", "base_rss_mb", "{:.0f}"),
    ("cold peak MB", "cold_peak_rss_mb", "{:.0f}"), ("(c) peak", "peak_rss_ratio", "{:.2f}"),
    ("warm peak", "warm_peak_rss_ratio", "{:.2f}"), ("(a) floor", "first_report_floor", "{:.2f}"),
    ("(b) floor", "warm_floor_per_cu", "{:.2f}"),
]


def print_header() -> None:
    print(f"{'model':22}" + "".join(f" {h:>12}" for h, _, _ in COLUMNS), flush=True)


def print_row(row: dict) -> None:
    if "error" in row:
        print(f"{row['label']:22} FAILED after {row['process_s']} s: {row['error']}", flush=True)
        return
    cells = "".join(f" {fmt.format(row[k]) if row.get(k) is not None else '-':>12}" for _, k, fmt in COLUMNS)
    above = [h.split()[0] for h, k, _ in COLUMNS if k in TARGETS and row.get(k) is not None and row[k] > TARGETS[k]]
    print(f"{row['label']:22}{cells}" + (f"  (above target: {' '.join(above)})" if above else ""), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(ARCHITECTURES),
                    help=f"comma-separated subset of {', '.join(ARCHITECTURES)} (default: all)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds of the warm diagnosis (b)")
    ap.add_argument("--convert-repeats", type=int, default=2, help="timed plain conversions per process (a)")
    ap.add_argument("--cold-runs", type=int, default=1, help="fresh processes per model for (a) and (c)")
    ap.add_argument("--json", type=Path, help="write every row here")
    ap.add_argument("--malloc-env", default="", help="glibc settings (NAME=value ...) for the model processes, "
                                                     "as `make lab` runs notebooks with")
    ap.add_argument("--tiny", action="store_true", help="a few layers and channels: does every model run at all")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--cold-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--plain-first", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if min(args.repeats, args.convert_repeats, args.cold_runs) < 1:
        raise SystemExit("--repeats, --convert-repeats and --cold-runs must be at least 1")

    if args.child:
        row = measure(args.child, args.repeats, args.convert_repeats, args.tiny, args.cold_only, args.plain_first)
        print(RESULT + json.dumps(row), flush=True)
        return 0

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in ARCHITECTURES]
    if unknown or not names:
        raise SystemExit(f"--models: unknown {', '.join(unknown) or '(none given)'}; "
                         f"expected names among {', '.join(ARCHITECTURES)}")
    args.malloc_settings = parse_malloc_env(args.malloc_env)
    print(f"real architectures{' (TINY: not a measurement)' if args.tiny else ''}, FP16, diagnosed on "
          f"{'/'.join(UNITS)}; each in a fresh process{' under ' + args.malloc_env if args.malloc_env else ''}")
    print(f"(a) cold diagnose(model) / (plain trace + coremltools.convert + 3 torch forwards), target <= "
          f"{TARGETS['first_report_ratio']}, median of {args.cold_runs} process(es); (a) fresh: the plain "
          f"conversion timed first in a fresh process of its own")
    print(f"(b) warm diagnose(conversion) / torch forward, per compute unit, target <= "
          f"{TARGETS['warm_ratio_per_cu']}, median of {args.repeats} rounds")
    print(f"(c) peak RSS of the cold diagnosis / RSS after loading the model and one forward, target <= "
          f"{TARGETS['peak_rss_ratio']} (warm peak: the same for a warm diagnose(conversion))")
    print_header()
    rows = []
    for name in names:
        runs = [run_model(name, args, cold_only=i > 0) for i in range(args.cold_runs)]
        plains = [run_model(name, args, cold_only=True, plain_first=True) for _ in range(args.cold_runs)]
        row = with_fresh_plain(combine(runs), plains)
        print_row(row)
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    failed = [r["label"] for r in rows if "error" in r]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
