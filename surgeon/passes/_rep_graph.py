"""Graph plumbing shared by fold-bn and reparameterize.

- `read_op` / `read_norm` read a conv2d / linear / eval batch_norm call into a small record
  (trailing conv arguments that capture omitted get their aten defaults);
- `Shapes` answers "what rank is this node's output" from `meta["val"]`, running the graph
  once on the example inputs only when some node lacks it;
- `install` replaces a node by a new conv2d / linear with new parameter tensors (never
  written into old ones), records provenance, removes the dead nodes and the tensors no
  node refers to any more, and gives the new tensors their plain names when those are free;
- `fixed_point` applies a rule set until nothing more matches and returns the final sweep's
  rejections (what is still left unfolded, and why).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from surgeon.errors import PassError
from surgeon.graph import call, delete_attr, get_attr, get_tensor, module_path, set_parameter
from surgeon.rules import Pattern, RuleSet, rewrite

from ._rep_math import Affine, batch_norm_affine

aten = torch.ops.aten
_OP = Pattern(("conv2d", "linear"))
_NORM = Pattern(("batch_norm",), params=())


@dataclass(frozen=True)
class Op:
    """A conv2d or linear call whose weight (and bias, if any) are get_attr nodes."""

    node: fx.Node
    kind: str
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def path(self) -> str:
        return module_path(self.node)

    def describe(self, gm: fx.GraphModule) -> str:
        if self.kind == "linear":
            out_f, in_f = get_tensor(gm, self.weight.target).shape
            return f"linear {in_f}->{out_f} ({self.path or '<root>'})"
        kh, kw = get_tensor(gm, self.weight.target).shape[2:]
        extra = "".join(f" {name} {value}" for name, value, plain in (
            ("stride", self.stride, (1, 1)), ("dilation", self.dilation, (1, 1)), ("groups", self.groups, 1))
            if value != plain)
        return f"conv2d {kh}x{kw}{extra} ({self.path or '<root>'})"


def _pair(value: Any, default: int) -> tuple[int, int]:
    if value is None:
        return (default, default)
    if isinstance(value, int):
        return (value, value)
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


def _is_param(value: Any) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr"


def rewritable(node: Any) -> bool:
    """A node still in its graph and not part of an adapter (adapter nodes belong to their adapter's
    bookkeeping: merge / unmerge / remove them, reparameterization never touches them)."""
    return isinstance(node, fx.Node) and not getattr(node, "_erased", False) and "surgeon_adapter" not in node.meta


def read_op(node: Any) -> Op | None:
    """The conv2d / linear call at `node` with parameter weight and bias, or None."""
    match = _OP.match(node) if rewritable(node) else None
    if match is None or not isinstance(match["x"], fx.Node) or not (match["bias"] is None or _is_param(match["bias"])):
        return None
    if match.op == "linear":
        return Op(node, "linear", match["x"], match["weight"], match["bias"])
    padding = match["padding"]
    if isinstance(padding, str):
        return None
    return Op(node, "conv2d", match["x"], match["weight"], match["bias"], _pair(match["stride"], 1),
              _pair(padding, 0), _pair(match["dilation"], 1), match["groups"] or 1)


@dataclass(frozen=True)
class Norm:
    """An aten.batch_norm call: input, parameter refs (or None), eps and training flag."""

    node: fx.Node
    x: fx.Node
    refs: tuple                   # (weight, bias, running_mean, running_var)
    eps: float
    training: bool

    @property
    def path(self) -> str:
        return module_path(self.node)


def read_norm(node: Any) -> Norm | None:
    """The batch_norm call at `node` (its tensors get_attr nodes or None), or None."""
    match = _NORM.match(node) if rewritable(node) else None
    if match is None or not isinstance(match["x"], fx.Node):
        return None
    refs = (match["weight"], match["bias"], match["running_mean"], match["running_var"])
    if not all(r is None or _is_param(r) for r in refs):
        return None
    # training: a literal True (batch statistics always); a flag node follows .train() (eval at capture)
    return Norm(node, match["x"], refs, float(match["eps"]), match["training"] is True or refs[2] is None)


def tensor(gm: fx.GraphModule, ref: fx.Node | None) -> torch.Tensor | None:
    """The tensor a get_attr node refers to (None for None)."""
    return None if ref is None else get_tensor(gm, ref.target)


def norm_affine(gm: fx.GraphModule, norm: Norm) -> Affine:
    """The eval BN's per-channel scale and shift (float64)."""
    weight, bias, mean, var = (tensor(gm, r) for r in norm.refs)
    return batch_norm_affine(weight, bias, mean, var, norm.eps)


class Shapes:
    """Output shapes of nodes, from meta["val"]; fills missing ones by one run on the example inputs."""

    def __init__(self, gm: fx.GraphModule, ctx):
        self.gm, self.ctx, self.filled = gm, ctx, False

    def rank(self, node: fx.Node) -> int | None:
        shape = self.shape(node)
        return None if shape is None else len(shape)

    def shape(self, node: fx.Node) -> tuple | None:
        """The node's output sizes (symbolic ones as SymInts), or None when unknown."""
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) and not self.filled:
            self._fill()
            val = node.meta.get("val")
        return tuple(val.shape) if isinstance(val, torch.Tensor) else None

    def _fill(self) -> None:
        self.filled = True
        recorder = _ShapeRecorder(self.gm)
        with torch.no_grad():
            recorder.run(*pytree.tree_leaves((self.ctx.example_args, self.ctx.example_kwargs)))


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and not isinstance(n.meta.get("val"), torch.Tensor):
            n.meta["val"] = torch.empty(out.shape, dtype=out.dtype, device="meta")
        return out


def common_path(nodes: list[fx.Node]) -> str:
    """The longest common dotted prefix of the nodes' module paths."""
    paths = [module_path(n).split(".") if module_path(n) else [] for n in nodes]
    prefix: list[str] = []
    for atoms in zip(*paths):
        if any(a != atoms[0] for a in atoms):
            break
        prefix.append(atoms[0])
    return ".".join(prefix)


def install(gm: fx.GraphModule, old: fx.Node, kind: str, x: fx.Node, weight: torch.Tensor,
            bias: torch.Tensor | None, like: Op, *, made_by: str, path: str,
            padding: tuple[int, int] | None = None, groups: int | None = None) -> fx.Node:
    """Replace every use of `old` by kind(x, weight, bias) with `like`'s conv attributes; clean up."""
    new = emit(gm, old, kind, x, weight, bias, like, made_by=made_by, path=path, padding=padding, groups=groups)
    finish(gm, old, new)
    return new


def emit(gm: fx.GraphModule, before: fx.Node, kind: str, x: fx.Node, weight: torch.Tensor,
         bias: torch.Tensor | None, like: Op, *, made_by: str, path: str,
         padding: tuple[int, int] | None = None, groups: int | None = None) -> fx.Node:
    """Create kind(x, new weight, new bias) before `before`, its tensors cast like `like`'s weight."""
    ref = get_tensor(gm, like.weight.target)
    graph = gm.graph
    with graph.inserting_before(before):
        w_ref = _new_param(gm, path, "weight", weight.to(ref.dtype), ref.requires_grad, made_by)
        b_ref = None if bias is None else _new_param(gm, path, "bias", bias.to(ref.dtype), ref.requires_grad, made_by)
        if kind == "linear":
            args: tuple = (x, w_ref, b_ref)
        else:
            args = (x, w_ref, b_ref, list(like.stride), list(padding or like.padding), list(like.dilation),
                    groups or like.groups)
        target = aten.linear.default if kind == "linear" else aten.conv2d.default
        return call(graph, target, args, made_by=made_by, path=path)


def finish(gm: fx.GraphModule, old: fx.Node, new: fx.Node) -> None:
    """Point old's users at new, drop dead nodes and tensors, give new tensors their plain names."""
    if "val" in old.meta:
        new.meta["val"] = old.meta["val"]
    created = [n for n in gm.graph.find_nodes(op="get_attr") if "surgeon_stem" in n.meta]
    old.replace_all_uses_with(new)
    prune(gm)
    for ref in created:
        if not getattr(ref, "_erased", False):
            _settle_name(gm, ref)
            del ref.meta["surgeon_stem"]


def _new_param(gm: fx.GraphModule, path: str, stem: str, value: torch.Tensor, requires_grad: bool,
               made_by: str) -> fx.Node:
    target = _free_target(gm, path, stem)
    set_parameter(gm, target, value.detach().contiguous(), requires_grad)
    node = get_attr(gm.graph, target, made_by=made_by)
    node.meta["surgeon_stem"] = stem
    return node


def _free_target(gm: fx.GraphModule, path: str, stem: str) -> str:
    prefix = f"{path}." if path else ""
    index = 0
    while True:
        target = f"{prefix}{stem}" if index == 0 else f"{prefix}{stem}_{index}"
        if not _exists(gm, target):
            return target
        index += 1


def _exists(gm: fx.GraphModule, target: str) -> bool:
    try:
        get_tensor(gm, target)
    except AttributeError:
        return False
    return True


def _settle_name(gm: fx.GraphModule, ref: fx.Node) -> None:
    """Move a new tensor to its plain name (e.g. `block.weight`) once the old one is gone."""
    path = ref.target.rpartition(".")[0]
    plain = f"{path}.{ref.meta['surgeon_stem']}" if path else ref.meta["surgeon_stem"]
    if ref.target == plain or _exists(gm, plain):
        return
    value = get_tensor(gm, ref.target)
    delete_attr(gm, ref.target)
    set_parameter(gm, plain, value.detach(), value.requires_grad)
    ref.target = plain


def prune(gm: fx.GraphModule) -> None:
    """Remove dead nodes, then the tensors that only dead get_attr nodes referred to."""
    before = {n: n.target for n in gm.graph.find_nodes(op="get_attr")}
    gm.graph.eliminate_dead_code()
    live = {n.target for n in gm.graph.find_nodes(op="get_attr")}
    for target in {t for node, t in before.items() if getattr(node, "_erased", False)} - live:
        if _exists(gm, target):
            delete_attr(gm, target)


def fixed_point(gm: fx.GraphModule, rules: RuleSet, pass_name: str, limit: int = 1000) -> list[tuple[str, str]]:
    """Apply `rules` until a sweep matches nothing; that sweep's rejections, deduplicated."""
    for _ in range(limit):
        result = rewrite(gm, rules)
        if not result.matches:
            return list(dict.fromkeys(result.rejections))
    raise PassError(pass_name, f"rules still matching after {limit} sweeps; a rule undoes another")
