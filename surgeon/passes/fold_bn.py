"""fold-bn: fold eval-mode BatchNorms into the conv2d / linear next to them, exactly.

An eval BatchNorm is a per-channel affine map s x + t along dim 1 (see _rep_math.Affine):
- op -> BN: s (W x + b) + t == (s W) x + (s b + t)   (conv2d incl. grouped / depthwise,
  linear with a rank-2 output so dim 1 is its feature dim);
- BN -> op: W (s x + t) + b == (W diag(s)) x + (W t + b)   (conv2d without zero padding, or
  with padding when t == 0; linear on a rank-2 input).
A producer op is preferred. Refused, with the reason in the report: a BN in training mode
(batch statistics), a producer whose output has other users, a BN whose output has other
users, zero padding after a BN with a shift (the border would need t, not 0), mismatched
channels or ranks. A BN with no conv2d / linear next to it is left alone silently.
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

from ._rep_graph import Norm, Op, Shapes, fixed_point, install, norm_affine, read_norm, read_op, tensor
from ._rep_math import affine_after, affine_before


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
    """Fold the BN at `node` into an adjacent op: True, a reason it cannot, or None (no op adjacent)."""
    norm = read_norm(node)
    if norm is None:
        return None
    producer = read_op(norm.x)
    consumers = [op for user in node.users if (op := read_op(user)) is not None and op.x is node]
    if producer is None and not consumers:
        return None
    if norm.training:
        return "batch_norm is in training mode (batch statistics, e.g. track_running_stats=False): " \
               "not a fixed affine map"
    reasons = []
    if producer is not None:
        outcome = _into_producer(gm, shapes, norm, producer, made_by, log)
        if outcome is True:
            return True
        reasons.append(outcome)
    if consumers:
        outcome = _into_consumer(gm, shapes, norm, consumers, made_by, log)
        if outcome is True:
            return True
        reasons.append(outcome)
    return "; ".join(reasons)


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


# op -> BN: s (W x + b) + t == (s W) x + (s b + t)
def _into_producer(gm, shapes, norm: Norm, op: Op, made_by: str, log: list[str]) -> bool | str:
    if len(op.node.users) > 1:
        others = sorted(u.name for u in op.node.users if u is not norm.node)
        return f"the BN's input {op.node.name} ({op.describe(gm)}) has other users ({', '.join(others)})"
    reason = _rank_reason(gm, shapes, op.node, op, "the output")
    if reason:
        return reason
    weight = tensor(gm, op.weight)
    if weight.shape[0] != _channels(gm, norm):
        return f"BN has {_channels(gm, norm)} channels, {op.describe(gm)} has {weight.shape[0]} outputs"
    new_weight, new_bias = affine_after(weight, tensor(gm, op.bias), norm_affine(gm, norm))
    log.append(f"fold-bn: {op.describe(gm)} <- batch_norm ({norm.path})")
    install(gm, norm.node, op.kind, op.x, new_weight, new_bias, op, made_by=made_by, path=op.path)
    return True


# BN -> op: W (s x + t) + b == (W diag(s)) x + (W t + b), exact only where no zero padding meets t
def _into_consumer(gm, shapes, norm: Norm, consumers: list[Op], made_by: str, log: list[str]) -> bool | str:
    if len(norm.node.users) > 1:
        return f"the BN's output has {len(norm.node.users)} users; folding into one would leave the others"
    op = consumers[0]
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
    log.append(f"fold-bn: batch_norm ({norm.path}) -> {op.describe(gm)}")
    install(gm, op.node, op.kind, norm.x, new_weight, new_bias, op, made_by=made_by, path=op.path)
    return True
