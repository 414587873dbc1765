"""Pairing a diagnosed (FP16 or mixed) program with its FP32 reference: var pairs and layer maps.

coremltools names the same op differently at FP16 and FP32 (``var_7_cast_fp16`` vs
``var_7``), so ops are paired by structure (:func:`pair_programs`), names being the fallback
(:func:`reference_key`). :class:`ProgramPairing` holds what a diagnosis needs from the pairing:
the var pairs, the reference's layer map and the diagnosed program's, borrowed from it.
A package diagnosed on its own is its own reference: :meth:`ProgramPairing.identity`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from .emulator.program import walk_ops
from .mapping import LayerMap, module_outputs

_SUFFIX = re.compile(r"(_cast_fp16|_cast_fp32|_to_fp16|_to_fp32|_promoted)+$")


def reference_key(name: str) -> str:
    """The FP32-program name of a var of an FP16/mixed program by naming (``var_7_cast_fp16`` -> ``var_7``)."""
    return _SUFFIX.sub("", name)


def pair_programs(dev_program, ref_program) -> dict[str, str]:
    """Dev var name -> the reference (FP32 program) var holding the same quantity.

    Matched by structure, not names (coremltools names the same op differently at FP16 and
    FP32): walking the dev program in order, an op matches the first unmatched reference op
    of the same type whose non-constant inputs are the matches of its own inputs. A precision
    cast only one side has is transparent: the diagnosed program's (its output matches its
    input's match) and the reference's (an FP32 program writing an FP16 Core ML state casts
    there; an FP16 program does not; FP16 inputs cast to FP32; an FP16 output cast back).
    Ops left unmatched fall back to name matching. A ``constexpr_*`` output (a compressed
    weight, decompressed at load time) counts as a constant. Top-level ops only (a loop is
    one op, as it is one step of the interpreter).
    """
    dev_f = next(iter(dev_program.functions.values()))
    ref_f = next(iter(ref_program.functions.values()))
    ref_inputs = set(ref_f.inputs)
    match: dict[str, str] = {n: n for n in dev_f.inputs if n in ref_inputs}
    index: dict = defaultdict(list)
    ref_names = set(ref_inputs)
    alias: dict[str, str] = {}  # reference cast output -> the var it casts (followed through chains)
    order: dict[int, int] = {}
    for op in walk_ops(ref_f, nested=False):
        if op.op_type == "cast":
            src = op.inputs["x"].name
            alias[op.outputs[0].name] = alias.get(src, src)
    for op in walk_ops(ref_f, nested=False):
        order[id(op)] = len(order)  # program order, for the loose match
        index[(op.op_type, _input_signature(op, None, alias))].append(op)
        ref_names.update(v.name for v in op.outputs)
    used = set()
    for op in walk_ops(dev_f, nested=False):
        sig = _input_signature(op, match, alias)
        candidates = [c for c in index.get((op.op_type, sig), []) if id(c) not in used] if sig is not None else []
        if candidates:
            ref_op = candidates[0]
            used.add(id(ref_op))
            for dv, rv in zip(op.outputs, ref_op.outputs):
                match[dv.name] = rv.name
        elif op.op_type == "cast" and op.inputs["x"].name in match:
            match[op.outputs[0].name] = match[op.inputs["x"].name]
        else:
            for dv in op.outputs:
                key = reference_key(dv.name)
                if key in ref_names:
                    match[dv.name] = key
            if sig is None and not any(dv.name in match for dv in op.outputs):
                ref_op = _loose_match(op, match, alias, index, used, order)
                if ref_op is not None:
                    used.add(id(ref_op))
                    for dv, rv in zip(op.outputs, ref_op.outputs):
                        match[dv.name] = rv.name
    # a program output stands for the reference's output where they differ by casts only
    ref_out_of_root = {alias.get(v.name, v.name): v.name for v in ref_f.outputs}
    for v in dev_f.outputs:
        paired = match.get(v.name)
        if paired is not None and paired not in ref_out_of_root.values():
            out = ref_out_of_root.get(alias.get(paired, paired))
            if out is not None:
                match[v.name] = out
    return match


def _loose_match(op, match, alias, index, used, order):
    """The first unused reference op of ``op``'s type whose inputs agree with ``op``'s wherever those
    are constants or matched; an unmatched input is a wildcard. Pairs an op past a few extra ops the
    other program has on one input (e.g. an index normalised once more before a ``gather``), so the
    rest of the program still pairs. None where another input disagrees."""
    partial = []
    for pname, v in sorted(op.inputs.items()):
        for x in (v if isinstance(v, (list, tuple)) else (v,)):
            if x.op is not None and (x.op.op_type == "const" or x.op.op_type.startswith("constexpr_")):
                partial.append((pname, "const"))
            elif x.name in match:
                partial.append((pname, alias.get(match[x.name], match[x.name])))
            else:
                partial.append((pname, None))
    found = []
    for (op_type, sig), ops in index.items():
        if op_type != op.op_type or sig is None or len(sig) != len(partial):
            continue
        if all(p == s or (p[0] == s[0] and p[1] is None and s[1] != "const") for p, s in zip(partial, sig)):
            found += [ref_op for ref_op in ops if id(ref_op) not in used][:1]
    return min(found, key=lambda ref_op: order[id(ref_op)]) if found else None


def _input_signature(op, match, alias):
    """(input name, matched var name or "const") for every input, reference casts seen through (``alias``);
    None if an input has no match."""
    sig = []
    for pname, v in sorted(op.inputs.items()):
        for x in (v if isinstance(v, (list, tuple)) else (v,)):
            if x.op is not None and (x.op.op_type == "const" or x.op.op_type.startswith("constexpr_")):
                sig.append((pname, "const"))  # a compressed weight (constexpr_*) is a constant too
            elif match is None:
                sig.append((pname, alias.get(x.name, x.name)))
            elif x.name in match:
                sig.append((pname, alias.get(match[x.name], match[x.name])))
            else:
                return None
    return tuple(sig)


def paired_layer_map(conversion, ref_map: LayerMap, ref_of: dict) -> LayerMap:
    """The diagnosed program's LayerMap: module chains of the reference vars it is paired with."""
    if conversion.layer_chains:
        return conversion.layer_map()
    chains = {dev: ref_map.chains[ref] for dev, ref in ref_of.items() if ref in ref_map.chains}
    if not chains:
        return conversion.layer_map()  # no mapping to borrow: scopes resolved against the module tree
    return LayerMap(chains=chains, module_outputs=module_outputs(conversion.program, chains), source=ref_map.source)


def innermost_module_per_var(module_outputs: dict) -> dict:
    """var -> the innermost module whose output it carries (``blocks.11`` rather than ``blocks``)."""
    out: dict = {}
    for module, var in module_outputs.items():
        if var not in out or module.count(".") > out[var].count(".") or (
                module.count(".") == out[var].count(".") and len(module) > len(out[var])):
            out[var] = module
    return out


@dataclass(frozen=True)
class ProgramPairing:
    """A diagnosed conversion paired with its FP32 reference conversion."""

    #: diagnosed var -> the reference var holding the same quantity
    ref_of: dict
    #: the reference program's op -> torch module mapping
    ref_map: LayerMap
    #: the diagnosed program's, borrowed from the reference where it has none of its own
    layer_map: LayerMap
    #: reference var -> the innermost torch module whose output it carries
    module_vars: dict

    @classmethod
    def of(cls, conversion, reference) -> ProgramPairing:
        ref_map = reference.layer_map()
        ref_of = pair_programs(conversion.program, reference.program)
        return cls(ref_of=ref_of, ref_map=ref_map, layer_map=paired_layer_map(conversion, ref_map, ref_of),
                   module_vars=innermost_module_per_var(ref_map.module_outputs))

    @classmethod
    def identity(cls, conversion) -> ProgramPairing:
        """A program paired with itself (a package diagnosed against its own exact FP32 run)."""
        layer_map = conversion.layer_map()
        function = next(iter(conversion.program.functions.values()))
        ref_of = {n: n for n in function.inputs}
        for op in walk_ops(function, nested=False):
            ref_of.update((v.name, v.name) for v in op.outputs)
        return cls(ref_of=ref_of, ref_map=layer_map, layer_map=layer_map,
                   module_vars=innermost_module_per_var(layer_map.module_outputs))


def unpaired_ops(dev_program, ref_of: dict) -> list:
    """The diagnosed program's top-level ops (weight decompression aside) with no output paired."""
    function = next(iter(dev_program.functions.values()))
    return [op for op in walk_ops(function, nested=False) if not op.op_type.startswith("constexpr_")
            and not any(v.name in ref_of for v in op.outputs)]
