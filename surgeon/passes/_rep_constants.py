"""Input-independent computations done once (for reparameterize).

A call whose inputs are all parameters, buffers, literals or other such calls gives the same
tensor on every forward: LeViT's and TinyViT's attention biases gathered by a fixed index table
(`attention_biases[:, attention_bias_idxs]`), which timm's eager models cache in eval mode and a
captured graph recomputes on every call; a weight computed from its parameter (weight
standardization); a table built from `arange`. Each maximal such computation is evaluated once
at compile time and stored as one frozen tensor (requires_grad False: the result is an inference
graph, as after fold-bn) in place of the computation; the parameters only it read are dropped.

Left as they are: bare views of one tensor (`gamma.view(1, -1, 1, 1)`, a select: free, and folding
them would copy), random ops, ops that write into a tensor, anything reading a tensor that the
graph writes into, adapter nodes (their own passes own them), and results over `LIMIT` elements.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from surgeon.graph import get_tensor, module_path

from ._rep_graph import _new_param, finish, rewritable
from ._rep_views import op_name

LIMIT = 1 << 26     # elements in one precomputed tensor (256 MB in fp32)
_FACTORIES = {torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step,
              torch.ops.aten.zeros.default, torch.ops.aten.ones.default, torch.ops.aten.full.default,
              torch.ops.aten.eye.default, torch.ops.aten.scalar_tensor.default}


def _is_view(node: fx.Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return bool(target.is_view) or target in (torch.ops.aten.reshape.default, torch.ops.aten.contiguous.default,
                                                  torch.ops.aten.clone.default)
    return False


def _pure(node: fx.Node) -> bool:
    """An aten call that neither draws random numbers nor writes into a tensor."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or not rewritable(node):
        return False
    if torch.Tag.nondeterministic_seeded in target.tags or target._schema.is_mutable:
        return False
    return True


def _written(gm: fx.GraphModule) -> set[str]:
    """Targets of the get_attr tensors some op writes into (their value changes between calls)."""
    written = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and node.target._schema.is_mutable:
            written |= {a.target for a in node.all_input_nodes if a.op == "get_attr"}
    return written


def constants(gm: fx.GraphModule) -> dict[fx.Node, bool]:
    """Every input-independent node, mapped to whether it computes something (not only views)."""
    written = _written(gm)
    const: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if node.target not in written and rewritable(node):
                const[node] = False
        elif _pure(node) and all(i in const for i in node.all_input_nodes) \
                and (node.all_input_nodes or node.target in _FACTORIES):
            const[node] = (not _is_view(node)) or any(const[i] for i in node.all_input_nodes)
    return const


def precompute(gm: fx.GraphModule, made_by: str, log: list[str], rejections: list[tuple[str, str]],
               wanted=lambda node: True, stem: str = "precomputed") -> list[str]:
    """Replace each maximal input-independent computation that `wanted` accepts by its value, a new
    tensor `<module path>.<stem>` (see the module's docstring); the new tensors' targets."""
    const = constants(gm)
    frontier = [n for n, computes in const.items() if computes and n.op == "call_function"
                and any(u not in const for u in n.users) and wanted(n)]
    made = []
    values: dict[fx.Node, object] = {}

    def value(node):
        if node not in values:
            if node.op == "get_attr":
                values[node] = get_tensor(gm, node.target)
            else:
                args = fx.node.map_arg(node.args, value)
                kwargs = fx.node.map_arg(node.kwargs, value)
                values[node] = node.target(*args, **kwargs)
        return values[node]

    with torch.no_grad():
        for node in frontier:
            path, what, result = module_path(node), f"{op_name(node)} ({node.name})", value(node)
            if not isinstance(result, torch.Tensor):
                continue
            if result.numel() > LIMIT:
                rejections.append((f"{made_by} @ {path or '<root>'}",
                                   f"{what} reads only parameters but its result holds {result.numel():,} elements "
                                   f"(> {LIMIT:,}): computed on every call"))
                continue
            with gm.graph.inserting_before(node):
                ref = _new_param(gm, path, stem, result.detach().clone(), False, made_by)
            shape = "x".join(map(str, result.shape)) or "scalar"
            finish(gm, node, ref)
            made.append(ref.target)
            log.append(f"constant: {what} of parameters only -> a precomputed {shape} tensor ({path or '<root>'})")
    return made
