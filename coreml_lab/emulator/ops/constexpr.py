"""Weight decompression (``constexpr_*``) and activation quantize / dequantize.

Semantics: coremltools ``ops/defs/iOS16/constexpr_ops.py`` (iOS16 ops),
``ops/defs/iOS18/compression.py`` (iOS18 redefinitions and new ops) and
``ops/defs/iOS17/quantization_ops.py`` (``quantize`` / ``dequantize``).

One kernel per op type serves every opset; the opset is told apart by the
inputs the op has (the iOS16 ``constexpr_lut_to_dense`` and
``constexpr_sparse_to_dense`` carry a ``shape`` input and bit-packed uint8
data; their iOS18 versions carry sub-byte tensors, held unpacked one value per
byte, whose shape is the output's).

``constexpr_*`` ops produce constants: Core ML materialises them when it loads
the model. They are computed here in FP32 and rounded once to the declared
output dtype, whatever the device profile (an FP16 weight is an FP16 value on
every device). Since all their inputs are constants the result is computed once
per op and reused by later predictions.

``quantize`` / ``dequantize`` run on activations at prediction time: they are
ordinary elementwise ops computed in the op's compute dtype.
"""

from __future__ import annotations

import math
import weakref

import torch

from .. import dtypes
from ..registry import kernel

_F32 = torch.float32


# ----------------------------------------------------------------------------- caching

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _all_const_inputs(op) -> bool:
    for var in op.inputs.values():
        for v in (var if isinstance(var, (list, tuple)) else (var,)):
            if v.op is None or not (v.op.op_type == "const" or v.op.op_type.startswith("constexpr_")):
                return False
    return True


def _cached(fn):
    """Compute a constexpr op once (its inputs are all constants) and reuse the result."""

    def run(call):
        op = call.op
        if not _all_const_inputs(op):
            return fn(call)
        try:
            hit = _CACHE.get(op)
        except TypeError:  # op not weak-referenceable: no caching
            return fn(call)
        if hit is None:
            hit = fn(call)
            _CACHE[op] = hit
        return hit

    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    run.uncached = fn
    return run


# ----------------------------------------------------------------------------- helpers

def _out_dtype(call, i: int = 0) -> torch.dtype:
    return dtypes.torch_dtype(call.declared(i))


def _unpack_bits(packed: torch.Tensor, nbits: int, count: int) -> torch.Tensor:
    """``count`` unsigned ``nbits``-wide fields packed LSB-first into bytes (row-major)."""
    b = packed.reshape(-1).to(torch.int64) & 0xFF
    shifts = torch.arange(8, dtype=torch.int64)
    bits = ((b[:, None] >> shifts) & 1).reshape(-1)  # bit k of byte j at position 8*j + k
    need = count * nbits
    if bits.numel() < need:
        raise ValueError(f"packed data holds {bits.numel()} bits, {need} needed for {count} "
                         f"{nbits}-bit values")
    fields = bits[:need].reshape(count, nbits)
    weights = torch.pow(2, torch.arange(nbits, dtype=torch.int64))
    return (fields * weights).sum(dim=1)  # integer bit assembly, not a float sum


def _per_axis(param: torch.Tensor, rank: int, axis: int | None, what: str, size: int | None) -> torch.Tensor:
    """A scalar or a vector along ``axis``, reshaped to broadcast against a rank-``rank`` tensor."""
    if param.ndim == 0:
        return param
    if param.ndim != 1:
        raise ValueError(f"{what} must be a scalar or a vector, got shape {tuple(param.shape)}")
    if axis is None:
        raise ValueError(f"{what} is a vector: input 'axis' is required")
    if not -rank <= axis < rank:
        raise ValueError(f"input 'axis' = {axis} out of range for a rank-{rank} tensor")
    axis %= rank
    if size is not None and param.shape[0] != size:
        raise ValueError(f"{what} has {param.shape[0]} values; expected {size} (the size of axis {axis})")
    shape = [1] * rank
    shape[axis] = param.shape[0]
    return param.reshape(shape)


def _blockwise(param: torch.Tensor, data_shape, what: str) -> tuple[torch.Tensor, list, list]:
    """Block sizes of a per-block parameter; returns (param reshaped for broadcast, view shape, block)."""
    if param.ndim != len(data_shape):
        raise ValueError(f"{what} has rank {param.ndim}; expected the rank of 'data' ({len(data_shape)})")
    view, pshape = [], []
    for d, (n, g) in enumerate(zip(data_shape, param.shape)):
        if g == 0 or n % g:
            raise ValueError(f"{what} has {g} blocks along dim {d}, which does not divide the data size {n}")
        view += [g, n // g]
        pshape += [g, 1]
    return param.reshape(pshape), view, list(data_shape)


def _shift_scale(data: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """``scale * (data - offset)`` with per-block scale/offset (block = data.shape / scale.shape), FP32."""
    s, view, shape = _blockwise(scale.to(_F32), data.shape, "input 'scale'")
    x = data.to(_F32).reshape(view)
    if offset is not None:
        if tuple(offset.shape) != tuple(scale.shape):
            raise ValueError(f"input 'offset' has shape {tuple(offset.shape)}; expected the shape of "
                             f"'scale' {tuple(scale.shape)}")
        o, _, _ = _blockwise(offset.to(_F32), data.shape, "input 'offset'")
        x = x - o
    return (x * s).reshape(shape)


def _lut_lookup(indices: torch.Tensor, lut: torch.Tensor, vector_axis: int | None) -> torch.Tensor:
    """iOS18 LUT: per-block tables ``lut[*groups, NUM_PALETTES, VECTOR_SIZE]``."""
    k = indices.ndim
    if lut.ndim != k + 2:
        raise ValueError(f"input 'lut' has rank {lut.ndim}; expected rank(indices) + 2 = {k + 2}")
    n_pal, vsize = lut.shape[-2], lut.shape[-1]
    idx = indices.to(torch.int64)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_pal):
        raise ValueError(f"input 'indices' has values outside [0, {n_pal})")
    # linear number of the table each index position uses
    group = torch.zeros((), dtype=torch.int64)
    stride = 1
    for d in range(k - 1, -1, -1):
        n, g = indices.shape[d], lut.shape[d]
        if g == 0 or n % g:
            raise ValueError(f"input 'lut' has {g} tables along dim {d}, which does not divide the "
                             f"indices size {n}")
        shape = [1] * k
        shape[d] = n
        group = group + (torch.arange(n, dtype=torch.int64) // (n // g) * stride).reshape(shape)
        stride *= g
    flat = lut.reshape(-1, vsize)
    out = flat[group * n_pal + idx]  # indices.shape + [VECTOR_SIZE]
    if vsize == 1:
        return out.squeeze(-1)
    if vector_axis is None:
        raise ValueError(f"input 'lut' has VECTOR_SIZE {vsize} > 1: input 'vector_axis' is required")
    if not -k <= vector_axis < k:
        raise ValueError(f"input 'vector_axis' = {vector_axis} out of range for rank-{k} indices")
    a = vector_axis % k
    out = torch.movedim(out, -1, a + 1)
    shape = list(indices.shape)
    shape[a] *= vsize
    return out.reshape(shape)


def _scatter_mask(nonzero: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dense tensor of ``mask``'s shape: ``nonzero`` at set positions (row-major), zeros elsewhere."""
    m = mask != 0
    n = int(m.sum())
    if n != nonzero.numel():
        raise ValueError(f"input mask has {n} set bits but {nonzero.numel()} nonzero values were given")
    out = torch.zeros(mask.shape, dtype=nonzero.dtype)
    out[m] = nonzero.reshape(-1)
    return out


def _opt_int(call, name: str):
    return call.int(name) if call.has(name) else None


# ----------------------------------------------------------------------------- iOS16

@kernel("constexpr_affine_dequantize", family="constexpr")
@_cached
def constexpr_affine_dequantize(call):
    q = call.raw("quantized_data")
    scale = call.raw("scale").to(_F32)
    zp = call.raw("zero_point").to(_F32)
    axis = call.int("axis")
    size = q.shape[axis] if -q.ndim <= axis < q.ndim else None
    s = _per_axis(scale, q.ndim, axis, "input 'scale'", size)
    z = _per_axis(zp, q.ndim, axis, "input 'zero_point'", size)
    return ((q.to(_F32) - z) * s).to(_out_dtype(call))


@kernel("constexpr_cast", family="constexpr")
@_cached
def constexpr_cast(call):
    want = call.str("output_dtype")
    if want != "fp32":
        raise ValueError(f"constexpr_cast input 'output_dtype' = {want!r}; expected 'fp32'")
    return call.raw("source_val").to(torch.float32)


@kernel("constexpr_lut_to_dense", family="constexpr")
@_cached
def constexpr_lut_to_dense(call):
    lut = call.raw("lut")
    if call.has("shape"):  # iOS16: flat LUT, bit-packed indices, explicit output shape
        shape = call.ints("shape")
        n_pal = lut.numel()
        if n_pal not in (2, 4, 16, 64, 256):
            raise ValueError(f"constexpr_lut_to_dense input 'lut' has {n_pal} entries; expected 2, 4, 16, "
                             "64 or 256")
        nbits = int(math.log2(n_pal))
        count = math.prod(shape)
        idx = _unpack_bits(call.raw("indices"), nbits, count)
        return lut.reshape(-1)[idx].reshape(shape).to(_out_dtype(call))
    return _lut_lookup(call.raw("indices"), lut, _opt_int(call, "vector_axis")).to(_out_dtype(call))


@kernel("constexpr_sparse_to_dense", family="constexpr")
@_cached
def constexpr_sparse_to_dense(call):
    nonzero = call.raw("nonzero_data")
    mask = call.raw("mask")
    if call.has("shape"):  # iOS16: mask is bit-packed uint8, LSB first
        shape = call.ints("shape")
        count = math.prod(shape)
        bits = _unpack_bits(mask, 1, count)
        return _scatter_mask(nonzero, bits).reshape(shape).to(_out_dtype(call))
    return _scatter_mask(nonzero, mask).to(_out_dtype(call))


# ----------------------------------------------------------------------------- iOS18

@kernel("constexpr_blockwise_shift_scale", family="constexpr")
@_cached
def constexpr_blockwise_shift_scale(call):
    offset = call.raw("offset") if call.has("offset") else None
    return _shift_scale(call.raw("data"), call.raw("scale"), offset).to(_out_dtype(call))


@kernel("constexpr_lut_to_sparse", family="constexpr")
@_cached
def constexpr_lut_to_sparse(call):
    mask = call.raw("indices_mask")
    lut = call.raw("lut")
    vector_axis = _opt_int(call, "vector_axis")
    indices = _scatter_mask(call.raw("indices_nonzero_data").to(torch.int64), mask)
    dense = _lut_lookup(indices, lut, vector_axis)
    out_mask = mask
    if vector_axis is not None and lut.shape[-1] > 1:
        out_mask = torch.repeat_interleave(mask, lut.shape[-1], dim=vector_axis)
    return out_mask.to(torch.uint8), dense[out_mask != 0].reshape(-1).to(_out_dtype(call, 1))


@kernel("constexpr_sparse_blockwise_shift_scale", family="constexpr")
@_cached
def constexpr_sparse_blockwise_shift_scale(call):
    mask = call.raw("data_mask")
    offset = call.raw("offset") if call.has("offset") else None
    data = _scatter_mask(call.raw("nonzero_data"), mask)
    deq = _shift_scale(data, call.raw("scale"), offset)
    return mask.to(torch.uint8), deq[mask != 0].reshape(-1).to(_out_dtype(call, 1))


# ----------------------------------------------------------------------------- iOS17 activations

_QRANGE = {"int8": (-128, 127), "uint8": (0, 255)}


@kernel("quantize", family="elementwise")
def quantize(call):
    x = call.tensor("input")
    out = call.str("output_dtype")
    if out not in _QRANGE:
        raise ValueError(f"quantize input 'output_dtype' = {out!r}; expected 'int8' or 'uint8'")
    axis = _opt_int(call, "axis")
    size = x.shape[axis] if axis is not None and -x.ndim <= axis < x.ndim else None
    scale = _per_axis(call.tensor("scale").to(x.dtype), x.ndim, axis, "quantize input 'scale'", size)
    q = torch.round(x / scale)  # round half to even
    if call.has("zero_point"):
        zp = _per_axis(call.raw("zero_point").to(x.dtype), x.ndim, axis, "quantize input 'zero_point'", size)
        q = q + zp
    lo, hi = _QRANGE[out]
    return torch.clamp(q, lo, hi).to(dtypes.torch_dtype(out))


@kernel("dequantize", family="elementwise")
def dequantize(call):
    q = call.raw("input")
    scale = call.tensor("scale")
    axis = _opt_int(call, "axis")
    size = q.shape[axis] if axis is not None and -q.ndim <= axis < q.ndim else None
    s = _per_axis(scale, q.ndim, axis, "dequantize input 'scale'", size)
    x = q.to(scale.dtype)
    if call.has("zero_point"):
        x = x - _per_axis(call.raw("zero_point").to(scale.dtype), q.ndim, axis,
                          "dequantize input 'zero_point'", size)
    return x * s
