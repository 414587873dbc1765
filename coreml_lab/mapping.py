"""MIL op <-> torch module: which module produced each op, and which op carries each module's output.

Two sources, best first:

1. coremltools' own mapping (``convert_and_retrieve_op_mapping``, experimental,
   pinned with coremltools 9.0): every MIL output name -> the torch node it came
   from, with the node's full chain of enclosing modules (TorchScript node
   ``modules``, or an fx node's ``nn_module_stack`` for exported programs).
2. The scopes coremltools records on each op (``TORCHSCRIPT_MODULE_NAME``). They
   do not always spell the full path (a module ``layers.0.attn`` inside a
   ModuleList loop appears as ``0.attn``), so they are resolved against the real
   module tree: exact path, else the unique module whose path ends with it (and
   whose class matches). Ambiguous or unknown paths stay unresolved, never guessed.

A module's output op is the last op (program order) whose output leaves the
module: it is used by an op outside the module, or is a program output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from coremltools.converters.mil.mil.scope import ScopeSource

from .emulator.program import walk_ops

ROOT = ""


@dataclass
class LayerMap:
    """Module chains per MIL output name, and each module's output var.

    chains: output var name -> module paths, innermost first, ending with "" (the model).
    module_outputs: module path -> output var name of the op that carries its output.
    source: "coremltools" | "scopes" | "none".
    """

    chains: dict = field(default_factory=dict)
    module_outputs: dict = field(default_factory=dict)
    source: str = "none"

    def module_of(self, var_name: str) -> str | None:
        """Innermost module path that produced ``var_name`` (None when unknown, "" = the model itself)."""
        chain = self.chains.get(var_name)
        return chain[0] if chain else None

    def op_module(self, op) -> str | None:
        for v in op.outputs:
            m = self.module_of(v.name)
            if m is not None:
                return m
        return None

    def to_json(self) -> dict:
        return {"chains": {k: list(v) for k, v in self.chains.items()}, "source": self.source}

    @classmethod
    def from_json(cls, d: dict) -> LayerMap:
        return cls(chains={k: tuple(v) for k, v in d.get("chains", {}).items()}, source=d.get("source", "none"))


# --------------------------------------------------------------------------- from coremltools' mapping

def chains_from_coremltools(mapping) -> dict[str, tuple]:
    """Output var name -> module chain from a ``TorchNodeToMILOperationMapping``."""
    chains: dict[str, tuple] = {}
    for name, node in mapping.operation_output_name_to_node_map.items():
        chain = _node_chain(node)
        if chain is not None:
            chains[name] = chain
    return chains


def _node_chain(node) -> tuple | None:
    modules = getattr(node, "modules", None)
    if modules is not None:  # TorchScriptNodeInfo: ((path, call index), ...) innermost first
        paths = [m[0] if isinstance(m, (tuple, list)) else getattr(m, "name", str(m)) for m in modules]
        return _with_root(paths)
    meta = getattr(node, "meta", None)
    if meta is not None:  # torch.fx.Node: nn_module_stack is ordered outermost -> innermost
        stack = meta.get("nn_module_stack") or {}
        paths = [v[0] if isinstance(v, (tuple, list)) else str(v) for v in stack.values()]
        return _with_root(list(reversed(paths)))
    return None


def _with_root(paths: list[str]) -> tuple:
    paths = [p for p in paths if p != ROOT]
    return tuple(paths) + (ROOT,)


# --------------------------------------------------------------------------- from scopes

def resolve_scope_path(names: list[str], types: list[str] | None, tree: Mapping) -> str | None:
    """The real module path for a scope's module names, or None when it is unknown or ambiguous."""
    if not names:
        return ROOT
    path = ".".join(names)
    # module types line up with the names (plus the op kind last) only in raw scopes
    want_type = types[len(names) - 1] if types and len(types) == len(names) + 1 else None

    def type_ok(p):
        return want_type is None or type(tree[p]).__name__ == want_type

    if path in tree and type_ok(path):
        return path
    candidates = [p for p in tree if p.endswith("." + path) and type_ok(p)]
    return candidates[0] if len(candidates) == 1 else None


def chains_from_scopes(program, tree: Mapping | None) -> dict[str, tuple]:
    """Output var name -> module chain from TorchScript scopes, resolved against ``tree``."""
    chains: dict[str, tuple] = {}
    for op in walk_ops(program, nested=False):  # module outputs are top-level vars
        scopes = getattr(op, "scopes", None) or {}
        names = list(scopes.get(ScopeSource.TORCHSCRIPT_MODULE_NAME, []))
        types = list(scopes.get(ScopeSource.TORCHSCRIPT_MODULE_TYPE, []))
        if not names:
            continue
        module_names = names[:-1]  # the last entry is the torch value, not a module
        if tree is None:
            path = ".".join(module_names)
        else:
            path = resolve_scope_path(module_names, types, tree)
            if path is None:
                continue
        chain = _ancestors(path)
        for v in op.outputs:
            chains[v.name] = chain
    return chains


def _ancestors(path: str) -> tuple:
    if not path:
        return (ROOT,)
    parts = path.split(".")
    return tuple(".".join(parts[:i]) for i in range(len(parts), 0, -1)) + (ROOT,)


# --------------------------------------------------------------------------- module outputs

def module_outputs(program, chains: Mapping[str, tuple]) -> dict[str, str]:
    """module path -> the var carrying its output (last var in program order that leaves it)."""
    func = next(iter(program.functions.values()))
    block_outputs = {v.name for v in func.outputs}
    out: dict[str, str] = {}
    for op in walk_ops(program, nested=False):  # module outputs are top-level vars
        for v in op.outputs:
            chain = chains.get(v.name)
            if not chain:
                continue
            consumer_chains = [chains.get(c.outputs[0].name, ()) if c.outputs else () for c in v.child_ops]
            for m in chain:
                if m == ROOT:
                    continue
                leaves = v.name in block_outputs or any(m not in cc for cc in consumer_chains)
                if leaves:
                    out[m] = v.name
    return out


def build_layer_map(program, torch_module=None, coremltools_chains: Mapping | None = None) -> LayerMap:
    """The LayerMap of a converted program, from coremltools' mapping if given, else from scopes."""
    tree = dict(torch_module.named_modules()) if torch_module is not None else None
    if coremltools_chains:
        chains = dict(coremltools_chains)
        if tree is not None:  # keep only paths that exist in the real module tree
            chains = {k: tuple(p for p in v if p in tree) for k, v in chains.items()}
        source = "coremltools"
    else:
        chains = chains_from_scopes(program, tree)
        source = "scopes" if chains else "none"
    return LayerMap(chains=chains, module_outputs=module_outputs(program, chains), source=source)
