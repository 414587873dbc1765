"""Emulator kernels for MIL tensor ops (coreml_lab/emulator/ops/tensor.py and shape.py).

Ops the torch frontend emits are checked with ``check_torch_op`` (FP32 CPU vs
torch; FP16 GPU/NE vs a float64 reference). The rest (and the parameter variants
torch never produces) are built with the MIL builder, converted without graph
passes (so nothing is constant-folded away) and compared with numpy references
written from the op docstrings. Data-movement ops must be *exact*: their FP16
variants are compared bit for bit against the reference on FP16-rounded inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from opcheck import FP16_PROFILES, FakeOpCall, Fn, check_torch_op, run_mil

from coreml_lab.emulator import EmulatedModel, OpExecutionError

RNG = np.random.default_rng(0)


def check_exact(body, inputs, refs, target="iOS17", fp16=True):
    """FP32 CPU equals ``refs(**inputs)`` exactly; FP16 GPU/NE equal it on FP16-rounded inputs."""
    want = refs(**inputs)
    want = list(want) if isinstance(want, (list, tuple)) else [want]
    got = run_mil(body, inputs, target)
    for g, w in zip(got, want):
        assert g.shape == np.shape(w), f"shape {g.shape} != {np.shape(w)}"
        np.testing.assert_array_equal(g, w)
    if not fp16:
        return
    r16 = {k: (v.astype(np.float16).astype(np.float32) if v.dtype.kind == "f" else v) for k, v in inputs.items()}
    want16 = refs(**r16)
    want16 = list(want16) if isinstance(want16, (list, tuple)) else [want16]
    for cu in FP16_PROFILES:
        got = run_mil(body, inputs, target, fp16=True, compute_unit=cu)
        for g, w in zip(got, want16):
            np.testing.assert_array_equal(g, np.asarray(w, dtype=g.dtype), err_msg=cu)


def _f(var, value):
    """A float constant in the dtype of ``var`` (FP16 programs need FP16 parameters)."""
    return np.float16(value) if var.dtype == types.fp16 else np.float32(value)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# =============================================================================== torch models


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
@pytest.mark.parametrize("shape", [(6, 20), (-1, 5), (2, 60)])
def test_reshape_view(target, shape):
    check_torch_op(Fn(lambda x: x.view(*shape) * 2), [torch.randn(2, 3, 4, 5)], ["reshape"], target=target)


def test_flatten_torch():
    check_torch_op(Fn(lambda x: torch.flatten(x, 1) + 1), [torch.randn(2, 3, 4)], ["reshape"])


@pytest.mark.parametrize("perm", [(0, 2, 3, 1), (3, 2, 1, 0), (1, 0, 2, 3)])
def test_transpose_permute(perm):
    check_torch_op(Fn(lambda x: x.permute(*perm) + 0.5), [torch.randn(2, 3, 4, 5)], ["transpose"])


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
@pytest.mark.parametrize("fn", [
    lambda x: x[:, 1:, ::2, 1:4],
    lambda x: x[..., -3:-1, ::3],
    lambda x: x[:, -1],            # squeeze_mask
    lambda x: x[1, :, 2::2, 0],    # several squeezes
    lambda x: x.narrow(2, 1, 2),
], ids=["steps", "negative", "squeeze", "squeeze2", "narrow"])
def test_slice_by_index_torch(target, fn):
    check_torch_op(Fn(lambda x: fn(x) * 3), [torch.randn(2, 3, 6, 7)], ["slice_by_index"], target=target)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_concat_cat(dim):
    check_torch_op(Fn(lambda x, y: torch.cat([x, y * 2, x], dim)), [torch.randn(2, 3, 4), torch.randn(2, 3, 4)],
                   ["concat"])


@pytest.mark.parametrize("fn", [
    lambda x: torch.split(x, [1, 2, 3], 1),
    lambda x: torch.split(x, 2, -1),
    lambda x: torch.chunk(x, 3, 1),
], ids=["sizes", "even", "chunk"])
def test_split_torch(fn):
    check_torch_op(Fn(lambda x: tuple(p * 2 for p in fn(x))), [torch.randn(2, 6, 4)], ["split"])


@pytest.mark.parametrize("dim", [0, 1, 3, -1])
def test_stack_torch(dim):
    check_torch_op(Fn(lambda x, y: torch.stack([x, y + 1], dim)), [torch.randn(2, 3, 4), torch.randn(2, 3, 4)],
                   ["stack"])


def test_squeeze_unsqueeze_torch():
    check_torch_op(Fn(lambda x: x.unsqueeze(1).unsqueeze(-1) * 2), [torch.randn(2, 3)], ["expand_dims"])
    check_torch_op(Fn(lambda x: x.squeeze(2) * 2), [torch.randn(2, 3, 1, 4)], ["squeeze"])


@pytest.mark.parametrize("reps", [(1, 2, 1, 3), (2, 1, 1, 1), (2, 1, 3, 1, 2)])
def test_tile_repeat(reps):
    check_torch_op(Fn(lambda x: x.repeat(*reps) + 1), [torch.randn(2, 3, 4, 5)], ["tile"])


@pytest.mark.parametrize("mode,pads,target", [
    ("constant", (1, 2), "iOS15"), ("constant", (1, 2, 0, 3), "iOS17"), ("reflect", (1, 2, 2, 1), "iOS15"),
    ("reflect", (3, 1), "iOS17"), ("replicate", (1, 2, 2, 1), "iOS17"), ("replicate", (2, 0), "iOS15"),
])
def test_pad_torch(mode, pads, target):
    kw = {"value": 1.5} if mode == "constant" else {}
    x = torch.randn(2, 3, 5, 6) if len(pads) == 4 else torch.randn(3, 5, 6)  # torch's reflect/replicate limits
    check_torch_op(Fn(lambda x: F.pad(x, pads, mode=mode, **kw) * 2), [x], ["pad"], target=target)


@pytest.mark.parametrize("target", ["iOS15", "iOS16", "iOS17"])
@pytest.mark.parametrize("k,dim,largest", [(2, 1, True), (3, -1, False), (1, 0, True), (7, -1, True)])
def test_topk_torch(target, k, dim, largest):
    # a permutation of distinct values: no ties, so torch's order is the only correct one
    x = torch.randperm(2 * 5 * 7).float().reshape(2, 5, 7) / 4
    check_torch_op(Fn(lambda x: torch.topk(x, k, dim=dim, largest=largest)), [x], ["topk"], target=target)


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("dim", [0, -1])
def test_argsort_sort_torch(descending, dim):
    x = torch.randperm(4 * 6).float().reshape(4, 6) - 10
    check_torch_op(Fn(lambda x: torch.argsort(x, dim=dim, descending=descending)), [x], ["argsort"])
    check_torch_op(Fn(lambda x: torch.sort(x, dim=dim, descending=descending)), [x], ["argsort"])


def test_pixel_shuffle_torch():
    check_torch_op(Fn(lambda x: F.pixel_shuffle(x, 2) + 1), [torch.randn(1, 8, 3, 5)], ["pixel_shuffle"],
                   target="iOS15")
    check_torch_op(Fn(lambda x: F.pixel_shuffle(x, 3) + 1), [torch.randn(2, 9, 2, 2)], ["pixel_shuffle"])


@pytest.mark.parametrize("f", [2, 3])
def test_pixel_unshuffle_torch(f):
    check_torch_op(Fn(lambda x: F.pixel_unshuffle(x, f) + 1), [torch.randn(1, 2, 6, 12)], ["pixel_unshuffle"],
                   target="iOS16")


@pytest.mark.parametrize("dims", [(1,), (1, 3), (0, 1, 2, 3)])
def test_reverse_flip(dims):
    check_torch_op(Fn(lambda x: torch.flip(x, dims) * 2), [torch.randn(2, 3, 4, 5)], ["reverse"])


def test_range_1d_dynamic_arange():
    # length comes from the input at run time
    check_torch_op(Fn(lambda n: torch.arange(n.sum()) * 2), [torch.tensor([3, 4], dtype=torch.int32)],
                   ["range_1d"])


@pytest.mark.parametrize("fn", [
    lambda x: torch.triu(x), lambda x: torch.tril(x), lambda x: torch.tril(x, 1), lambda x: torch.triu(x, -1),
], ids=["triu", "tril", "tril+1", "triu-1"])
def test_band_part_triu_tril(fn):
    check_torch_op(Fn(lambda x: fn(x) + 1), [torch.randn(2, 5, 5)], ["band_part"])


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
def test_one_hot_torch(target):
    idx = torch.tensor([[0, 3, 4], [2, 2, 1]], dtype=torch.int32)
    check_torch_op(Fn(lambda i: F.one_hot(i.long(), 5)), [idx], ["one_hot"], target=target)


@pytest.mark.parametrize("target", ["iOS15", "iOS17"])
def test_non_zero_torch(target):
    x = torch.tensor([[1.0, 0.0, -2.0], [0.0, 0.0, 3.0]])
    ml = check_torch_op(Fn(lambda x: torch.nonzero(x)), [x], ["non_zero"], target=target)
    # a different input gives a different number of rows (flexible output)
    out = EmulatedModel(ml, "CPU_ONLY").predict({"x0": np.zeros((2, 3), np.float32)})
    assert list(out.values())[0].shape == (0, 2)


@pytest.mark.parametrize("target", ["iOS15", "iOS18"])
def test_slice_assignment(target):
    def assign(x, y):
        x = x.clone()
        x[:, 1:5:2] = y
        return x * 1.0

    expect = ["slice_update"] if target == "iOS18" else ["scatter"]
    check_torch_op(Fn(assign), [torch.randn(3, 6), torch.randn(3, 2)], expect, target=target)


# =============================================================================== MIL builder ops


def test_fill_fill_like_shape():
    s = np.array([2, 3], np.int32)
    x = randn(4, 5)
    check_exact(
        lambda s, x: [mb.fill(shape=s, value=2.5), mb.fill(shape=s), mb.fill_like(ref_tensor=x, value=-1.0),
                      mb.fill_like(ref_tensor=x, value=7), mb.shape(x=x)],
        {"s": s, "x": x},
        lambda s, x: [np.full((2, 3), 2.5, np.float32), np.zeros((2, 3), np.float32),
                      np.full((4, 5), -1.0, np.float32), np.full((4, 5), 7, np.int32), np.array([4, 5], np.int32)],
        fp16=False)
    got = run_mil(lambda s: mb.fill(shape=s, value=True), {"s": s})[0]
    assert got.shape == (2, 3) and (got == 1).all()


def _range(a, b, c):
    # model inputs cannot be rank 0: squeeze (1,) inputs to scalars
    return mb.range_1d(start=mb.squeeze(x=a), end=mb.squeeze(x=b), step=mb.squeeze(x=c))


@pytest.mark.parametrize("start,end,step", [(0.5, 3.0, 0.25), (5.0, -1.0, -1.5), (2.0, 2.0, 1.0)])
def test_range_1d_float(start, end, step):
    inputs = {"a": np.array([start], np.float32), "b": np.array([end], np.float32), "c": np.array([step], np.float32)}
    got = run_mil(_range, inputs)[0]
    np.testing.assert_allclose(got, np.arange(start, end, step, dtype=np.float64), rtol=1e-6)


def test_range_1d_int():
    inputs = {"a": np.array([7], np.int32), "b": np.array([-4], np.int32), "c": np.array([-3], np.int32)}
    got = run_mil(_range, inputs)[0]
    np.testing.assert_array_equal(got, np.arange(7, -4, -3))
    assert got.dtype == np.int32


@pytest.mark.parametrize("lower,upper", [(0, -1), (-1, 0), (0, 0), (1, 2), (2, -1), (-1, -1)])
def test_band_part_builder(lower, upper):
    x = randn(2, 4, 6)

    def ref(x):
        m, n = np.meshgrid(np.arange(4), np.arange(6), indexing="ij")
        band = ((lower < 0) | (m - n <= lower)) & ((upper < 0) | (n - m <= upper))
        return np.where(band, x, 0).astype(np.float32)

    check_exact(lambda x: mb.band_part(x=x, lower=lower, upper=upper), {"x": x}, ref)


@pytest.mark.parametrize("axis", [-1, 0, 1, 2])
def test_one_hot_axes(axis):
    idx = np.array([[0, 3], [4, 1]], np.int32)

    def ref(i):
        out = np.where(np.arange(5) == i[..., None], 2.0, -1.0).astype(np.float32)
        return np.moveaxis(out, -1, axis)

    check_exact(lambda i: mb.one_hot(indices=i, one_hot_vector_size=5, axis=axis, on_value=2.0, off_value=-1.0),
                {"i": idx}, ref, fp16=False)


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
@pytest.mark.parametrize("pad", [[1, 2], [0, 2, 3, 1], [1, 0, 2, 2, 0, 1]])
def test_pad_builder(mode, pad):
    x = randn(2, 4, 5)
    np_mode = {"replicate": "edge"}.get(mode, mode)

    def ref(x):
        full = [(0, 0)] * (3 - len(pad) // 2) + [tuple(pad[i:i + 2]) for i in range(0, len(pad), 2)]
        kw = {"constant_values": 0.5} if mode == "constant" else {}
        return np.pad(x, full, mode=np_mode, **kw)

    def body(x):
        kw = {"constant_val": _f(x, 0.5)} if mode == "constant" else {}
        return mb.pad(x=x, pad=np.array(pad, np.int32), mode=mode, **kw)

    check_exact(body, {"x": x}, ref)


def test_pad_dynamic_pad_input():
    x = randn(3, 4)
    p = np.array([1, 0, 2, 1], np.int32)
    got = run_mil(lambda x, p: mb.pad(x=x, pad=p, mode="reflect"), {"x": x, "p": p})[0]
    np.testing.assert_array_equal(got, np.pad(x, [(1, 0), (2, 1)], mode="reflect"))


def test_tile_builder():
    x = randn(2, 3)
    check_exact(lambda x: mb.tile(x=x, reps=[3, 2]), {"x": x}, lambda x: np.tile(x, (3, 2)))


def _stable_sort(x, axis, ascending):
    key = x if ascending else -x
    return np.argsort(key, axis=axis, kind="stable")


@pytest.mark.parametrize("ascending", [False, True])
def test_argsort_ties_stable(ascending):
    # ties keep input order (lowest index first) in both directions
    x = np.array([[1.0, 3.0, 1.0, 2.0, 3.0, 1.0], [0.0, 0.0, 0.0, -1.0, 5.0, 0.0]], np.float32)
    check_exact(lambda x: mb.argsort(x=x, axis=-1, ascending=ascending), {"x": x},
                lambda x: _stable_sort(x, -1, ascending).astype(np.int32))
    # long rows with many ties (where an unstable sort really reorders equal keys)
    x = RNG.integers(0, 5, (2, 300)).astype(np.float32)
    check_exact(lambda x: mb.argsort(x=x, axis=-1, ascending=ascending), {"x": x},
                lambda x: _stable_sort(x, -1, ascending).astype(np.int32), fp16=False)


@pytest.mark.parametrize("target", ["iOS15", "iOS16", "iOS17"])
@pytest.mark.parametrize("ascending", [False, True])
def test_topk_ties_and_axis(target, ascending):
    x = np.array([[[2.0, 5.0], [2.0, 1.0], [7.0, 5.0], [2.0, 5.0]]], np.float32)  # (1, 4, 2), ties on axis 1

    def ref(x):
        idx = _stable_sort(x, 1, ascending)[:, :3]
        return np.take_along_axis(x, idx, 1), idx.astype(np.int32)

    check_exact(lambda x: mb.topk(x=x, k=3, axis=1, ascending=ascending), {"x": x}, ref, target=target)


def test_topk_ios17_options():
    x = randn(3, 6)
    # k=-1 ("all") is valid MIL but coremltools 9 cannot serialize it (the output shape becomes -1)
    vals, idx = run_mil(lambda x: mb.topk(x=x, k=6, output_indices_dtype="uint16"), {"x": x})
    order = _stable_sort(x, -1, False)
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_array_equal(vals, np.take_along_axis(x, order, -1))
    only = run_mil(lambda x: mb.topk(x=x, k=2, return_indices=False), {"x": x})
    assert len(only) == 1
    np.testing.assert_array_equal(only[0], np.take_along_axis(x, order[:, :2], -1))
    ints = np.array([[3, 9, -2, 9]], np.int32)
    v, i = run_mil(lambda x: mb.topk(x=x, k=2), {"x": ints})
    np.testing.assert_array_equal(v, [[9, 9]])
    np.testing.assert_array_equal(i, [[1, 3]])


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2])
def test_flatten2d(axis):
    x = randn(2, 3, 4)
    a = axis + 3 if axis < 0 else axis
    check_exact(lambda x: mb.flatten2d(x=x, axis=axis), {"x": x},
                lambda x: x.reshape(int(np.prod(x.shape[:a])), -1))


@pytest.mark.parametrize("target,shape,expect", [
    ("iOS15", [0, 0, -1], (2, 3, 4)),
    ("iOS15", [0, 0, 2, 2], None),   # rank-matching 0s copy dims: (2, 3, 2, 2) from a rank-4 input
    ("iOS17", [1, 0, -1, 0], (1, 2, 3, 4)),   # iOS17: 0 matches from the right ...
    ("iOS17", [0, 0, 2, -1], (1, 2, 2, 6)),   # ... and is 1 when it has no partner
    ("iOS17", [-1], (24,)),
])
def test_reshape_zero_and_minus_one(target, shape, expect):
    x = randn(2, 3, 4) if expect != None else randn(2, 3, 1, 4)  # noqa: E711
    want = expect if expect is not None else (2, 3, 2, 2)
    got = run_mil(lambda x: mb.reshape(x=x, shape=np.array(shape, np.int32)), {"x": x}, target)[0]
    np.testing.assert_array_equal(got, x.reshape(want))


def test_reshape_dynamic_shape_input():
    x = randn(2, 6)
    got = run_mil(lambda x, s: mb.reshape(x=x, shape=s), {"x": x, "s": np.array([3, -1], np.int32)})[0]
    np.testing.assert_array_equal(got, x.reshape(3, 4))


def test_reshape_like():
    x = randn(2, 3, 4, 5)
    a, b = randn(6, 2), randn(4, 1, 5)
    check_exact(lambda x, a, b: mb.reshape_like(x=x, ref_tensors=(a, b), begins=(0, 0), ends=(1, 0),
                                                end_masks=(False, True)),
                {"x": x, "a": a, "b": b}, lambda x, a, b: x.reshape(6, 4, 1, 5), target="iOS16")


def test_identity_expand_squeeze():
    x = randn(3, 1, 4, 1)
    check_exact(lambda x: mb.expand_dims(x=x, axes=[-2]), {"x": randn(3, 4)}, lambda x: x.reshape(3, 1, 4))
    check_exact(lambda x: mb.expand_dims(x=x, axes=[0, -1]), {"x": randn(3, 4)}, lambda x: x.reshape(1, 3, 4, 1))
    check_exact(lambda x: [mb.identity(x=x), mb.squeeze(x=x),
                           mb.squeeze(x=x, axes=[-1]), mb.squeeze(x=x, axes=[0, 1])],
                {"x": x},
                lambda x: [x, x.reshape(3, 4), x.reshape(3, 1, 4),
                           x.reshape(3, 4, 1)])  # squeezing a non-1 axis is ignored (PyTorch rule)


def test_transpose_concat_split_stack_builder():
    x, y = randn(2, 3, 4), randn(2, 3, 4)
    check_exact(
        lambda x, y: [mb.transpose(x=x, perm=[2, -3, 1]), mb.concat(values=(x, y), axis=-2),
                      mb.concat(values=(x, y, x), axis=1, interleave=True), *mb.split(x=x, num_splits=2, axis=2),
                      *mb.split(x=y, split_sizes=[1, 2], axis=1), mb.stack(values=(x, y), axis=-1)],
        {"x": x, "y": y},
        lambda x, y: [x.transpose(2, 0, 1), np.concatenate([x, y], -2),
                      np.stack([x, y, x], 2).reshape(2, 9, 4), *np.split(x, 2, 2), y[:, :1], y[:, 1:],
                      np.stack([x, y], -1)])


@pytest.mark.parametrize("axes", [None, [0], [-1, 1]])
def test_reverse_builder(axes):
    x = randn(2, 3, 4)
    kw = {} if axes is None else {"axes": axes}
    check_exact(lambda x: mb.reverse(x=x, **kw), {"x": x},
                lambda x: np.flip(x, axis=None if axes is None else tuple(axes)).copy())


@pytest.mark.parametrize("seq_axis,batch_axis", [(1, 0), (0, 1), (2, 0)])
def test_reverse_sequence(seq_axis, batch_axis):
    x = randn(3, 4, 5) if (seq_axis, batch_axis) != (0, 1) else randn(5, 3, 2)
    B = x.shape[batch_axis]
    lengths = np.array([x.shape[seq_axis], 0, 2][:B], np.int32)

    def ref(x, L):
        out = x.copy()
        xs = np.moveaxis(x, (batch_axis, seq_axis), (0, 1))
        os = np.moveaxis(out, (batch_axis, seq_axis), (0, 1))
        for b in range(B):
            n = L[b]
            os[b, :n] = xs[b, :n][::-1]
        return out

    check_exact(lambda x, L: mb.reverse_sequence(x=x, lengths=L, seq_axis=seq_axis, batch_axis=batch_axis),
                {"x": x, "L": lengths}, ref)


@pytest.mark.parametrize("begin,end,stride,bm,em,sm", [
    ([0, 1, 0], [2, 3, 5], [1, 1, 2], None, None, None),
    ([1, -1, 4], [0, 0, 0], [-1, -1, -2], None, None, None),          # negative strides
    ([0, 5, 0], [0, 0, 0], [1, -2, 1], [True, False, True], [True, True, True], None),
    ([0, 2, -2], [0, 0, 0], [1, 1, 1], [True, False, False], [True, False, True], [False, True, False]),
    ([-1, 0, 1], [0, 4, 100], [1, 1, 3], None, [False, False, False], [True, False, False]),  # clamp end
    # clamped bounds (the builder itself rewrites an end below -size to 0, so -6 not -7 here)
    ([-5, -9, -1], [9, 9, -6], [1, 2, -1], None, None, None),
])
def test_slice_by_index_builder(begin, end, stride, bm, em, sm):
    x = randn(2, 4, 6)
    kw = {"stride": np.array(stride, np.int32)}
    for name, m in (("begin_mask", bm), ("end_mask", em), ("squeeze_mask", sm)):
        if m is not None:
            kw[name] = np.array(m, bool)

    def ref(x):
        sl = []
        for d in range(3):
            if sm is not None and sm[d]:
                sl.append(begin[d])
                continue
            b = None if bm is not None and bm[d] else begin[d]
            e = None if em is not None and em[d] else end[d]
            sl.append(slice(b, e, stride[d]))
        return np.asarray(x[tuple(sl)])

    check_exact(lambda x: mb.slice_by_index(x=x, begin=np.array(begin, np.int32), end=np.array(end, np.int32),
                                            **kw), {"x": x}, ref)


def test_slice_by_index_dynamic_begin_end():
    x = randn(4, 6)
    got = run_mil(lambda x, b, e: mb.slice_by_index(x=x, begin=b, end=e),
                  {"x": x, "b": np.array([1, 2], np.int32), "e": np.array([3, -1], np.int32)})[0]
    np.testing.assert_array_equal(got, x[1:3, 2:-1])


@pytest.mark.parametrize("begin,size", [([0, 1, 2], [2, 2, -1]), ([-1, 0, -3], [1, -1, 2])])
def test_slice_by_size(begin, size):
    x = randn(2, 4, 6)

    def ref(x):
        sl = []
        for d, (b, s) in enumerate(zip(begin, size)):
            b = b + x.shape[d] if b < 0 else b
            sl.append(slice(b, None if s == -1 else b + s))
        return x[tuple(sl)]

    check_exact(lambda x: mb.slice_by_size(x=x, begin=np.array(begin, np.int32), size=np.array(size, np.int32)),
                {"x": x}, ref)


@pytest.mark.parametrize("begin,end,stride,sm", [
    ([0, 1], [3, 5], [1, 2], None),
    ([2, 5], [0, 0], [-1, -2], None),
    ([1, 0], [0, 6], [1, 1], [True, False]),
])
def test_slice_update(begin, end, stride, sm):
    x = randn(3, 6)
    sl = tuple(begin[d] if sm and sm[d] else slice(begin[d], end[d], stride[d]) for d in range(2))
    upd = randn(*np.asarray(x[sl]).shape)
    kw = {"squeeze_mask": np.array(sm, bool)} if sm else {}

    def ref(x, u):
        out = x.copy()
        out[sl] = u
        return out

    check_exact(lambda x, u: mb.slice_update(x=x, update=u, begin=np.array(begin, np.int32),
                                             end=np.array(end, np.int32), stride=np.array(stride, np.int32), **kw),
                {"x": x, "u": upd}, ref, target="iOS18")


@pytest.mark.parametrize("axis,size,stride", [(0, 3, 1), (1, 2, 2), (-1, 4, 3), (1, 5, 1)])
def test_sliding_windows(axis, size, stride):
    x = randn(4, 5, 7)
    a = axis % 3

    def ref(x):
        n = x.shape[a]
        m = (n - size) // stride + 1
        wins = [np.take(x, range(i * stride, i * stride + size), axis=a) for i in range(m)]
        return np.stack(wins, axis=a)

    check_exact(lambda x: mb.sliding_windows(x=x, axis=axis, size=size, stride=stride), {"x": x}, ref)


def _ref_depth_to_space(x, b):
    n, c, h, w = x.shape
    co = c // (b * b)
    out = np.zeros((n, co, h * b, w * b), x.dtype)
    for i in range(b):
        for j in range(b):
            for k in range(co):
                out[:, k, i::b, j::b] = x[:, (i * b + j) * co + k]
    return out


def _ref_space_to_depth(x, b):
    n, c, h, w = x.shape
    out = np.zeros((n, c * b * b, h // b, w // b), x.dtype)
    for i in range(b):
        for j in range(b):
            for k in range(c):
                out[:, (i * b + j) * c + k] = x[:, k, i::b, j::b]
    return out


@pytest.mark.parametrize("b", [2, 3])
def test_depth_space(b):
    x = randn(2, 2 * b * b, 2, 3)
    check_exact(lambda x: mb.depth_to_space(x=x, block_size=b), {"x": x}, lambda x: _ref_depth_to_space(x, b))
    y = randn(2, 3, 2 * b, b)
    check_exact(lambda y: mb.space_to_depth(x=y, block_size=b), {"y": y}, lambda y: _ref_space_to_depth(y, b))


def test_depth_to_space_matches_docstring_smoke():
    # the coremltools op test: (1, 4, 1, 1) -> (1, 1, 2, 2) keeps channel order row-major
    x = np.array([9.0, 5.0, 1.0, 3.0], np.float32).reshape(1, 4, 1, 1)
    got = run_mil(lambda x: mb.depth_to_space(x=x, block_size=2), {"x": x})[0]
    np.testing.assert_array_equal(got, [[[[9.0, 5.0], [1.0, 3.0]]]])


def _ref_space_to_batch(x, bs, pads):
    xp = np.pad(x, [(0, 0), (0, 0), tuple(pads[0]), tuple(pads[1])])
    n = x.shape[0]
    outs = []
    for i in range(bs[0]):
        for j in range(bs[1]):
            for k in range(n):
                outs.append(xp[k, :, i::bs[0], j::bs[1]])
    return np.stack(outs)


def _ref_batch_to_space(y, bs, crops):
    nb, c, h, w = y.shape
    n = nb // (bs[0] * bs[1])
    full = np.zeros((n, c, h * bs[0], w * bs[1]), y.dtype)
    for i in range(bs[0]):
        for j in range(bs[1]):
            for k in range(n):
                full[k, :, i::bs[0], j::bs[1]] = y[(i * bs[1] + j) * n + k]
    return full[:, :, crops[0][0]:h * bs[0] - crops[0][1], crops[1][0]:w * bs[1] - crops[1][1]]


@pytest.mark.parametrize("bs,pads", [([2, 2], [[0, 0], [2, 0]]), ([1, 3], [[1, 0], [0, 2]]), ([2, 1], [[0, 0], [0, 0]])])
def test_space_to_batch_and_back(bs, pads):
    x = randn(2, 3, 4, 4)
    ref = _ref_space_to_batch(x, bs, pads)
    check_exact(lambda x: mb.space_to_batch(x=x, block_shape=np.array(bs, np.int32),
                                            paddings=np.array(pads, np.int32)),
                {"x": x}, lambda x: _ref_space_to_batch(x, bs, pads))
    check_exact(lambda y: mb.batch_to_space(x=y, block_shape=np.array(bs, np.int32),
                                            crops=np.array(pads, np.int32)),
                {"y": ref}, lambda y: _ref_batch_to_space(y, bs, pads))
    np.testing.assert_array_equal(_ref_batch_to_space(ref, bs, pads), x)  # the two references invert


def test_space_to_batch_docstring_example():
    x = np.arange(1, 17, dtype=np.float32).reshape(2, 1, 2, 4)
    got = run_mil(lambda x: mb.space_to_batch(x=x, block_shape=[2, 2], paddings=[[0, 0], [2, 0]]), {"x": x})[0]
    want = [[0, 1, 3], [0, 9, 11], [0, 2, 4], [0, 10, 12], [0, 5, 7], [0, 13, 15], [0, 6, 8], [0, 14, 16]]
    np.testing.assert_array_equal(got.reshape(8, 3), want)


def test_pixel_shuffle_builder():
    x = randn(1, 8, 2, 3)
    check_exact(lambda x: mb.pixel_shuffle(x=x, upscale_factor=2), {"x": x},
                lambda x: F.pixel_shuffle(torch.from_numpy(x), 2).numpy())
    y = randn(1, 2, 4, 6)
    check_exact(lambda y: mb.pixel_unshuffle(x=y, downscale_factor=np.uint32(2)), {"y": y},
                lambda y: F.pixel_unshuffle(torch.from_numpy(y), 2).numpy(), target="iOS16")


# ----------------------------------------------------------------------------- NMS


def _iou(a, b):
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _ref_nms(boxes, scores, iou_t, score_t, max_boxes, per_class):
    """boxes [n, B, 4], scores [n, B, K] -> (boxes, scores, indices, counts) per the docstring."""
    n, B, K = scores.shape
    ob = np.zeros((n, max_boxes, 4), np.float32)
    os_ = np.zeros((n, max_boxes, K), np.float32)
    oi = np.full((n, max_boxes), -1, np.int32)
    oc = np.zeros(n, np.int32)
    for b in range(n):
        best = scores[b].max(-1)
        cls = scores[b].argmax(-1)
        order = sorted(range(B), key=lambda i: (-best[i], i))
        picked = []
        for i in order:
            if score_t is not None and best[i] < score_t:
                continue
            if any(_iou(boxes[b, i], boxes[b, j]) > iou_t and (not per_class or cls[i] == cls[j]) for j in picked):
                continue
            picked.append(i)
            if len(picked) == max_boxes:
                break
        for t, i in enumerate(picked):
            ob[b, t], os_[b, t], oi[b, t] = boxes[b, i], scores[b, i], i
        oc[b] = len(picked)
    return ob, os_, oi, oc


def _nms_inputs(n=2, B=12, K=3, seed=1):
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0, 10, (n, B, 2))
    sizes = rng.uniform(1, 4, (n, B, 2))
    boxes = np.concatenate([centers, sizes], -1).astype(np.float32)
    scores = rng.permutation(n * B * K).reshape(n, B, K).astype(np.float32) / (n * B * K)  # distinct
    return boxes, scores


@pytest.mark.parametrize("per_class", [False, True])
@pytest.mark.parametrize("max_boxes,iou_t,score_t", [(5, 0.3, 0.0), (12, 0.1, 0.5), (20, 0.5, -1.0)])
def test_nms_ios15(per_class, max_boxes, iou_t, score_t):
    boxes, scores = _nms_inputs()
    want = _ref_nms(boxes, scores, iou_t, score_t, max_boxes, per_class)
    got = run_mil(lambda b, s: mb.non_maximum_suppression(
        boxes=b, scores=s, iou_threshold=iou_t, score_threshold=score_t, max_boxes=max_boxes,
        per_class_suppression=per_class), {"b": boxes, "s": scores}, "iOS15")
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert want[3].min() > 0 and (want[2] == -1).any() == (want[3] < max_boxes).any()


@pytest.mark.parametrize("per_class", [False, True])
def test_nms_ios17_layout(per_class):
    boxes, scores = _nms_inputs(n=1, B=15, K=2, seed=3)
    want = _ref_nms(boxes, scores, 0.2, None, 8, per_class)
    got = run_mil(lambda b, s: mb.non_maximum_suppression(
        boxes=b, scores=s, iou_threshold=0.2, max_boxes=8, per_class_suppression=per_class),
        {"b": boxes.transpose(0, 2, 1).copy(), "s": scores.transpose(0, 2, 1).copy()}, "iOS17")
    assert len(got) == 3
    np.testing.assert_array_equal(got[0], want[0].transpose(0, 2, 1))
    np.testing.assert_array_equal(got[1], want[1].transpose(0, 2, 1))
    np.testing.assert_array_equal(got[2], want[2])


def test_nms_fp16_profiles_and_suppression():
    # two heavily overlapping boxes: the lower-scoring one goes; a far box stays
    boxes = np.array([[[1, 1, 2, 2], [1.1, 1, 2, 2], [8, 8, 1, 1]]], np.float32)
    scores = np.array([[[0.6], [0.9], [0.3]]], np.float32)
    for cu in ("CPU_ONLY",) + FP16_PROFILES:
        got = run_mil(lambda b, s: mb.non_maximum_suppression(boxes=b, scores=s, iou_threshold=_f(b, 0.5),
                                                              score_threshold=_f(b, 0.0), max_boxes=3),
                      {"b": boxes, "s": scores}, "iOS15", fp16=cu != "CPU_ONLY", compute_unit=cu)
        np.testing.assert_array_equal(got[2], [[1, 2, -1]], err_msg=cu)
        np.testing.assert_array_equal(got[3], [2])


# ----------------------------------------------------------------------------- errors


def test_bad_parameters_raise_value_error():
    from coreml_lab.emulator.ops import shape as S
    from coreml_lab.emulator.ops import tensor as T

    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="mode='wrap'.*constant"):
        S.pad(FakeOpCall("pad", {"x": x}, pad=[1, 1], mode="wrap"))
    with pytest.raises(ValueError, match="reflect padding"):
        S.pad(FakeOpCall("pad", {"x": x}, pad=[3, 0], mode="reflect"))
    with pytest.raises(ValueError, match="output_indices_dtype='int8'"):
        T.topk(FakeOpCall("topk", {"x": x}, k=1, output_indices_dtype="int8", n_outputs=2))
    with pytest.raises(ValueError, match="more than one -1"):
        S.reshape(FakeOpCall("reshape", {"x": x}, shape=[-1, -1]))
    with pytest.raises(ValueError, match="stride"):
        T.slice_by_index(FakeOpCall("slice_by_index", {"x": x}, begin=[0, 0], end=[1, 1], stride=[1, 0]))


def test_runtime_error_names_the_op():
    # a reshape whose dynamic target shape does not fit fails with the op named
    with pytest.raises(OpExecutionError, match="reshape"):
        run_mil(lambda x, s: mb.reshape(x=x, shape=s), {"x": randn(2, 6), "s": np.array([5, -1], np.int32)})
