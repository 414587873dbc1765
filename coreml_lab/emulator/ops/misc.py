"""Random sampling ops and ``classify``.

Semantics: coremltools ``ops/defs/iOS15/random.py`` and ``iOS15/classify.py``.

Random ops: a device's random stream cannot be reproduced (Apple does not
document its generator), so the emulator only promises the distribution, shape
and dtype. Given the op's ``seed`` input (>= 0) the output is deterministic: a
fresh ``torch.Generator`` seeded with it is used at every invocation, so
repeated predictions give the same values ("a reproducible sequence of values
across multiple invokes"). With the default ``seed = -1`` torch's global
generator is used (reproducible under ``torch.manual_seed``). Samples are drawn
in FP32 and rounded to the declared output dtype.

``classify`` produces the outputs of a classifier model, as ``MLModel.predict``
returns them: the predicted class label (the class of the highest probability,
a ``str`` or ``int``) and a dict ``{class label: probability}`` (Python floats).
"""

from __future__ import annotations

import torch

from ..registry import kernel

_F32 = torch.float32


def _generator(call) -> torch.Generator | None:
    seed = call.int("seed")
    if seed is None or seed < 0:
        return None
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def _shape(call) -> list[int]:
    shape = call.ints("shape")
    if any(s <= 0 for s in shape):
        raise ValueError(f"{call.op.op_type} input 'shape' = {shape}; every dimension must be > 0")
    return shape


@kernel("random_uniform", family="misc")
def random_uniform(call):
    low = call.float("low")
    high = call.float("high")
    u = torch.rand(_shape(call), generator=_generator(call), dtype=_F32)
    return low + (high - low) * u


@kernel("random_normal", family="misc")
def random_normal(call):
    mean = call.float("mean")
    std = call.float("stddev")
    z = torch.randn(_shape(call), generator=_generator(call), dtype=_F32)
    return mean + std * z


@kernel("random_bernoulli", family="misc")
def random_bernoulli(call):
    p = call.float("prob")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_bernoulli input 'prob' = {p}; expected a probability in [0, 1]")
    u = torch.rand(_shape(call), generator=_generator(call), dtype=_F32)
    return (u < p).to(_F32)


@kernel("random_categorical", family="misc")
def random_categorical(call):
    x = call.tensor("x").to(_F32)
    mode = call.str("mode")
    size = call.int("size")
    if size < 1:
        raise ValueError(f"random_categorical input 'size' = {size}; expected >= 1")
    if mode == "logits":
        # unnormalised probabilities exp(x - max): torch.multinomial normalises the weights
        w = torch.exp(x - x.amax(dim=-1, keepdim=True))
    elif mode == "probs":
        if bool((x < 0).any()):
            raise ValueError("random_categorical with mode='probs' got negative probabilities in input 'x'")
        w = x
    else:
        raise ValueError(f"random_categorical input 'mode' = {mode!r}; expected 'logits' or 'probs'")
    lead = x.shape[:-1]
    flat = w.reshape(-1, x.shape[-1])
    idx = torch.multinomial(flat, size, replacement=True, generator=_generator(call))
    return idx.reshape(*lead, size).to(_F32)


@kernel("classify", family="misc")
def classify(call):
    probs = call.tensor("probabilities").to(_F32).reshape(-1)
    classes = call.value("classes")
    classes = list(getattr(classes, "ls", classes))
    if len(classes) != probs.numel():
        raise ValueError(f"classify: {len(classes)} classes for {probs.numel()} probabilities")
    labels = [c if isinstance(c, str) else (c.decode() if isinstance(c, bytes) else int(c)) for c in classes]
    values = probs.tolist()
    best = int(torch.argmax(probs))
    return labels[best], dict(zip(labels, values))
