"""Emulator kernels for normalizations: batch_norm, instance_norm, layer_norm, l2_norm,
local_response_norm (and torch GroupNorm, which converts into elementwise/reduction ops).

batch_norm, instance_norm and layer_norm come from torch modules; l2_norm and
local_response_norm have no torch conversion producing them (F.normalize becomes
reduce_l2_norm + real_div, nn.LocalResponseNorm becomes pad + avg_pool + pow), so
they are built with the MIL builder and checked against numpy references written
from the op docstrings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb
from opcheck import FakeOpCall, check_torch_op, check_unary_mil, convert_unary_mil, op_types, run_unary

from coreml_lab.emulator.registry import lookup


def _randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _randomize(module: torch.nn.Module, seed=0) -> torch.nn.Module:
    """Non-trivial affine parameters and running statistics (defaults are ones/zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_floating_point():
                continue
            if "var" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.25)
            else:
                p.copy_(torch.randn(p.shape, generator=g))
    return module.eval()


# ----------------------------------------------------------------------------- batch_norm


@pytest.mark.parametrize("module,shape,target", [
    (torch.nn.BatchNorm2d(4), (2, 4, 3, 5), "iOS17"),
    (torch.nn.BatchNorm2d(4, eps=1e-3), (2, 4, 3, 5), "iOS15"),
    (torch.nn.BatchNorm1d(3), (2, 3, 7), "iOS17"),       # rank 3
    (torch.nn.BatchNorm3d(2), (1, 2, 3, 4, 5), "iOS17"),  # rank 5
], ids=["2d", "2d-iOS15", "1d-rank3", "3d-rank5"])
def test_batch_norm(module, shape, target):
    check_torch_op(_randomize(module), [_randn(*shape, seed=1)], ["batch_norm"], target=target, atol=1e-5)


@pytest.mark.parametrize("affine", [False, True])
def test_batch_norm_builder_optional_gamma_beta(affine):
    g = np.random.default_rng(0)
    x = g.normal(size=(2, 3, 4, 4)).astype(np.float32)
    mean = g.normal(size=3).astype(np.float32)
    var = g.uniform(0.5, 2.0, size=3).astype(np.float32)
    gamma = g.normal(size=3).astype(np.float32)
    beta = g.normal(size=3).astype(np.float32)
    c = lambda a: a.astype(np.float64).reshape(1, 3, 1, 1)
    ref = (x - c(mean)) / np.sqrt(c(var) + 1e-5)  # epsilon absent: default 1e-5
    kwargs = {}
    if affine:
        ref = ref * c(gamma) + c(beta)
        kwargs = {"gamma": gamma, "beta": beta}
    check_unary_mil(lambda v: mb.batch_norm(x=v, mean=mean, variance=var, **kwargs), x, ref, "batch_norm")


# ----------------------------------------------------------------------------- instance_norm


@pytest.mark.parametrize("module,shape,target", [
    (torch.nn.InstanceNorm2d(4, affine=True), (2, 4, 3, 5), "iOS17"),
    (torch.nn.InstanceNorm2d(4, affine=True, eps=1e-3), (2, 4, 3, 5), "iOS15"),
    (torch.nn.InstanceNorm1d(3), (2, 3, 8), "iOS17"),   # no affine: gamma/beta absent
], ids=["2d-affine", "2d-iOS15", "1d-plain"])
def test_instance_norm(module, shape, target):
    x = _randn(*shape, seed=2) * 3 + 1
    check_torch_op(_randomize(module, 3), [x], ["instance_norm"], target=target, atol=1e-5)


# ----------------------------------------------------------------------------- layer_norm


@pytest.mark.parametrize("module,shape,target", [
    (torch.nn.LayerNorm(5), (2, 4, 5), "iOS17"),
    (torch.nn.LayerNorm([3, 5]), (2, 4, 3, 5), "iOS17"),                 # axes [-2, -1]
    (torch.nn.LayerNorm(6, elementwise_affine=False), (3, 6), "iOS17"),
    (torch.nn.LayerNorm(8, eps=1e-3), (2, 8), "iOS15"),
], ids=["last", "last-two", "no-affine", "iOS15"])
def test_layer_norm(module, shape, target):
    x = _randn(*shape, seed=4) * 2 - 1
    check_torch_op(_randomize(module, 5), [x], ["layer_norm"], target=target, atol=1e-5)


def _np_layer_norm(x, axes, gamma=None, beta=None, eps=1e-5):
    x = x.astype(np.float64)
    rank = x.ndim
    axes = tuple(sorted(a % rank for a in axes))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    shape = [x.shape[i] if i in axes else 1 for i in range(rank)]
    if gamma is not None:
        y = y * gamma.astype(np.float64).reshape(shape)
    if beta is not None:
        y = y + beta.astype(np.float64).reshape(shape)
    return y


# axes absent cannot be built: coremltools' default (a python range) fails Builder._add_const,
# so "every axis" is spelled out; the kernel also treats an absent axes as every axis.
@pytest.mark.parametrize("axes", [[0, 1, 2], [0, 2], [-1, 1]], ids=["all", "non-trailing", "negative-unsorted"])
def test_layer_norm_builder_axes(axes):
    g = np.random.default_rng(6)
    x = g.normal(size=(2, 3, 4)).astype(np.float32)
    norm_axes = axes
    sorted_axes = sorted(a % 3 for a in norm_axes)
    pshape = tuple(x.shape[i] for i in sorted_axes)  # gamma: x.shape at the axes, in increasing order
    gamma = g.normal(size=pshape).astype(np.float32)
    beta = g.normal(size=pshape).astype(np.float32)
    ref = _np_layer_norm(x, norm_axes, gamma, beta, eps=1e-4)
    check_unary_mil(lambda v: mb.layer_norm(x=v, axes=axes, gamma=gamma, beta=beta, epsilon=1e-4), x, ref,
                    "layer_norm", atol=1e-5)


# ----------------------------------------------------------------------------- l2_norm


def _np_l2_norm(x, eps):
    x = x.astype(np.float64)
    s = np.sum(x * x, axis=(-3, -2, -1), keepdims=True)
    return x / np.sqrt(s + eps)


@pytest.mark.parametrize("shape,eps,target", [
    ((3, 4, 5), None, "iOS17"),       # rank 3: the whole tensor; default epsilon 1e-6
    ((2, 3, 4, 5), 1e-3, "iOS17"),     # rank 4: batch-wise over the last three dims
    ((2, 2, 3, 2, 2), 1e-6, "iOS15"),  # rank 5: two batch dims
])
def test_l2_norm(shape, eps, target):
    x = np.random.default_rng(7).normal(size=shape).astype(np.float32)
    ref = _np_l2_norm(x, 1e-6 if eps is None else eps)
    kwargs = {} if eps is None else {"epsilon": eps}
    check_unary_mil(lambda v: mb.l2_norm(x=v, **kwargs), x, ref, "l2_norm", target=target)


def test_l2_norm_epsilon_matters_for_tiny_inputs():
    x = np.full((1, 1, 2, 2), 1e-4, dtype=np.float32)  # sum of squares 4e-8 << epsilon 1e-2
    ml = convert_unary_mil(lambda v: mb.l2_norm(x=v, epsilon=1e-2), x.shape)
    np.testing.assert_allclose(run_unary(ml, x), _np_l2_norm(x, 1e-2), rtol=1e-5)
    assert np.all(run_unary(ml, x) < 2e-3)  # without epsilon the result would be 0.5


# ----------------------------------------------------------------------------- local_response_norm


def _np_lrn(x, size, alpha=1e-4, beta=0.75, k=1.0):
    """x / (k + alpha/size * sum_{q in Q(c)} x_q^2)^beta over channels (axis 1), with
    Q(c) = [c - floor(size/2), c + floor((size-1)/2)] clipped to the channels (Apple's
    MPSCNNCrossChannelNormalization definition)."""
    x = x.astype(np.float64)
    C = x.shape[1]
    sq = x * x
    s = np.zeros_like(x)
    for c in range(C):
        lo, hi = max(0, c - size // 2), min(C - 1, c + (size - 1) // 2)
        s[:, c] = sq[:, lo:hi + 1].sum(axis=1)
    return x / (k + alpha / size * s) ** beta


@pytest.mark.parametrize("shape,size,params,target", [
    ((2, 6, 3, 4), 3, {}, "iOS17"),                                  # defaults alpha/beta/k
    ((2, 6, 3, 4), 5, {"alpha": 0.5, "beta": 0.6, "k": 2.0}, "iOS17"),
    ((2, 7, 5), 4, {"alpha": 0.3, "beta": 0.75, "k": 1.0}, "iOS17"),  # rank 3, even size
    ((1, 5, 2, 2), 3, {"alpha": 1.0, "beta": 0.5, "k": 0.5}, "iOS15"),
])
def test_local_response_norm(shape, size, params, target):
    x = (np.random.default_rng(8).normal(size=shape) * 3).astype(np.float32)
    ref = _np_lrn(x, size, **params)
    # cross-check the reference against torch, which uses the same window
    torch_ref = torch.nn.functional.local_response_norm(torch.from_numpy(x).double(), size, **params).numpy()
    np.testing.assert_allclose(ref, torch_ref, rtol=1e-12)
    check_unary_mil(lambda v: mb.local_response_norm(x=v, size=size, **params), x, ref,
                    "local_response_norm", target=target)


# ----------------------------------------------------------------------------- group norm


@pytest.mark.parametrize("shape,fused", [((2, 4, 3, 5), True), ((2, 4, 6), False)])
def test_group_norm_conversion_ops(shape, fused):
    """torch GroupNorm has no MIL op: it converts to reshape / reduce_mean / sub / square / add /
    sqrt / real_div, and the affine mul + add. On rank-4 inputs coremltools fuses that affine
    pair into a batch_norm with mean 0 and variance 1 (so Core ML adds epsilon a second time)."""
    from opcheck import convert_torch
    ml = convert_torch(_randomize(torch.nn.GroupNorm(2, 4), 9), [_randn(*shape)])
    ops = op_types(ml)
    assert {"reshape", "reduce_mean", "sub", "square", "sqrt", "real_div"} <= ops, ops
    assert not ops & {"layer_norm", "instance_norm"}
    assert ("batch_norm" in ops) == fused, ops
    if not fused:
        assert {"mul", "add"} <= ops


@pytest.mark.parametrize("groups,shape", [(2, (2, 4, 3, 5)), (1, (2, 6, 4)), (3, (1, 3, 8))])
def test_group_norm_end_to_end(groups, shape):
    # needs the elementwise kernels and the tensor family's reshape besides reduce_mean/batch_norm
    module = _randomize(torch.nn.GroupNorm(groups, shape[1]), 10)
    expect = ["reduce_mean", "reshape"] + (["batch_norm"] if len(shape) == 4 else [])
    check_torch_op(module, [_randn(*shape, seed=11) * 2 + 0.5], expect, atol=1e-5)


# ----------------------------------------------------------------------------- bad parameters


@pytest.mark.parametrize("op_type,tensors,values,words", [
    ("local_response_norm", {}, {"size": 0}, ["'size'", "0"]),
    ("layer_norm", {"gamma": torch.ones(3)}, {"axes": [-1]}, ["'gamma'", "(3,)", "(4,)"]),
    ("layer_norm", {}, {"axes": [2]}, ["'axes'", "2"]),
    ("batch_norm", {"mean": torch.zeros(2), "variance": torch.ones(3)}, {}, ["'mean'", "C=3"]),
    ("l2_norm", {}, {}, ["'x'", "rank >= 3"]),
])
def test_bad_parameters_raise_value_error(op_type, tensors, values, words):
    x = torch.zeros(1, 3, 4) if op_type != "l2_norm" else torch.zeros(3, 4)
    if op_type == "layer_norm":
        x = torch.zeros(2, 4)
    k = lookup(op_type)
    assert k is not None and k.family == "normalization"
    with pytest.raises(ValueError) as info:
        k.fn(FakeOpCall(op_type, {"x": x, **tensors}, **values))
    msg = str(info.value)
    assert op_type in msg
    for w in words:
        assert w in msg, msg
