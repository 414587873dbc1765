"""Torch ops coremltools 9.0 lacks, registered as composites of MIL ops through its own ``register_torch_op``.

Each composite is a translation coremltools itself would make (MIL ops only, no custom
layers); ``tests/test_convert.py`` checks each one against torch on random inputs, through
a real conversion and the emulator. :func:`register` is idempotent and never overrides a
translation coremltools already has (a later coremltools that adds one keeps its own).

- ``aten::diff`` (``torch.diff``): Hugging Face's decoder models call it to detect packed
  sequences while building causal masks (``transformers.masking_utils``); its absence is
  coremltools' "Unsupported fx node diff" / "convert function for op 'diff' not implemented".
- ``aten::new_ones`` (``tensor.new_ones``): the same masks start from ``q_idx.new_ones((), dtype=torch.bool)``.
"""

from __future__ import annotations

#: torch op name -> what the composite is made of (shown in conversion messages)
COMPOSITES = {
    "diff": "concat (prepend/append) and n rounds of slice_by_index + sub (logical_xor for bool)",
    "new_ones": "fill (a const when the size is known) of the given dtype, else the tensor's",
}

_registered: set[str] = set()


def register() -> list[str]:
    """Register every composite coremltools does not translate itself; the names newly registered."""
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY, register_torch_op

    new = []
    for name, func in (("diff", diff), ("new_ones", new_ones)):
        if name in _registered or name in _TORCH_OPS_REGISTRY:
            continue
        register_torch_op(func, override=False)
        _registered.add(name)
        new.append(name)
    return new


def diff(context, node):  # the name is the torch op it translates
    """torch.diff(input, n=1, dim=-1, prepend=None, append=None)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs, _get_kwinputs
    from coremltools.converters.mil.mil import types

    inputs = _get_inputs(context, node, min_expected=1)
    x = inputs[0]

    def arg(i, keyword, default):
        if len(inputs) > i:
            return inputs[i]
        found = _get_kwinputs(context, node, keyword, default=[default])
        return found[0]

    n, dim, prepend, append = arg(1, "n", None), arg(2, "dim", None), arg(3, "prepend", None), arg(4, "append", None)
    n = 1 if n is None else int(n.val)
    rank = x.rank
    dim = -1 if dim is None else int(dim.val)
    dim = dim + rank if dim < 0 else dim
    parts = [v for v in (prepend, x, append) if v is not None]
    if len(parts) > 1:
        x = mb.concat(values=parts, axis=dim)
    is_bool = types.is_bool(x.dtype)
    for i in range(n):
        length = x.shape[dim]
        begin_hi, begin_lo = [0] * rank, [0] * rank
        end_hi, end_lo = [0] * rank, [0] * rank
        begin_hi[dim] = 1
        end_lo[dim] = -1
        mask_begin = [d != dim for d in range(rank)]
        mask_end_hi = [True] * rank
        mask_end_lo = [d != dim for d in range(rank)]
        if isinstance(length, int) and length <= n - i - 1:
            raise ValueError(f"torch.diff along dim {dim} of size {length} with n={n} leaves nothing")
        hi = mb.slice_by_index(x=x, begin=begin_hi, end=end_hi, begin_mask=mask_begin, end_mask=mask_end_hi)
        lo = mb.slice_by_index(x=x, begin=begin_lo, end=end_lo, begin_mask=mask_begin, end_mask=mask_end_lo)
        last = i == n - 1
        name = {"name": node.name} if last else {}
        x = mb.logical_xor(x=hi, y=lo, **name) if is_bool else mb.sub(x=hi, y=lo, **name)
    context.add(x)


def new_ones(context, node):  # the name is the torch op it translates
    """tensor.new_ones(size, dtype=None, ...): ones of ``dtype``, else of the tensor's dtype."""
    import numpy as np
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs, _get_kwinputs
    from coremltools.converters.mil.frontend.torch.utils import NUM_TO_NUMPY_DTYPE, TORCH_DTYPE_TO_NUM
    from coremltools.converters.mil.mil import types

    inputs = _get_inputs(context, node, min_expected=2)
    x, size = inputs[0], inputs[1]
    dtype = inputs[2] if len(inputs) > 2 else _get_kwinputs(context, node, "dtype", default=[None])[0]
    dtype = getattr(dtype, "val", dtype)
    if dtype is None:
        np_dtype = types.nptype_from_builtin(x.dtype)
    else:
        import torch

        np_dtype = NUM_TO_NUMPY_DTYPE[TORCH_DTYPE_TO_NUM[dtype] if isinstance(dtype, torch.dtype) else int(dtype)]
    if np.issubdtype(np_dtype, np.integer):
        np_dtype = np.int32  # Core ML's integers
    if isinstance(size, list):
        size = mb.concat(values=size, axis=0)
    if size.val is not None:
        context.add(mb.const(val=np.ones(tuple(int(d) for d in np.atleast_1d(size.val)) if np.size(size.val) else (),
                                         dtype=np_dtype), name=node.name))
        return
    ones = mb.fill(shape=mb.cast(x=size, dtype="int32"), value=np_dtype(1))
    context.add(mb.identity(x=ones, name=node.name))
