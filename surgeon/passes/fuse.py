"""fuse: partition the graph into fusable regions and report each one, and why others were not.

A region is a set of nodes one generated kernel can replace. Each adapter site's output seeds
one (passes/_fuse_regions.py has the forms and the identities they rely on):
  lora_linear   a base linear/addmm with its unmerged LoRA branch (out = y + s B(A x)), DoRA's
                form of it (g (x W^T + s B A x) + b), or an IA3 per-output scale (y * l);
  bottleneck    a bottleneck or parallel adapter, y + s U act(D src);
  mixed_lora_linear  in a mixed-batch graph (surgeon/serving.py), a base linear and the MixedSite
                that adds each row's LoRA update from the site's bank (every route a plain LoRA);
then grows an epilogue: the longest chain of single-user ops with a rule in kernels/epilogue.py
(silu/gelu/relu, a gate multiply such as SwiGLU's, a residual add, a constant scale, a
per-output gain). Outside those regions:
  elementwise   connected chains of pointwise ops (two or more) with a rule in
                kernels/pointwise_program.py, and means over the last dim among them (row kernels).
Each growth step keeps the region convex (no path leaves it and comes back), checked on a
networkx view of the graph, so it can be contracted into one node; regions that could not all be
contracted at once (two groups reading each other's values) are left out, and the candidates left
are grouped again with the regions contracted until nothing more groups, so a second lower finds
nothing. Shapes of operands are compared with sympy where export recorded symbolic dims.

Each refusal keeps the nodes it says were left out (of any region, or of one region for a refused
merge "region + user"); only refusals still true of the final regions are reported: one whose
nodes all ended in a region (a later round grouped them) is dropped, one whose nodes partly did
names those left, "(still unfused: a, b)".

The pass does not change the graph (check "exact"); it records a summary of the regions in
`gm.meta["surgeon_regions"]`. `lower` replaces the regions with kernel calls.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import networkx as nx
import torch
import torch.fx as fx

from surgeon.graph import module_path
from surgeon.kernels.epilogue import match as match_epilogue
from surgeon.pipeline import Context, PassResult

from surgeon.kernels.pointwise_program import (REDUCTIONS, RULES as POINTWISE_RULES, broadcast_shape,
                                               program_from_nodes)

from ._fuse_regions import BASE_OPS, Region, mixed_site, row_vector, same_meta, seed, tensor_meta

log = logging.getLogger("surgeon.fuse")
aten = torch.ops.aten
__all__ = ["Fuse", "Region", "dependency_graph", "is_convex", "partition", "same_meta"]
POINTWISE = POINTWISE_RULES            # an op with a pointwise rule can join an elementwise region


def partition(gm: fx.GraphModule) -> tuple[list[Region], list[tuple[str, str]]]:
    """All regions in graph order, and (candidate, reason) for every candidate not fused."""
    graph = dependency_graph(gm)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    regions: list[Region] = []
    rejections: list[Refusal] = []
    names: dict[str, int] = {}
    taken: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        mixed = mixed_site(gm, node) is not None
        if not (is_site_output(node) or mixed) or node in taken:
            continue
        region = seed(gm, node)
        if isinstance(region, str):
            where = f"mixed site {node.target}" if mixed else f"adapter {node.meta['surgeon_adapter']}"
            rejections.append(Refusal(f"{where} @ {module_path(node)}", region))
            continue
        region.name = _unique(names, region.name)
        grow(gm, region, graph, order, taken, rejections)
        taken.update((n, region.name) for n in region.nodes)
        regions.append(region)
    for node in gm.graph.nodes:
        if node.target in BASE_OPS and node not in taken and not node.meta.get("surgeon_adapter"):
            rejections.append(Refusal(f"{node.name} @ {module_path(node)}", "no adapter: a plain GEMM is left to "
                                      "the eager op (no template for it)", (node,)))
    groups = elementwise_regions(gm, graph, order, taken, names, rejections)
    regions += [g for g in groups if not absorb_program(gm, graph, order, regions, g, rejections)]
    regions = contractible(graph, regions, rejections)
    regions += later_rounds(gm, graph, regions, names)
    regions.sort(key=lambda r: order[r.output])
    reported = still_true(rejections, regions)
    for where, why in reported:
        log.info("not fused: %s: %s", where, why)
    return regions, reported


@dataclass(frozen=True)
class Refusal:
    """A candidate not fused, why, and the nodes it leaves out: of every region, or, with an anchor,
    of the region holding the anchor (a refused merge). No nodes: true whatever groups later (an
    adapter site, which no later round makes a region)."""

    where: str
    why: str
    nodes: tuple[fx.Node, ...] = ()
    anchor: fx.Node | None = None


def still_true(refusals: list[Refusal], regions: list[Region]) -> list[tuple[str, str]]:
    """(where, why) of each refusal once, as the final regions leave it: dropped when all its nodes
    ended in a region (its anchor's, for a merge), naming the nodes left when only some did."""
    owner = {node: region.name for region in regions for node in region.nodes}
    reported: dict[tuple, tuple[str, str]] = {}
    for refusal in refusals:
        home = owner.get(refusal.anchor) if refusal.anchor is not None else None
        left = [n for n in refusal.nodes if n not in owner] if refusal.anchor is None else \
            [n for n in refusal.nodes if home is None or owner.get(n) != home]
        if refusal.nodes and not left:
            continue
        where = refusal.where if len(left) == len(refusal.nodes) else \
            f"{refusal.where} (still {'unfused' if refusal.anchor is None else 'outside it'}: " \
            f"{', '.join(n.name for n in left)})"
        reported.setdefault((where, refusal.why, frozenset(left)), (where, refusal.why))
    return list(reported.values())


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


def contractible(graph: nx.DiGraph, regions: list[Region], rejections: list) -> list[Region]:
    """The regions, taken in turn, that can all be replaced at once: two convex regions can still read
    each other's values (a -> b in one, c -> d in the other, with a -> d and c -> b through ops outside
    both), and contracting both would make a cycle. The later one is left out, and the reason reported
    (only pointwise groups have several outputs, so only they are ever left out)."""
    if nx.is_directed_acyclic_graph(quotient(graph, regions)):
        return regions
    kept: list[Region] = []
    for region in regions:
        contracted = quotient(graph, kept + [region])
        if nx.is_directed_acyclic_graph(contracted):
            kept.append(region)
            continue
        others = {name for edge in nx.find_cycle(contracted) for name in edge if isinstance(name, str)}
        rejections.append(Refusal(region.name, f"replacing it too would make a cycle with "
                                               f"{', '.join(sorted(others - {region.name}))} (each reads a value "
                                               f"the other computes, through ops outside both)", tuple(region.nodes)))
    return kept


def quotient(graph: nx.DiGraph, regions: list[Region]) -> nx.DiGraph:
    """`graph` with each region's nodes contracted into one node, named as the region."""
    owner = {node: region.name for region in regions for node in region.nodes}
    contracted = nx.DiGraph()
    contracted.add_nodes_from(owner.get(n, n) for n in graph)
    contracted.add_edges_from((owner.get(u, u), owner.get(v, v)) for u, v in graph.edges
                              if owner.get(u, u) != owner.get(v, v))
    return contracted


def later_rounds(gm: fx.GraphModule, graph: nx.DiGraph, regions: list[Region], names: dict) -> list[Region]:
    """The pointwise groups a second lower would find, so that it finds none: the candidates no region
    took, grouped again in the graph with the regions so far contracted, until a round finds nothing.
    A group refused for a reduction, or left out for a cycle, leaves nodes that can group once their
    neighbours are kernels. Their refusals were recorded by the first round (still_true drops those
    a later round made false); a later round's own are not."""
    found: list[Region] = []
    while True:
        view = quotient(graph, regions + found)
        order = {node: i for i, node in enumerate(nx.topological_sort(view))}
        left = [n for n in sorted((n for n in view if isinstance(n, fx.Node)), key=order.get)
                if n.op == "call_function" and n.target in POINTWISE]
        more = contractible(view, _group_regions(gm, view, order, left, names, []), [])
        if not more:
            return found
        found += more


def is_site_output(node: fx.Node) -> bool:
    """Whether `node` is the last op of an adapter site (no user belongs to the same adapter and path)."""
    adapter = node.meta.get("surgeon_adapter")
    if node.op != "call_function" or not adapter or node.target not in (aten.add.Tensor, aten.mul.Tensor):
        return False
    path = node.meta.get("surgeon_path")
    return not any(u.meta.get("surgeon_adapter") == adapter and u.meta.get("surgeon_path") == path
                   for u in node.users)


def grow(gm: fx.GraphModule, region: Region, graph: nx.DiGraph, order: dict, taken: dict, rejections: list) -> None:
    """Extend the region's epilogue while its output's one user has a rule, is free and stays convex."""
    out_meta = tensor_meta(gm, region.output)
    while True:
        value = region.output
        if len(value.users) != 1:
            region.stop = f"'{value.name}' feeds {len(value.users)} ops" if value.users else "graph output"
            if len(value.users) > 1:
                rejections.append(Refusal(f"{region.name} + users of {value.name}", f"{region.stop}: it must be "
                                          "stored", tuple(value.users), value))
            return
        user = next(iter(value.users))
        if user.op != "call_function":
            region.stop = f"'{value.name}' is the graph output"
            return
        if user in taken:
            region.stop = f"{user.name}: already fused into {taken[user]}"
            rejections.append(Refusal(f"{region.name} + {user.name}", region.stop, (user,), value))
            return
        if is_eval_dropout(user, value):       # the identity: absorbed, no step
            region.nodes.append(user)
            continue
        if is_row_view(gm, user, value):
            region.nodes.append(user)          # the kernel's rows are the view's: it reshapes the output
            region.parts["view"] = user
            out_meta = tensor_meta(gm, user)
            continue
        found = match_epilogue(user, value, lambda other: same_meta(tensor_meta(gm, other), out_meta),
                               lambda other: row_vector(gm, other, value))
        if isinstance(found, str):
            region.stop = found
            rejections.append(Refusal(f"{region.name} + {user.name}", found, (user,), value))
            return
        if not is_convex(graph, order, set(region.nodes) | {user}):
            region.stop = f"{user.name}: would make the region non-convex"
            rejections.append(Refusal(f"{region.name} + {user.name}", region.stop, (user,), value))
            return
        region.nodes.append(user)
        region.steps.append((found[0], found[1], user))


VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def is_row_view(gm: fx.GraphModule, node: fx.Node, value: fx.Node) -> bool:
    """Whether `node` views `value` with other leading dims but the same last dim (a free reshape
    of the kernel's contiguous M x N output, e.g. GPT-2's addmm output back to batch x sequence)."""
    if node.target not in VIEWS or node.args[0] is not value:
        return False
    before, after = tensor_meta(gm, value), tensor_meta(gm, node)
    return before is not None and after is not None and len(after[0]) >= 1 and \
        same_meta(((before[0][-1],), before[1]), ((after[0][-1],), after[1]))


def is_eval_dropout(node: fx.Node, value: fx.Node) -> bool:
    """Whether `node` is dropout(value, p, train=False), the identity an eval-mode capture keeps."""
    return node.target is aten.dropout.default and node.args[0] is value and \
        node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True) is False


def elementwise_regions(gm, graph, order, taken, names, rejections) -> list[Region]:
    """Convex groups (two or more) of pointwise ops outside the GEMM regions, grown in graph order.

    A mean over the last dim joins like a pointwise op (the group then runs one row per program,
    kernels/pointwise_rows.py: RMSNorm's to/pow/mean/add/rsqrt/mul/to/mul is one kernel). A group
    whose program has no kernel because of a reduction (another dim, a broadcast a row kernel does
    not read) is grouped again without its reductions, and the reason is reported.
    """
    candidates = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in POINTWISE and n not in taken]
    return _group_regions(gm, graph, order, candidates, names, rejections)


def _group_regions(gm, graph, order, nodes: list[fx.Node], names, rejections) -> list[Region]:
    regions = []
    for group in pointwise_groups(gm, graph, order, nodes, rejections):
        if len(group) < 2:
            continue
        program = program_from_nodes(group)
        reductions = [n for n in group if POINTWISE[n.target].name in REDUCTIONS]
        if isinstance(program, str) and reductions:
            # what it leaves out are the reductions: the rest is grouped again
            rejections.append(Refusal(f"row group at {module_path(group[-1])}", f"{program}; grouped again "
                                      f"without {', '.join(n.name for n in reductions)}", tuple(reductions)))
            regions += _group_regions(gm, graph, order, [n for n in group if n not in reductions], names, rejections)
            continue
        name = _unique(names, f"elementwise@{module_path(group[-1])}")
        if isinstance(program, str):
            rejections.append(Refusal(name, program, tuple(group)))
            continue
        regions.append(Region(name, "elementwise", group, parts={"program": program}))
    return regions


def pointwise_groups(gm, graph, order, nodes: list[fx.Node], rejections) -> list[list[fx.Node]]:
    """`nodes` (in graph order) grouped: each joins (and so merges) its producers' groups when the
    union stays convex and on one grid, else the latest group of one of its producers that stays
    convex, and starts a group otherwise."""
    groups: list[list[fx.Node]] = []
    member: dict[fx.Node, int] = {}
    for node in nodes:
        candidates = sorted({member[i] for i in node.all_input_nodes if i in member
                             if one_grid(gm, groups[member[i]] + [node])}, reverse=True)
        union = set(node for g in candidates for node in groups[g]) | {node}
        if len(candidates) > 1 and is_convex(graph, order, union) and one_grid(gm, list(union)):
            for g in candidates[1:]:
                groups[candidates[0]] += groups[g]
                member.update(dict.fromkeys(groups[g], candidates[0]))
                groups[g] = []
            groups[candidates[0]].sort(key=order.get)
        joined = next((g for g in candidates if is_convex(graph, order, set(groups[g]) | {node})), None)
        if joined is None:
            if candidates:
                rejections.append(Refusal(node.name, "joining its producers' pointwise group would make it "
                                          "non-convex (a path leaves the group and re-enters); starts a new group",
                                          (node,)))
            joined = len(groups)
            groups.append([])
        groups[joined].append(node)
        member[node] = joined
    return [g for g in groups if g]


def absorb_program(gm, graph, order, regions: list[Region], group: Region, rejections: list) -> bool:
    """Make a pointwise group the end of a lora_linear region's epilogue when it reads that region's
    output (all its uses) and otherwise only tiles, per-column vectors and scalars; True if it did."""
    for region in regions:
        value = region.output
        if region.kind != "lora_linear" or "program" in region.parts or not value.users or \
                not set(value.users) <= set(group.nodes):
            continue
        why = program_refusal(gm, value, group)
        if isinstance(why, str):
            rejections.append(Refusal(f"{region.name} + {group.name}", why, tuple(group.nodes), value))
            return False
        if not is_convex(graph, order, set(region.nodes) | set(group.nodes)):
            rejections.append(Refusal(f"{region.name} + {group.name}", "the two would make a non-convex region",
                                      tuple(group.nodes), value))
            return False
        program, kinds = why
        region.nodes = sorted(region.nodes + group.nodes, key=order.get)
        region.parts.update(program=program, program_kinds=kinds)
        region.stop = f"its epilogue ends with {group.name}'s {len(group.nodes)} pointwise ops"
        return True
    return False


def program_refusal(gm, value: fx.Node, group: Region) -> "tuple | str":
    """(program with `value` as %0, its other inputs' kinds), or why the group cannot end the epilogue."""
    program = program_from_nodes(group.nodes, first=value)
    if isinstance(program, str):
        return program
    if len(program.outputs) != 1:
        return f"{group.name} has {len(program.outputs)} outputs (an epilogue stores one)"
    if program.has_reduction:
        return f"{group.name} reduces rows (an epilogue tile holds only part of a row)"
    out, result = tensor_meta(gm, value), tensor_meta(gm, program.output_nodes[0])
    if out is None or result is None or not same_meta((out[0], None), (result[0], None)):
        return f"{group.name}'s output is not shaped as {value.name} (it broadcasts)"
    if result[1] != out[1]:
        return f"{group.name}'s output is {result[1]}, {value.name} is {out[1]} (the kernel stores x's dtype)"
    kinds = []
    for node in program.input_nodes[1:]:
        meta = tensor_meta(gm, node)
        shape = () if meta is None else (1,) * (len(out[0]) - len(meta[0])) + tuple(meta[0])
        ones = all(isinstance(d, int) and d == 1 for d in shape[:-1])
        if meta is None or len(shape) != len(out[0]):
            return f"input {node.name} has no known shape or more dims than {value.name}"
        kinds.append("scalar" if ones and shape[-1:] in ((1,), ()) else "vec" if ones and
                     same_meta(((shape[-1],), None), ((out[0][-1],), None)) else
                     "tile" if same_meta((shape, None), (out[0], None)) else None)
        if kinds[-1] is None:
            return f"input {node.name} {list(shape)} is neither a tile, one value per column nor one value"
    return program, tuple(kinds)


def one_grid(gm: fx.GraphModule, nodes: list[fx.Node]) -> bool:
    """Whether the nodes' values broadcast to one shape (one pointwise kernel's grid covers them):
    Llama's q and k rotary, with 4 and 2 heads, share cos and sin but not a grid."""
    shapes = [tuple(str(d) for d in meta[0]) for meta in map(lambda n: tensor_meta(gm, n), nodes) if meta]
    return broadcast_shape([tuple(1 if d == "1" else d for d in s) for s in shapes]) is not None


def _unique(names: dict[str, int], name: str) -> str:
    names[name] = names.get(name, 0) + 1
    return name if names[name] == 1 else f"{name}#{names[name]}"


@dataclass(frozen=True)
class Fuse:
    name: ClassVar[str] = "fuse"
    check: ClassVar[str] = "exact"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        regions, rejections = partition(gm)
        gm.meta["surgeon_regions"] = [{"name": r.name, "kind": r.kind, "nodes": [n.name for n in r.nodes],
                                       "epilogue": r.epilogue()[0] if r.kind != "elementwise" else "",
                                       "stop": r.stop} for r in regions]
        kinds = {kind: sum(r.kind == kind for r in regions) for kind in ("lora_linear", "bottleneck", "elementwise")}
        if any(r.kind == "mixed_lora_linear" for r in regions):   # a mixed-batch graph (surgeon/serving.py)
            kinds["mixed_lora_linear"] = sum(r.kind == "mixed_lora_linear" for r in regions)
        notes = [r.describe() for r in regions]
        notes.append(", ".join(f"{n} {kind} regions" for kind, n in kinds.items()) +
                     f", {len(rejections)} candidates not fused")
        return PassResult(matches=len(regions), rejections=rejections, notes=notes)
