"""The abstract interpreter of the coupled-group analysis: labels every tensor's axes.

Walks the canonical graph once in order. Every axis of every tensor the graph reads (get_attr)
becomes a fresh channel space; placeholders are FIXED; each call node's labels come from its
transfer rule (rules.rule_table). An op with no rule (an opaque custom op, a function
kept by torch.fx.wrap, a call_module) makes every channel axis that reaches it ineligible, with
the reason naming the node, its target and its module path; so does reaching the graph output.
Guarantee: two tensor axes end up in one space only if some rule joined them, and a space with
no poison reason can be permuted (with its unit, parts and ties) without changing the function.
"""
from __future__ import annotations

import contextlib

from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..errors import SurgeonError
from ..graph import get_tensor
from .rules import rule_table
from .space import BCAST, FIXED, Fixed, Label, Spaces

_VIEWLIKE = ("alias", "to", "_to_copy", "view", "reshape", "t", "transpose", "unsqueeze", "expand",
             "detach", "clone", "contiguous")


def _size(value: Any) -> int:
    if isinstance(value, int):
        return value
    hint = getattr(getattr(value, "node", None), "hint", None)
    return int(hint) if hint is not None else int(value)


class Flow:
    """Labels per node, the spaces they point into, and the helpers rules use."""

    def __init__(self, gm: fx.GraphModule):
        self.gm, self.spaces = gm, Spaces()
        self.env: dict[fx.Node, Any] = {}
        self.roles: dict[tuple[str, int], str] = {}
        self.by_tensor: dict[int, tuple] = {}
        self.aliases: dict[str, str] = {}      # get_attr target -> first target holding that tensor
        self.table = rule_table()

    # ------------------------------------------------------------------ reading
    def labels(self, arg: Any) -> tuple | None:
        value = self.env.get(arg) if isinstance(arg, fx.Node) else None
        return value if isinstance(value, tuple) else None

    def shape(self, arg: fx.Node) -> tuple[int, ...]:
        val = arg.meta.get("val")
        if not isinstance(val, torch.Tensor) and arg.op == "get_attr":
            val = get_tensor(self.gm, arg.target)
        return tuple(_size(s) for s in val.shape)

    def where(self, node: fx.Node) -> str:
        target = getattr(node.target, "__name__", str(node.target))
        if isinstance(node.target, torch._ops.OpOverload):
            target = str(node.target).removesuffix(".default")
        return f"{node.name} ({target}, {node.meta.get('surgeon_path') or '<root>'})"

    def param_like(self, arg: Any) -> bool:
        """True when `arg` is a parameter read, possibly through view-like ops."""
        while isinstance(arg, fx.Node) and arg.op == "call_function":
            name = getattr(getattr(arg.target, "overloadpacket", None), "__name__", "")
            if name not in _VIEWLIKE:
                return False
            arg = arg.args[0]
        return isinstance(arg, fx.Node) and arg.op == "get_attr"

    # ------------------------------------------------------------------ stating facts
    def join(self, a: Any, b: Any, node: fx.Node, why: str) -> Any:
        """Axes a and b carry one permutation; returns the label of the joined axis."""
        if a is BCAST:
            return b
        if b is BCAST:
            return a
        if isinstance(a, Fixed) or isinstance(b, Fixed):
            fixed, other = (a, b) if isinstance(a, Fixed) else (b, a)
            if isinstance(other, Label):
                self.poison(other, node, f"{why}: meets positions fixed by {fixed.origin}" if fixed.origin
                            else f"{why}: meets a fixed-position axis")
            return fixed
        if a.rep == b.rep and a.unit == b.unit:
            self.spaces.union(a.space, b.space, f"{why} at {self.where(node)}")
            return a
        if a.rep == 1 or b.rep == 1:
            fine, coarse = (a, b) if a.rep == 1 else (b, a)
            self.spaces.tie(fine.space, fine.unit * coarse.rep, coarse.space, coarse.unit, self.where(node))
            return fine
        for label in (a, b):
            self.poison(label, node, f"{why} with incompatible head layouts")
        return FIXED

    def poison(self, label: Any, node: fx.Node, why: str) -> None:
        if isinstance(label, Label):
            self.spaces.poison(label.space, f"{why} at {self.where(node)}")

    def role(self, arg: Any, axis: int, role: str) -> None:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            self.roles.setdefault((self.aliases.get(arg.target, arg.target), axis), role)

    def narrow(self, label: Any, start: int, end: int, node: fx.Node, step: int = 1) -> Any:
        """The label of positions [start, end) of an axis (a part of its channel space)."""
        if not isinstance(label, Label) or (start == 0 and step == 1 and
                                            end * label.unit == self.spaces.size(label.space) * label.rep):
            return label
        if step != 1 or label.rep != 1:
            self.poison(label, node, "strided or repeated slice of a channel axis")
            return FIXED
        part = self.spaces.range_space(label.space, start * label.unit, end * label.unit)
        return Label(part, label.unit)

    def concat(self, pieces: list, node: fx.Node) -> Any:
        """The label of an axis concatenated from `pieces` (a space made of parts)."""
        units = {p.unit for p in pieces if isinstance(p, Label)}
        if all(isinstance(p, Label) and p.rep == 1 for p in pieces) and len(units) == 1:
            space = self.spaces.concat([p.space for p in pieces])
            self.spaces.require_unit(space, units.pop())
            return Label(space, pieces[0].unit)
        for piece in pieces:
            self.poison(piece, node, "concatenates a channel axis with other axes")
        return FIXED

    def default(self, node: fx.Node, why: str = "no transfer rule for this op") -> Any:
        """No rule: every channel axis reaching the node becomes ineligible; outputs are Fixed by it."""
        for arg in pytree.tree_leaves((node.args, node.kwargs)):
            for label in self.labels(arg) or ():
                self.poison(label, node, why)
        fixed = Fixed(f"{self.where(node)}, which has no transfer rule")
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return tuple(fixed if _size(n) != 1 else BCAST for n in val.shape)
        if isinstance(val, (list, tuple)):
            return [tuple(fixed for _ in v.shape) if isinstance(v, torch.Tensor) else None for v in val]
        return None

    # ------------------------------------------------------------------ the walk
    def run(self) -> "Flow":
        for node in self.gm.graph.nodes:
            self.env[node] = self.visit(node)
        return self

    def visit(self, node: fx.Node) -> Any:
        if node.op == "get_attr":
            return self._get_attr(node)
        if node.op == "placeholder":
            val, fixed = node.meta.get("val"), Fixed(f"graph input '{node.target}'")
            return tuple(fixed if _size(n) != 1 else BCAST for n in val.shape) \
                if isinstance(val, torch.Tensor) else None
        if node.op == "output":
            for arg in pytree.tree_leaves(node.args):
                for label in self.labels(arg) or ():
                    self.poison(label, node, "reaches the graph output")
            return None
        if isinstance(node.meta.get("val"), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)):
            return None   # size arithmetic (sym_size, operator.mul on sizes): no tensor axis to carry
        packet = getattr(node.target, "overloadpacket", node.target)
        rule = self.table.get(packet) if node.op == "call_function" else None
        if rule is None:
            return self.default(node)
        return rule(self, node)

    def _get_attr(self, node: fx.Node) -> tuple | None:
        try:
            tensor = get_tensor(self.gm, node.target)
        except AttributeError:
            return None
        if not isinstance(tensor, torch.Tensor):
            return None
        if id(tensor) not in self.by_tensor:
            labels = tuple(Label(self.spaces.new(n, (node.target, axis, 0, n))) if n > 1 else BCAST
                           for axis, n in enumerate(tensor.shape))
            self.by_tensor[id(tensor)] = (node.target, labels)
        first, labels = self.by_tensor[id(tensor)]
        self.aliases[node.target] = first
        return labels


@contextlib.contextmanager
def concrete_shapes(gm: fx.GraphModule, example_inputs: tuple | None):
    """While inside, every node's meta["val"] has the example's concrete sizes: a graph captured with
    dynamic shapes holds symbols (and sym_size nodes), and the analysis is about channel and head axes,
    which are static. The symbolic values are put back on exit."""
    symbolic = [n for n in gm.graph.nodes if _symbolic(n.meta.get("val"))]
    if not symbolic:
        yield
        return
    example_inputs = example_inputs if example_inputs is not None else gm.meta.get("surgeon_example")
    if example_inputs is None:
        raise SurgeonError(f"groups: node '{symbolic[0].name}' has a symbolic shape; pass example inputs so the "
                           "graph can be run once at a concrete size")
    saved = {n: n.meta.pop("val") for n in gm.graph.nodes if "val" in n.meta}
    try:
        fill_shapes(gm, example_inputs)
        yield
    finally:
        for n in gm.graph.nodes:
            n.meta.pop("val", None)
        for n, val in saved.items():
            n.meta["val"] = val


def _symbolic(val: Any) -> bool:
    return any(isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and
                                              any(isinstance(d, torch.SymInt) for d in v.shape))
               for v in pytree.tree_leaves(val))


def fill_shapes(gm: fx.GraphModule, example_inputs: tuple | None) -> None:
    """Make sure every tensor node has meta["val"] (running the graph once when some lack it)."""
    missing = [n for n in gm.graph.nodes if n.op in ("call_function", "call_module", "call_method", "placeholder")
               and "val" not in n.meta]
    if not missing:
        return
    if example_inputs is None:
        raise SurgeonError(f"groups: node '{missing[0].name}' has no shape (meta['val']); "
                           "pass example inputs so the graph can be run once")

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if "val" not in n.meta:
                n.meta["val"] = pytree.tree_map_only(
                    torch.Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"), out) \
                    if not isinstance(out, (int, torch.SymInt)) else int(out)
            return out

    with torch.no_grad():
        _Recorder(gm).run(*pytree.tree_leaves(example_inputs))
