"""Emulator kernels for random sampling and classify.

A device's random stream cannot be reproduced, so the random ops are checked on
shape, dtype, support and sample statistics (several thousand samples, bounds
of about 5 standard errors), plus determinism for a given ``seed`` input.
``classify`` is checked on ``ct.ClassifierConfig`` conversions: the emulator
returns what ``MLModel.predict`` returns, a class label and a dict of class
probabilities.
"""

from __future__ import annotations

import warnings

import coremltools as ct
import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from opcheck import convert_program, convert_torch, feeds, op_types, require_kernels

from coreml_lab.emulator import EmulatedModel

N = 20_000


def outputs(ml, data, cu="CPU_ONLY"):
    return list(EmulatedModel(ml, cu).predict(data).values())


def assert_mean(samples, mean, std, what):
    se = std / np.sqrt(samples.size)
    assert abs(float(samples.mean()) - mean) < 5 * se + 1e-3, f"{what}: mean {samples.mean()} vs {mean}"


# ----------------------------------------------------------------------------- torch-produced random ops


class Rand(torch.nn.Module):
    def forward(self, x):
        return x + torch.rand(4, N // 4)


class RandnLike(torch.nn.Module):
    def forward(self, x):
        return torch.randn_like(x) * 2.0 + 1.0


class Multinomial(torch.nn.Module):
    def forward(self, p):
        return torch.multinomial(p, 4000, replacement=True)


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
def test_torch_rand_uniform(target):
    ml = convert_torch(Rand(), [torch.zeros(4, N // 4)], target=target)
    assert "random_uniform" in op_types(ml)
    (u,) = outputs(ml, {"x0": np.zeros((4, N // 4), np.float32)})
    assert u.shape == (4, N // 4) and u.dtype == np.float32
    assert u.min() >= 0.0 and u.max() < 1.0
    assert_mean(u, 0.5, np.sqrt(1 / 12), "uniform")
    assert abs(u.var() - 1 / 12) < 0.005
    # unseeded: a second prediction draws new values
    (u2,) = outputs(ml, {"x0": np.zeros((4, N // 4), np.float32)})
    assert not np.array_equal(u, u2)


def test_torch_randn_like():
    require_kernels("shape")
    x = torch.zeros(8, N // 8)
    ml = convert_torch(RandnLike(), [x])
    assert "random_normal" in op_types(ml)
    (z,) = outputs(ml, feeds([x]))
    assert z.shape == (8, N // 8)
    assert_mean(z, 1.0, 2.0, "normal")
    assert abs(z.std() - 2.0) < 0.05
    # roughly Gaussian tails: ~4.6% beyond 2 sigma
    assert 0.035 < float(np.mean(np.abs(z - 1.0) > 4.0)) < 0.058


@pytest.mark.parametrize("cu", ["CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"])
def test_torch_multinomial_is_random_categorical_probs(cu):
    p = torch.tensor([[0.1, 0.6, 0.3, 0.0], [1.0, 1.0, 2.0, 4.0]])  # second row unnormalised
    ml = convert_torch(Multinomial(), [p])
    assert "random_categorical" in op_types(ml)
    (idx,) = outputs(ml, feeds([p]), cu)
    assert idx.shape == (2, 4000)
    assert set(np.unique(idx)) <= {0.0, 1.0, 2.0, 3.0}
    assert not np.any(idx[0] == 3)  # probability 0 never drawn
    for row, probs in zip(idx, [[0.1, 0.6, 0.3, 0.0], [0.125, 0.125, 0.25, 0.5]]):
        freq = np.bincount(row.astype(int), minlength=4) / row.size
        np.testing.assert_allclose(freq, probs, atol=0.03)


# ----------------------------------------------------------------------------- MIL builder


def _seeded_program(seed, precision_dtype=types.fp32):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1,), dtype=precision_dtype)], opset_version=ct.target.iOS17)
    def prog(x):
        shape = np.array([50, N // 50], np.int32)
        u = mb.random_uniform(shape=shape, low=-2.0, high=6.0, seed=seed)
        z = mb.random_normal(shape=shape, mean=-3.0, stddev=0.5, seed=seed)
        b = mb.random_bernoulli(shape=shape, prob=0.3, seed=seed)
        c = mb.random_categorical(x=np.log(np.array([[0.2, 0.5, 0.3]], np.float32)), mode="logits",
                                  size=N, seed=seed)
        return (mb.add(x=u, y=mb.mul(x=x, y=0.0)), z, b, c)

    return prog


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_random_ops_statistics_and_seed_determinism(precision):
    ml = convert_program(_seeded_program(7), precision=precision)
    assert {"random_uniform", "random_normal", "random_bernoulli", "random_categorical"} <= op_types(ml)
    cus = ["CPU_ONLY"] if precision == "fp32" else ["CPU_AND_GPU", "CPU_AND_NE"]
    for cu in cus:
        u, z, b, c = outputs(ml, {"x": np.zeros(1, np.float32)}, cu)
        assert u.shape == z.shape == b.shape == (50, N // 50) and c.shape == (1, N)
        assert u.min() >= -2.0 and u.max() <= 6.0  # FP16 rounding may reach the bound
        assert_mean(u, 2.0, 8 / np.sqrt(12), f"{cu} uniform")
        assert_mean(z, -3.0, 0.5, f"{cu} normal")
        assert abs(z.std() - 0.5) < 0.02
        assert set(np.unique(b)) == {0.0, 1.0}
        assert_mean(b, 0.3, np.sqrt(0.21), f"{cu} bernoulli")
        freq = np.bincount(c[0].astype(int), minlength=3) / N
        np.testing.assert_allclose(freq, [0.2, 0.5, 0.3], atol=0.02)
        # same seed: the same values at every invocation (a reproducible sequence)
        again = outputs(ml, {"x": np.zeros(1, np.float32)}, cu)
        for a, b2 in zip((u, z, b, c), again):
            np.testing.assert_array_equal(a, b2)


def test_different_seeds_give_different_samples():
    (u7, *_), (u8, *_) = (outputs(convert_program(_seeded_program(s)), {"x": np.zeros(1, np.float32)}) for s in (7, 8))
    assert not np.array_equal(u7, u8)


def test_bernoulli_extreme_probabilities():
    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=ct.target.iOS15)
    def prog(x):
        return (mb.random_bernoulli(shape=np.array([3, 5], np.int32), prob=0.0, seed=1),
                mb.random_bernoulli(shape=np.array([3, 5], np.int32), prob=1.0, seed=1))

    zeros, ones = outputs(convert_program(prog, target="iOS15"), {"x": np.zeros(1, np.float32)})
    np.testing.assert_array_equal(zeros, np.zeros((3, 5)))
    np.testing.assert_array_equal(ones, np.ones((3, 5)))


# ----------------------------------------------------------------------------- classify


class Head(torch.nn.Module):
    def forward(self, x):
        return torch.softmax(x * 2.0, dim=-1)


def _classifier(labels, precision):
    x = torch.zeros(1, len(labels))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(Head().eval(), (x,))
        return ct.convert(
            traced, inputs=[ct.TensorType(name="x", shape=(1, len(labels)))], convert_to="mlprogram",
            classifier_config=ct.ClassifierConfig(labels),
            compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
        )


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("labels", [["cat", "dog", "bird", "fish"], [3, 5, 7, 11]])
def test_classify_returns_label_and_probability_dict(labels, precision):
    ml = _classifier(labels, precision)
    assert "classify" in op_types(ml)
    spec = ml.get_spec().description
    label_name, probs_name = spec.predictedFeatureName, spec.predictedProbabilitiesName
    x = np.array([[0.3, -1.0, 1.2, 0.9]], np.float32)
    with torch.no_grad():
        p = Head()(torch.from_numpy(x).double()).numpy()[0]
    cus = ["CPU_ONLY"] if precision == "fp32" else ["CPU_AND_GPU", "CPU_AND_NE"]
    for cu in cus:
        out = EmulatedModel(ml, cu).predict({"x": x})
        assert set(out) == {label_name, probs_name}
        label, probs = out[label_name], out[probs_name]
        assert label == labels[int(np.argmax(p))]
        assert type(label) is type(labels[0])  # str labels -> str, int64 labels -> Python int
        assert isinstance(probs, dict) and list(probs) == labels
        assert all(type(v) is float for v in probs.values())
        tol = 1e-6 if precision == "fp32" else 2e-3
        np.testing.assert_allclose([probs[k] for k in labels], p, rtol=0, atol=tol)
