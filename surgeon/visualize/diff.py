"""What happened to each node of one compile: a before/after diff of two node tables.

Input is the node table `surgeon.compiled.node_table` writes (nodes.json): one record per FX node
with name, op, target, path (module path), pass (the pass that created it), adapter, shape,
dtype and inputs. Nodes are matched by name: passes edit the captured graph in place and FX
never hands out a name twice, so a name means the same node before and after.

Guarantees: every node of either table gets exactly one status from STATUS; `GraphDiff.nodes`
holds the union of both tables in an order where each node follows the nodes it reads (the
after graph's order, with removed nodes placed after their last surviving predecessor); input
names that are not in a table (a filtered table) are ignored, never an error.
"""
from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass, field

from ..report import table

# status -> (colour, what it means); the order is the legend's order
STATUS: dict[str, tuple[str, str]] = {
    "unchanged": ("#dfe3e8", "as captured"),
    "inserted": ("#39a85a", "created by an adapter pass (insert, unmerge, combine)"),
    "merged": ("#e0912b", "weight rewritten by a merge: an adapter was folded into it"),
    "folded": ("#8e63ce", "created by a folding pass (e.g. fold-bn)"),
    "permuted": ("#2b9cc4", "created by a permuting pass"),
    "fused": ("#d4479a", "a call of a generated kernel (fuse / lower)"),
    "added": ("#55b3ae", "created by another pass"),
    "rewired": ("#a9b53a", "same op, reads different inputs"),
    "changed": ("#c9a227", "same name, different target, shape, dtype, path or pass"),
    "merged-away": ("#e8613c", "removed: an adapter's op, now inside the base weight"),
    "folded-away": ("#b79be6", "removed: folded into a neighbouring op"),
    "fused-away": ("#ec9ccb", "removed: now inside a generated kernel"),
    "permuted-away": ("#8fd0e6", "removed: replaced by a permuted op"),
    "removed": ("#c0392b", "removed by a pass"),
}

# how a creating pass reads in the view: the first glob matching the pass name wins
PASS_KINDS: tuple[tuple[str, str], ...] = (
    ("capture", "unchanged"), ("insert", "inserted"), ("unmerge", "inserted"), ("combine", "inserted"),
    ("merge", "merged"), ("fold*", "folded"), ("*permute*", "permuted"), ("fuse*", "fused"),
    ("lower*", "fused"), ("*", "added"),
)
_COMPARED = ("op", "target", "path", "pass", "adapter", "shape", "dtype", "digest")
_SITE_OPS = ("aten.linear.default", "aten.addmm.default")


def pass_kind(record: dict) -> str:
    """The status a node has from its own record alone (its creating pass, adapter and target)."""
    if record.get("target", "").startswith("surgeon."):
        return "fused"        # a registered kernel op: torch.ops.surgeon.*
    if record.get("adapter") and record.get("pass", "capture") != "capture":
        return "inserted"
    name = record.get("pass") or "capture"
    return next(kind for glob, kind in PASS_KINDS if fnmatch.fnmatchcase(name, glob))


@dataclass
class GraphDiff:
    """Added / removed / changed nodes by name, a status for every node, counts by module path."""

    nodes: list[dict]                      # union, each record + status, in_before, in_after
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: dict[str, list[str]] = field(default_factory=dict)   # name -> fields that differ
    before_inputs: dict[str, list[str]] = field(default_factory=dict)  # where inputs differ

    @property
    def status(self) -> dict[str, str]:
        return {n["name"]: n["status"] for n in self.nodes}

    def by_path(self, depth: int | None = None) -> dict[str, Counter]:
        """Module path (cut to `depth` components) -> Counter of the statuses other than unchanged."""
        out: dict[str, Counter] = {}
        for node in self.nodes:
            if node["status"] != "unchanged":
                path = ".".join(node["path"].split(".")[:depth]) if depth else node["path"]
                out.setdefault(path or "<root>", Counter())[node["status"]] += 1
        return dict(sorted(out.items(), key=lambda item: _natural(item[0])))

    def to_dict(self) -> dict:
        return {"added": self.added, "removed": self.removed, "changed": self.changed,
                "by_path": {p: dict(c) for p, c in self.by_path().items()}}

    def summary(self, depth: int | None = None, list_nodes: bool = False) -> str:
        """A text summary: totals, one row per module path, and optionally every changed node."""
        after = sum(1 for n in self.nodes if n["in_after"])
        before = sum(1 for n in self.nodes if n["in_before"])
        lines = [f"{before} -> {after} nodes: {len(self.added)} added, {len(self.removed)} removed, "
                 f"{len(self.changed)} changed"]
        paths = self.by_path(depth)
        if not paths:
            return "\n".join(lines + ["no differences"])
        kinds = [s for s in STATUS if any(s in c for c in paths.values())]
        rows = [[p] + [c.get(k, "") for k in kinds] for p, c in paths.items()]
        lines += ["", table(["module"] + kinds, rows)]
        if list_nodes:
            rows = [[n["status"], n["name"], n["path"] or "<root>", ", ".join(self.changed.get(n["name"], []))]
                    for n in self.nodes if n["status"] != "unchanged"]
            lines += ["", table(["status", "node", "module", "fields"], rows)]
        return "\n".join(lines)


def _natural(path: str) -> list:
    """Sort key that puts layers.2 before layers.10."""
    return [(0, int(a), "") if a.isdigit() else (1, 0, a) for a in path.split(".")]


def merged_sites(report: dict | None, before_report: dict | None = None) -> set[str]:
    """Module paths whose base weight a merge rewrote: merged adapters' modules (not merged before)."""
    def sites(rep):
        return {m for a in (rep or {}).get("adapters", []) if a.get("status") == "merged" for m in a["modules"]}
    return sites(report) - sites(before_report)


def diff(before_nodes: list[dict] | None, after_nodes: list[dict], report: dict | None = None,
         before_report: dict | None = None) -> GraphDiff:
    """Diff two node tables by name; `report` (report.json) tells which weights a merge rewrote."""
    if before_nodes is None:   # no snapshot: every node reads as what its creating pass made it
        return GraphDiff([{**n, "status": pass_kind(n), "in_before": True, "in_after": True} for n in after_nodes])
    before = {n["name"]: n for n in before_nodes}
    after = {n["name"]: n for n in after_nodes}
    result = GraphDiff(_union(before_nodes, after_nodes))
    rewritten = merged_sites(report, before_report)
    for node in result.nodes:
        name = node["name"]
        node["in_before"], node["in_after"] = name in before, name in after
        if name not in before:
            result.added.append(name)
            node["status"] = pass_kind(node)
            node["status"] = "added" if node["status"] == "unchanged" else node["status"]
            continue
        if name not in after:
            result.removed.append(name)
            continue
        node["status"] = _compare(before[name], after[name], rewritten, result)
    _name_removed(result, before, after, report)
    return result


def _compare(old: dict, new: dict, rewritten: set[str], result: GraphDiff) -> str:
    name = new["name"]
    fields = [k for k in _COMPARED if old.get(k) != new.get(k)]
    old_in = list(old.get("inputs", []))
    if old_in != new.get("inputs", []):
        result.before_inputs[name] = old_in
    is_weight = new["op"] == "get_attr" and new["target"].rpartition(".")[2].startswith("weight")
    if new["path"] in rewritten and (new["target"] in _SITE_OPS or is_weight):
        result.changed[name] = fields + ["weight"]
        return "merged"
    if fields:
        result.changed[name] = fields
        kind = pass_kind(new)
        return kind if "pass" in fields and kind not in ("unchanged", "added") else "changed"
    if name in result.before_inputs:
        result.changed[name] = ["inputs"]
        return "rewired"
    return "unchanged"


def _name_removed(result: GraphDiff, before: dict, after: dict, report: dict | None) -> None:
    """A removed node takes the kind of what replaced it: the new inputs of its surviving users."""
    merged = {a["name"] for a in (report or {}).get("adapters", []) if a.get("status") == "merged"}
    status = {n["name"]: n.get("status") for n in result.nodes}
    users: dict[str, list[str]] = {}
    for node in before.values():
        for i in node.get("inputs", []):
            users.setdefault(i, []).append(node["name"])
    for name in reversed(list(before)):          # users first, so chains inherit
        if name in after:
            continue
        record = before[name]
        kind = "merged-away" if record.get("adapter") in merged else None
        for user in users.get(name, []):
            if kind:
                break
            if user not in after:
                kind = status[user] if status[user] != "removed" else None
                continue
            new_inputs = [i for i in after[user].get("inputs", []) if i not in before and i in after]
            kinds = [status[i] for i in new_inputs if status[i] in ("folded", "fused", "permuted", "merged")]
            kind = f"{kinds[0]}-away" if kinds else None
        status[name] = kind or "removed"
    for node in result.nodes:
        if not node["in_after"]:
            node["status"] = status[node["name"]]


def _union(before_nodes: list[dict], after_nodes: list[dict]) -> list[dict]:
    """Both tables' nodes once each: the after order, removed nodes after their last kept predecessor."""
    kept = {n["name"] for n in after_nodes}
    following: dict[str, list[dict]] = {}
    anchor = ""
    for node in before_nodes:
        if node["name"] in kept:
            anchor = node["name"]
        else:
            following.setdefault(anchor, []).append(dict(node))
    out = following.get("", [])
    for node in after_nodes:
        out.append(dict(node))
        out += following.get(node["name"], [])
    return out
