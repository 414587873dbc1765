"""Emulator kernels for gather / scatter ops (coreml_lab/emulator/ops/scatter_gather.py).

Torch models cover what the torch frontend emits (Embedding, index_select and
x[idx] -> gather; torch.gather -> gather_along_axis; x[i, j] -> gather_nd;
scatter/scatter_add -> scatter_along_axis; index_put -> scatter_nd; slice
assignment -> scatter). Scatter modes, batch_dims, validate_indices and index
edge cases are built with the MIL builder and checked against sequential numpy
references written from the op docstrings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from coremltools.converters.mil import Builder as mb
from opcheck import FP16_PROFILES, Fn, check_torch_op, run_mil

from coreml_lab.emulator import OpExecutionError

MODES = ("update", "add", "sub", "mul", "div", "max", "min")
RNG = np.random.default_rng(0)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# =============================================================================== torch models


@pytest.mark.parametrize("target", ["iOS15", "iOS16", "iOS17"])
def test_embedding_gather(target):
    emb = torch.nn.Embedding(10, 4)
    ids = torch.tensor([[1, 2, 9], [0, 9, 3]], dtype=torch.int32)
    check_torch_op(emb, [ids], ["gather"], target=target)


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
def test_index_select_and_negative_indexing(target):
    x = torch.randn(5, 4)
    check_torch_op(Fn(lambda x, i: torch.index_select(x, 1, i) * 2), [x, torch.tensor([3, 0, 3, 1])], ["gather"],
                   target=target)
    # x[i] with negative indices: iOS15 gather takes them, iOS17 converts them first
    check_torch_op(Fn(lambda x, i: x[i] * 2), [x, torch.tensor([-1, 2, -5, 0])], ["gather"], target=target)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_torch_gather_along_axis(dim):
    x = torch.randn(4, 5, 3)
    idx = torch.randint(0, x.shape[dim], (4, 5, 3))
    check_torch_op(Fn(lambda x, i: torch.gather(x, dim, i) + 1), [x, idx], ["gather_along_axis"])


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
def test_advanced_indexing_gather_nd(target):
    x = torch.randn(4, 5, 3)
    i = torch.tensor([0, 3, -1])
    j = torch.tensor([4, 0, 2])
    check_torch_op(Fn(lambda x, i, j: x[i, j] * 2), [x, i, j], ["gather_nd"], target=target)


@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("dim", [0, 1])
def test_torch_scatter_along_axis(add, dim):
    x = torch.randn(4, 5)
    # a permutation per row / column: no duplicate targets (torch's scatter leaves those undefined)
    idx = torch.argsort(torch.rand(4, 5), dim=dim)[:3] if dim == 0 else torch.argsort(torch.rand(4, 5), dim=1)[:, :3]
    upd = torch.randn(*idx.shape)
    fn = (lambda x, i, u: x.scatter_add(dim, i, u)) if add else (lambda x, i, u: x.scatter(dim, i, u))
    check_torch_op(Fn(fn), [x, idx, upd], ["scatter_along_axis"])


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_index_put_scatter_nd(target, accumulate):
    x = torch.randn(5, 3)
    # accumulate=True sums repeated rows; plain index_put needs distinct rows
    idx = torch.tensor([2, -1, 2, 0]) if accumulate else torch.tensor([2, -1, 0])
    upd = torch.randn(len(idx), 3)
    check_torch_op(Fn(lambda x, i, u: torch.index_put(x, (i,), u, accumulate=accumulate)), [x, idx, upd],
                   ["scatter_nd"], target=target)


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
def test_slice_assignment_scatter(target):
    def assign(x, y):
        x = x.clone()
        x[1:4] = y
        return x * 1.0

    check_torch_op(Fn(assign), [torch.randn(6, 3), torch.randn(3, 3)], ["scatter"], target=target)


# =============================================================================== builder: gathers


def _ref_gather(x, idx, axis, batch_dims):
    """output[p0..p_{axis-1}, i..., ...] = x[..., indices[b..., i...], ...] (tf.gather with batch_dims)."""
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    if batch_dims == 0:
        return np.take(x, idx, axis=axis)
    out = [_ref_gather(x[b], idx[b], axis - 1, batch_dims - 1) for b in range(x.shape[0])]
    return np.stack(out)


@pytest.mark.parametrize("target,axis,batch_dims,ishape", [
    ("iOS15", 0, 0, (2, 3)), ("iOS15", -1, 0, (4,)), ("iOS16", 1, 1, (2, 3)), ("iOS16", 2, 2, (2, 3, 2)),
    ("iOS17", 2, 1, (2, 5)), ("iOS17", 1, 0, ()),
])
def test_gather_batch_dims(target, axis, batch_dims, ishape):
    x = randn(2, 3, 4, 5)
    lo = -x.shape[axis] if target != "iOS17" else 0  # iOS17 indices are non-negative
    idx = RNG.integers(lo, x.shape[axis], size=ishape).astype(np.int32)
    if ishape == ():
        idx = idx.reshape(1)  # model inputs cannot be rank 0: squeezed in the program

    def body(x, i):
        i = mb.squeeze(x=i) if ishape == () else i
        kw = {"batch_dims": batch_dims} if target != "iOS15" else {}
        return mb.gather(x=x, indices=i, axis=axis, **kw)

    want = _ref_gather(x, idx.reshape(ishape), axis % 4, batch_dims)
    got = run_mil(body, {"x": x, "i": idx}, target)[0]
    np.testing.assert_array_equal(got, want)
    for cu in FP16_PROFILES:  # data movement: exact in FP16 too
        got16 = run_mil(body, {"x": x, "i": idx}, target, fp16=True, compute_unit=cu)[0]
        np.testing.assert_array_equal(got16, want.astype(np.float16).astype(np.float32))


def test_gather_along_axis_negative_and_int():
    x = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    idx = RNG.integers(-4, 4, (2, 3, 6)).astype(np.int32)  # longer than the axis; negative indices
    got = run_mil(lambda x, i: mb.gather_along_axis(x=x, indices=i, axis=-1), {"x": x, "i": idx}, "iOS15")[0]
    np.testing.assert_array_equal(got, np.take_along_axis(x, np.where(idx < 0, idx + 4, idx), axis=-1))


def _ref_gather_nd(x, idx, batch_dims):
    if batch_dims:
        return np.stack([_ref_gather_nd(x[b], idx[b], batch_dims - 1) for b in range(x.shape[0])])
    L = idx.shape[-1]
    flat = idx.reshape(-1, L)
    rows = [x[tuple(int(v) if v >= 0 else int(v) + x.shape[d] for d, v in enumerate(r))] for r in flat]
    return np.stack(rows).reshape(idx.shape[:-1] + x.shape[L:])


@pytest.mark.parametrize("target,batch_dims,ishape", [
    ("iOS15", 0, (3, 2)), ("iOS15", 0, (2, 2, 3)), ("iOS16", 1, (2, 4, 1)), ("iOS17", 1, (2, 3, 2)),
    ("iOS17", 2, (2, 3, 1)),
])
def test_gather_nd_batch_dims(target, batch_dims, ishape):
    x = randn(2, 3, 4, 5)
    L = ishape[-1]
    hi = np.array(x.shape[batch_dims:batch_dims + L])
    idx = (RNG.integers(0, 1 << 20, size=ishape) % hi).astype(np.int32)
    if target == "iOS15":
        idx = np.where(RNG.random(ishape) < 0.5, idx - hi, idx).astype(np.int32)  # negative indices too
    kw = {"batch_dims": batch_dims} if target != "iOS15" else {}
    got = run_mil(lambda x, i: mb.gather_nd(x=x, indices=i, **kw), {"x": x, "i": idx}, target)[0]
    np.testing.assert_array_equal(got, _ref_gather_nd(x, idx, batch_dims))


def test_validate_indices_raises_and_unvalidated_clamps():
    x = randn(4, 3)
    bad = np.array([1, 4], np.int32)
    with pytest.raises(OpExecutionError, match="validate_indices"):
        run_mil(lambda x, i: mb.gather(x=x, indices=i, validate_indices=True), {"x": x, "i": bad})
    neg = np.array([-1, 0], np.int32)  # iOS17: negative indices are out of bound
    with pytest.raises(OpExecutionError, match="negative"):
        run_mil(lambda x, i: mb.gather(x=x, indices=i, validate_indices=True), {"x": x, "i": neg})
    # without validation: undefined but memory safe -> clamped, never an error
    got = run_mil(lambda x, i: mb.gather(x=x, indices=i), {"x": x, "i": bad})[0]
    np.testing.assert_array_equal(got, x[[1, 3]])
    with pytest.raises(OpExecutionError, match="validate_indices"):
        run_mil(lambda d, i, u: mb.scatter_nd(data=d, indices=i, updates=u, validate_indices=True),
                {"d": x, "i": np.array([[5]], np.int32), "u": randn(1, 3)})


# =============================================================================== builder: scatters


def _apply_seq(data, targets, values, mode):
    """The docstring's update rule applied one update at a time, in order (float64 / exact ints)."""
    out = data.astype(np.float64 if data.dtype.kind == "f" else np.int64).reshape(-1).copy()
    for t, v in zip(targets, values):
        if mode == "update":
            out[t] = v
        elif mode == "add":
            out[t] += v
        elif mode == "sub":
            out[t] -= v
        elif mode == "mul":
            out[t] *= v
        elif mode == "div":
            out[t] = out[t] / v if data.dtype.kind == "f" else int(out[t] / v)
        elif mode == "max":
            out[t] = max(out[t], v)
        elif mode == "min":
            out[t] = min(out[t], v)
    return out.reshape(data.shape).astype(data.dtype)


def _check(got, want):
    if want.dtype.kind == "f":
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, want)


def _ref_scatter(data, idx, upd, axis, mode):
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    targets, values = [], []
    for pos in np.ndindex(*upd.shape):
        p = list(pos)
        p[axis] = idx[pos[axis]]
        targets.append(np.ravel_multi_index(p, data.shape))
        values.append(upd[pos])
    return _apply_seq(data, targets, values, mode)


def _data(kind, shape):
    if kind == "f":
        return RNG.uniform(0.5, 2.0, shape).astype(np.float32) * RNG.choice([-1, 1], shape)
    return RNG.integers(1, 9, shape).astype(np.int32) * RNG.choice([-1, 1], shape).astype(np.int32)


@pytest.mark.parametrize("kind", ["f", "i"])
@pytest.mark.parametrize("mode", MODES)
def test_scatter_modes(mode, kind):
    data = _data(kind, (4, 5))
    idx = np.array([2, -1, 2], np.int32)  # duplicate and negative (iOS15)
    upd = _data(kind, (4, 3))
    got = run_mil(lambda d, i, u: mb.scatter(data=d, indices=i, updates=u, axis=1, mode=mode),
                  {"d": data, "i": idx, "u": upd}, "iOS15")[0]
    _check(got, _ref_scatter(data, idx, upd, 1, mode))


def _ref_scatter_along_axis(data, idx, upd, axis, mode):
    idx = np.where(idx < 0, idx + data.shape[axis], idx)
    targets, values = [], []
    for pos in np.ndindex(*upd.shape):
        p = list(pos)
        p[axis] = idx[pos]
        targets.append(np.ravel_multi_index(p, data.shape))
        values.append(upd[pos])
    return _apply_seq(data, targets, values, mode)


@pytest.mark.parametrize("kind", ["f", "i"])
@pytest.mark.parametrize("mode", MODES)
def test_scatter_along_axis_modes(mode, kind):
    data = _data(kind, (3, 4, 2))
    idx = RNG.integers(-4, 4, (3, 5, 2)).astype(np.int32)  # 5 updates into 4 slots: duplicates
    upd = _data(kind, (3, 5, 2))
    got = run_mil(lambda d, i, u: mb.scatter_along_axis(data=d, indices=i, updates=u, axis=1, mode=mode),
                  {"d": data, "i": idx, "u": upd}, "iOS15")[0]
    _check(got, _ref_scatter_along_axis(data, idx, upd, 1, mode))


def _ref_scatter_nd(data, idx, upd, mode):
    L = idx.shape[-1]
    inner = data.shape[L:]
    targets, values = [], []
    for k, row in enumerate(idx.reshape(-1, L)):
        row = [int(v) + data.shape[d] if v < 0 else int(v) for d, v in enumerate(row)]
        for q in np.ndindex(*inner):
            targets.append(np.ravel_multi_index(row + list(q), data.shape))
            values.append(upd.reshape((-1,) + inner)[(k,) + q])
    return _apply_seq(data, targets, values, mode)


@pytest.mark.parametrize("kind", ["f", "i"])
@pytest.mark.parametrize("mode", MODES)
def test_scatter_nd_modes(mode, kind):
    data = _data(kind, (3, 4, 2))
    idx = np.array([[[0, 1], [2, -1]], [[0, 1], [1, 0]]], np.int32)  # (2, 2, 2): duplicate [0, 1]
    upd = _data(kind, (2, 2, 2))
    got = run_mil(lambda d, i, u: mb.scatter_nd(data=d, indices=i, updates=u, mode=mode),
                  {"d": data, "i": idx, "u": upd}, "iOS15")[0]
    _check(got, _ref_scatter_nd(data, idx, upd, mode))


@pytest.mark.parametrize("op", ["scatter", "scatter_along_axis", "scatter_nd"])
def test_scatter_ios17_default_mode_and_dropped_out_of_bound(op):
    data = randn(4, 3)
    if op == "scatter":
        idx, upd = np.array([1, 9, 3], np.int32), randn(3, 3)
        body = lambda d, i, u: mb.scatter(data=d, indices=i, updates=u)
        keep = lambda: _ref_scatter(data, idx[[0, 2]], upd[[0, 2]], 0, "add")
    elif op == "scatter_along_axis":
        idx, upd = np.array([[1, 7, 0]], np.int32), randn(1, 3)
        body = lambda d, i, u: mb.scatter_along_axis(data=d, indices=i, updates=u, axis=0)
        want = data.astype(np.float64)
        want[1, 0] += upd[0, 0]
        want[0, 2] += upd[0, 2]
        keep = lambda: want.astype(np.float32)
    else:
        idx, upd = np.array([[2], [-7]], np.int32), randn(2, 3)
        body = lambda d, i, u: mb.scatter_nd(data=d, indices=i, updates=u)
        keep = lambda: _ref_scatter_nd(data, idx[:1], upd[:1], "add")
    # default mode is "add"; an out-of-bound update is dropped (memory-safe, no error)
    got = run_mil(body, {"d": data, "i": idx, "u": upd}, "iOS17")[0]
    _check(got, keep())


def test_scatter_add_fp16_accumulation_on_ne():
    # 64 updates of 1.0 plus a start of 2048: FP16 sequential adds stall (2048 + 1 rounds to 2048),
    # while an FP32 accumulator (GPU) gets 2112 and stores it exactly in FP16. "ne" is the
    # FP16-accumulating NE variant (the calibrated NE accumulates wide, like the GPU).
    from coreml_lab.emulator import ne_fp16_accumulation

    data = np.full((2, 1), 2048.0, np.float32)
    idx = np.zeros(64, np.int32)
    upd = np.ones((64, 1), np.float32)
    body = lambda d, i, u: mb.scatter(data=d, indices=i, updates=u, axis=0, mode="add")
    ne = run_mil(body, {"d": data, "i": idx, "u": upd}, "iOS15", fp16=True, compute_unit=ne_fp16_accumulation())[0]
    gpu = run_mil(body, {"d": data, "i": idx, "u": upd}, "iOS15", fp16=True, compute_unit="CPU_AND_GPU")[0]
    np.testing.assert_array_equal(ne, [[2048.0], [2048.0]])
    np.testing.assert_array_equal(gpu, [[2112.0], [2048.0]])


def test_bad_scatter_mode_raises_value_error():
    from coreml_lab.emulator.ops import scatter_gather as S

    class Call:
        accumulate = torch.float32

        def str(self, name, default=None):
            return "xor" if name == "mode" else default

    with pytest.raises(ValueError, match="mode='xor'.*update"):
        S._apply(Call(), torch.zeros(3), torch.tensor([0]), torch.ones(1), None, "scatter")


@pytest.mark.parametrize("indices", [[-1, 0], [10, 0]])
@pytest.mark.parametrize("op", ["scatter", "scatter_along_axis", "scatter_nd"])
def test_ios17_validate_indices_stops_the_prediction_as_core_ml_does(op, indices):
    # coremltools' iOS17 op tests: with validate_indices=True and runtime indices, Core ML raises a
    # RuntimeError "Unable to compute the prediction using ML Program"; OpExecutionError is one
    data, upd = randn(2, 3), randn(2, 3)
    idx = np.array(indices, np.int32)
    body = {
        "scatter": lambda d, i, u: mb.scatter(data=d, indices=i, updates=u, validate_indices=True),
        "scatter_along_axis": lambda d, i, u: mb.scatter_along_axis(
            data=d, indices=mb.reshape(x=mb.tile(x=i, reps=[3]), shape=[2, 3]), updates=u, validate_indices=True),
        "scatter_nd": lambda d, i, u: mb.scatter_nd(
            data=d, indices=mb.reshape(x=i, shape=[2, 1]), updates=u, validate_indices=True),
    }[op]
    with pytest.raises(RuntimeError, match="Unable to compute the prediction using ML Program") as info:
        run_mil(body, {"d": data, "i": idx, "u": upd}, "iOS17")
    assert isinstance(info.value, OpExecutionError) and op in str(info.value)


def test_ios17_unvalidated_negative_scatter_index_is_out_of_bound_not_from_the_end():
    # coremltools' TestScatter.test_ios17_invalid_indices: index -1 must not update the last row
    # ("negative values are considered out-of-bound" from iOS17); before iOS17 it counts from the end
    data = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    upd = np.array([[5, 6, 7], [8, 9, 10]], np.float32)
    idx = np.array([-1, 0], np.int32)
    body = lambda d, i, u: mb.scatter(data=d, indices=i, updates=u)
    got17 = run_mil(body, {"d": data, "i": idx, "u": upd}, "iOS17")[0]
    np.testing.assert_array_equal(got17, [[9, 11, 13], [4, 5, 6]])  # the -1 update is dropped
    got15 = run_mil(body, {"d": data, "i": idx, "u": upd}, "iOS15")[0]
    np.testing.assert_array_equal(got15, [[9, 11, 13], [9, 11, 13]])
    # gathers clamp an out-of-bound index from iOS17 on, and still count from the end before
    x = randn(4, 3)
    g17 = run_mil(lambda x, i: mb.gather(x=x, indices=i), {"x": x, "i": np.array([-1, 1], np.int32)}, "iOS17")[0]
    np.testing.assert_array_equal(g17, x[[0, 1]])
    g15 = run_mil(lambda x, i: mb.gather(x=x, indices=i), {"x": x, "i": np.array([-1, 1], np.int32)}, "iOS15")[0]
    np.testing.assert_array_equal(g15, x[[3, 1]])
