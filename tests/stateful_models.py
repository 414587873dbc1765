"""A stateful test model shared by the stateful tests, and its package made with plain coremltools code."""

from __future__ import annotations

import warnings
from pathlib import Path

import coremltools as ct
import numpy as np
import torch


class Accumulate(torch.nn.Module):
    """Apple's stateful-model guide pattern: an FP16 buffer updated in place, read back (times ``gain``)."""

    def __init__(self, gain: float = 1.0):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(1, 6, 4, dtype=torch.float16))
        self.proj = torch.nn.Linear(4, 4)
        self.gain = gain

    def forward(self, x, pos):
        p = pos[0]
        self.k_cache[:, p:p + 1] = self.proj(x).half()
        out = self.k_cache.float().sum(1)
        if self.gain != 1.0:  # a constant to the trace
            out = out * self.gain
        return out + x[:, 0]


def accumulate_package(model: Accumulate, example: tuple, path: Path, **convert_options) -> Path:
    """``model`` traced on ``example`` and converted by ``ct.convert`` for iOS18 with its buffer as the
    state ``k_cache`` (``convert_options`` such as ``compute_precision`` passed on), saved at ``path``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
        ml = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 1, 4)),
                                        ct.TensorType(name="pos", shape=(1,), dtype=np.int32)],
                        states=[ct.StateType(wrapped_type=ct.TensorType(shape=(1, 6, 4), dtype=np.float16),
                                             name="k_cache")],
                        minimum_deployment_target=ct.target.iOS18, **convert_options)
    ml.save(str(path))
    return path
