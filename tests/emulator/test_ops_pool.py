"""Emulator kernels of the pool family: avg_pool, max_pool, l2_pool."""

from __future__ import annotations

import math

import coremltools as ct
import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb
from opcheck import check_torch_op, convert_program, fp16_accumulation_runs, require_kernels

from coreml_lab.emulator import EmulatedModel

# ----------------------------------------------------------------------------- numpy reference


def np_pool(x, kind, ks, strides, pad_type, pad=None, ceil_mode=False, exclude=False):
    """Pooling written from the MIL docstring (float64): window taps gathered with masks."""
    x = x.astype(np.float64)
    nd = x.ndim - 2
    ins = x.shape[2:]
    if pad_type == "valid":
        pads = [(0, 0)] * nd
    elif pad_type == "custom":
        pads = [(pad[2 * i], pad[2 * i + 1]) for i in range(nd)]
    else:
        pads = []
        for d, k, s in zip(ins, ks, strides):
            total = max(0, (math.ceil(d / s) - 1) * s + k - d)
            lo, hi = total // 2, total - total // 2
            pads.append((lo, hi) if pad_type == "same" else (hi, lo))
    outs = []
    for d, k, s, (pb, pa) in zip(ins, ks, strides, pads):
        if ceil_mode:
            o = math.ceil((d + pb + pa - k) / s) + 1
            if (o - 1) * s >= d + pb and pb + pa > 0:
                o -= 1
        else:
            o = (d + pb + pa - k) // s + 1
        outs.append(o)
    grids = np.meshgrid(*[np.arange(o) for o in outs], indexing="ij")
    acc = np.full(x.shape[:2] + tuple(outs), -np.inf if kind == "max" else 0.0)
    count = np.zeros(tuple(outs))
    for taps in np.ndindex(*ks):
        pos = [g * s + t - pb for g, s, t, (pb, _) in zip(grids, strides, taps, pads)]
        inside = np.ones(tuple(outs), bool)
        in_padded = np.ones(tuple(outs), bool)
        for p, d, (pb, pa) in zip(pos, ins, pads):
            inside &= (p >= 0) & (p < d)
            in_padded &= (p >= -pb) & (p < d + pa)
        idx = tuple(np.clip(p, 0, d - 1) for p, d in zip(pos, ins))
        vals = x[(slice(None), slice(None)) + idx]
        if kind == "max":
            acc = np.where(inside, np.maximum(acc, vals), acc)
        elif kind == "l2":
            acc = acc + np.where(inside, vals * vals, 0.0)
        else:
            acc = acc + np.where(inside, vals, 0.0)
        count += inside if exclude else in_padded
    if kind == "avg":
        return acc / count
    if kind == "l2":
        return np.sqrt(acc)
    return acc


# ----------------------------------------------------------------------------- from torch


POOL_CASES = [
    (lambda: torch.nn.MaxPool1d(3, 2, 1), (2, 3, 11), "max_pool"),
    (lambda: torch.nn.MaxPool1d(2, ceil_mode=True), (1, 3, 9), "max_pool"),
    (lambda: torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True), (1, 2, 8, 9), "max_pool"),
    (lambda: torch.nn.MaxPool2d((2, 3), stride=(2, 1)), (1, 2, 7, 8), "max_pool"),
    (lambda: torch.nn.MaxPool3d(3, 2, 1), (1, 2, 5, 6, 7), "max_pool"),
    (lambda: torch.nn.MaxPool3d(2, 2, ceil_mode=True), (1, 2, 5, 5, 4), "max_pool"),  # ceil -> extra custom pad
    (lambda: torch.nn.AvgPool1d(3, 2, 1), (2, 3, 11), "avg_pool"),
    (lambda: torch.nn.AvgPool1d(3, 2, 1, count_include_pad=False, ceil_mode=True), (1, 3, 10), "avg_pool"),
    (lambda: torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=True), (1, 2, 8, 8), "avg_pool"),
    (lambda: torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False), (1, 2, 8, 8), "avg_pool"),
    (lambda: torch.nn.AvgPool2d((2, 4), stride=(1, 3), padding=(1, 2)), (1, 2, 6, 9), "avg_pool"),
    (lambda: torch.nn.AvgPool3d(3, 2, 1, count_include_pad=False), (1, 2, 5, 6, 7), "avg_pool"),
    (lambda: torch.nn.AvgPool3d(3, 2, 1, count_include_pad=True), (1, 2, 5, 6, 7), "avg_pool"),
    # 3-d ceil_mode: the converter pads after and excludes padding from the average
    (lambda: torch.nn.AvgPool3d(2, 2, ceil_mode=True, count_include_pad=False), (1, 2, 5, 5, 4), "avg_pool"),
    (lambda: torch.nn.AdaptiveAvgPool2d((2, 3)), (1, 2, 8, 9), "avg_pool"),
    (lambda: torch.nn.AdaptiveMaxPool2d((2, 2)), (1, 2, 8, 8), "max_pool"),
]


@pytest.mark.parametrize("case", range(len(POOL_CASES)))
def test_pool_torch(case):
    torch.manual_seed(case)
    factory, shape, op = POOL_CASES[case]
    check_torch_op(factory(), [torch.randn(*shape)], [op])


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
@pytest.mark.parametrize("factory", [lambda: torch.nn.MaxPool2d(2, 2, 1), lambda: torch.nn.AvgPool2d(3, 2, 1)])
def test_pool_targets(target, factory):
    torch.manual_seed(40)
    m = factory()
    check_torch_op(m, [torch.randn(1, 3, 7, 7)], ["max_pool" if isinstance(m, torch.nn.MaxPool2d) else "avg_pool"],
                   target=target)


def test_lppool():
    require_kernels("pow", "abs", "sign", "relu", "mul")
    torch.manual_seed(41)
    # LPPool converts to pow / avg_pool / sign / relu / abs / pow, not to l2_pool
    check_torch_op(torch.nn.LPPool2d(2, 2), [torch.rand(1, 2, 6, 6) + 0.1], ["avg_pool"])


# ----------------------------------------------------------------------------- from MIL


def _pool_prog(op, x_shape, target, **kw):
    fn = getattr(mb, op)

    @mb.program(input_specs=[mb.TensorSpec(shape=x_shape)], opset_version=target)
    def prog(x):
        return fn(x=x, **kw)
    return convert_program(prog, target)


MIL_CASES = [
    # (op, x shape, kernel, strides, pad_type, pad, ceil_mode, exclude, target)
    ("l2_pool", (1, 3, 10), [3], [2], "valid", None, False, None, ct.target.iOS15),
    ("l2_pool", (1, 3, 9), [4], [1], "same", None, False, None, ct.target.iOS15),
    ("l2_pool", (2, 2, 7, 8), [2, 3], [2, 2], "custom", [1, 1, 0, 2], False, None, ct.target.iOS17),
    ("l2_pool", (1, 2, 7, 8), [3, 3], [2, 2], "custom", [1, 1, 1, 1], True, None, ct.target.iOS17),
    ("l2_pool", (1, 2, 7, 8), [2, 4], [3, 3], "same_lower", None, False, None, ct.target.iOS17),
    ("avg_pool", (1, 2, 7, 8), [2, 4], [2, 3], "same", None, False, False, ct.target.iOS15),
    ("avg_pool", (1, 2, 7, 8), [2, 4], [2, 3], "same", None, False, True, ct.target.iOS15),
    ("avg_pool", (1, 2, 7, 8), [2, 4], [2, 3], "same_lower", None, False, False, ct.target.iOS16),
    ("avg_pool", (1, 2, 5, 6, 7), [2, 3, 2], [1, 2, 3], "same_lower", None, False, True, ct.target.iOS17),
    ("avg_pool", (1, 2, 8), [3], [2], "custom", [1, 1], True, False, ct.target.iOS17),  # last window overflows
    ("max_pool", (1, 2, 7, 8), [2, 4], [2, 3], "same_lower", None, False, None, ct.target.iOS16),
    ("max_pool", (1, 2, 5, 6, 7), [2, 2, 3], [2, 1, 2], "same", None, False, None, ct.target.iOS17),
    ("max_pool", (1, 2, 9, 9), [3, 2], [2, 2], "custom", [1, 1, 0, 0], True, None, ct.target.iOS17),
]


@pytest.mark.parametrize("case", range(len(MIL_CASES)))
def test_pool_mil(case):
    op, shape, ks, strides, pad_type, pad, ceil_mode, exclude, target = MIL_CASES[case]
    rng = np.random.default_rng(case)
    x = rng.standard_normal(shape).astype(np.float32)
    kw = dict(kernel_sizes=ks, strides=strides, pad_type=pad_type, ceil_mode=ceil_mode)
    if pad is not None:
        kw["pad"] = pad
    if exclude is not None:
        kw["exclude_padding_from_average"] = exclude
    ml = _pool_prog(op, shape, target, **kw)
    declared = tuple(ml._mil_program.functions["main"].outputs[0].shape)
    got = next(iter(EmulatedModel(ml, "CPU_ONLY").predict({"x": x}).values()))
    want = np_pool(x, op.split("_")[0], ks, strides, pad_type, pad, ceil_mode, bool(exclude))
    assert got.shape == declared == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_pool_fp16_program_mil():
    """An FP16 MIL program (l2_pool has no torch source) under GPU and NE profiles."""
    rng = np.random.default_rng(50)
    x = rng.standard_normal((1, 4, 12, 12)).astype(np.float32)

    @mb.program(input_specs=[mb.TensorSpec(shape=x.shape)], opset_version=ct.target.iOS17)
    def prog(x):
        return mb.l2_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="same")

    ml = convert_program(prog, ct.target.iOS17, ct.precision.FLOAT16)
    want = np_pool(x, "l2", [3, 3], [2, 2], "same")
    for cu in ("CPU_AND_GPU", "CPU_AND_NE"):
        got = next(iter(EmulatedModel(ml, cu).predict({"x": x}).values()))
        np.testing.assert_allclose(got, want, rtol=2e-2, atol=1e-2 * np.abs(want).max())


# ----------------------------------------------------------------------------- FP16 accumulation


def test_avg_pool_fp16_accumulation():
    torch.manual_seed(51)
    m = torch.nn.AvgPool2d(16, 8, count_include_pad=False, padding=4)
    x = torch.rand(1, 2, 48, 48) * 4 + 1
    want, acc32, acc16, _ = fp16_accumulation_runs(m, [x])
    assert not np.array_equal(acc16, acc32)
    assert np.max(np.abs(acc16 - want)) > np.max(np.abs(acc32 - want))
    np.testing.assert_allclose(acc16, want, rtol=2e-2)
    np.testing.assert_allclose(acc32, want, rtol=2e-2)
