"""Parallel branches on one input, summed, merged into one conv2d / linear (for reparameterize).

A sum is a tree of adds and subtractions (inner ones used only by the tree): `aten.add.Tensor`,
`aten.sub.Tensor` (its second operand's terms enter with a minus sign: FastViT's RepMixer computes
`mixer(x) - norm(x)`), a negation (one term, negated), and the in-place `aten.add_.Tensor` that
`out += branch(x)` becomes when nothing else reads `out` (rewritten as a plain add, nobody can
tell); a literal 0 operand (`out = 0; out += ...`) adds nothing. Each term is a signed branch on
some input x: an op (conv2d / linear) reading x, an eval BatchNorm on x (the per-channel affine
diag(s) x + t), or x itself (the identity). Terms on the same x merge:

    sum_i conv(x, W_i, b_i) + diag(s) x + t + x == conv(x, sum_i pad(W_i) + I_s + I, sum_i b_i + t)

(a term with a minus sign enters with its weight and bias negated), where pad() zero-pads each
kernel, centred, to the largest one and I_s / I are identity kernels. The outputs align only
when every conv has the same stride, dilation and groups and the same 2p - d(k - 1) per spatial
dim (so padding P = (2p - d(k-1) + d(K-1)) / 2 serves all); an identity needs stride 1, that
alignment 0, an odd merged kernel and in == out channels.
Linears merge the same way (sum of weights, + I for the identity, + diag(s) for a BN on a
rank-2 input). A branch whose output is used elsewhere, a BN in training mode, and branches
that do not align are left as they are, with the reason; so is a sum holding conv2d / linear /
batch_norm branches of which no two read one input, and an in-place add into a tensor read elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import operator

import torch
import torch.fx as fx

from surgeon.graph import call, module_path
from surgeon.rules import Match, Pattern, Rule, RuleSet, path_matches

from ._rep_graph import (Norm, Op, Shapes, common_path, emit, finish, norm_affine, read_norm, read_op,
                         rewritable, tensor)
from ._rep_math import centred, identity_kernel, identity_matrix, zero_bias
from ._rep_views import describe_node

ADD = torch.ops.aten.add.Tensor
ADD_ = torch.ops.aten.add_.Tensor           # `out += branch(x)` (MobileOne, RepVGG's identity) as export writes it
SUB = torch.ops.aten.sub.Tensor
NEG = torch.ops.aten.neg.default
_SUBS = (SUB, operator.sub, torch.sub)
_NEGS = (NEG, operator.neg, torch.neg)
_ADDS = (ADD, ADD_, operator.add, torch.add) + _SUBS   # the fx front end leaves Python / torch ops as they are


def _is_add(node) -> bool:
    """An add or subtraction of two operands with alpha 1 (in place or not), or a negation, whatever
    its operands are."""
    if not (rewritable(node) and node.op == "call_function"):
        return False
    if node.target in _NEGS:
        return len(node.args) == 1 and not node.kwargs
    return node.target in _ADDS and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1


def _zero(value) -> bool:
    """A literal 0: the start of `out = 0; out += branch(x)` or of `scale_out + identity_out` with one absent."""
    return not isinstance(value, fx.Node) and isinstance(value, (int, float)) and value == 0


def _signed_operands(node: fx.Node) -> list[tuple[fx.Node, int]]:
    """The add's (or subtraction's) operands with their signs (a literal 0 adds nothing)."""
    signs = (1, -1) if node.target in _SUBS else (-1,) if node.target in _NEGS else (1, 1)
    return [(a, sign) for a, sign in zip(node.args, signs) if not _zero(a)]


def _operands(node: fx.Node) -> list[fx.Node]:
    """The add's tensor operands (a literal 0 adds nothing)."""
    return [a for a, _ in _signed_operands(node)]


def _shared_inplace(node: fx.Node) -> list[fx.Node]:
    """For an in-place add, the other readers of the tensor it writes into (they would see the change)."""
    if node.target is not ADD_ or not isinstance(node.args[0], fx.Node):
        return []
    return [u for u in node.args[0].users if u is not node]


def _tree_add(node) -> bool:
    """An add that a sum tree can be made of: tensor operands or 0, and when in place, writing into a
    tensor nothing else reads (so rewriting it as a plain add changes nothing anyone sees)."""
    return (_is_add(node) and all(isinstance(a, fx.Node) or _zero(a) for a in node.args) and bool(_operands(node))
            and not _shared_inplace(node))


def signed_terms(root: fx.Node, sign: int = 1) -> list[tuple[fx.Node, int]]:
    """The terms of the sum tree rooted at `root` with their signs (inner adds and subtractions used
    only by the tree are expanded)."""
    terms: list[tuple[fx.Node, int]] = []
    for arg, s in _signed_operands(root):
        inner = _tree_add(arg) and len(arg.users) == 1
        terms += signed_terms(arg, sign * s) if inner else [(arg, sign * s)]
    return terms


def add_terms(root: fx.Node) -> list[fx.Node]:
    """The terms of the sum tree rooted at `root`, whatever their signs."""
    return [term for term, _ in signed_terms(root)]


def tree_adds(root: fx.Node) -> list[fx.Node]:
    """The add nodes of the tree rooted at `root`, root first."""
    adds = [root]
    for arg in _operands(root):
        if _tree_add(arg) and len(arg.users) == 1:
            adds += tree_adds(arg)
    return adds


def sum_root(node: fx.Node) -> fx.Node | None:
    """The root of the add tree `node` is a term of, or None if it is not a term of one."""
    root = None
    while len(node.users) == 1 and _tree_add(user := next(iter(node.users))):
        root = node = user
    return root


@dataclass(frozen=True)
class SumOfTerms(Pattern):
    """Match the root of an add tree; the capture `terms` lists its terms."""

    ops: tuple[str, ...] = ("add",)
    params: tuple[str, ...] = ()

    def match(self, node: fx.Node) -> Match | None:
        if not (_tree_add(node) or _blocked(node)) or (len(node.users) == 1 and _tree_add(next(iter(node.users)))):
            return None
        path = module_path(node)
        terms = add_terms(node) if _tree_add(node) else _operands(node)
        return Match(node, "add", path, {"terms": terms}) if path_matches(path, self.path) else None


def _blocked(node) -> bool:
    """An in-place add that would be a sum but writes into a tensor read elsewhere too."""
    return _is_add(node) and bool(_shared_inplace(node))


@dataclass
class Branch:
    """A term of a sum, seen as a branch on input `x`: an op, a BN (affine identity) or x itself."""

    node: fx.Node
    x: fx.Node
    op: Op | None = None
    norm: Norm | None = None
    sign: int = 1

    def describe(self, gm: fx.GraphModule) -> str:
        minus = "-" if self.sign < 0 else ""
        if self.op is not None:
            return minus + self.op.describe(gm)
        return minus + (f"batch_norm identity ({self.norm.path})" if self.norm else f"identity ({self.x.name})")


@dataclass
class Bucket:
    """Branches that merge into one op: ops with one alignment key, plus the identities they take."""

    key: tuple
    branches: list[Branch] = field(default_factory=list)     # the op branches
    identities: list[Branch] = field(default_factory=list)

    @property
    def ops(self) -> list[Op]:
        return [b.op for b in self.branches]


def branch_rules(gm: fx.GraphModule, shapes: Shapes, made_by: str, log: list[str], path: str = "*") -> RuleSet:
    """The parallel-branch rule of reparameterize."""
    return RuleSet((Rule("parallel", SumOfTerms(path=path),
                         lambda m: merge_sum(gm, shapes, m.node, made_by, log)),))


def merge_sum(gm: fx.GraphModule, shapes: Shapes, root: fx.Node, made_by: str, log: list[str]) -> bool | str | None:
    """Merge the mergeable branches of the sum at `root`: True, the reasons none merge, or None."""
    if _blocked(root):
        return _blocked_reason(gm, root)
    if not _tree_add(root):
        return None
    signed = signed_terms(root)
    adds = tree_adds(root)
    reasons: list[str] = []
    merged: dict[fx.Node, fx.Node] = {}     # first consumed term -> merged op (others map to None)
    for x, branches in _group(signed).items():
        if not any(b.op is not None for b in branches) or len(branches) < 2:
            continue
        for bucket in _buckets(gm, shapes, x, branches, reasons):
            if len(bucket.ops) + len(bucket.identities) >= 2:
                _merge_bucket(gm, root, bucket, merged, made_by, log)
    if not merged:
        return "; ".join(dict.fromkeys(reasons)) or _unmerged_reason(gm, signed)
    kept, seen = [], set()
    for term, sign in signed:
        if term not in merged:
            kept.append((term, sign))
        elif merged[term] is not None and term not in seen:
            kept.append((merged[term], 1))
        seen.add(term)
    _functional(adds)
    finish(gm, root, _sum(gm, root, kept, made_by))
    return True


def _functional(adds: list[fx.Node]) -> None:
    """Make the old tree's in-place adds plain adds, so that they die with the tree: fx keeps an unused
    in-place op as a side effect. Nothing else reads what they write into (`_tree_add`)."""
    for node in adds:
        if node.target is ADD_:
            node.target = ADD


def _candidate(term: fx.Node) -> bool:
    return read_op(term) is not None or read_norm(term) is not None


def _unmerged_reason(gm: fx.GraphModule, signed: list[tuple[fx.Node, int]]) -> str | None:
    """Why a sum holding conv2d / linear / batch_norm branches merged nothing (None if it holds none)."""
    if len(signed) < 2 or not any(_candidate(t) for t, _ in signed):
        return None
    parts = []
    for branch in (b for bs in _group(signed).values() for b in bs):
        if branch.op is not None or branch.norm is not None:
            parts.append(f"{branch.describe(gm)} on {branch.x.name}")
        else:
            parts.append(f"{describe_node(branch.node)}, not a conv2d / linear / batch_norm")
    return ("no branches merge (a conv2d / linear merges with the other branches on its own input): "
            + "; ".join(parts))


def _blocked_reason(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why an in-place add of branches is not rewritten (None when no operand is a branch op)."""
    if not any(isinstance(a, fx.Node) and _candidate(a) for a in node.args):
        return None
    others = ", ".join(sorted(u.name for u in _shared_inplace(node)))
    return (f"in-place add into {node.args[0].name}, which {others} also read(s): merging its branches would "
            "change what they see; left as is")


def _group(signed: list[tuple[fx.Node, int]]) -> dict[fx.Node, list[Branch]]:
    """Signed terms by the input they read (a term that is another term's input is that input's identity)."""
    reads = {}
    for term, _ in signed:
        op, norm = read_op(term), read_norm(term)
        reads[term] = (op.x, op, None) if op else (norm.x, None, norm) if norm else None
    inputs = {r[0] for r in reads.values() if r is not None}
    groups: dict[fx.Node, list[Branch]] = {}
    for term, sign in signed:
        if term in inputs or reads[term] is None:
            branch = Branch(term, term, sign=sign)
        else:
            x, op, norm = reads[term]
            branch = Branch(term, x, op=op, norm=norm, sign=sign)
        groups.setdefault(branch.x, []).append(branch)
    return groups


def _buckets(gm: fx.GraphModule, shapes: Shapes, x: fx.Node, branches: list[Branch], reasons: list[str]) -> list[Bucket]:
    """Sort the branches on x into mergeable buckets; note why any branch stays out."""
    buckets: dict[tuple, Bucket] = {}
    identities = []
    for branch in branches:
        where = branch.describe(gm)
        if branch.node is not x and len(branch.node.users) > 1:
            others = ", ".join(sorted(u.name for u in branch.node.users))
            reasons.append(f"branch {where} is used elsewhere too ({others}); merging would change it")
        elif branch.norm is not None and branch.norm.training:
            reasons.append(f"branch {where} is a batch_norm in training mode (batch statistics): not mergeable")
        elif branch.op is not None:
            key = _key(gm, branch.op)
            buckets.setdefault(key, Bucket(key)).branches.append(branch)
        else:
            identities.append(branch)
    ordered = list(buckets.values())
    if len(ordered) > 1:
        reasons.append(f"branches on {x.name} do not align: {_mismatch(gm, ordered[0], ordered[1])}")
    for branch in identities:
        home = next((b for b in ordered if _takes_identity(gm, shapes, b, branch)), None)
        if home is None:
            reasons.append(f"{branch.describe(gm)} fits no branch on {x.name} (needs stride 1, in == out "
                           "channels, a centred odd kernel or a square linear)")
        else:
            home.identities.append(branch)
    return ordered


_KEY_FIELDS = ("op", "stride", "dilation", "groups", "out channels", "in channels per group",
               "padding alignment 2p-d(k-1)", "kernel parity")


def _key(gm: fx.GraphModule, op: Op) -> tuple:
    weight = tensor(gm, op.weight)
    if op.kind == "linear":
        return ("linear", None, None, None, weight.shape[0], weight.shape[1], None, None)
    kernel = tuple(weight.shape[2:])
    align = tuple(2 * p - d * (k - 1) for p, d, k in zip(op.padding, op.dilation, kernel))
    return ("conv2d", op.stride, op.dilation, op.groups, weight.shape[0], weight.shape[1], align,
            tuple(k % 2 for k in kernel))


def _mismatch(gm: fx.GraphModule, a: Bucket, b: Bucket) -> str:
    diffs = [f"{name} {u} vs {v}" for name, u, v in zip(_KEY_FIELDS, a.key, b.key) if u != v]
    return f"mismatched {', '.join(diffs)} ({a.ops[0].describe(gm)} vs {b.ops[0].describe(gm)})"


def _takes_identity(gm: fx.GraphModule, shapes: Shapes, bucket: Bucket, branch: Branch) -> bool:
    kind, stride, _, groups, out_ch, in_per_group, align, parity = bucket.key
    if kind == "linear":
        square, rank = out_ch == in_per_group, 2
    else:
        square, rank = out_ch == in_per_group * groups and stride == (1, 1) and align == (0, 0) \
            and parity == (1, 1), 4
    if branch.norm is None:
        return square
    return square and tensor(gm, branch.norm.refs[2]).numel() == out_ch and shapes.rank(branch.x) == rank


def _merge_bucket(gm: fx.GraphModule, root: fx.Node, bucket: Bucket, merged: dict, made_by: str,
                  log: list[str]) -> None:
    """Emit the bucket's merged op before `root`; map its terms to it in `merged`."""
    first = bucket.ops[0]
    weights = [tensor(gm, op.weight) for op in bucket.ops]
    has_bias = any(op.bias is not None for op in bucket.ops) or any(b.norm for b in bucket.identities)
    bias = sum(b.sign * zero_bias(w, tensor(gm, b.op.bias)) for w, b in zip(weights, bucket.branches))
    affines = [norm_affine(gm, b.norm) if b.norm else None for b in bucket.identities]
    bias = bias + sum(b.sign * a.shift for a, b in zip(affines, bucket.identities) if a is not None)
    channels = weights[0].shape[0]
    diagonals = [(a.scale if a is not None else torch.ones(channels, dtype=torch.float64)) * b.sign
                 for a, b in zip(affines, bucket.identities)]
    if first.kind == "linear":
        weight = sum(b.sign * w.double() for w, b in zip(weights, bucket.branches)) + sum(
            identity_matrix(channels, d) for d in diagonals)
        padding = None
    else:
        kernel = tuple(max(w.shape[d] for w in weights) for d in (2, 3))
        weight = sum(b.sign * centred(w, kernel) for w, b in zip(weights, bucket.branches)) + sum(
            identity_kernel(channels, first.groups, kernel, d) for d in diagonals)
        align = bucket.key[6]
        padding = tuple((a + d * (k - 1)) // 2 for a, d, k in zip(align, first.dilation, kernel))
    terms = [op.node for op in bucket.ops] + [b.node for b in bucket.identities]
    path = common_path([op.node for op in bucket.ops] + [b.node for b in bucket.identities if b.norm])
    new = emit(gm, root, first.kind, first.x, weight, bias if has_bias else None, first, made_by=made_by,
               path=path, padding=padding)
    if "val" in first.node.meta:
        new.meta["val"] = first.node.meta["val"]
    merged.update({t: None for t in terms})
    merged[terms[0]] = new
    parts = [b.describe(gm) for b in bucket.branches + bucket.identities]
    shape = "x".join(map(str, weight.shape[2:]))
    log.append(f"parallel: {' + '.join(parts)} -> {first.kind}{' ' + shape if shape else ''} ({path or '<root>'})")


def _sum(gm: fx.GraphModule, root: fx.Node, terms: list[tuple[fx.Node, int]], made_by: str) -> fx.Node:
    """Rebuild a signed sum of `terms` before `root` (the first term alone when there is one). A merged op
    carries its signs in its weights, so a positive term leads."""
    terms = sorted(terms, key=lambda t: t[1] < 0)
    assert terms[0][1] > 0, "a merged op leads the sum"
    path = module_path(root)
    with gm.graph.inserting_before(root):
        total = terms[0][0]
        for term, sign in terms[1:]:
            total = call(gm.graph, ADD if sign > 0 else SUB, (total, term), made_by=made_by, path=path)
    return total
