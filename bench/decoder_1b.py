"""A 1B-parameter LLaMA-style decoder converted and diagnosed: time of each phase and peak memory.

    python bench/decoder_1b.py [--layers 16 --hidden 2048 --intermediate 8192 --heads 32
                                --vocab 32000 --tokens 128] [--plain] [--cache DIR] [--json out.json]

The decoder is written here in plain torch (no ``transformers``: no package decides its
shape): token embedding, ``layers`` pre-norm blocks of RMSNorm, multi-head causal attention
with rotary position embeddings and a SwiGLU MLP, a final RMSNorm and an untied LM head;
random weights (LLaMA's normal init, std 0.02), created once in FP32 and never copied
(no gradients). At the defaults it has about 1.2 billion parameters (4.8 GB in FP32; the shape of
LLaMA 3.2 1B with a 32,000-token vocabulary).

Phases, each timed, with the process's peak resident memory during it (``bench/rss.py``):
build; torch forward of ``tokens`` tokens (median of ``--forwards``; the resident memory
after it is the baseline); optionally (``--plain``) a plain ``torch.jit.trace`` +
``coremltools.convert`` (released before the next phase); ``cl.convert(model, inputs,
ConversionOptions())`` (FP16, into an empty conversion cache unless ``--cache`` is given);
``cl.diagnose(conversion)`` on CPU_ONLY, CPU_AND_GPU and CPU_AND_NE (``--first-report``: instead of
those two, one cold ``cl.diagnose(model, inputs, options)``, which converts once and forks its FP32
reference from that conversion). The figures are those of
whatever library is on the path (public API only). ``--layers 2 --hidden 256`` (the rest
scaled from the hidden size unless given) runs it in seconds.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rss import MB, PeakRSS, rss, trim

UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary position embeddings (q and k rotated)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x, cos, sin, mask):
        batch, tokens, hidden = x.shape

        def split(t):  # (batch, tokens, hidden) -> (batch, heads, tokens, head_dim)
            return t.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        scores = q @ k.transpose(-1, -2) * (1.0 / math.sqrt(self.head_dim)) + mask
        out = torch.softmax(scores, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, hidden))


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, hidden: int, intermediate: int, heads: int):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden)
        self.self_attn = Attention(hidden, heads)
        self.post_attention_layernorm = RMSNorm(hidden)
        self.mlp = SwiGLU(hidden, intermediate)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """LLaMA-style decoder for a fixed number of ``tokens``: ``input_ids`` (1, tokens) -> logits."""

    def __init__(self, layers: int, hidden: int, intermediate: int, heads: int, vocab: int, tokens: int,
                 rope_base: float = 10000.0):
        super().__init__()
        if hidden % heads or (hidden // heads) % 2:
            raise ValueError(f"hidden ({hidden}) must split into {heads} heads of an even size")
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden, intermediate, heads) for _ in range(layers))
        self.norm = RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        head_dim = hidden // heads
        inv_freq = 1.0 / rope_base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(tokens, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        # additive causal mask; -1e4 stays finite in FP16 and still gives exp() = 0
        mask = torch.full((tokens, tokens), -1e4).triu(1)
        self.register_buffer("mask", mask, persistent=False)
        self.reset_parameters()
        self.requires_grad_(False)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02):
        """LLaMA's init, in place: normal(0, std) weights, RMSNorm scales of 1."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin, self.mask)
        return self.lm_head(self.norm(x))


def _timed_phase(name: str, fn, figures: dict):
    """Run ``fn`` as phase ``name``: its time and the peak resident memory during it go to ``figures``."""
    trim()
    with PeakRSS() as memory:
        t = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t
    figures[name] = {"s": round(seconds, 2), "peak_rss_mb": round(memory.peak / MB),
                     "rss_before_mb": round(memory.start / MB)}
    print(f"{name:18} {seconds:9.2f} s   peak RSS {memory.peak / MB:9.0f} MB (before: {memory.start / MB:.0f} MB)",
          flush=True)
    return out


def plain_conversion(model, input_ids, options):
    """``torch.jit.trace`` + ``coremltools.convert`` as a user writes them, with ``options``' arguments."""
    import coremltools as ct
    import numpy as np

    traced = torch.jit.trace(model, (input_ids,), check_trace=False)
    return ct.convert(traced, inputs=[ct.TensorType(name="input_ids", shape=tuple(input_ids.shape), dtype=np.int32)],
                      **options.convert_kwargs())


def _mem_total_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, help="MLP width (default: 4 x hidden, 8192 at 2048 as in LLaMA 3.2 1B)")
    ap.add_argument("--heads", type=int, help="attention heads (default: hidden / 64, 32 at 2048)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--forwards", type=int, default=2, help="timed torch forwards (median)")
    ap.add_argument("--plain", action="store_true", help="also time a plain trace + coremltools.convert first")
    ap.add_argument("--first-report", action="store_true",
                    help="time one cold cl.diagnose(model, inputs, options) instead of cl.convert then "
                         "cl.diagnose(conversion): the one call a user makes, one coremltools conversion")
    ap.add_argument("--cache", type=Path, help="conversion cache directory (default: a new one, removed after)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    intermediate = args.intermediate or 4 * args.hidden
    heads = args.heads or max(1, args.hidden // 64)
    if min(args.layers, args.hidden, intermediate, heads, args.vocab, args.tokens, args.forwards) < 1:
        raise SystemExit("--layers, --hidden, --intermediate, --heads, --vocab, --tokens and --forwards must be >= 1")
    if args.hidden % heads or (args.hidden // heads) % 2:
        ap.error(f"--hidden {args.hidden} must split into {heads} heads (--heads) of an even size")

    cache = args.cache or Path(tempfile.mkdtemp(prefix="decoder_1b_cache_"))
    os.environ["COREML_LAB_CACHE"] = str(cache)  # read by coreml_lab when it converts
    import coreml_lab as cl

    figures: dict = {"layers": args.layers, "hidden": args.hidden, "intermediate": intermediate, "heads": heads,
                     "vocab": args.vocab, "tokens": args.tokens, "torch": torch.__version__,
                     "threads": torch.get_num_threads(), "mem_total_mb": round(_mem_total_mb())}
    print(f"LLaMA-style decoder: {args.layers} layers, hidden {args.hidden}, MLP {intermediate}, {heads} heads, "
          f"vocab {args.vocab}, {args.tokens} tokens; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"machine memory {figures['mem_total_mb'] / 1024:.1f} GB", flush=True)
    try:
        torch.manual_seed(0)
        model = _timed_phase("build", lambda: Decoder(args.layers, args.hidden, intermediate, heads, args.vocab,
                                                      args.tokens).eval(), figures)
        params = sum(p.numel() for p in model.parameters())
        figures["parameters"] = params
        print(f"parameters: {params:,} ({params / 1e9:.3f} B; {params * 4 / 2 ** 30:.2f} GiB in FP32)", flush=True)
        input_ids = torch.randint(0, args.vocab, (1, args.tokens))

        def forward():
            with torch.no_grad():
                return model(input_ids)

        forward()  # warm-up; the baseline memory is after loading the model and one forward
        times = []
        for _ in range(args.forwards):
            t = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t)
        trim()
        base = rss()
        forward_s = statistics.median(times)
        figures.update(torch_forward_s=round(forward_s, 3), base_rss_mb=round(base / MB))
        print(f"{'torch forward':18} {forward_s:9.2f} s   RSS after loading and one forward {base / MB:.0f} MB",
              flush=True)

        options = cl.ConversionOptions()
        if args.plain:
            _timed_phase("plain convert", lambda: plain_conversion(model, input_ids, options), figures)
            gc.collect()
        inputs = {"input_ids": input_ids}
        if args.first_report:  # conversion, FP32 reference and diagnosis in the one call
            report = _timed_phase("cl.diagnose(model)", lambda: cl.diagnose(model, inputs, options, progress=False),
                                  figures)
            diagnose_s = figures["cl.diagnose(model)"]["s"]
        else:
            conversion = _timed_phase("cl.convert", lambda: cl.convert(model, inputs, options), figures)
            report = _timed_phase("cl.diagnose", lambda: cl.diagnose(conversion, progress=False), figures)
            diagnose_s = figures["cl.diagnose"]["s"]
        if not report.ok:
            raise SystemExit(f"the diagnosis carries an error: {report.error.splitlines()[0][:500]}")
        overall = max(v["peak_rss_mb"] for v in figures.values() if isinstance(v, dict))
        figures.update(diagnose_per_cu_forwards=round(diagnose_s / forward_s / len(UNITS), 2),
                       peak_rss_mb=overall, peak_rss_ratio=round(overall * MB / base, 2))
        what = "diagnose(model, inputs, options)" if args.first_report else "diagnose(conversion)"
        print(f"{what} per compute unit: {figures['diagnose_per_cu_forwards']:.2f} torch forwards; "
              f"peak RSS {overall / 1024:.2f} GB = {figures['peak_rss_ratio']:.2f} x the RSS after one forward")
        print("\n".join(report.summary().splitlines()[:12]))
    finally:
        if args.cache is None:
            shutil.rmtree(cache, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
