"""Helpers over the canonical GraphModule: tensors by path, provenance, counts, lint."""
from __future__ import annotations

from typing import Any

import contextlib

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch import nn

from .capture import _ensure_path, _get_attr, index_children
from .fastpath import recompile


def module_path(node: fx.Node) -> str:
    """The qualified path of the module a node came from ('' for the root)."""
    return node.meta.get("surgeon_path", "")


def get_tensor(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The parameter or buffer stored at `target` in gm's module tree."""
    return _get_attr(gm, target)


def set_parameter(gm: fx.GraphModule, target: str, value: torch.Tensor, requires_grad: bool) -> None:
    """Store a new Parameter at `target` (replacing any previous one; never writes in place).

    The value is stored contiguous: a factor born as a view (PiSSA's A inherits LAPACK's column-major
    layout) would otherwise round differently from the same values loaded back from a file, since
    BLAS picks its kernel by layout."""
    owner_path, _, name = target.rpartition(".")
    owner = _ensure_path(gm, owner_path)
    if name in owner._parameters:
        del owner._parameters[name]
    owner.register_parameter(name, nn.Parameter(value.contiguous(), requires_grad=requires_grad))


def delete_attr(gm: fx.GraphModule, target: str) -> None:
    """Remove a tensor (and its now-empty owner modules) from gm's module tree."""
    owner_path, _, name = target.rpartition(".")
    owner = _get_attr(gm, owner_path) if owner_path else gm
    delattr(owner, name)
    while owner_path and not any(True for _ in owner.children()) \
            and not owner._parameters and not owner._buffers:
        parent_path, _, child = owner_path.rpartition(".")
        parent = _get_attr(gm, parent_path) if parent_path else gm
        delattr(parent, child)
        parent.__dict__.pop(child, None)   # the fast-lookup entry (capture.index_children)
        owner_path, owner = parent_path, parent


def call(graph: fx.Graph, target: Any, args: tuple, kwargs: dict | None = None, *,
         made_by: str, path: str, adapter: str | None = None) -> fx.Node:
    """Create a call_function node with provenance (the pass that made it, its module path)."""
    node = graph.call_function(target, args, kwargs or {})
    _stamp(node, made_by, path, adapter)
    return node


def get_attr(graph: fx.Graph, target: str, *, made_by: str, adapter: str | None = None) -> fx.Node:
    """Create a get_attr node with provenance."""
    node = graph.get_attr(target)
    _stamp(node, made_by, target.rpartition(".")[0], adapter)
    return node


def _stamp(node: fx.Node, made_by: str, path: str, adapter: str | None) -> None:
    node.meta["surgeon_pass"] = made_by
    node.meta["surgeon_path"] = path
    if adapter:
        node.meta["surgeon_adapter"] = adapter


def sort_topologically(graph: fx.Graph) -> bool:
    """Reorder nodes so each comes after its inputs, moving as little as possible; True if any moved.

    A node is kept where it is unless an input of it is defined later; then that input (and its
    own inputs, depth first) is pulled up to just before it. Placeholders stay first, output last.
    A graph with a cycle (a pass bug: no order exists) raises ValueError naming a node on it.
    """
    order: list[fx.Node] = []
    done: set[fx.Node] = set()
    visiting: set[fx.Node] = set()       # on the current depth-first path
    for start in graph.nodes:
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node in done:
                continue
            if expanded:
                done.add(node)
                visiting.discard(node)
                order.append(node)
                continue
            if node in visiting:
                raise ValueError(f"the graph has a cycle through '{node.name}': no node order exists")
            visiting.add(node)
            stack.append((node, True))
            stack.extend((inp, False) for inp in reversed(node.all_input_nodes) if inp not in done)
    if order == list(graph.nodes):
        return False
    anchor = graph._root        # the graph's sentinel: appending after it in turn rebuilds the order
    for node in order:
        anchor.append(node)
        anchor = node
    return True


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameter counts, each shared tensor counted once."""
    params = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def compute_nodes(gm: fx.GraphModule) -> int:
    """Number of call nodes (the ops the module runs)."""
    return sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_module", "call_method"))


def _fake_mode(gm: fx.GraphModule):
    """(the FakeTensorMode torch.export traced `gm` with, its inputs' device), or (None, None)."""
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, FakeTensor):
            return val.fake_mode, val.device
    return None, None


def lint(gm: fx.GraphModule) -> None:
    """Check graph well-formedness and that every get_attr resolves; recompile the module."""
    gm.graph.lint()
    for node in gm.graph.find_nodes(op="get_attr"):
        try:
            _get_attr(gm, node.target)
        except AttributeError as error:
            raise AssertionError(f"get_attr node '{node.name}' names missing tensor '{node.target}'") from error
    fill_meta(gm)
    index_children(gm)
    recompile(gm)


def fill_meta(gm: fx.GraphModule) -> None:
    """Give nodes a pass created without shape metadata a `meta["val"]`, by running their op on the
    values of their inputs: under torch.export's FakeTensorMode when the graph has one (symbolic
    sizes propagate: a dynamic batch stays a symbol), else on meta-device tensors. Nodes whose
    inputs have none, or ops that fail there, are left without (shape unknown)."""
    fake_mode, device = _fake_mode(gm)

    def value_of(value):
        if isinstance(value, fx.Node):
            val = value.meta.get("val")
            if isinstance(val, torch.SymInt) and fake_mode is not None:
                return val
            if not isinstance(val, torch.Tensor):
                raise LookupError(value.name)
            if fake_mode is None:
                return torch.empty(val.shape, dtype=val.dtype, device="meta")
            if isinstance(val, FakeTensor):
                return val
            return torch.empty(val.shape, dtype=val.dtype, device=device)   # under fake_mode: a fake tensor
        return value

    # ops with the same target and the same input metadata give the same output metadata: each is run once
    # (a LoRA site's three nodes repeat across every layer, and an op on symbolic sizes costs milliseconds)
    seen: dict = {}
    for node in gm.graph.nodes:
        if "val" in node.meta or node.op not in ("get_attr", "call_function"):
            continue
        try:
            if node.op == "get_attr":
                tensor = get_tensor(gm, node.target)
                node.meta["val"] = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
                continue
            key = _signature(node)
            if key is not None and key in seen:
                node.meta["val"] = seen[key]
                continue
            with fake_mode if fake_mode is not None else contextlib.nullcontext():
                args, kwargs = torch.fx.node.map_aggregate((node.args, node.kwargs), value_of)
                node.meta["val"] = node.target(*args, **kwargs)
            if key is not None:
                seen[key] = node.meta["val"]
        except Exception:  # noqa: BLE001 - metadata only: unknown shape is allowed
            continue


def _signature(node: fx.Node):
    """A hashable key of a call's target and its inputs' metadata (shape, stride, dtype, device of each
    tensor input; constants as they are), or None where an input has no such key."""
    def key(value):
        if isinstance(value, fx.Node):
            val = value.meta.get("val")
            if isinstance(val, torch.Tensor):
                return ("tensor", _sizes(val.shape), _sizes(val.stride()) if val.layout == torch.strided else None,
                        val.dtype, val.device.type, val.requires_grad)
            if isinstance(val, torch.SymInt):
                return ("symint", _sizes((val,)))
            raise LookupError(value.name)
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, *map(key, value))
        if isinstance(value, dict):
            return ("dict", *((k, key(v)) for k, v in value.items()))
        hash(value)
        return (type(value).__name__, value)
    try:
        return (node.target, key(node.args), key(node.kwargs))
    except (LookupError, TypeError):
        return None


def _sizes(sizes) -> tuple:
    """Sizes as ints, or the expressions of symbolic ones (equal expressions are the same size)."""
    return tuple(s.node.expr if isinstance(s, torch.SymInt) else int(s) for s in sizes)


def meta_tensors(module: nn.Module) -> list[str]:
    """Names of the module's parameters and buffers on the meta device (no data: a structure-only model)."""
    return [name for name, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]


def first_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for one without any)."""
    return next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))


def placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, floating dtype) of a module's tensors, as SurgeonModule reports them (the default dtype for
    a module without floating tensors)."""
    dtype = next((t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()),
                 torch.get_default_dtype())
    return first_device(module), dtype
