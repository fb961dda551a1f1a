"""Rewrites of the ONNX graph `torch.onnx.export` produces, before it is saved (onnx_ir graphs)."""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any


def bool_where_to_logic(graph: Any) -> int:
    """onnxruntime has no boolean `Where` kernel: rewrite Where(c, x, y) on bools as
    Or(And(c, x), And(Not(c), y)) (the same broadcasting). Returns the count rewritten."""
    import onnx_ir as ir

    n = 0
    for node in list(graph.all_nodes()):
        if node.op_type != "Where" or node.domain not in ("", "ai.onnx") or node.outputs[0].dtype != ir.DataType.BOOL:
            continue
        c, x, y = node.inputs
        g = node.graph
        not_c = ir.node("Not", [c])
        a = ir.node("And", [c, x])
        b = ir.node("And", [not_c.outputs[0], y])
        o = ir.node("Or", [a.outputs[0], b.outputs[0]])
        o.outputs[0].dtype = ir.DataType.BOOL
        o.outputs[0].shape = node.outputs[0].shape
        g.insert_before(node, [not_c, a, b, o])
        old = node.outputs[0]
        ir.convenience.replace_all_uses_with(old, o.outputs[0])
        if old in g.outputs:
            g.outputs[g.outputs.index(old)] = o.outputs[0]
            o.outputs[0].name = old.name
        g.remove(node, safe=True)
        n += 1
    return n


def name_dims(graph: Any, dynamic_axes: Mapping[str, Mapping[int, str]]) -> None:
    """Give the graph's symbolic dims (`s0`, `s1 + s2`, ...) the names of `dynamic_axes` ('batch',
    'seq', 'past_seq + seq') on its inputs and outputs."""
    import onnx_ir as ir

    rename: dict[str, str] = {}
    by_name = {v.name: v for v in graph.inputs}
    for name, axes in dynamic_axes.items():
        v = by_name.get(name)
        if v is None or v.shape is None:
            continue
        for axis, dim_name in axes.items():
            d = v.shape[axis]
            if isinstance(d, ir.SymbolicDim) and d.value and re.fullmatch(r"s\d+", d.value):
                rename[d.value] = dim_name

    def fix(v: Any) -> None:
        if v.shape is None:
            return
        dims = []
        for d in v.shape:
            if isinstance(d, ir.SymbolicDim) and d.value:
                d = ir.SymbolicDim(re.sub(r"\bs\d+\b", lambda m: rename.get(m.group(0), m.group(0)), d.value))
            dims.append(d)
        v.shape = ir.Shape(dims)

    for v in [*graph.inputs, *graph.outputs]:
        fix(v)
