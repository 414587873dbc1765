"""Kernels, one module per MIL op family (two for the large ones); importing this package registers them all."""

from . import (  # noqa: F401
    activation,
    constexpr,
    control_flow,
    conv,
    elementwise,
    linear,
    misc,
    normalization,
    pool,
    recurrent,
    reduction,
    resample,
    resize,
    scatter_gather,
    shape,
    state,
    tensor,
    transformers,
)
