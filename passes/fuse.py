"""fuse: partition the graph into fusable regions and report each one, and why others were not.

A region is a set of nodes one generated kernel can replace. Kinds found:
  lora_linear   a base linear/addmm, its unmerged LoRA branch (h = x A^T, u = h B^T,
                out = y + s u), then the longest chain of single-user ops that have a rule in
                kernels/epilogue.py (bias is part of the base op; silu/gelu/relu, a gate
                multiply such as SwiGLU's, a residual add, a constant scale);
  elementwise   connected chains of pointwise ops outside any lora_linear region (reported;
                no template lowers them yet).
Each growth step keeps the region convex (no path leaves it and comes back), checked on a
networkx view of the graph, so it can be contracted into one node. Shapes of operands are
compared with sympy where export recorded symbolic dims.

The pass does not change the graph (check "exact"); it records a summary of the regions in
`gm.meta["surgeon_regions"]`. `lower` replaces the lora_linear regions with kernel calls.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import networkx as nx
import sympy
import torch
import torch.fx as fx

from surgeon.graph import get_tensor, module_path
from surgeon.kernels.epilogue import match as match_epilogue
from surgeon.pipeline import Context, PassResult

log = logging.getLogger("surgeon.fuse")
aten = torch.ops.aten
BASE_OPS = (aten.linear.default, aten.addmm.default)
POINTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
             aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default, aten.tanh.default,
             aten.rsqrt.default, aten.exp.default, aten.pow.Tensor_Scalar, aten.to.dtype, aten.cos.default,
             aten.sin.default}


@dataclass
class Region:
    """Nodes one kernel can replace; for lora_linear, the parts the kernel call needs."""

    name: str
    kind: str                                   # "lora_linear" | "elementwise"
    nodes: list[fx.Node]                        # graph order; `nodes[-1]` is the output
    adapter: str = ""
    parts: dict[str, Any] = field(default_factory=dict)   # x, weight, bias, lora_a, lora_b (nodes)
    weight_layout: str = "out_in"
    scale: float = 1.0
    rank: int = 0
    steps: list[tuple[str, Any, fx.Node]] = field(default_factory=list)  # (rule, operand, graph node)
    stop: str = ""                              # why the epilogue ends where it does

    @property
    def output(self) -> fx.Node:
        return self.nodes[-1]

    def epilogue(self) -> tuple[str, list[fx.Node]]:
        """The custom op's epilogue string and its tensor operands, e.g. ("silu,mul:0", [up])."""
        operands: list[fx.Node] = []
        texts = []
        for rule, operand, _ in self.steps:
            if isinstance(operand, fx.Node):
                if operand not in operands:
                    operands.append(operand)
                texts.append(f"{rule}:{operands.index(operand)}")
            else:
                texts.append(rule if operand is None else f"{rule}:{operand!r}")
        return ",".join(texts), operands

    def describe(self) -> str:
        if self.kind != "lora_linear":
            return f"{self.name}: {len(self.nodes)} pointwise ops ({', '.join(n.name for n in self.nodes)})"
        chain = [self.output_base()] + [f"{rule}({_operand_text(op)})" if op is not None else rule
                                        for rule, op, _ in self.steps]
        return f"{self.name}: {' -> '.join(chain)} [{len(self.nodes)} nodes, r={self.rank}, s={self.scale:g}]"

    def output_base(self) -> str:
        bias = "+bias" if self.parts.get("bias") is not None else ""
        return f"{self.nodes[0].target.__name__.split('.')[0]}{bias}+lora({self.adapter})"


def _operand_text(operand: Any) -> str:
    return operand.name if isinstance(operand, fx.Node) else repr(operand)


def partition(gm: fx.GraphModule) -> tuple[list[Region], list[tuple[str, str]]]:
    """All regions in graph order, and (candidate, reason) for every candidate not fused."""
    graph = dependency_graph(gm)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    regions: list[Region] = []
    rejections: list[tuple[str, str]] = []
    names: dict[str, int] = {}
    taken: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if _is_lora_add(node):
            seed = lora_seed(gm, node)
            if isinstance(seed, str):
                rejections.append((f"lora_linear@{module_path(node)}", seed))
                continue
            seed.name = _unique(names, seed.name)
            grow(gm, seed, graph, order, taken, rejections)
            taken.update((n, seed.name) for n in seed.nodes)
            regions.append(seed)
    for node in gm.graph.nodes:
        if node.target in BASE_OPS and node not in taken and not node.meta.get("surgeon_adapter"):
            rejections.append((f"{node.name} @ {module_path(node)}", "no LoRA branch: a plain GEMM is left to "
                                                                     "the eager op (no template for it)"))
    regions += elementwise_regions(gm, graph, order, taken, names, rejections)
    regions.sort(key=lambda r: order[r.output])
    for where, why in rejections:
        log.info("not fused: %s: %s", where, why)
    return regions, rejections


def dependency_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """Data dependencies of gm's nodes as a networkx DiGraph (edge: producer -> consumer)."""
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node)
        graph.add_edges_from((src, node) for src in node.all_input_nodes)
    return graph


def is_convex(graph: nx.DiGraph, order: dict[fx.Node, int], nodes: set[fx.Node]) -> bool:
    """No path between two of `nodes` passes through a node outside them (contractible)."""
    lo, hi = min(order[n] for n in nodes), max(order[n] for n in nodes)
    window = graph.subgraph(n for n in graph if lo <= order[n] <= hi)   # paths between them stay inside
    below = set().union(*(nx.descendants(window, n) for n in nodes)) - nodes
    above = set().union(*(nx.ancestors(window, n) for n in nodes)) - nodes
    return not (below & above)


def _is_lora_add(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is aten.add.Tensor and bool(node.meta.get("surgeon_adapter"))


def lora_seed(gm: fx.GraphModule, add: fx.Node) -> "Region | str":
    """The region `base + s * B(A x)` ending at an adapter's add, or why the add is not one."""
    if len(add.args) != 2 or not all(isinstance(a, fx.Node) for a in add.args):
        return f"{add.name}: not an add of two tensors"
    base, up = add.args
    down = up.args[0] if up.target is aten.linear.default else None
    if base.target not in BASE_OPS or not isinstance(down, fx.Node) or down.target is not aten.linear.default:
        return f"{add.name}: not base_op + linear(linear(x, A), B) (another adapter kind or stacked adapters)"
    x = base.args[0] if base.target is aten.linear.default else base.args[1]
    if down.args[0] is not x:
        return f"{add.name}: the LoRA branch reads '{down.args[0]}' but the base op reads '{x}'"
    if base.target is aten.addmm.default and (base.kwargs.get("beta", 1) != 1 or base.kwargs.get("alpha", 1) != 1):
        return f"{base.name}: addmm with beta/alpha != 1"
    for node in (base, down, up):
        if len(node.users) != 1:
            return f"{node.name}: used outside the LoRA site ({len(node.users)} users)"
    lora_a, lora_b = down.args[1], up.args[1]
    if len(down.args) > 2 and down.args[2] is not None or len(up.args) > 2 and up.args[2] is not None:
        return f"{add.name}: LoRA linears with a bias"
    weight, bias = (base.args[1], base.args[2] if len(base.args) > 2 else None) \
        if base.target is aten.linear.default else (base.args[2], base.args[0])
    tensors = [x, weight, lora_a, lora_b] + ([bias] if bias is not None else [])
    metas = [tensor_meta(gm, t) for t in tensors]
    if any(m is None for m in metas) or len({m[1] for m in metas}) != 1:
        return f"{add.name}: mixed or unknown dtypes {[None if m is None else str(m[1]) for m in metas]}"
    return Region(f"lora_linear@{module_path(base)}", "lora_linear", [base, down, up, add],
                  adapter=add.meta["surgeon_adapter"],
                  parts={"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b},
                  weight_layout="out_in" if base.target is aten.linear.default else "in_out",
                  scale=float(add.kwargs.get("alpha", 1)), rank=int(metas[2][0][0]))


def grow(gm: fx.GraphModule, region: Region, graph: nx.DiGraph, order: dict, taken: dict, rejections: list) -> None:
    """Extend the region's epilogue while its output's one user has a rule, is free and stays convex."""
    out_meta = tensor_meta(gm, region.nodes[0])
    while True:
        value = region.output
        if len(value.users) != 1:
            region.stop = f"'{value.name}' feeds {len(value.users)} ops" if value.users else "graph output"
            if len(value.users) > 1:
                rejections.append((f"{region.name} + users of {value.name}", f"{region.stop}: it must be stored"))
            return
        user = next(iter(value.users))
        if user.op != "call_function":
            region.stop = f"'{value.name}' is the graph output"
            return
        if user in taken:
            region.stop = f"{user.name}: already fused into {taken[user]}"
            rejections.append((f"{region.name} + {user.name}", region.stop))
            return
        found = match_epilogue(user, value, lambda other: same_meta(tensor_meta(gm, other), out_meta))
        if isinstance(found, str):
            region.stop = found
            rejections.append((f"{region.name} + {user.name}", found))
            return
        if not is_convex(graph, order, set(region.nodes) | {user}):
            region.stop = f"{user.name}: would make the region non-convex"
            rejections.append((f"{region.name} + {user.name}", region.stop))
            return
        region.nodes.append(user)
        region.steps.append((found[0], found[1], user))


def elementwise_regions(gm, graph, order, taken, names, rejections) -> list[Region]:
    """Connected chains (two or more) of pointwise ops outside lora_linear regions."""
    pointwise = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in POINTWISE and n not in taken]
    regions = []
    for component in nx.weakly_connected_components(graph.subgraph(pointwise)):
        if len(component) < 2:
            continue
        nodes = sorted(component, key=order.get)
        name = _unique(names, f"elementwise@{module_path(nodes[-1])}")
        if not is_convex(graph, order, set(nodes)):
            rejections.append((name, "pointwise chain is not convex (a path leaves it and re-enters)"))
            continue
        regions.append(Region(name, "elementwise", nodes, stop="no elementwise template yet (runs eager)"))
    return regions


def _unique(names: dict[str, int], name: str) -> str:
    names[name] = names.get(name, 0) + 1
    return name if names[name] == 1 else f"{name}#{names[name]}"


# ---------------------------------------------------------------- shapes


def tensor_meta(gm: fx.GraphModule, node: Any) -> tuple[tuple, torch.dtype] | None:
    """(shape, dtype) of a node's value: from export's meta, a parameter, or the adapter ops' rules."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(val.shape), val.dtype
    if node.op == "get_attr":
        tensor = get_tensor(gm, node.target)
        return tuple(tensor.shape), tensor.dtype
    if node.meta.get("surgeon_adapter") and node.target in (aten.add.Tensor, aten.mul.Tensor):
        return tensor_meta(gm, node.args[0])    # an adapter's output (no meta of its own) keeps y's shape
    if node.target is aten.linear.default:
        x, w = tensor_meta(gm, node.args[0]), tensor_meta(gm, node.args[1])
        return None if x is None or w is None else ((*x[0][:-1], w[0][0]), x[1])
    return None


def same_meta(a, b) -> bool:
    """Same dtype and the same shape, comparing symbolic dims as sympy expressions."""
    if a is None or b is None or a[1] != b[1] or len(a[0]) != len(b[0]):
        return False
    return all(sympy.simplify(_expr(p) - _expr(q)) == 0 for p, q in zip(a[0], b[0]))


def _expr(dim) -> sympy.Expr:
    return dim.node.expr if isinstance(dim, torch.SymInt) else sympy.Integer(int(dim))


@dataclass(frozen=True)
class Fuse:
    name: ClassVar[str] = "fuse"
    check: ClassVar[str] = "exact"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        regions, rejections = partition(gm)
        gm.meta["surgeon_regions"] = [{"name": r.name, "kind": r.kind, "nodes": [n.name for n in r.nodes],
                                       "epilogue": r.epilogue()[0] if r.kind == "lora_linear" else "",
                                       "stop": r.stop} for r in regions]
        lora = [r for r in regions if r.kind == "lora_linear"]
        notes = [r.describe() for r in regions]
        notes.append(f"{len(lora)} lora_linear regions, {len(regions) - len(lora)} elementwise regions, "
                     f"{len(rejections)} candidates not fused")
        return PassResult(matches=len(lora), rejections=rejections, notes=notes)
