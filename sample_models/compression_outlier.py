"""Compression outlier: one layer's outlier weight channel makes its compression cost most of the accuracy.

4-bit palettization or int8 quantization of ``blocks.2`` alone costs more than all other layers.

An MLP of four 64x64 linear blocks, each followed by tanh and a per-channel gain (64 values:
below coremltools' compression threshold, never compressed). In ``blocks.2`` one input channel's
weights are 40x larger than the rest, and the gain before it makes that channel 40x smaller: the
function is ordinary (as after an activation-outlier migration into the weights), but a
per-tensor LUT or a per-output-channel scale of ``blocks.2`` spends its range on the outlier and
rounds every other weight coarsely. ``cl.find_uncompressed_ops`` ranks ``blocks.2`` first and leaves it uncompressed.
"""

from __future__ import annotations

import torch
from torch import nn

from ._util import seeded

PITFALL = "C1"
OUTLIER_LAYER = "blocks.2"
OUTLIER_CHANNEL = 5
OUTLIER_SCALE = 40.0


class OutlierMLP(nn.Module):
    def __init__(self, width: int = 64, depth: int = 4, classes: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.gains = nn.ParameterList(nn.Parameter(torch.ones(width)) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        for block, gain in zip(self.blocks, self.gains):
            x = torch.tanh(block(x)) * gain
        return self.head(x)


def build(seed: int = 0):
    g = seeded(seed)
    model = OutlierMLP().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.25)
            elif p.shape[0] != 64 or not any(p is q for q in model.gains):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        index = int(OUTLIER_LAYER.split(".")[1])
        # the channel scaled down by the gain before the layer and up in the layer's weights
        model.gains[index - 1][OUTLIER_CHANNEL] = 1 / OUTLIER_SCALE
        model.blocks[index].weight[:, OUTLIER_CHANNEL] *= OUTLIER_SCALE
    x = torch.randn(8, 64, generator=g)
    return model, (x,), ("MLP of four 64x64 linear blocks; blocks.2 has an outlier input channel (40x weights) "
                         "that makes its weight compression far coarser than the others'.")
