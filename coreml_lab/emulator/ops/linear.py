"""Dot-product ops: linear, matmul, einsum.

Semantics: coremltools ``ops/defs/iOS15/linear.py`` and ``iOS17/linear.py``.

* ``linear``: ``x @ weight.T + bias`` (bias defaults to 0). iOS17 lets weight/bias
  have another float dtype than ``x``; inputs arrive in the op's compute dtype,
  so that needs no special case here.
* ``matmul``: numpy-style batch broadcasting, rank-1 operands promoted and the
  inserted dimension removed; ``transpose_x``/``transpose_y`` swap the last two
  dimensions and have no effect on a rank-1 operand.
* ``einsum``: MIL supports exactly two equation forms (and the same forms with
  other letters): ``"nchw,nwhu->nchu"`` (rank 4) and ``"chw,whu->chu"`` (rank 3),
  i.e. a matrix product over dims -3 (C x W1) and -3/-1 of the second operand
  (W1 x W2), with dims B and H treated as (broadcast) batch. It is computed as a
  batched matmul after moving H in front of C, so FP16 accumulation works the
  same as for ``matmul``.

All dot products go through :mod:`..numerics` with the op's accumulation dtype. On a
device with the Neural Engine rules (``profiles.NE_RULES``) the result then passes the
multiply-accumulate output port, :func:`mac_output` (2^15 ceiling, FP16 bias, denormal flush).
int32 operands (allowed for linear/matmul) are multiplied exactly in int64 and
returned as int32.
"""

from __future__ import annotations

import torch

from .. import numerics
from ..registry import kernel


def _is_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point()


def _common_float(call, *ts):
    """Bring float operands to one dtype (the accumulation dtype, which numerics uses); ints stay."""
    if any(t is not None and t.is_floating_point() for t in ts):
        dt = call.accumulate
        return [None if t is None else t.to(dt) for t in ts]
    return list(ts)


def has_mac_port(call, taps: int = 2) -> bool:
    """Whether the op's device passes a multiply-accumulate of ``taps`` terms through the Neural
    Engine's output port (:func:`mac_output`). Where it does not, a kernel hands its bias to the
    fused torch call (``F.linear`` / ``F.conv*``), as torch's own forward does: one pass less than
    adding it after, and the same rounding as the torch reference."""
    return (call.hazard("mac_ceiling_2p15") and taps >= 2) or call.hazard("mac_flush_denormals") \
        or call.hazard("bias_fp16_add")


def mac_output(call, y: torch.Tensor, bias=None, bias_shape=None, taps: int = 2):
    """``y`` (+ bias) through the Neural Engine's multiply-accumulate output port where the device
    has one (the NE_RULES mac_ceiling_2p15 / mac_flush_denormals / bias_fp16_add), else plain
    ``y + bias``. ``taps`` is the number of accumulated terms: the ceiling needs two or more.
    ``y`` is the kernel's own fresh result: the bias is added into it in place (the same
    arithmetic as ``y + bias``, without a second output-sized tensor)."""
    ceiling = call.hazard("mac_ceiling_2p15") and taps >= 2
    flush = call.hazard("mac_flush_denormals")
    bias16 = call.hazard("bias_fp16_add")
    if not (ceiling or flush or bias16):
        if bias is None:
            return y
        return y.add_(bias.to(y.dtype).view(bias_shape if bias_shape is not None else bias.shape))
    return numerics.mac_port(y, bias, bias_shape, ceiling=ceiling, flush_denormals=flush, bias_fp16=bias16)


@kernel("linear", family="linear", uses={"accumulate", "hazards"})
def linear(call):
    # floats are fetched in the accumulation dtype: same values, and constant weights are
    # converted once and cached instead of on every run
    acc = call.accumulate if call.raw("x").is_floating_point() else None
    x = call.tensor("x", dtype=acc)
    w = call.tensor("weight", dtype=acc)
    b = call.tensor("bias", dtype=acc) if call.has("bias") else None
    if w.ndim != 2:
        raise ValueError(f"linear: input 'weight' must be rank 2 [D_out, D_in], got shape {tuple(w.shape)}")
    x, w, b = _common_float(call, x, w, b)
    if _is_int(x):
        y = torch.matmul(x.long(), w.long().t())
        if b is not None:
            y = y + b.long()
        return y.to(torch.int32)
    if not has_mac_port(call):
        return numerics.linear(x, w, b, call.accumulate)
    return mac_output(call, numerics.linear(x, w, None, call.accumulate), b)


@kernel("matmul", family="linear", uses={"compute", "accumulate", "hazards"}, compute_free_on_fp16=True)
def matmul(call):
    x = call.tensor("x")
    y = call.tensor("y")
    tx = call.bool("transpose_x")
    ty = call.bool("transpose_y")
    if tx and x.ndim == 1:
        raise ValueError("matmul: input 'transpose_x' is True but 'x' is rank 1; expected False")
    if tx and x.ndim >= 2:
        x = x.transpose(-1, -2)
    if ty and y.ndim >= 2:
        y = y.transpose(-1, -2)
    x, y = _common_float(call, x, y)
    if _is_int(x):
        return torch.matmul(x.long(), y.long()).to(torch.int32)
    return mac_output(call, numerics.matmul(x, y, call.accumulate))


def _einsum_pattern(equation: str):
    """Label vectors (first-appearance numbering) of the two inputs and the output."""
    eq = equation.replace(" ", "")
    if eq.count("->") != 1:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != 2:
        return None
    ids: dict[str, int] = {}
    vecs = []
    for part in (*ins, out):
        vec = []
        for ch in part:
            if ch not in ids:
                ids[ch] = len(ids)
            vec.append(ids[ch])
        vecs.append(vec)
    return vecs


_EINSUM_FORMS = {
    4: [[0, 1, 2, 3], [0, 3, 2, 4], [0, 1, 2, 4]],  # nchw,nwhu->nchu
    3: [[0, 1, 2], [2, 1, 3], [0, 1, 3]],           # chw,whu->chu
}


@kernel("einsum", family="linear")
def einsum(call):
    values = call.tensors("values")
    equation = call.str("equation")
    if len(values) != 2:
        raise ValueError(f"einsum: input 'values' must hold 2 tensors, got {len(values)}")
    x, y = _common_float(call, *values)
    rank = x.ndim
    if rank not in _EINSUM_FORMS or y.ndim != rank:
        raise ValueError(
            f"einsum: input 'values' must be two tensors of rank 3 or 4, got ranks {x.ndim} and {y.ndim}")
    if _einsum_pattern(equation) != _EINSUM_FORMS[rank]:
        raise ValueError(
            f"einsum: input 'equation' {equation!r} is not supported; expected the form "
            f"'nchw,nwhu->nchu' (rank 4) or 'chw,whu->chu' (rank 3), with any letters")
    # [*B, C, H, W1] x [*B, W1, H, W2] -> [*B, C, H, W2] as a matmul batched over (*B, H)
    a = x.movedim(-2, -3)  # [*B, H, C, W1]
    b = y.movedim(-2, -3)  # [*B, H, W1, W2]
    out = numerics.matmul(a, b, call.accumulate)  # [*B', H', C, W2] (B and H broadcast)
    return mac_output(call, out.movedim(-3, -2))
