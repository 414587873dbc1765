"""FP16 overflow in a chain: a log-mel spectrogram front end needs a whole FP32 region, not one op.

Raw audio at int16 PCM scale (|x| up to ~20000, fine in FP16) goes through a
short-time Fourier transform written as a strided ``conv1d`` with fixed cos/sin
weights (:data:`OVERFLOW_MODULE`), the power ``re^2 + im^2``, a mel projection
(a matmul with a triangular filterbank) and ``log(mel + eps)``, then a small
classifier. The DFT's outputs reach ~1e6, beyond FP16's 65504, so the FP16
program has inf from the convolution on. Keeping the convolution alone in FP32
does not help: its FP32 result is cast back to FP16 for the next op and
overflows there. Every op from the convolution to the log - whose output,
~30, is back in FP16 range - must run in FP32 (:data:`FP32_REGION`, by
torch module); the classifier after the log is fine in FP16.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._util import seeded

PITFALL = "P1"
#: module path of the layer whose output first leaves FP16 range
OVERFLOW_MODULE = "frontend.stft"
#: torch modules whose ops must all stay in FP32 (the region from the overflow to the log)
FP32_REGION = ("frontend.stft", "frontend.power", "frontend.mel", "frontend.log")

SIZES = {  # samples, n_fft, hop, mel bands
    "small": (4096, 256, 128, 16),
}


def _mel(f):
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_filterbank(n_fft: int, n_mels: int, sample_rate: float = 16000.0) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) triangular mel filters (HTK mel scale), peak 1."""
    bins = n_fft // 2 + 1
    freqs = torch.linspace(0, sample_rate / 2, bins, dtype=torch.float64)
    edges = 700.0 * (10 ** (torch.linspace(0, float(_mel(torch.tensor(sample_rate / 2))), n_mels + 2,
                                           dtype=torch.float64) / 2595.0) - 1.0)
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
    up = (freqs[:, None] - lo[None]) / (mid - lo)[None]
    down = (hi[None] - freqs[:, None]) / (hi - mid)[None]
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


class STFT(nn.Module):
    """Real and imaginary parts of a Hann-windowed DFT, as one strided conv1d with fixed weights."""

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        self.hop, bins = hop, n_fft // 2 + 1
        n = torch.arange(n_fft, dtype=torch.float64)
        k = torch.arange(bins, dtype=torch.float64)[:, None]
        window = 0.5 - 0.5 * torch.cos(2 * math.pi * n / n_fft)
        angle = 2 * math.pi * k * n / n_fft
        weight = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window])  # (2 * bins, n_fft)
        self.register_buffer("weight", weight.float()[:, None, :])

    def forward(self, audio):  # (batch, samples) -> (batch, 2 * bins, frames)
        return nn.functional.conv1d(audio[:, None, :], self.weight, stride=self.hop)


class Power(nn.Module):
    def forward(self, spec):
        re, im = spec.chunk(2, dim=1)
        return re * re + im * im


class MelProjection(nn.Module):
    def __init__(self, n_fft: int, n_mels: int):
        super().__init__()
        self.register_buffer("filters", mel_filterbank(n_fft, n_mels))

    def forward(self, power):  # (batch, bins, frames) -> (batch, frames, mels)
        return torch.matmul(power.transpose(1, 2), self.filters)


class Log(nn.Module):
    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return torch.log(x + self.eps)


class LogMel(nn.Module):
    def __init__(self, n_fft: int, hop: int, n_mels: int):
        super().__init__()
        self.stft = STFT(n_fft, hop)
        self.power = Power()
        self.mel = MelProjection(n_fft, n_mels)
        self.log = Log()

    def forward(self, audio):
        return self.log(self.mel(self.power(self.stft(audio))))


class KeywordSpotter(nn.Module):
    def __init__(self, n_fft: int, hop: int, n_mels: int, hidden: int = 32, classes: int = 4):
        super().__init__()
        self.frontend = LogMel(n_fft, hop, n_mels)
        self.norm = nn.LayerNorm(n_mels)
        self.proj = nn.Linear(n_mels, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, audio):
        feats = self.norm(self.frontend(audio))
        return self.head(torch.relu(self.proj(feats))).mean(dim=1)


def build(seed: int = 0, size: str = "small"):
    """``size="small"``: 4096 samples (0.26 s at 16 kHz), n_fft 256, hop 128, 16 mel bands."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(map(repr, SIZES))}, got {size!r}")
    g = seeded(seed)
    samples, n_fft, hop, n_mels = SIZES[size]
    model = KeywordSpotter(n_fft, hop, n_mels).eval()
    t = torch.arange(samples, dtype=torch.float32) / 16000.0
    tone = torch.sin(2 * math.pi * 440.0 * t) + 0.5 * torch.sin(2 * math.pi * 1200.0 * t)
    noise = torch.rand(samples, generator=g) * 2 - 1
    audio = torch.round(12000.0 * tone + 4000.0 * noise)[None]  # int16 PCM scale, |x| < 22000
    return model, (audio,), ("Keyword spotter whose log-mel front end (DFT as conv1d, power, mel matmul, log) "
                             "runs on int16-scale audio: the DFT output exceeds FP16's 65504, and only an FP32 "
                             "region from the convolution to the log fixes it.")
