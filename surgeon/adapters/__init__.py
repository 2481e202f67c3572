"""Adapter kinds as data: each kind is one small file declaring an AdapterKind.

An AdapterKind says which options it takes, how its parameters are initialized for a site
with `in_features -> out_features`, its forward as graph code (given the site's input `x`
and base output `y`, return the adapted output), its delta weight where a merge is exact,
and its parameter count. The insert/merge/unmerge passes serve every kind through this
interface; adding a kind never touches them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from ..graph import call


@dataclass(frozen=True)
class Option:
    type: type | tuple[type, ...]
    default: Any
    choices: tuple | None = None
    positive: bool = False


class Branch:
    """Builds an adapter's forward in the graph: each call makes one provenance-stamped node."""

    def __init__(self, graph: fx.Graph, made_by: str, path: str, adapter: str):
        self.graph, self.made_by, self.path, self.adapter = graph, made_by, path, adapter
        self.created: list[fx.Node] = []

    def op(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        node = call(self.graph, target, args, kwargs, made_by=self.made_by, path=self.path, adapter=self.adapter)
        self.created.append(node)
        return node

    def linear(self, x: fx.Node, weight: fx.Node) -> fx.Node:
        return self.op(torch.ops.aten.linear.default, x, weight)


@dataclass(frozen=True)
class AdapterKind:
    name: str
    options: dict[str, Option]
    init: Callable[[dict, int, int, torch.dtype, torch.Generator], dict[str, torch.Tensor]]
    forward: Callable[[Branch, fx.Node, fx.Node, dict[str, fx.Node], dict], fx.Node]
    delta_weight: Callable[[dict[str, torch.Tensor], dict], torch.Tensor] | None
    param_count: Callable[[dict, int, int], int]
    refuse_merge: str = ""   # why merge is impossible, when delta_weight is None


def kinds() -> dict[str, AdapterKind]:
    """The adapter kinds by spec `type` name (an explicit table; nothing registers at import)."""
    from . import lora

    return {lora.LORA.name: lora.LORA}
