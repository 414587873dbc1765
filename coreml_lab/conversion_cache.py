"""The conversion cache: conversions on disk by a key of (graph and weights, input specs, options, versions).

Re-running a notebook cell with the same options is near-instant, and any change to the
model's code or weights misses the cache. The last few conversions of the process are also
kept in memory (a hit without reloading the package).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path

import coremltools as ct
import numpy as np
import torch

from .conversion import Conversion
from .emulator.program import mil_program, walk_ops
from .messages import Message
from .options import ConversionOptions
from .sources import ExampleInputs

CACHE_FORMAT = 1


def cache_dir() -> Path:
    """Where conversions are cached: $COREML_LAB_CACHE, else ~/.cache/coreml_lab."""
    root = os.environ.get("COREML_LAB_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "coreml_lab"


def clear_cache() -> int:
    """Delete every cached conversion; returns how many were removed."""
    _RECENT.clear()
    root = cache_dir()
    if not root.exists():
        return 0
    n = 0
    for entry in root.iterdir():
        if entry.is_dir() and (entry / "meta.json").exists():
            shutil.rmtree(entry)
            n += 1
    return n


def _hash_tensor(h, name: str, t) -> None:
    h.update(name.encode())
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        h.update(repr(t).encode())


def fingerprint(source_digest: str, inputs: ExampleInputs | None, options: ConversionOptions) -> str:
    """Cache key of (graph and weights - :meth:`Prepared.digest` -, input specs, options, versions)."""
    h = hashlib.sha256()
    h.update(f"format={CACHE_FORMAT};ct={ct.__version__};torch={torch.__version__};np={np.__version__}".encode())
    h.update(source_digest.encode())
    if inputs is not None:
        h.update(inputs.describe().encode())
    h.update(options.key().encode())
    return h.hexdigest()[:32]


def source_digest(graph_text: str, tensors: dict) -> str:
    """Hash of a traced graph's text and its weights."""
    h = hashlib.sha256()
    h.update(graph_text.encode())
    for name in sorted(tensors):
        _hash_tensor(h, name, tensors[name])
    return h.hexdigest()


_MANGLE = re.compile(r"___torch_mangle_\d+\.")


def scripted_fingerprint_parts(scripted) -> tuple[str, dict]:
    # TorchScript mangles class names on every re-trace; the graph is the same
    graph = _MANGLE.sub("", str(scripted.inlined_graph))
    tensors = dict(scripted.state_dict())
    try:
        _, consts = scripted.code_with_constants
        for k, v in consts.const_mapping.items():
            tensors[f"__const__{k}"] = v
    except Exception:  # noqa: BLE001 - constants are an extra safety net
        pass
    return graph, tensors


def save(key: str, conv: Conversion) -> None:
    root = cache_dir() / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir()))
    try:
        conv.mlmodel.save(str(tmp / "model.mlpackage"))
        scopes = {}
        for op in walk_ops(conv.program, nested=True, consts=True):
            if getattr(op, "scopes", None):
                scopes[op.name] = {src.name: list(vals) for src, vals in op.scopes.items()}
        meta = {
            "spec_version": conv.spec_version, "wall_time": conv.wall_time, "method": conv.method,
            "source_kind": conv.source_kind, "options": conv.options.to_dict(),
            "messages": [m.to_dict() for m in conv.messages],
            "scopes": scopes,
            "layer_chains": {k: list(v) for k, v in conv.layer_chains.items()},
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


#: the last few conversions of this process, by cache key: a cache hit without reloading the package
_RECENT: OrderedDict[tuple, Conversion] = OrderedDict()
RECENT_SIZE = 6


def remember(key: str, conv: Conversion) -> None:
    _RECENT[(str(cache_dir()), key)] = conv
    _RECENT.move_to_end((str(cache_dir()), key))
    while len(_RECENT) > RECENT_SIZE:
        _RECENT.popitem(last=False)


def recent(key: str) -> Conversion | None:
    """A conversion of this process remembered under ``key`` (also one that has no entry on disk)."""
    return _RECENT.get((str(cache_dir()), key))


def load(key: str, options: ConversionOptions, inputs, source) -> Conversion | None:
    recent = _RECENT.get((str(cache_dir()), key))
    if recent is not None and (cache_dir() / key / "meta.json").exists():
        return dataclasses.replace(recent, options=options, example_inputs=inputs, source=source, from_cache=True)
    conv = _load_from_disk(key, options, inputs, source)
    if conv is not None:
        remember(key, conv)
    return conv


def _load_from_disk(key: str, options: ConversionOptions, inputs, source) -> Conversion | None:
    root = cache_dir() / key
    meta_path = root / "meta.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        shell = ct.models.MLModel(str(root / "model.mlpackage"), skip_model_load=True)
        program = mil_program(shell)
        _restore_scopes(program, meta.get("scopes", {}))
        mlmodel = ct.models.MLModel(shell.get_spec(), weights_dir=shell.weights_dir, mil_program=program,
                                    skip_model_load=True)
    except Exception as exc:  # noqa: BLE001 - a damaged entry is a miss, not a failure
        warnings.warn(f"ignoring damaged conversion cache entry {root}: {exc}", stacklevel=2)
        return None
    return Conversion(
        mlmodel=mlmodel, program=program, options=options, spec_version=meta["spec_version"],
        wall_time=meta["wall_time"], messages=[Message.from_dict(m) for m in meta["messages"]],
        method=meta["method"], source_kind=meta["source_kind"], example_inputs=inputs, cache_key=key,
        from_cache=True, onnx_path=getattr(source, "onnx_path", None), source=source,
        layer_chains={k: tuple(v) for k, v in meta.get("layer_chains", {}).items()},
    )


def _restore_scopes(program, scopes: dict) -> None:
    from coremltools.converters.mil.mil.scope import ScopeSource

    for op in walk_ops(program, nested=True, consts=True):
        saved = scopes.get(op.name)
        if saved:
            for src_name, vals in saved.items():
                op.scopes[ScopeSource[src_name]] = list(vals)

