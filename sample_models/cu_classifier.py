"""Compute-unit divergence (P2): a classifier whose top-1 class flips under FP16 rounding.

The weights are exactly representable in FP16, so storing them in FP16 loses
nothing: CPU_ONLY (FP32 arithmetic) matches PyTorch to ~1e-7. The two best
logits differ by a hair, and the FP16 activations of the GPU / Neural Engine
round them into the other order - the same kind of gap as the field report
(mean abs diff ~0.003, max ~0.012, "enough to flip classifications") where
loading with ``ComputeUnit.CPU_ONLY`` fixed it. Emulated (iOS15, FP16): the
calibrated Neural Engine (wide accumulation, each bias added in FP16 after the
accumulator output is rounded) gives mean ~0.0036, max ~0.009; the GPU (FP32
arithmetic) mean ~0.0016, max ~0.004.
"""

from __future__ import annotations

import torch
from torch import nn

from ._util import round_params_to_fp16, seeded

PITFALL = "P2"


class TinyClassifier(nn.Module):
    def __init__(self, features: int = 32, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.out(x)


def _near_tie(model: TinyClassifier, x: torch.Tensor, margin: float) -> None:
    """Shift the output bias so the top two logits of ``x`` differ by ``margin`` (FP16-exact bias)."""
    with torch.no_grad():
        logits = model(x)[0]
        top2 = torch.topk(logits, 2).indices
        a, b = int(top2[0]), int(top2[1])
        model.out.bias[b] += (logits[a] - logits[b]) - margin
        round_params_to_fp16(model)


def build(seed: int = 3, margin: float = 2e-3):
    g = seeded(seed)
    model = TinyClassifier().eval()
    with torch.no_grad():
        model.out.weight.mul_(40.0)  # trained-classifier logit scale (~10), where FP16 steps are ~0.008
    round_params_to_fp16(model)
    x = (torch.randn(1, 32, generator=g) * 2.0).half().float()
    _near_tie(model, x, margin)
    return model, (x,), ("3-layer MLP with FP16-exact weights and a near-tie between its two best classes: "
                         "CPU_ONLY matches PyTorch, FP16 GPU/NE rounding can flip the top-1 class.")
