"""MIL op <-> torch module: which module produced each op, and which op carries each module's output.

Three sources:

1. The TorchScript coremltools converted (traced models, TorchScript files): each op's
   scope ends with the torch value it came from, and that value's node in the graph
   carries the full path of every module it ran in (``scopeName()``). Exact, and read
   from the conversion itself.
2. coremltools' own mapping (``convert_and_retrieve_op_mapping``, experimental,
   pinned with coremltools 9.0): every MIL output name -> the torch node it came
   from, with the node's full chain of enclosing modules (TorchScript node
   ``modules``, or an fx node's ``nn_module_stack`` for exported programs). It costs
   a conversion of its own; used for exported programs, whose ops have no TorchScript scope.
3. The scopes' module names alone (``TORCHSCRIPT_MODULE_NAME``), e.g. for a conversion
   read back from the cache without chains. They do not always spell the full path (a
   module ``layers.0.attn`` inside a ModuleList loop appears as ``0.attn``), so they are
   resolved against the real module tree: exact path, else the unique module whose path
   ends with it (and whose class matches). Ambiguous or unknown paths stay unresolved,
   never guessed.

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


# --------------------------------------------------------------------------- from the TorchScript

def torchscript_module_paths(scripted) -> dict[str, tuple]:
    """Torch value name -> the module chain (innermost first, ending with the model) that computed it.

    Read from the TorchScript graph as coremltools' torch frontend reads it
    (``_expand_and_optimize_ir``: inlined, renumbered, weights named), so the value names are
    the ones it records as the last entry of each op's ``TORCHSCRIPT_MODULE_NAME`` scope. A
    traced node's ``scopeName()`` spells every module it ran in by its full path
    (``__module.encoder/__module.encoder.block.0.0/...``), ModuleList members included, which
    the scope's module names (``encoder.0``) do not.
    """
    from coremltools.converters.mil.frontend.torch.torchscript_utils import _expand_and_optimize_ir

    graph, _, _ = _expand_and_optimize_ir(scripted)
    paths: dict[str, tuple] = {}
    blocks = [graph]
    while blocks:
        for node in blocks.pop().nodes():
            scope = node.scopeName()
            chain = tuple(reversed([part[len("__module."):] for part in scope.split("/")
                                    if part.startswith("__module.")])) if scope else ()
            for value in node.outputs():
                paths[value.debugName()] = _with_root(list(chain))
            blocks.extend(node.blocks())
    return paths


def chains_from_torchscript(program, paths: Mapping[str, tuple]) -> dict[str, tuple]:
    """Output var name -> module chain, for the ops whose scope names a torch value of ``paths``."""
    chains: dict[str, tuple] = {}
    for op in walk_ops(program, nested=False):  # module outputs are top-level vars
        names = (getattr(op, "scopes", None) or {}).get(ScopeSource.TORCHSCRIPT_MODULE_NAME)
        chain = paths.get(names[-1]) if names else None
        if chain is not None:
            for v in op.outputs:
                chains[v.name] = chain
    if all(chain == (ROOT,) for chain in chains.values()):  # no module paths (e.g. scripted, not traced)
        return {}
    return chains


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


def annotate_modules(program, chains: dict) -> None:
    """Write each op's full torch module path into its scopes.

    Raw scopes spell ModuleList members as "0.attn" instead of "layers.0.attn", and coremltools'
    mapping helper (which inlines the TorchScript) leaves no module names at all; writing the
    resolved path back lets every scope reader (the emulator's records, error messages) name
    the real module.
    """
    if not chains:
        return
    for op in walk_ops(program, nested=True, consts=True):
        for v in op.outputs:
            chain = chains.get(v.name)
            if chain and chain[0]:
                op.scopes[ScopeSource.TORCHSCRIPT_MODULE_NAME] = chain[0].split(".") + [v.name]
                break
