"""FP16 overflow to inf (P1): frame energy of raw audio overflows FP16, outputs become +-inf.

The model takes raw PCM-scale audio frames (|x| up to ~20000, fine in FP16) and
computes each frame's mean power ``mean(x * x)``. Squares above 65504 - FP16's
maximum - become inf in the FP16 program; log(inf) is inf, and every logit of the
classifier becomes +inf or -inf (NaN, the field report's symptom, appears where +inf
and -inf meet in one sum on the GPU; the Neural Engine never outputs NaN: it returns
+0 for inf - inf, ane-guide). The FP32 conversion is fine. The op that
overflows is the ``mul`` inside module ``energy`` (:data:`OVERFLOW_MODULE`):
its inputs are in FP16 range, its output is not.
"""

from __future__ import annotations

import torch
from torch import nn

from ._util import seeded

PITFALL = "P1"
#: module path of the layer whose output first leaves FP16 range
OVERFLOW_MODULE = "energy"


class FrameEnergy(nn.Module):
    """Mean power of each frame; overflows FP16 once |x| > 256."""

    def forward(self, frames):
        return (frames * frames).mean(dim=-1, keepdim=True)


class Block(nn.Module):
    """Residual MLP block of the frame encoder."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return x + self.norm(torch.nn.functional.gelu(self.fc(x)))


class AudioEventNet(nn.Module):
    def __init__(self, frame: int = 64, hidden: int = 32, classes: int = 4, blocks: int = 8):
        super().__init__()
        self.energy = FrameEnergy()
        self.proj = nn.Linear(frame, hidden)
        self.encoder = nn.Sequential(*[Block(hidden) for _ in range(blocks)])
        self.head = nn.Linear(hidden + 1, classes)

    def forward(self, frames):
        log_power = torch.log(self.energy(frames) + 1e-3)
        feats = self.encoder(self.proj(frames / 32768.0))
        logits = self.head(torch.cat([feats, log_power], dim=-1))
        return logits.mean(dim=1)


def build(seed: int = 0):
    g = seeded(seed)
    model = AudioEventNet().eval()
    frames = (torch.rand(1, 8, 64, generator=g) * 2 - 1) * 20000.0
    return model, (frames,), ("Audio classifier whose frame-energy layer squares raw PCM values: "
                              "FP16 overflows to inf and the outputs are +-inf; FP32 is fine.")
