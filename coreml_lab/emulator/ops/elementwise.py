"""Elementwise unary and binary arithmetic, comparison, logical ops and cast.

Semantics: coremltools ``ops/defs/iOS15/elementwise_{unary,binary}.py`` and the
iOS17 ``cast``/``clip`` variants. Binary ops broadcast numpy-style. Inputs
arrive in the op's compute dtype, so an FP16-computing device rounds once per op
(torch's half kernels compute each element in float and round the result).
"""

from __future__ import annotations

import torch

from ..registry import kernel

_BINARY = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
}

_COMPARE = {
    "equal": torch.eq,
    "not_equal": torch.ne,
    "greater": torch.gt,
    "greater_equal": torch.ge,
    "less": torch.lt,
    "less_equal": torch.le,
}

_LOGICAL = {
    "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
    "logical_xor": torch.logical_xor,
}

_UNARY = {
    "abs": torch.abs,
    "acos": torch.acos,
    "asin": torch.asin,
    "atan": torch.atan,
    "atanh": torch.atanh,
    "ceil": torch.ceil,
    "cos": torch.cos,
    "cosh": torch.cosh,
    "erf": torch.erf,
    "exp": torch.exp,
    "exp2": torch.exp2,
    "floor": torch.floor,
    "sign": torch.sign,
    "sin": torch.sin,
    "sinh": torch.sinh,
    "sqrt": torch.sqrt,
    "square": torch.square,
    "tan": torch.tan,
    "tanh": torch.tanh,
}


def _xy(call):
    x, y = call.tensor("x"), call.tensor("y")
    if x.is_floating_point() != y.is_floating_point() or (x.is_floating_point() and x.dtype != y.dtype):
        common = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(common), y.to(common)
    return x, y


@kernel(*_BINARY, family="elementwise", uses={"compute"}, compute_free_on_fp16=True)
def binary(call):
    x, y = _xy(call)
    return _BINARY[call.op.op_type](x, y)


def _unsigned_zero(call, y: torch.Tensor) -> torch.Tensor:
    """Neural Engine (NE_RULES zero_sign_dropped_before_reciprocal): -0 reaches a reciprocal as +0."""
    return y + 0.0 if call.hazard("zero_sign_dropped_before_reciprocal") else y  # -0 + 0 = +0 in IEEE


@kernel("real_div", family="elementwise", uses={"compute", "hazards"}, compute_free_on_fp16=True)
def real_div(call):
    x, y = _xy(call)
    if not x.is_floating_point():
        # integer real_div: true division, then truncated back to the declared int type
        return torch.div(x.double(), y.double()).to(x.dtype)
    return torch.div(x, _unsigned_zero(call, y))


@kernel("floor_div", family="elementwise")
def floor_div(call):
    x, y = _xy(call)
    return torch.div(x, y, rounding_mode="floor")


@kernel("mod", family="elementwise")
def mod(call):
    # MIL mod follows Python's sign convention (result has the divisor's sign), like torch.remainder
    x, y = _xy(call)
    return torch.remainder(x, y)


@kernel("pow", family="elementwise")
def pow_(call):
    x, y = _xy(call)
    if x.is_floating_point():
        return torch.pow(x, y)
    # int32 pow: torch refuses negative integer exponents. x ** -n truncated toward zero
    # (the int result type) is 1 for x == 1, +-1 for x == -1 and 0 otherwise (uncertain:
    # MIL leaves x == 0 undefined; 0 is returned).
    neg = y < 0
    if not bool(neg.any()):
        return torch.pow(x, y)
    pos = torch.pow(x, torch.where(neg, torch.zeros_like(y), y))
    odd = torch.remainder(y, 2) == 1
    small = torch.where(x == 1, torch.ones_like(x),
                        torch.where(x == -1, torch.where(odd, -torch.ones_like(x), torch.ones_like(x)),
                                    torch.zeros_like(x)))
    return torch.where(neg, small, pos)


@kernel(*_COMPARE, family="elementwise", uses={"compute"}, compute_free_on_fp16=True)
def compare(call):
    x, y = _xy(call)
    return _COMPARE[call.op.op_type](x, y)


@kernel(*_LOGICAL, family="elementwise")
def logical(call):
    return _LOGICAL[call.op.op_type](call.tensor("x").bool(), call.tensor("y").bool())


@kernel("logical_not", family="elementwise")
def logical_not(call):
    return torch.logical_not(call.tensor("x").bool())


@kernel(*_UNARY, family="elementwise", uses={"compute"}, compute_free_on_fp16=True)
def unary(call):
    return _UNARY[call.op.op_type](call.tensor("x"))


@kernel("round", family="elementwise")
def round_(call):
    # MIL round: to nearest, half to even ("0.5 is rounded to 0"), like torch.round
    return torch.round(call.tensor("x"))


@kernel("inverse", family="elementwise")
def inverse(call):
    x = call.tensor("x")
    eps = call.float("epsilon")
    return 1.0 / _unsigned_zero(call, x + torch.tensor(eps, dtype=x.dtype))


@kernel("log", family="elementwise")
def log(call):
    x = call.tensor("x")
    eps = call.float("epsilon")
    y = torch.log(x + torch.tensor(eps, dtype=x.dtype))
    if call.hazard("log_zero_sentinel"):
        # Neural Engine: log(+0) is the finite sentinel -45,440, not -inf (NE_RULES)
        y = torch.where(y == -torch.inf, torch.tensor(-45440.0, dtype=y.dtype), y)
    return y


@kernel("rsqrt", family="elementwise")
def rsqrt(call):
    x = call.tensor("x")
    eps = call.float("epsilon")
    return torch.rsqrt(_unsigned_zero(call, x + torch.tensor(eps, dtype=x.dtype)))


@kernel("clip", family="elementwise")
def clip(call):
    x = call.tensor("x")
    alpha = call.tensor("alpha").to(x.dtype)
    beta = call.tensor("beta").to(x.dtype)
    return torch.minimum(torch.maximum(x, alpha), beta)


@kernel("threshold", family="elementwise")
def threshold(call):
    x = call.tensor("x")
    return torch.maximum(x, torch.tensor(call.float("alpha"), dtype=x.dtype))


@kernel("cast", family="elementwise", uses=())
def cast(call):
    x = call.raw("x")
    declared = call.declared(0)
    target = call.storage_dtype(0)
    if target is None:
        raise ValueError(f"cast: input 'dtype' is {call.str('dtype')!r}; expected one of int8, uint8, "
                         "int16, uint16, int32, fp16, fp32, bool")
    if x.is_floating_point() and not target.is_floating_point and target != torch.bool:
        # float -> int: truncation toward zero (numpy astype semantics used by coremltools)
        x = torch.trunc(x.double()).to(torch.int64)
    if declared == "uint16":
        # held widened in int32: wrap modulo 2**16 like numpy's astype(uint16)
        return torch.remainder(x.to(torch.int64), 1 << 16).to(target)
    return x.to(target)
