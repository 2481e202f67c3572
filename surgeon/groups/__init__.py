"""Coupled-group analysis: which weight axes must be permuted together, and how.

    spec = analyze_groups(gm, example_inputs)   # also stored as gm.meta["surgeon_groups"]
    print(format_groups(spec))

Over the canonical graph, a producer's output channels (weight rows, bias) move with every
consumer's input channels (weight columns), through elementwise ops, activations, gated products
(SwiGLU gate and up rows move together), norm affine parameters and statistics, concat / split
(index maps: each part is its own group), reshapes into heads (whole heads move; positions inside a
head never do) and attention (grouped-query: blocks of query heads move with their key/value head).
The result is plain JSON-able data:

- groups: id, key (unique, from the members' common module path), kind (channels | heads |
  kv-heads), size, unit (block that moves as one), status (eligible | residual | ineligible),
  reasons, members (tensor, axis, [start, stop), role), and for query heads under grouped-query
  attention `tie`: {group, coarse, movable} - blocks of `coarse` channels move exactly as the units
  of that key/value group (movable False: they stay, query heads move only inside their block);
- tensors: for every tensor the graph reads, per axis the segments and the group of each.

Guarantee: permuting every member of an eligible group by one unit-block permutation (honouring a
tie) leaves the function unchanged; an op without a transfer rule between a producer and a consumer
makes their group ineligible with a reason naming that node, its op and module path. Groups a
residual add joins (the residual stream) are reported as "residual" and left alone by default.

Modules: infer.py walks the graph and labels each tensor axis (fill_shapes, Flow), rules.py holds
the per-op transfer rules, space.py the axis spaces and labels, reshape.py the reshape rule,
permute.py applies a permutation to the members' tensors (and records it for un-permute), nm.py
searches N:M-sparsity permutations. The package may import torch, surgeon.graph, surgeon.errors and
surgeon.report; the passes that move weights (co-permute, permute-nm, un-permute) and S2FT build on
it, never the other way round.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch.fx as fx

from .infer import Flow, concrete_shapes, fill_shapes
from .space import Spaces


def analyze_groups(gm: fx.GraphModule, example_inputs: tuple | None = None, store: bool = True) -> dict:
    """Run the analysis on `gm` and return (and store in gm.meta["surgeon_groups"]) the group spec."""
    with concrete_shapes(gm, example_inputs):
        fill_shapes(gm, example_inputs)
        flow = Flow(gm).run()
        spec = _resolve(flow)
    if store:
        gm.meta["surgeon_groups"] = spec
    return spec


@dataclass
class _Draft:
    size: int
    unit: int = 1
    members: dict = field(default_factory=dict)        # (target, axis, start, stop) -> role
    poison: list[str] = field(default_factory=list)
    residual: list[str] = field(default_factory=list)
    tie: tuple[int, int] | None = None                 # (coarse, other root)
    tied_by: list[int] = field(default_factory=list)

    def add_reasons(self, poison: list[str], residual: list[str]) -> None:
        self.poison += [r for r in poison if r not in self.poison]
        self.residual += [r for r in residual if r not in self.residual]


def _merge_ties(spaces: Spaces) -> None:
    """Key/value spaces tied to the same query blocks share one permutation."""
    buckets = defaultdict(list)
    for tie in spaces.ties:
        buckets[(spaces.find(tie.fine), tie.coarse)].append(tie)
    for ties in buckets.values():
        for tie in ties[1:]:
            spaces.union(ties[0].other, tie.other, f"key/value heads of the same query heads at {tie.where}")


def _collect(flow: Flow) -> dict[int, _Draft]:
    """Leaf spaces with the members, units and reasons of every space they are part of."""
    spaces, drafts = flow.spaces, {}
    for index, space in enumerate(spaces.spaces):
        if spaces.find(index) != index:
            continue
        for leaf, start, length in spaces.leaves(index):
            root = spaces.find(leaf)
            draft = drafts.setdefault(root, _Draft(spaces.spaces[root].size, spaces.spaces[root].unit))
            draft.unit = math.lcm(draft.unit, space.unit)
            draft.add_reasons(space.poison, space.residual)
            if start % space.unit or length % space.unit:
                draft.poison.append(f"a part boundary at channel {start} cuts a block of {space.unit}")
            for target, axis, s, _ in space.members:
                key = (target, axis, s + start, s + start + length)
                draft.members[key] = flow.roles.get((target, axis), "")
    return drafts


def _apply_ties(flow: Flow, drafts: dict[int, _Draft]) -> None:
    spaces = flow.spaces
    for tie in spaces.ties:
        fine, other = drafts.get(spaces.find(tie.fine)), drafts.get(spaces.find(tie.other))
        if fine is None or other is None:
            continue
        ok = fine.size % tie.coarse == 0 and tie.coarse % fine.unit == 0 and other.unit == tie.unit \
            and fine.size // tie.coarse == other.size // other.unit
        if not ok:
            for draft in (fine, other):
                draft.poison.append(f"grouped-query heads at {tie.where} do not line up "
                                    f"(blocks of {tie.coarse} vs heads of {tie.unit})")
            continue
        fine.tie = (tie.coarse, spaces.find(tie.other))
        if spaces.find(tie.fine) not in other.tied_by:
            other.tied_by.append(spaces.find(tie.fine))


def _status(draft: _Draft) -> str:
    return "ineligible" if draft.poison else "residual" if draft.residual else "eligible"


def _resolve(flow: Flow) -> dict:
    _merge_ties(flow.spaces)
    drafts = _collect(flow)
    _apply_ties(flow, drafts)
    for root, draft in drafts.items():       # a query group that cannot move makes its kv group stay too
        if draft.tie and _status(draft) == "ineligible":
            drafts[draft.tie[1]].poison.append("tied to query heads that cannot move")
    order = {n.target: i for i, n in enumerate(flow.gm.graph.nodes) if n.op == "get_attr"}
    live = {root: d for root, d in drafts.items() if d.members}
    roots = sorted(live, key=lambda r: min((order.get(t, 1 << 30), a, s) for t, a, s, _ in live[r].members))
    ids = {root: i for i, root in enumerate(roots)}
    groups = [_group(ids, root, live[root], drafts) for root in roots]
    _name_groups(groups)
    return {"version": 1, "groups": groups, "tensors": _tensor_index(flow, groups)}


def _group(ids: dict, root: int, draft: _Draft, drafts: dict) -> dict:
    members = [{"tensor": t, "axis": a, "start": s, "stop": e, "role": role}
               for (t, a, s, e), role in sorted(draft.members.items())]
    kind = "kv-heads" if draft.tied_by else "heads" if draft.unit > 1 else "channels"
    tie = None
    if draft.tie and draft.tie[1] in ids:
        other = drafts[draft.tie[1]]
        tie = {"group": ids[draft.tie[1]], "coarse": draft.tie[0], "movable": _status(other) == "eligible"}
    return {"id": ids[root], "key": "", "path": _common_path([m["tensor"] for m in members]), "kind": kind,
            "size": draft.size, "unit": draft.unit, "units": draft.size // draft.unit, "status": _status(draft),
            "reasons": draft.poison or draft.residual, "members": members, "tie": tie,
            "tied_by": sorted(ids[r] for r in draft.tied_by if r in ids)}


def _common_path(tensors: list[str]) -> str:
    owners = [t.rpartition(".")[0].split(".") for t in tensors]
    prefix = []
    for atoms in zip(*owners):
        if any(a != atoms[0] for a in atoms):
            break
        prefix.append(atoms[0])
    return ".".join(p for p in prefix if p)


def _name_groups(groups: list[dict]) -> None:
    """Unique keys: the common module path, with the kind (and an index) where paths collide."""
    by_path = defaultdict(list)
    for g in groups:
        by_path[g["path"] or "<root>"].append(g)
    for path, same in by_path.items():
        kinds = defaultdict(list)
        for g in same:
            kinds[g["kind"]].append(g)
        for kind, gs in kinds.items():
            for i, g in enumerate(gs):
                g["key"] = path if len(same) == 1 else f"{path}:{kind}" + (f"{i}" if len(gs) > 1 else "")


def _tensor_index(flow: Flow, groups: list[dict]) -> dict:
    tensors: dict = {}
    for node in flow.gm.graph.find_nodes(op="get_attr"):
        labels = flow.env.get(node)
        if isinstance(labels, tuple) and node.target == flow.aliases.get(node.target, node.target):
            shape = [flow.spaces.size(l.space) if hasattr(l, "space") else 1 for l in labels]
            tensors[node.target] = {"shape": shape, "axes": [[] for _ in shape]}
    for g in groups:
        for m in g["members"]:
            if m["tensor"] in tensors:
                tensors[m["tensor"]]["axes"][m["axis"]].append(
                    {"group": g["id"], "start": m["start"], "stop": m["stop"]})
    for entry in tensors.values():
        for segments in entry["axes"]:
            segments.sort(key=lambda s: s["start"])
    return tensors


def eligible(spec: dict, allow_residual: bool = False) -> list[dict]:
    """The groups a permutation may act on (residual ones only when asked)."""
    ok = ("eligible", "residual") if allow_residual else ("eligible",)
    return [g for g in spec["groups"] if g["status"] in ok]


def format_groups(spec: dict, show_ineligible: bool = True) -> str:
    """A printable group spec: the groups, why some cannot move, and each tensor's axes."""
    from ..report import table

    groups = spec["groups"]
    counts = defaultdict(int)
    for g in groups:
        counts[g["status"]] += 1
    head = f"coupled groups: {len(groups)} (" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")"
    rows = [[f"g{g['id']}", g["key"], g["kind"], g["size"], g["unit"], g["units"], g["status"],
             _tie_text(g), _members_text(g["members"], spec["tensors"])]
            for g in groups if show_ineligible or g["status"] != "ineligible"]
    out = [head, "", table(["group", "key", "kind", "size", "unit", "units", "status", "tie", "members"], rows)]
    reasons = [f"  g{g['id']} {g['status']}: {g['reasons'][0]}" + (f" (+{len(g['reasons']) - 1} more)"
                                                                   if len(g["reasons"]) > 1 else "")
               for g in groups if g["reasons"] and (show_ineligible or g["status"] != "ineligible")]
    if reasons:
        out += ["", "why:"] + reasons
    out += ["", "tensors (axis: group[start:stop] / unit):"]
    by_id = {g["id"]: g for g in groups}
    for name, entry in spec["tensors"].items():
        axes = []
        for axis, segments in enumerate(entry["axes"]):
            text = " + ".join(f"g{s['group']}" + (f"[{s['start']}:{s['stop']}]" if s["stop"] - s["start"]
                                                  != entry["shape"][axis] else "") +
                              f"/{by_id[s['group']]['unit']}" for s in segments) or "-"
            axes.append(f"{axis}: {text}")
        out.append(f"  {name} {'x'.join(map(str, entry['shape']))}  " + "  ".join(axes))
    return "\n".join(out)


def _tie_text(g: dict) -> str:
    if not g["tie"]:
        return f"<- {', '.join(f'g{i}' for i in g['tied_by'])}" if g["tied_by"] else ""
    t = g["tie"]
    return f"{t['coarse']}-blocks move with g{t['group']}" + ("" if t["movable"] else " (fixed)")


def _members_text(members: list[dict], tensors: dict, most: int = 4) -> str:
    text = ", ".join(_member_text(m, tensors) for m in members[:most])
    return text + (f" (+{len(members) - most} more)" if len(members) > most else "")


def _member_text(m: dict, tensors: dict) -> str:
    whole = m["tensor"] in tensors and tensors[m["tensor"]]["shape"][m["axis"]] == m["stop"] - m["start"]
    span = "" if whole else f"[{m['start']}:{m['stop']}]"
    return f"{m['tensor']}:{m['axis']}{span}"
