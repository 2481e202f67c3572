"""What fold-bn and reparameterize see through: row-preserving reshapes and eval dropouts.

Models do not always put a BatchNorm right next to its conv / linear. LeViT normalizes a linear's
tokens as `bn(y.flatten(0, 1)).reshape_as(y)`, an EfficientViT-style block normalizes a conv's
output as `bn(y.flatten(2)).view_as(y)`, and classifier heads put a dropout between a BatchNorm1d
and the linear. A reshape is a row-major reinterpretation of the same values, so it moves no
value from one channel to another exactly when the channel dim keeps its size and everything
before it keeps its total size (`channel_kept`); then a per-channel affine map commutes with it.
An eval dropout is the identity. The chains found here are read-only facts; the passes decide
what to rewrite.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from surgeon.modes import DROPOUTS

aten = torch.ops.aten

# ops that only reinterpret their first argument's shape (row-major), as export and torch.fx write them
RESHAPES = {aten.flatten.using_ints, aten.reshape.default, aten.view.default, aten.reshape_as.default,
            aten.view_as.default, aten._unsafe_view.default, aten.unflatten.int, aten.squeeze.dim,
            aten.unsqueeze.default, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze}
_RESHAPE_METHODS = {"flatten", "reshape", "view", "reshape_as", "view_as", "unflatten", "squeeze", "unsqueeze"}
# ops whose second argument is read for its shape only (the reshaped tensor's size comes from it)
_SHAPE_DONORS = {aten.reshape_as.default, aten.view_as.default, aten.expand_as.default}
_SHAPE_DONOR_METHODS = {"reshape_as", "view_as", "expand_as"}


def is_reshape(node: Any) -> bool:
    """A call that only reinterprets the shape of its first argument."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        return node.target in _RESHAPE_METHODS
    return node.op == "call_function" and node.target in RESHAPES


def is_eval_dropout(node: Any) -> bool:
    """A dropout that is the identity in eval (its train flag a mode flag node or False, or p == 0).

    A literal True drops in eval too: not the identity, never seen through."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in DROPOUTS:
        return False
    p_at, flag_at, flag_name = DROPOUTS[node.target]
    p = node.args[p_at] if len(node.args) > p_at else node.kwargs.get("p", 0.5)
    flag = node.args[flag_at] if len(node.args) > flag_at else node.kwargs.get(flag_name, True)
    return p == 0 or flag is False or isinstance(flag, fx.Node)


def shape_only(user: fx.Node, node: fx.Node) -> bool:
    """Whether `user` reads `node` for its size only (`y.reshape_as(node)`, `node.size(0)`, sym_size)."""
    if user.op == "call_function" and user.target in _SHAPE_DONORS or \
            user.op == "call_method" and user.target in _SHAPE_DONOR_METHODS:
        return len(user.args) == 2 and user.args[1] is node and user.args[0] is not node
    if user.op == "call_function" and user.target is aten.sym_size.int:
        return True
    return user.op == "call_method" and user.target == "size"


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of `node` that read its values (not only its shape)."""
    return [u for u in node.users if not shape_only(u, node)]


def chain_after(node: fx.Node, links) -> list[fx.Node]:
    """The nodes after `node` that each are `links(n)` and the only value user of the one before."""
    chain: list[fx.Node] = []
    while len(users := value_users(node)) == 1 and links(users[0]) and users[0].args[0] is node:
        node = users[0]
        chain.append(node)
    return chain


def chain_before(node: fx.Node, links) -> list[fx.Node]:
    """The nodes before `node` (in data-flow order) that each are `links(n)` reading the one before."""
    chain: list[fx.Node] = []
    while links(node.args[0] if node.args else None):
        node = node.args[0]
        chain.insert(0, node)
    return chain


def _same(a, b) -> bool:
    """Equal sizes, symbolic ones included when the shape environment proves it (no guard added)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def channel_kept(shape, dim: int, reshaped) -> bool:
    """Whether reshaping `shape` into `reshaped` (row-major) sends index i of `dim` to index i of dim 1
    and moves nothing across channels: sizes before `dim` multiply to reshaped[0], shape[dim] == reshaped[1]."""
    if shape is None or reshaped is None or len(reshaped) < 2 or not 0 <= dim < len(shape):
        return False
    return _same(math.prod(shape[:dim]), reshaped[0]) and _same(shape[dim], reshaped[1])


def describe_node(node: Any) -> str:
    """A node as a report names it: its op's short name and the node's name."""
    if not isinstance(node, fx.Node):
        return repr(node)
    if node.op in ("placeholder", "get_attr"):
        return f"{node.op} {node.name}"
    return f"{op_name(node)} ({node.name})"


def op_name(node: fx.Node) -> str:
    """The short op name of a call (`flatten` for aten.flatten.using_ints, a method's name)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))
