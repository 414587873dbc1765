"""Input datasets: the feeds (input name -> numpy array) a diagnosis or a fix search runs on, validated."""

from __future__ import annotations

import numpy as np
import torch


def dataset(inputs, example, what: str = "inputs") -> list[dict]:
    """Validated feeds (name -> numpy) from ``inputs``: None = the example inputs, a dict, or an iterable.
    ``what`` names the argument in errors (``"steps"`` for a multi-step diagnosis)."""
    if inputs is None:
        return [example.as_numpy()]
    if isinstance(inputs, dict):
        inputs = [inputs]
    items = list(inputs)
    if not items:
        raise ValueError("inputs is empty: pass at least one dict of input name -> array, "
                         "or inputs=None to diagnose the example inputs")
    names = list(example.names)
    shapes = {n: tuple(t.shape) for n, t in zip(example.names, example.tensors)}
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise TypeError(f"{what}[{i}] must be a dict of input name -> array, got {type(item).__name__}")
        if sorted(item) != sorted(names):
            raise ValueError(f"{what}[{i}] has names {sorted(item)}; the model's inputs are {names} "
                             f"(shapes {shapes})")
        feed = {}
        for n in names:
            v = item[n]
            arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            if arr.dtype == np.int64:
                arr = arr.astype(np.int32)
            elif arr.dtype == np.float64:
                arr = arr.astype(np.float32)
            feed[n] = arr
        out.append(feed)
    return out
