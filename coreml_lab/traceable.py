"""Models made traceable as users call them: inputs by keyword, tensors out, torch's fused fast paths off.

``torch.jit.trace`` hands a module positional tensors and accepts only tensors back.
Models people bring are called otherwise: Hugging Face models take ``input_ids=``,
``attention_mask=``, ``pixel_values=`` ... and return ``ModelOutput`` objects holding a
``DynamicCache``; their causal masks are built with ``torch.vmap`` (which the tracer cannot
record: "RuntimeError: unordered_map::at"); and stock ``nn.TransformerEncoder`` /
``nn.MultiheadAttention`` take torch's fused fast path in eval mode under ``no_grad``
(``aten::_transformer_encoder_layer_fwd``, ``aten::_native_multi_head_attention``), which
coremltools cannot convert.

:class:`Traceable` is a module that shares the user's module tree (the very same
submodules, parameters and buffers: module paths such as ``encoder.layer.0.attention``
stay those of the user's model, and nothing is copied or modified) and calls the model
from positional tensors by keyword, with ``use_cache=False`` where the forward takes it,
flattening what comes back to tensors (a ModelOutput's names become the output names).
Inside its forward, :func:`traceable_masks` evaluates Hugging Face's mask functions by
broadcasting instead of ``vmap`` (the same values), and the MHA fast path is off. The trace
and every reference run go through the same forward, so they compute the same thing.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from collections.abc import Sequence

import torch

#: modules whose eval-mode forward may take torch's fused fast path
FAST_PATH_MODULES = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer, torch.nn.TransformerEncoder,
                     torch.nn.TransformerDecoderLayer)

#: keyword arguments that keep a Hugging Face forward from returning a cache, when it takes them (the
#: ModelOutput itself is flattened by :func:`tensors_only`, which keeps its names for the outputs)
TENSOR_ONLY_KWARGS = {"use_cache": False}

_lock = threading.RLock()


def is_huggingface(model) -> bool:
    """Whether ``model`` is a ``transformers`` PreTrainedModel (without importing transformers)."""
    tf = sys.modules.get("transformers")
    base = getattr(tf, "PreTrainedModel", None) if tf is not None else None
    return base is not None and isinstance(model, base)


def fast_path_modules(model) -> list[str]:
    """Paths of the modules of ``model`` that may take torch's fused MHA / transformer fast path."""
    if not isinstance(model, torch.nn.Module):
        return []
    return [p or type(model).__name__ for p, m in model.named_modules() if isinstance(m, FAST_PATH_MODULES)]


@contextlib.contextmanager
def fast_path_off():
    """torch's fused MHA / transformer fast path off inside the block; the previous setting restored after."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    with _lock:
        previous = mha.get_fastpath_enabled()
        mha.set_fastpath_enabled(False)
        try:
            yield
        finally:
            mha.set_fastpath_enabled(previous)


#: how many masks were built by :func:`_broadcast_for_bhqkv` (lets a caller tell whether a forward built any)
broadcast_masks = 0


def _broadcast_for_bhqkv(mask_function, bh_indices: bool = True):
    """``transformers.masking_utils._vmap_for_bhqkv`` by broadcasting: the same (B, H, Q, KV) mask."""
    global broadcast_masks
    broadcast_masks += 1

    def evaluate(batch_idx, head_idx, q_idx, kv_idx):
        if bh_indices:
            args = (batch_idx[:, None, None, None], head_idx[None, :, None, None],
                    q_idx[None, None, :, None], kv_idx[None, None, None, :])
            shape = (batch_idx.shape[0], head_idx.shape[0], q_idx.shape[0], kv_idx.shape[0])
        else:
            args = (batch_idx, head_idx, q_idx[:, None], kv_idx[None, :])
            shape = (q_idx.shape[0], kv_idx.shape[0])
        return mask_function(*args).expand(shape).contiguous()  # contiguous: transformers writes into it

    return evaluate


@contextlib.contextmanager
def traceable_masks():
    """Hugging Face's mask functions evaluated by broadcasting instead of ``torch.vmap`` inside the block."""
    masking = sys.modules.get("transformers.masking_utils")
    original = getattr(masking, "_vmap_for_bhqkv", None) if masking is not None else None
    if original is None or original is _broadcast_for_bhqkv:
        yield
        return
    # TransformGetItemToIndex routes tensor[index] through an autograd.Function for vmap's sake,
    # which the tracer cannot record either; broadcast indices are plain advanced indexing
    index_mode = getattr(masking, "TransformGetItemToIndex", None)
    with _lock:
        masking._vmap_for_bhqkv = _broadcast_for_bhqkv
        if index_mode is not None:
            masking.TransformGetItemToIndex = contextlib.nullcontext
        try:
            yield
        finally:
            masking._vmap_for_bhqkv = original
            if index_mode is not None:
                masking.TransformGetItemToIndex = index_mode


def tensors_only(out):
    """A forward's result as tensors and (nested) tuples of tensors: ModelOutputs and dicts by value, Nones dropped."""
    if isinstance(out, torch.Tensor):
        return out
    to_tuple = getattr(out, "to_tuple", None)
    if callable(to_tuple):  # transformers' ModelOutput
        out = to_tuple()
    if isinstance(out, dict):
        out = tuple(out.values())
    if isinstance(out, (tuple, list)):
        return tuple(tensors_only(o) for o in out if o is not None and not _is_cache(o))
    raise TypeError(f"the model returned a {type(out).__name__}; Core ML outputs must be tensors "
                    "(return tensors, or tuples/dicts of tensors)")


def output_names(out, flat) -> tuple | None:
    """The names of a ModelOutput's / dict's tensors (``logits``, ``last_hidden_state`` ...) when each
    flattened output is one of them; None otherwise."""
    if not (hasattr(out, "keys") and isinstance(flat, tuple)):
        return None
    names = tuple(k for k in out.keys() if isinstance(out[k], torch.Tensor))
    if len(names) != len(flat) or not all(isinstance(t, torch.Tensor) for t in flat):
        return None
    if not all(isinstance(n, str) and n.isidentifier() for n in names):
        return None
    return names


def _is_cache(value) -> bool:
    return type(value).__name__.endswith("Cache") and not isinstance(value, torch.Tensor)


class Traceable(torch.nn.Module):
    """The user's model called by keyword from positional tensors, returning tensors only.

    It shares the model's submodules, parameters and buffers (its module paths are the
    model's own); ``fixed`` keyword arguments (``use_cache=False`` for Hugging Face models)
    are added to each call. After a forward, ``output_names`` holds the names of a
    ModelOutput's tensors (the converted outputs take them), or None. torch's fused MHA /
    transformer fast path is off inside the forward.
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str], fixed: dict | None = None):
        super().__init__()
        # the same tables, not copies: named_modules() / parameters() are the model's own
        self._parameters = model._parameters
        self._buffers = model._buffers
        self._modules = model._modules
        self.__dict__["wrapped"] = model  # not registered: it is the tree above, not a child
        self.training = model.training
        self.names = tuple(names)
        self.fixed = dict(fixed or {})
        self.__dict__["output_names"] = None
        self.__dict__["built_masks"] = False  # whether the last forward built Hugging Face masks

    def forward(self, *tensors):
        if len(tensors) != len(self.names):
            raise TypeError(f"{type(self.wrapped).__name__} takes inputs {list(self.names)}; got {len(tensors)} tensors")
        kwargs = dict(zip(self.names, tensors), **self.fixed)
        before = broadcast_masks
        with traceable_masks(), fast_path_off():
            out = self.wrapped(**kwargs)
        self.__dict__["built_masks"] = broadcast_masks > before
        flat = tensors_only(out)
        self.__dict__["output_names"] = output_names(out, flat)
        return flat

    def extra_repr(self) -> str:
        return f"{type(self.wrapped).__name__}({', '.join(self.names)}), {self.fixed}"


def tensor_only_kwargs(model) -> dict:
    """The keyword arguments of :data:`TENSOR_ONLY_KWARGS` that ``model.forward`` takes by name."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {k: v for k, v in TENSOR_ONLY_KWARGS.items() if k in params}
