"""Control flow (cond, while_loop), select, and MIL lists.

Semantics: coremltools ``ops/defs/iOS15/control_flow.py`` (no later opset
redefines these ops).

* ``cond`` runs nested block 0 (true branch) or 1 (false branch); both take no
  block inputs and read what they need from the enclosing blocks.
* ``while_loop`` has a condition block (``blocks[0]``) and a body block
  (``blocks[1]``); both take the loop variables as block inputs. The condition
  is evaluated first (tf.while_loop semantics: the body may run zero times);
  each body run returns the next loop variables. The op returns the final loop
  variables. The condition may be a scalar or a one-element bool tensor.
* Lists are functional: ``list_write`` / ``list_scatter`` return a new list and
  never change their input list (a MIL value can be read again later). A list is
  held as a Python list of tensors; slots never written hold ``None`` and read
  as zeros of the element shape (when that shape is known).

These kernels move values, they never compute floating point results, so they
register ``exact=True``: loop variables and list elements keep the dtype they
are held in.
"""

from __future__ import annotations

import torch
from coremltools.converters.mil.mil.types.symbolic import any_symbolic

from .. import dtypes
from ..registry import kernel


def _truth(value, what: str) -> bool:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must hold a single bool, got a tensor of shape {tuple(value.shape)}")
        return bool(value.reshape(()).item())
    return bool(value)


# ----------------------------------------------------------------------------- cond / while

@kernel("cond", family="control", exact=True)
def cond(call):
    pred = _truth(call.raw("pred"), "cond input 'pred'")
    outs = call.run_block(0 if pred else 1, [])
    return outs[0] if len(outs) == 1 else outs


#: guard against a loop that never ends (a wrong condition would hang the process)
MAX_WHILE_ITERATIONS = 10_000_000


@kernel("while_loop", family="control", exact=True)
def while_loop(call):
    loop_vars = list(call.tensors("loop_vars"))
    n_out = len(call.outputs)
    if len(loop_vars) != n_out:
        raise ValueError(f"while_loop has {len(loop_vars)} loop_vars but declares {n_out} outputs")
    for _ in range(MAX_WHILE_ITERATIONS):
        keep_going = call.run_block(0, loop_vars)
        if not _truth(keep_going[0], "while_loop condition block output"):
            return loop_vars[0] if n_out == 1 else loop_vars
        loop_vars = list(call.run_block(1, loop_vars))
        if len(loop_vars) != n_out:
            raise ValueError(f"while_loop body returned {len(loop_vars)} values, expected {n_out}")
    raise RuntimeError(f"while_loop ran {MAX_WHILE_ITERATIONS} iterations without its condition "
                       "becoming false (raise coreml_lab.emulator.ops.control_flow.MAX_WHILE_ITERATIONS "
                       "if this loop really is that long)")


@kernel("select", family="elementwise", exact=True)
def select(call):
    c = call.tensor("cond")
    a, b = call.tensor("a"), call.tensor("b")
    if a.dtype != b.dtype:
        common = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(common), b.to(common)
    return torch.where(c.bool(), a, b)


# ----------------------------------------------------------------------------- lists

class _ListSpec:
    """Element dtype / shape a list var declares (from its MIL type)."""

    __slots__ = ("dtype", "shape")

    def __init__(self, var):
        elem = getattr(var.sym_type, "T", None)  # coremltools list type: T = [elem, init_length, dynamic]
        elem_type = elem[0] if elem else None
        self.dtype = None
        self.shape = None
        try:
            self.dtype = dtypes.torch_dtype(dtypes.name_of(elem_type.get_primitive()))
            shape = elem_type.get_shape()
            if not any_symbolic(shape):
                self.shape = tuple(int(s) for s in shape)
        except Exception:  # noqa: BLE001 - unknown element type: filled from written values
            pass


def _zeros_like_elems(ls: list, spec: _ListSpec | None, what: str) -> torch.Tensor:
    ref = next((v for v in ls if v is not None), None)
    if ref is not None:
        return torch.zeros_like(ref)
    if spec is not None and spec.shape is not None and spec.dtype is not None:
        return torch.zeros(spec.shape, dtype=spec.dtype)
    raise ValueError(f"{what}: the list element was never written and its shape is not known")


def _list_in(call, name: str = "ls") -> list:
    ls = call.raw(name)
    if not isinstance(ls, list):
        raise TypeError(f"{call.op.op_type} input {name!r} must be a MIL list, got {type(ls).__name__}")
    return ls


def _index(call, name: str) -> int:
    return int(call.ints(name)[0])


def _check_index(call, ls: list, i: int, name: str, grow: bool) -> None:
    if i < 0:
        raise ValueError(f"{call.op.op_type} input {name!r} = {i}: list indices must be >= 0")
    if i >= len(ls) and not grow:
        raise ValueError(f"{call.op.op_type} input {name!r} = {i} is out of range for a list of length {len(ls)}")


def _grows(call) -> bool:
    """Whether the input list is dynamic_length (writes past its end grow it)."""
    elem = getattr(call.op.inputs["ls"].sym_type, "T", None)
    return bool(elem[2]) if elem and len(elem) > 2 else True


@kernel("make_list", family="control", exact=True)
def make_list(call):
    n = call.int("init_length")
    if n < 0:
        raise ValueError(f"make_list input 'init_length' = {n}; expected a length >= 0")
    dtype_name = call.str("dtype")
    if dtype_name not in ("bool", "fp16", "fp32", "int32"):
        raise ValueError(f"make_list input 'dtype' = {dtype_name!r}; expected one of "
                         "'bool', 'fp16', 'fp32', 'int32'")
    # unwritten slots are None; they read as zeros shaped and typed like the written elements
    return [None] * n


@kernel("list_length", family="control", exact=True)
def list_length(call):
    return torch.tensor(len(_list_in(call)), dtype=torch.int32)


@kernel("list_write", family="control", exact=True)
def list_write(call):
    ls = list(_list_in(call))
    i = _index(call, "index")
    _check_index(call, ls, i, "index", _grows(call))
    if i >= len(ls):
        ls.extend([None] * (i + 1 - len(ls)))
    ls[i] = call.raw("value")
    return ls


@kernel("list_read", family="control", exact=True)
def list_read(call):
    ls = _list_in(call)
    i = _index(call, "index")
    _check_index(call, ls, i, "index", grow=False)
    v = ls[i]
    if v is None:
        v = _zeros_like_elems(ls, _ListSpec(call.op.inputs["ls"]), "list_read")
    return v


@kernel("list_gather", family="control", exact=True)
def list_gather(call):
    ls = _list_in(call)
    idx = call.raw("indices").reshape(-1).long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(ls)):
        raise ValueError(f"list_gather input 'indices' has values outside [0, {len(ls)}): "
                         f"{idx.tolist()}")
    if any(v is None for v in ls):
        zero = _zeros_like_elems(ls, _ListSpec(call.op.inputs["ls"]), "list_gather")
        ls = [zero if v is None else v for v in ls]
    if ls and any(v.dtype != ls[0].dtype for v in ls):  # elements written from differently held values
        ls = [v.to(ls[0].dtype) for v in ls]
    if not ls:
        spec = _ListSpec(call.op.inputs["ls"])
        shape = spec.shape or ()
        return torch.zeros((0, *shape), dtype=spec.dtype or torch.float32)
    return torch.stack(ls)[idx]


@kernel("list_scatter", family="control", exact=True)
def list_scatter(call):
    ls = list(_list_in(call))
    idx = [int(i) for i in call.raw("indices").reshape(-1).tolist()]
    value = call.raw("value")
    if value.shape[0] != len(idx):
        raise ValueError(f"list_scatter: {value.shape[0]} values for {len(idx)} indices")
    grow = _grows(call)
    for i in idx:
        _check_index(call, ls, i, "indices", grow)
    need = max(idx, default=-1) + 1
    if need > len(ls):
        ls.extend([None] * (need - len(ls)))
    for k, i in enumerate(idx):  # one Python step per list element (not per tensor element)
        ls[i] = value[k]
    return ls
