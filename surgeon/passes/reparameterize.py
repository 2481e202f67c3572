"""reparameterize: collapse multi-branch / factorized training-time structure into single ops.

Generic rewrites over the canonical graph, applied until nothing more folds (so a block of
branches of branches collapses fully); no code knows a model class:
- fold-bn (see fold_bn.py): an eval BatchNorm into the conv2d / linear next to it, through
  row-preserving reshapes and eval dropouts;
- parallel (see _rep_branches.py): conv2d / linear branches on one input, summed (plain or
  in-place adds, `out += branch(x)`), with identities (bare or a BatchNorm) -> one op with
  zero-padded, centred, summed kernels (RepVGG, ACNet, MobileOne, multi-scale kernels,
  parallel linears, linear + identity);
- serial (here): two ops with nothing between, one of them 1x1 (or two linears) -> one op:
      conv_kxk(conv_1x1(x)) == conv_kxk'(x),  conv_1x1(conv_kxk(x)) == conv_kxk'(x),
      W2 (W1 x + b1) + b2 == (W2 W1) x + (W2 b1 + b2).
  A composition that would hold more parameters than the pair is only made when the result
  feeds a sum with a branch on the same input that absorbs it (a bottleneck without
  activation folded into its host); a standalone factorized pair is kept;
- constant (see _rep_constants.py), before the rules above: a computation that reads only
  parameters and buffers (attention biases gathered by a fixed index table, as in LeViT and
  TinyViT; a standardized conv weight, as in BiT) is done once and stored as one frozen tensor,
  so that the rules then see a plain conv2d / linear where the weight was computed.
Everything is exact up to float rounding (check "close"). What stays unfolded is listed in the
rejections with why: a nonlinearity between serial ops, a BatchNorm in training mode,
mismatched stride / groups / dilation / padding between branches, a branch or intermediate
output used elsewhere, zero padding that would see a bias, a sum of conv2d / linear / batch_norm
branches of which none share an input, an in-place add into a tensor read elsewhere, a BatchNorm
with no op next to it. A model with branches never reports nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F

from surgeon.graph import module_path
from surgeon.pipeline import Context, PassResult
from surgeon.rules import Pattern, Rule, RuleSet, path_matches

from ._rep_branches import add_terms, branch_rules, sum_root
from ._rep_constants import precompute
from ._rep_graph import Op, Shapes, common_path, fixed_point, install, read_op, tensor
from ._rep_math import compose_convs, compose_linears
from .fold_bn import bn_rules

aten = torch.ops.aten

# elementwise ops that make two ops around them non-composable (what a report names)
NONLINEAR = {aten.relu.default, aten.gelu.default, aten.silu.default, aten.sigmoid.default, aten.tanh.default,
             aten.hardswish.default, aten.hardsigmoid.default, aten.hardtanh.default, aten.leaky_relu.default,
             aten.elu.default, aten.mish.default, aten.softplus.default, aten.clamp.default,
             aten.clamp_min.default, aten.prelu.default, aten.relu6.default,
             torch.relu, torch.sigmoid, torch.tanh, F.relu, F.gelu, F.silu, F.hardswish, F.leaky_relu, F.elu,
             F.mish, F.softplus, F.relu6, F.hardtanh}   # the last row: as the fx front end leaves them


@dataclass(frozen=True)
class Reparameterize:
    path: str = "*"        # module-path glob of the ops / sums to consider
    name: ClassVar[str] = "reparameterize"
    check: ClassVar[str] = "close"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        log: list[str] = []
        shapes = Shapes(gm, ctx)
        rules = (bn_rules(gm, shapes, self.name, log, self.path)
                 + branch_rules(gm, shapes, self.name, log, self.path)
                 + serial_rules(gm, self.name, log, self.path))
        precomputed: list[tuple[str, str]] = []
        precompute(gm, self.name, log, precomputed, lambda node: path_matches(module_path(node), self.path))
        rejections = precomputed + fixed_point(gm, rules, self.name)
        return PassResult(matches=len(log), rejections=rejections, notes=log)


def serial_rules(gm: fx.GraphModule, made_by: str, log: list[str], path: str = "*") -> RuleSet:
    """The serial rule: an op composed with the op producing its input."""
    return RuleSet((Rule("serial", Pattern(("conv2d", "linear"), path),
                         lambda m: compose(gm, m.node, made_by, log)),))


def compose(gm: fx.GraphModule, node: fx.Node, made_by: str, log: list[str]) -> bool | str | None:
    """Compose the op at `node` with its producer op: True, the reason it cannot, or None."""
    second = read_op(node)
    if second is None:
        return None
    first = read_op(second.x)
    if first is None:
        return _nonlinearity_between(gm, second)
    if not _composable(gm, first, second):
        return None
    if len(first.node.users) > 1:
        others = ", ".join(sorted(u.name for u in first.node.users if u is not node))
        return f"the output of {first.describe(gm)} is also used by {others}; composing would change it"
    one_by_one_first = first.kind == "conv2d" and _is_plain_1x1(gm, first)
    if one_by_one_first and any(second.padding) and first.bias is not None \
            and bool(torch.any(tensor(gm, first.bias) != 0)):
        return (f"zero padding of {second.describe(gm)} would see the bias of {first.describe(gm)} as 0: "
                "not exact")
    groups = first.groups if first.groups == second.groups else 1
    grown = _parameters_after(gm, first, second, groups) > _parameters(gm, first) + _parameters(gm, second)
    if grown and not _has_host(second, first.x):
        return (f"composing {first.describe(gm)} -> {second.describe(gm)} would hold more parameters than "
                "the pair and no parallel branch absorbs it; kept factorized")
    _fold(gm, first, second, groups, one_by_one_first, made_by, log)
    return True


def _fold(gm: fx.GraphModule, first: Op, second: Op, groups: int, one_by_one_first: bool, made_by: str,
          log: list[str]) -> None:
    w1, b1, w2, b2 = (tensor(gm, r) for r in (first.weight, first.bias, second.weight, second.bias))
    if first.kind == "linear":
        weight, bias = compose_linears((w1, b1), (w2, b2))
        like = second
    else:
        weight, bias = compose_convs((w1, b1, first.groups), (w2, b2, second.groups), groups)
        like = second if one_by_one_first else first
    path = common_path([first.node, second.node])
    described = f"{first.describe(gm)} -> {second.describe(gm)}"
    no_bias = first.bias is None and second.bias is None
    new = install(gm, second.node, first.kind, first.x, weight, None if no_bias else bias, like,
                  made_by=made_by, path=path, padding=like.padding, groups=groups)
    log.append(f"serial: {described} => {read_op(new).describe(gm)}")


def _is_plain_1x1(gm: fx.GraphModule, op: Op) -> bool:
    """A 1x1 conv with stride 1 and no padding: a per-pixel matrix."""
    return tuple(tensor(gm, op.weight).shape[2:]) == (1, 1) and op.stride == (1, 1) and op.padding == (0, 0)


def _composable(gm: fx.GraphModule, first: Op, second: Op) -> bool:
    if first.kind != second.kind:
        return False
    if first.kind == "linear":
        return True
    return _is_plain_1x1(gm, first) or _is_plain_1x1(gm, second)


def _nonlinearity_between(gm: fx.GraphModule, second: Op) -> str | None:
    between = second.x
    if between.op != "call_function" or between.target not in NONLINEAR or not between.args:
        return None
    first = read_op(between.args[0])
    if first is None or not _composable(gm, first, second):
        return None
    name = str(between.target) if isinstance(between.target, torch._ops.OpOverload) else between.target.__name__
    return (f"a nonlinearity ({name}) between {first.describe(gm)} and "
            f"{second.describe(gm)}: they do not compose")


def _parameters(gm: fx.GraphModule, op: Op) -> int:
    return sum(tensor(gm, r).numel() for r in (op.weight, op.bias) if r is not None)


def _parameters_after(gm: fx.GraphModule, first: Op, second: Op, groups: int) -> int:
    w1, w2 = tensor(gm, first.weight), tensor(gm, second.weight)
    out_ch, in_ch = w2.shape[0], w1.shape[1] * first.groups
    spatial = max(w1[0, 0].numel(), w2[0, 0].numel()) if first.kind == "conv2d" else 1
    return out_ch * (in_ch // groups) * spatial + out_ch


def _has_host(second: Op, x: fx.Node) -> bool:
    """Whether `second` is a term of a sum that also holds another op of its kind reading x."""
    root = sum_root(second.node)
    if root is None:
        return False
    return any((op := read_op(t)) is not None and op.x is x and op.kind == second.kind and t is not second.node
               for t in add_terms(root))
