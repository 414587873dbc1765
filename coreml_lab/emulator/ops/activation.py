"""Activation ops: relu family, sigmoid family, gelu, softplus, softmax ...

Semantics: coremltools ``ops/defs/iOS15/activation.py`` and ``iOS17/activation.py``.
The iOS17 versions only let ``alpha``/``beta`` have a dtype other than ``x``'s; the
kernels read parameters through ``call.tensor`` so they always arrive in the
op's compute dtype, whatever dtype they were declared with.

Composite formulas (gelu, elu, softmax ...) are evaluated one torch op at a
time on tensors in the compute dtype, so a device computing in FP16 rounds every
intermediate result, as the hardware would.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F

from .. import numerics
from ..registry import kernel


def _param(call, name: str, like: torch.Tensor) -> torch.Tensor:
    """A constant parameter (alpha, beta) in ``x``'s dtype (iOS17 allows a different dtype)."""
    p = call.tensor(name)
    if p is None:
        raise ValueError(f"{call.op.op_type}: required input {name!r} is missing")
    return p.to(like.dtype)


def _channel_param(call, name: str, x: torch.Tensor) -> torch.Tensor:
    """A per-channel parameter of shape [C] broadcast along dim 1 of ``x``."""
    p = _param(call, name, x).reshape(-1)
    if x.ndim < 2:
        raise ValueError(f"{call.op.op_type}: x must have a channel dimension (rank >= 2), got rank {x.ndim}")
    c = x.shape[1]
    if p.numel() == 1 and c != 1:
        p = p.expand(c)
    if p.numel() != c:
        raise ValueError(
            f"{call.op.op_type}: input {name!r} has {p.numel()} values; expected one per channel "
            f"(dimension 1 of x has size {c})"
        )
    return p.reshape((1, c) + (1,) * (x.ndim - 2))


@cache
def _const(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A scalar constant held in ``dtype`` (an FP16 device holds its constants in FP16)."""
    return torch.tensor(value, dtype=dtype)


def _zero(x: torch.Tensor) -> torch.Tensor:
    return _const(0.0, x.dtype)


# ----------------------------------------------------------------------------- piecewise linear


@kernel("relu", family="activation", uses={"compute"}, compute_free_on_fp16=True)
def relu(call):
    return torch.relu(call.tensor("x"))


@kernel("relu6", family="activation", uses={"compute"}, compute_free_on_fp16=True)
def relu6(call):
    return torch.clamp(call.tensor("x"), 0.0, 6.0)


@kernel("leaky_relu", family="activation")
def leaky_relu(call):
    # x if x >= 0 else alpha * x
    x = call.tensor("x")
    alpha = _param(call, "alpha", x)
    return torch.where(x >= 0, x, alpha * x)


@kernel("prelu", family="activation")
def prelu(call):
    # per-channel (dim 1) leaky relu: x if x > 0 else alpha_c * x
    x = call.tensor("x")
    alpha = _channel_param(call, "alpha", x)
    return torch.where(x > 0, x, alpha * x)


@kernel("clamped_relu", family="activation")
def clamped_relu(call):
    # docstring: min(beta, x) if x >= 0 else min(beta, alpha * x)
    x = call.tensor("x")
    alpha = _param(call, "alpha", x)
    beta = _param(call, "beta", x)
    return torch.minimum(torch.where(x >= 0, x, alpha * x), beta)


@kernel("thresholded_relu", family="activation")
def thresholded_relu(call):
    # x if x >= alpha else 0
    x = call.tensor("x")
    alpha = _param(call, "alpha", x)
    return torch.where(x >= alpha, x, _zero(x))


@kernel("linear_activation", family="activation")
def linear_activation(call):
    x = call.tensor("x")
    return x * _param(call, "alpha", x) + _param(call, "beta", x)


@kernel("sigmoid_hard", family="activation")
def sigmoid_hard(call):
    # min(max(alpha * x + beta, 0), 1)
    x = call.tensor("x")
    y = x * _param(call, "alpha", x) + _param(call, "beta", x)
    return torch.clamp(y, 0.0, 1.0)


# ----------------------------------------------------------------------------- smooth


@kernel("elu", family="activation")
def elu(call):
    # x if x > 0 else alpha * (e^x - 1)
    x = call.tensor("x")
    alpha = _param(call, "alpha", x)
    return torch.where(x > 0, x, alpha * torch.expm1(x))


_GELU_MODES = ("EXACT", "TANH_APPROXIMATION", "SIGMOID_APPROXIMATION")


@kernel("gelu", family="activation")
def gelu(call):
    x = call.tensor("x")
    mode = call.str("mode")
    dt = x.dtype

    def c(v):
        return _const(v, dt)

    if mode == "EXACT":
        # 0.5 x (1 + erf(x / sqrt(2)))
        return (c(0.5) * x) * (c(1.0) + torch.erf(x * c(1.0 / math.sqrt(2.0))))
    if mode == "TANH_APPROXIMATION":
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        inner = c(math.sqrt(2.0 / math.pi)) * (x + c(0.044715) * (x * x * x))
        return (c(0.5) * x) * (c(1.0) + torch.tanh(inner))
    if mode == "SIGMOID_APPROXIMATION":
        # x * sigmoid(1.702 x)
        return x * torch.sigmoid(c(1.702) * x)
    raise ValueError(f"gelu: input 'mode' is {mode!r}; expected one of {list(_GELU_MODES)}")


@kernel("sigmoid", family="activation")
def sigmoid(call):
    return torch.sigmoid(call.tensor("x"))


@kernel("silu", family="activation")
def silu(call):
    # x * sigmoid(x)
    return F.silu(call.tensor("x"))


@kernel("scaled_tanh", family="activation")
def scaled_tanh(call):
    # alpha * tanh(beta * x)
    x = call.tensor("x")
    return _param(call, "alpha", x) * torch.tanh(_param(call, "beta", x) * x)


@kernel("softsign", family="activation")
def softsign(call):
    # x / (1 + |x|)
    x = call.tensor("x")
    return x / (_const(1.0, x.dtype) + torch.abs(x))


def _stable_softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|): never overflows."""
    return torch.clamp(x, min=0.0) + torch.log1p(torch.exp(-torch.abs(x)))


@kernel("softplus", family="activation")
def softplus(call):
    x = call.tensor("x")
    if call.hazard("softplus_naive_exp"):
        # Neural Engine: softplus is log(1 + exp(x)) with exp(x) leaving the multiply-accumulate
        # port, which saturates at 2^15: once exp(x) rounds to 32,768 or more (x >= ln(32768) ~ 10.397)
        # the output collapses to 0 instead of ~x (apple/coremltools#2687, cliff near x ~ 10.4);
        # softplus(+inf) = +0 (ane-guide)
        e = torch.exp(x.to(torch.float16))
        finite = e.abs() < 32768.0
        y = torch.log(_const(1.0, e.dtype) + e)
        return torch.where(finite, y, _zero(e))
    return _stable_softplus(x)


@kernel("softplus_parametric", family="activation")
def softplus_parametric(call):
    # alpha_c * log(1 + e^(beta_c * x)), per channel (dim 1)
    x = call.tensor("x")
    alpha = _channel_param(call, "alpha", x)
    beta = _channel_param(call, "beta", x)
    return alpha * _stable_softplus(beta * x)


# ----------------------------------------------------------------------------- softmax


@kernel("softmax", family="activation")
def softmax(call):
    x = call.tensor("x")
    axis = call.int("axis")
    if x.ndim == 0:
        if axis not in (0, -1):
            raise ValueError(f"softmax: input 'axis' is {axis}; a rank-0 x only allows 0 or -1")
        return torch.ones_like(x)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"softmax: input 'axis' is {axis}; expected a value in [{-x.ndim}, {x.ndim - 1}] "
                         f"for x of rank {x.ndim}")
    axis %= x.ndim
    if x.dtype == torch.float32 and call.accumulate == torch.float32:
        return torch.softmax(x, dim=axis)  # the same max-shifted formula, fused, all in FP32
    m = torch.amax(x, dim=axis, keepdim=True)
    shifted = x - m  # a new tensor: exp and the division below work in it (one full-size tensor, not three)
    if call.hazard("indeterminate_to_zero") and bool(torch.isinf(m).any()):
        # Neural Engine: inf - inf (a lane holding +inf, e.g. a coerced NaN) is +0, so that lane
        # takes all the mass (ane-guide)
        shifted.nan_to_num_(nan=0.0, posinf=torch.inf, neginf=-torch.inf)
    e = shifted.exp_()
    s = numerics.reduce_sum(e, axis, True, call.accumulate).to(x.dtype)
    return e.div_(s)
