"""fold-bn: fold eval-mode BatchNorms into the conv2d / linear next to them, exactly.

An eval BatchNorm is a per-channel affine map s x + t along dim 1 (see _rep_math.Affine):
- op -> BN: s (W x + b) + t == (s W) x + (s b + t)   (conv2d incl. grouped / depthwise,
  linear with a rank-2 output so dim 1 is its feature dim);
- BN -> op: W (s x + t) + b == (W diag(s)) x + (W t + b)   (conv2d without zero padding, or
  with padding when t == 0; linear on a rank-2 input).
A producer op is preferred. The BN need not touch the op (see _rep_views.py): reshapes may
sit between an op and its BN when they keep the op's features as the BN's channels, row for
row (LeViT's bn(y.flatten(0, 1)).reshape_as(y), bn(conv(x).flatten(2)).view_as(...)), and
reshapes and eval dropouts between a BN and its op (a BN1d -> dropout -> linear head); those
stay in the graph, now reading the folded op or the BN's input (across a dropout the fold is
exact in eval, which the check runs; in train mode the dropout then drops x, not s x + t). A reader of the op's output for
its shape only (reshape_as) is not a user of its values. Refused, with the reason in the report:
a BN in training mode (batch statistics), a producer whose output has other users, a BN whose
output has other users, zero padding after a BN with a shift (the border would need t, not 0),
mismatched channels or ranks, a reshape that moves values across channels, and a BN with no
conv2d / linear next to it. A BN that is a term of a sum is left to reparameterize's parallel
rule (it merges it as an identity branch, or says why not).
New weights are new tensors under the op's module path; the old ones are dropped from the
compiled module once nothing refers to them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from surgeon.pipeline import Context, PassResult
from surgeon.rules import Pattern, Rule, RuleSet

from ._rep_branches import sum_root
from ._rep_graph import (Norm, Op, Shapes, emit, finish, fixed_point, install, norm_affine, read_norm, read_op,
                         tensor)
from ._rep_math import affine_after, affine_before
from ._rep_views import (channel_kept, chain_after, chain_before, describe_node, is_eval_dropout, is_reshape,
                         op_name, value_users)


@dataclass(frozen=True)
class FoldBn:
    path: str = "*"        # module-path glob of the BatchNorms to fold
    name: ClassVar[str] = "fold-bn"
    check: ClassVar[str] = "close"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        log: list[str] = []
        rules = bn_rules(gm, Shapes(gm, ctx), self.name, log, self.path)
        rejections = fixed_point(gm, rules, self.name)
        return PassResult(matches=len(log), rejections=rejections, notes=[n.removeprefix("fold-bn: ") for n in log])


def bn_rules(gm: fx.GraphModule, shapes: Shapes, made_by: str, log: list[str], path: str = "*") -> RuleSet:
    """The fold-bn rule: each batch_norm folded into its producer or its consumer op."""
    return RuleSet((Rule("fold-bn", Pattern(("batch_norm",), path, params=()),
                         lambda m: fold_norm(gm, shapes, m.node, made_by, log)),))


def fold_norm(gm: fx.GraphModule, shapes: Shapes, node: fx.Node, made_by: str, log: list[str]) -> bool | str | None:
    """Fold the BN at `node` into an adjacent op: True, a reason it cannot, or None (a sum's branch,
    left to reparameterize's parallel rule, which reports it if it stays)."""
    norm = read_norm(node)
    if norm is None:
        return None
    before = chain_before(norm.node, is_reshape)            # op -> reshapes -> BN (LeViT, EfficientViT)
    source = before[0].args[0] if before else norm.x
    producer = read_op(source)
    after = chain_after(norm.node, lambda n: is_reshape(n) or is_eval_dropout(n))   # BN -> ... -> op
    end = after[-1] if after else norm.node
    consumers = [op for user in end.users if (op := read_op(user)) is not None and op.x is end]
    if producer is None and not consumers:
        return None if sum_root(norm.node) is not None else _lonely(norm, source, end)
    if norm.training:
        return "batch_norm is in training mode (batch statistics, e.g. track_running_stats=False): " \
               "not a fixed affine map"
    reasons = []
    if producer is not None:
        outcome = _into_producer(gm, shapes, norm, producer, before, made_by, log)
        if outcome is True:
            return True
        reasons.append(outcome)
    if consumers:
        outcome = _into_consumer(gm, shapes, norm, consumers, after, made_by, log)
        if outcome is True:
            return True
        reasons.append(outcome)
    return "; ".join(reasons)


def _lonely(norm: Norm, source: fx.Node, end: fx.Node) -> str:
    """Why a BN with no conv2d / linear next to it stays: what it reads and what reads it."""
    readers = ", ".join(describe_node(u) for u in end.users) or "nothing"
    return (f"no conv2d / linear next to it (through reshapes and eval dropouts): it reads "
            f"{describe_node(source)}, its output goes to {readers}")


def _channels(gm: fx.GraphModule, norm: Norm) -> int:
    return tensor(gm, norm.refs[2]).numel()


def _rank_reason(gm: fx.GraphModule, shapes: Shapes, node: fx.Node, op: Op, where: str) -> str | None:
    want = 2 if op.kind == "linear" else 4
    rank = shapes.rank(node)
    if rank == want:
        return None
    if op.kind == "linear":
        return f"the BN normalizes dim 1 but {op.describe(gm)} acts on the last dim ({where} has rank {rank})"
    return f"{where} of {op.describe(gm)} has rank {rank}, not 4"


def _feature_dim(op: Op, shape: tuple) -> int:
    """The dim of `shape` (the op's output or input) that holds the op's channels / features."""
    return len(shape) - 1 if op.kind == "linear" else 1


def _reshape_reason(gm, shapes: Shapes, op: Op, op_side: fx.Node, norm: Norm, where: str) -> str | None:
    """None when the reshapes between `op_side` (the op's output or input) and the BN keep the op's
    feature dim as the BN's dim 1, row for row; else why not."""
    op_shape, norm_shape = shapes.shape(op_side), shapes.shape(norm.x)
    if op_shape is not None and channel_kept(op_shape, _feature_dim(op, op_shape), norm_shape):
        return None
    return (f"the reshape between {op.describe(gm)} and the BN does not keep the op's features as the BN's "
            f"channels ({where} {_sizes(op_shape)}, BN input {_sizes(norm_shape)})")


def _sizes(shape) -> str:
    return "unknown" if shape is None else "(" + ", ".join(str(s) for s in shape) + ")"


# op -> BN: s (W x + b) + t == (s W) x + (s b + t); reshapes between move no value across channels
def _into_producer(gm, shapes, norm: Norm, op: Op, before: list[fx.Node], made_by: str,
                   log: list[str]) -> bool | str:
    links = before + [norm.node]
    for node, nxt in zip([op.node] + before, links):
        others = [u for u in value_users(node) if u is not nxt]
        if others:
            names = ", ".join(sorted(u.name for u in others))
            what = f"{op.node.name} ({op.describe(gm)})" if node is op.node else f"{node.name} (a reshape of it)"
            return f"the BN's input {what} has other users ({names})"
    reason = _reshape_reason(gm, shapes, op, op.node, norm, "op output") if before else \
        _rank_reason(gm, shapes, op.node, op, "the output")
    if reason:
        return reason
    weight = tensor(gm, op.weight)
    if weight.shape[0] != _channels(gm, norm):
        return f"BN has {_channels(gm, norm)} channels, {op.describe(gm)} has {weight.shape[0]} outputs"
    new_weight, new_bias = affine_after(weight, tensor(gm, op.bias), norm_affine(gm, norm))
    log.append(f"fold-bn: {op.describe(gm)} <- batch_norm ({norm.path}){_through(before)}")
    new = emit(gm, op.node, op.kind, op.x, new_weight, new_bias, op, made_by=made_by, path=op.path)
    finish(gm, op.node, new)                      # the BN, reshapes and shape-only readers read the folded op
    finish(gm, norm.node, norm.node.args[0])      # the BN is now the identity
    return True


def _through(chain: list[fx.Node]) -> str:
    """' through flatten, reshape_as' for a note, or '' when nothing was between."""
    return f" through {', '.join(op_name(n) for n in chain)}" if chain else ""


# BN -> op: W (s x + t) + b == (W diag(s)) x + (W t + b), exact only where no zero padding meets t;
# reshapes and eval dropouts between are kept, reading the BN's input instead
def _into_consumer(gm, shapes, norm: Norm, consumers: list[Op], after: list[fx.Node], made_by: str,
                   log: list[str]) -> bool | str:
    end = after[-1] if after else norm.node
    if len(value_users(end)) > 1:
        return f"the BN's output has {len(value_users(end))} users; folding into one would leave the others"
    op = consumers[0]
    if any(is_reshape(n) for n in after):
        reason = _reshape_reason(gm, shapes, op, end, norm, "op input")
    else:
        reason = _rank_reason(gm, shapes, norm.x, op, "the input")
    if reason:
        return reason
    weight = tensor(gm, op.weight)
    in_channels = weight.shape[1] * op.groups
    if in_channels != _channels(gm, norm):
        return f"BN has {_channels(gm, norm)} channels, {op.describe(gm)} reads {in_channels}"
    affine = norm_affine(gm, norm)
    if any(op.padding) and bool(torch.any(affine.shift != 0)):
        return (f"zero padding after a BatchNorm does not fold exactly into {op.describe(gm)}: "
                "the padded border would need the BN's shift, not 0")
    new_weight, new_bias = affine_before(weight, tensor(gm, op.bias), affine, op.groups)
    log.append(f"fold-bn: batch_norm ({norm.path}) -> {op.describe(gm)}{_through(after)}")
    x = end if after else norm.x
    if after:
        norm.node.replace_all_uses_with(norm.x)    # the chain now reads the BN's input
    install(gm, op.node, op.kind, x, new_weight, new_bias, op, made_by=made_by, path=op.path)
    return True
