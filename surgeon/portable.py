"""Dtype and device moves of a compiled module: one graph for every dtype and device.

torch.export bakes the capture's dtype and device into the graph as constants: `aten.to.dtype(x,
torch.float32)`, `aten.arange(n, device=cpu)`, `aten._to_copy(x, dtype=..., device=...)`, mask fills of
`torch.finfo(float32).min`. Some follow the model's dtype (`h.to(input_dtype)`), some are fixed on
purpose (RMSNorm's `h.to(torch.float32)` upcast), and in an fp32 capture the two look the same.
`SurgeonModule._apply` (what `.to`, `.half`, `.bfloat16`, `.float`, `.double`, `.cuda`, `.cpu` go
through) calls `prepare` before torch converts the tensors and `finish` after:

- device constants: one equal to the module's device follows it. No probe: probing another device
  changes the kernels torch dispatches to (sdpa on meta or CUDA returns other strides, and export then
  emits other layout ops), and in a graph whose tensors all live on one device a constant naming that
  device can only mean "here" (a fixed `cpu` in a CUDA module would mix devices and fail).
- dtype constants of captured nodes: the first move to a dtype the module has not run in captures the
  model once more in that dtype (the probe), on fake tensors on the capture's device: no weights are
  copied and no memory is used, and the same front end and shape settings run, so the two graphs must
  match node for node (`classify` refuses otherwise). A constant equal to the capture's dtype there and
  to the probe's dtype in the probe follows the module; one equal in both is fixed. A float scalar that
  is `torch.finfo(dtype).min` (max, eps, tiny) of each follows too; any other difference is refused.
  Export also records `x.to(dtype)` that changes nothing (fp32 to fp32) as a node and reads later uses
  of `x` from it; where the probe reads `x` itself (a residual added in the model's dtype), the
  argument is pointed back at `x`, which in the capture's dtype is the same value.
  Each later new dtype is probed too and must agree with the first probe's classification.
- dtype constants of nodes a pass made (no capture index; e.g. quantize-adapters' decode, adapter
  masks): a floating dtype equal to the module's dtype at the move follows it, others are fixed.
- following constants become run-time values read from `_surgeon_dtype`, a zero-size non-persistent
  buffer registered on the module: every move converts it like any floating buffer, so one graph serves
  every dtype and device (nodes `tensor_dtype`, `tensor_device`, `finfo_value` after the inputs).

What the probe needs is kept at capture (`remember`): each node's capture index
(meta["surgeon_capture_index"]), the captured graph's fingerprint, the front end with its settings, the
example, and a weightless copy of the model (every tensor on the meta device; a weak reference to the
model when it cannot be copied). A move that cannot be made raises SurgeonError before any tensor is
converted, saying why and to compile the model in that dtype instead; the module stays as it was.
Refused: a model whose capture in the new dtype fails or differs (e.g. the eager model fails in it,
or branches on its dtype), lowered elementwise regions (their generated programs name dtypes), a
module with no capture record and dtype constants in its graph.
"""
from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .errors import SurgeonError
from .fastpath import recompile

INDEX = "surgeon_capture_index"     # node.meta key: the node's position in the captured graph
RECORD = "surgeon_capture"          # gm.meta key: the CaptureRecord
BUFFER = "_surgeon_dtype"           # the zero-size buffer the graph reads the module's dtype and device from
MADE_BY = "portable"                # meta["surgeon_pass"] of the nodes made here
DONE = "surgeon_portable"           # node.meta key: the probe's edits are applied to this captured node
FINFO = ("min", "max", "eps", "tiny")


def tensor_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The graph's read of the module's dtype (of its `_surgeon_dtype` buffer)."""
    return tensor.dtype


def tensor_device(tensor: torch.Tensor) -> torch.device:
    """The graph's read of the module's device (of its `_surgeon_dtype` buffer)."""
    return tensor.device


def finfo_value(dtype: torch.dtype, attr: str) -> float:
    """torch.finfo(dtype).<attr> at run time (a mask fill of the module's dtype)."""
    return getattr(torch.finfo(dtype), attr)


RUNTIME = (tensor_dtype, tensor_device, finfo_value)


# ---------------------------------------------------------------- what capture keeps

@dataclass(frozen=True)
class Ref:
    """A node argument in a fingerprint: the captured node at `index`."""

    index: int


@dataclass(frozen=True)
class Entry:
    """One captured node: op, target, arguments (nodes as Refs), and the node it aliases (a `.to` that
    returned its input: same dtype and device), for matching graphs captured in different dtypes."""

    op: str
    target: str
    name: str
    path: str
    args: Any
    kwargs: Any
    alias_of: int | None


@dataclass(eq=False)
class CaptureRecord:
    """How the module was captured, so the model can be captured again in another dtype (the probe)."""

    model_name: str
    frontend: Callable                      # capture's front end with its settings: (model, args, tensor_kwargs, constants)
    args: tuple
    tensor_kwargs: dict
    constants: dict
    dtype: torch.dtype                      # the capture's floating dtype
    device: torch.device
    entries: list[Entry]
    skeleton: nn.Module | None = None       # the model without weights (meta tensors)
    model: Any = None                       # a weak reference to the model when no skeleton could be made
    why_no_skeleton: str = ""
    plan: dict[int, list] | None = None     # captured node -> [(argument path, edit)], from the first probe
    general: list[Entry] | None = None      # the capture's entries with the probe's argument fixes applied
    verified: set = field(default_factory=set)   # dtypes the graph is known to be right in

    def __post_init__(self):
        self.verified.add(self.dtype)

    def __getstate__(self):   # a weak reference does not pickle
        return {**self.__dict__, "model": None}

    def __deepcopy__(self, memo):
        # facts about the model, the same for every copy of the module (a probe copies the skeleton itself)
        return self


def remember(gm: fx.GraphModule, model: nn.Module, args: tuple, tensor_kwargs: dict, constants: dict,
             frontend: Callable) -> fx.GraphModule:
    """Keep on `gm` what a later dtype move needs (see the module docstring); returns gm."""
    entries = fingerprint(gm.graph)
    floating = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    tensors = [*model.parameters(), *model.buffers()]
    record = CaptureRecord(type(model).__name__, frontend, tuple(args), dict(tensor_kwargs), dict(constants),
                           floating[0].dtype if floating else torch.get_default_dtype(),
                           tensors[0].device if tensors else torch.device("cpu"), entries)
    try:
        record.skeleton = _copy_model(model, lambda t, owned: _like(t, "meta"))
    except Exception as error:  # noqa: BLE001 - an uncopyable model: keep a weak reference instead
        record.model, record.why_no_skeleton = _weak(model), _first_line(error)
    gm.meta[RECORD] = record
    return gm


def fingerprint(graph: fx.Graph) -> list[Entry]:
    """Stamp each node's capture index and return the graph's entries (in node order)."""
    index = {}
    for i, node in enumerate(graph.nodes):
        node.meta[INDEX] = i
        index[node] = i
    return [Entry(node.op, _key(node.target), node.name, node.meta.get("surgeon_path", ""),
                  _freeze(node.args, index), _freeze(node.kwargs, index), _alias_of(node, index))
            for node in graph.nodes]


def _freeze(value: Any, index: dict) -> Any:
    if isinstance(value, fx.Node):
        return Ref(index[value])
    if isinstance(value, (tuple, list)):
        return tuple(_freeze(v, index) for v in value)
    if isinstance(value, dict):
        return {k: _freeze(v, index) for k, v in value.items()}
    return value


def _alias_of(node: fx.Node, index: dict) -> int | None:
    """The index of the input a `.to` node returned unchanged (same dtype and device), else None."""
    packet = getattr(node.target, "overloadpacket", None)
    if node.op != "call_function" or packet is not torch.ops.aten.to or not node.args \
            or not isinstance(node.args[0], fx.Node):
        return None
    out, src = node.meta.get("val"), node.args[0].meta.get("val")
    if isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor) and out.dtype == src.dtype \
            and out.device == src.device:
        return index[node.args[0]]
    return None


def _key(target: Any) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"


def _weak(model: nn.Module):
    try:
        return weakref.ref(model)
    except TypeError:
        return None


def _like(t: torch.Tensor, device: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    new = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=dtype or t.dtype, device=device)
    return nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new


def _copy_model(model: nn.Module, make: Callable[[torch.Tensor, bool], torch.Tensor]) -> nn.Module:
    """A deep copy of `model` whose tensors are `make(tensor, owned)`'s (owned: a parameter or buffer,
    which `.to(dtype)` converts; plain tensor attributes are not owned); no weight is copied."""
    owned = {id(t) for t in (*model.parameters(), *model.buffers())}
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in (*module._parameters.values(), *module._buffers.values(), *vars(module).values()):
            if isinstance(value, torch.Tensor) and id(value) not in memo:
                memo[id(value)] = make(value, id(value) in owned)
    return copy.deepcopy(model, memo)


def _first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


# ---------------------------------------------------------------- the move

@dataclass
class Move:
    old_dtype: torch.dtype
    old_device: torch.device
    new_dtype: torch.dtype
    new_device: torch.device


class _Refused(Exception):
    """Why a move cannot be made (prepare turns it into a SurgeonError naming the module and the fix)."""


def current(gm: fx.GraphModule) -> tuple[torch.dtype, torch.device]:
    """The module's dtype and device: its `_surgeon_dtype` buffer's, or its first floating tensor's."""
    buffer = gm._buffers.get(BUFFER)
    if buffer is not None:
        return buffer.dtype, buffer.device
    return gm.dtype, gm.device


def prepare(gm: fx.GraphModule, fn: Callable) -> Move | None:
    """Before `nn.Module._apply(fn)` converts anything: where `fn` takes the module, and the graph made to
    read what follows the module at run time (see the module docstring); SurgeonError if it cannot."""
    old_dtype, old_device = current(gm)
    try:
        sample = fn(torch.empty(0, dtype=old_dtype, device=old_device))
    except Exception:  # noqa: BLE001 - torch's own conversion raises the same error, unchanged
        return None
    if not isinstance(sample, torch.Tensor):
        return None
    move = Move(old_dtype, old_device, sample.dtype, sample.device)
    dtype_moves = move.new_dtype != old_dtype
    if not dtype_moves and _same_device(move.new_device, old_device):
        return None
    record = gm.meta.get(RECORD)
    name = type(gm).__name__
    try:
        if dtype_moves:
            if not move.new_dtype.is_floating_point:
                raise _Refused(f"{move.new_dtype} is not a floating dtype")
            _check_lowered(gm, old_dtype)
            if record is not None and not any(INDEX in n.meta for n in gm.graph.nodes):
                record = None    # an unpickled module: its nodes lost their capture indices
            if record is None:
                _check_unrecorded(gm, old_dtype)
            else:
                _probe_once(record, move.new_dtype)
        _rewrite(gm, record, old_dtype, old_device, dtype_moves)
    except _Refused as why:
        raise SurgeonError(f"{name}: cannot move to {move.new_dtype if dtype_moves else move.new_device}: "
                           f"{str(why).rstrip('. ')}; "
                           f"compile the model in {move.new_dtype} instead (convert the model before "
                           f"surgeon.compile). This module is unchanged and still runs in {old_dtype} on "
                           f"{old_device}") from None
    return move


def finish(gm: fx.GraphModule, move: Move) -> None:
    """After the tensors moved: the nodes' shape metadata (meta["val"]) in the new dtype and device, so
    passes run after a move see what the module computes."""
    refresh_values(gm, move)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _check_lowered(gm: fx.GraphModule, dtype: torch.dtype) -> None:
    """Lowered regions whose encoded programs name dtypes (surgeon::pointwise, a lora_linear epilogue program)
    run only in those; lora_linear and bottleneck calls without one take any dtype."""
    fixed = [n for n in gm.graph.nodes if n.op == "call_function" and _key(n.target).startswith("surgeon.")
             and any(isinstance(v, str) and '"dtype"' in v for _, v in _leaves(n))]
    if not fixed:
        return
    pointwise = [n for n in fixed if _key(n.target).startswith("surgeon.pointwise")]
    if pointwise:
        raise _Refused(f"it has {len(pointwise)} lowered elementwise regions (surgeon::pointwise, e.g. node "
                       f"'{pointwise[0].name}') whose generated programs are fixed to {dtype}; lower with "
                       "`elementwise: false` to keep them movable")
    raise _Refused(f"it has lowered regions whose generated epilogue programs are fixed to {dtype} (e.g. node "
                   f"'{fixed[0].name}', {_key(fixed[0].target)})")


def _check_unrecorded(gm: fx.GraphModule, dtype: torch.dtype) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.meta.get("surgeon_pass") != MADE_BY and any(
                v == dtype for v in _constants(node) if isinstance(v, torch.dtype)):
            raise _Refused(f"it has no capture record (it was not captured by surgeon, or was unpickled, which "
                           f"loses node identities), so which of its {dtype} constants (e.g. in node "
                           f"'{node.name}') follow the module's dtype is unknown")


def _constants(node: fx.Node) -> list:
    found: list = []
    fx.node.map_aggregate((node.args, node.kwargs), found.append)
    return found


# ---------------------------------------------------------------- the probe

def _probe_once(record: CaptureRecord, dtype: torch.dtype) -> None:
    """Capture the model again in `dtype` (unless the graph is known right in it) and classify its constants
    (first probe) or check them against the first probe's classification (later ones)."""
    if dtype in record.verified:
        return
    entries = probe(record, dtype)
    if record.plan is None:
        plan = classify(record.entries, entries, record.dtype, dtype)
        record.general = _fixed_entries(record.entries, plan)
        record.plan = plan
    else:
        plan = classify(record.general, entries, record.dtype, dtype)
        if any(kind[0] == "node" for edits in plan.values() for _, kind in edits) or \
                _constant_edits(plan) != _constant_edits(record.plan):
            moved = sorted(_constant_edits(plan) ^ _constant_edits(record.plan))
            where = record.entries[moved[0][0]] if moved else None
            raise _Refused(f"the model's graph in {dtype} differs from the one its earlier moves were checked on"
                           + (f" at node '{where.name}' ({where.target}, module '{where.path}')" if where else ""))
    record.verified.add(dtype)


def probe(record: CaptureRecord, dtype: torch.dtype) -> list[Entry]:
    """The entries of the model captured in `dtype` on fake tensors (no weights), as capture did."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    source = record.skeleton
    if source is None:
        source = record.model() if record.model is not None else None
        if source is None:
            raise _Refused(f"its graph was captured in {record.dtype}, and telling which of its dtype constants "
                           f"follow the module needs the model it was compiled from ({record.model_name}), which "
                           "is gone (it could not be copied without its weights at capture: "
                           f"{record.why_no_skeleton or 'no reference kept'})")
    mode = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())

    def fake(t: torch.Tensor, converts: bool) -> torch.Tensor:
        device = record.device if t.device.type == "meta" else t.device
        with mode:
            return _like(t, device, dtype if converts and t.is_floating_point() else t.dtype)

    try:
        model = _copy_model(source, fake).eval()
        # the example itself (small), converted: inputs made fake here would carry static sizes, and
        # export would then leave out the symbolic-size nodes the dynamic capture has
        args, kwargs = pytree.tree_map(
            lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype == record.dtype else t,
            (record.args, record.tensor_kwargs))
        gm = record.frontend(model, args, kwargs, dict(record.constants))
    except Exception as error:  # noqa: BLE001 - the model itself (or export) fails in that dtype
        raise _Refused(f"its graph was captured in {record.dtype}, and telling which of its dtype constants follow "
                       f"the module needs {record.model_name} captured once more in {dtype} (on fake tensors, "
                       f"no weights copied), which failed: {_first_line(error)}") from None
    return fingerprint(gm.graph)


def classify(real: list[Entry], probe: list[Entry], dtype: torch.dtype, probe_dtype: torch.dtype) -> dict:
    """Align the capture (in `dtype`) with the probe (in `probe_dtype`) node by node: captured index ->
    [(argument path, edit)], edit ("dtype",) | ("finfo", attr) | ("node", from_index, to_index)."""
    plan: dict[int, list] = {}
    for i in range(max(len(real), len(probe))):
        if i >= len(real) or i >= len(probe):
            extra = (probe if i < len(probe) else real)[i]
            raise _Refused(f"the model's graph in {probe_dtype} differs from the one captured in {dtype}: "
                           f"{len(probe)} nodes against {len(real)} (from node '{extra.name}', {extra.target})")
        r, p = real[i], probe[i]
        where = f"at node '{r.name}' ({r.target}, module '{r.path}')"
        if (r.op, r.target) != (p.op, p.target):
            raise _Refused(f"the model's graph in {probe_dtype} differs from the one captured in {dtype} {where}: "
                           f"{p.target} there")
        edits: list = []
        try:
            _walk(r.args, p.args, ("args",), edits, real, probe, dtype, probe_dtype)
            _walk(r.kwargs, p.kwargs, ("kwargs",), edits, real, probe, dtype, probe_dtype)
        except _Refused as why:
            raise _Refused(f"the model's graph in {probe_dtype} differs from the one captured in {dtype} {where}: "
                           f"{why}") from None
        if edits:
            plan[i] = edits
    return plan


def _walk(r: Any, p: Any, path: tuple, edits: list, real: list[Entry], probe: list[Entry],
          dtype: torch.dtype, probe_dtype: torch.dtype) -> None:
    if isinstance(r, Ref) and isinstance(p, Ref):
        if r.index == p.index or probe[p.index].alias_of == r.index:
            return                                   # the same node, or the probe's no-op `.to` of it
        if real[r.index].alias_of == p.index:        # the capture's no-op `.to` where the probe reads its input
            edits.append((path, ("node", r.index, p.index)))
            return
        raise _Refused(f"it reads '{real[r.index].name}' in {dtype} but '{probe[p.index].name}' in {probe_dtype}")
    if isinstance(r, Ref) or isinstance(p, Ref):
        raise _Refused(f"argument {_show_path(path)} is {_show(r, real)} in {dtype} but {_show(p, probe)} in "
                       f"{probe_dtype}")
    if isinstance(r, tuple) and isinstance(p, tuple) and len(r) == len(p):
        for k, (a, b) in enumerate(zip(r, p)):
            _walk(a, b, path + (k,), edits, real, probe, dtype, probe_dtype)
        return
    if isinstance(r, dict) and isinstance(p, dict) and r.keys() == p.keys():
        for k in r:
            _walk(r[k], p[k], path + (k,), edits, real, probe, dtype, probe_dtype)
        return
    if isinstance(r, torch.dtype) and isinstance(p, torch.dtype):
        if r == p:
            return
        if r == dtype and p == probe_dtype:
            edits.append((path, ("dtype",)))
            return
        raise _Refused(f"argument {_show_path(path)} is {r} in {dtype} but {p} in {probe_dtype}")
    if type(r) is float and type(p) is float:
        if r == p or (math.isnan(r) and math.isnan(p)):
            return
        for attr in FINFO:
            if r == getattr(torch.finfo(dtype), attr) and p == getattr(torch.finfo(probe_dtype), attr):
                edits.append((path, ("finfo", attr)))
                return
        raise _Refused(f"argument {_show_path(path)} is the constant {r!r} in {dtype} but {p!r} in {probe_dtype}")
    if type(r) is type(p) and _equal(r, p):
        return
    raise _Refused(f"argument {_show_path(path)} is {r!r} in {dtype} but {p!r} in {probe_dtype}")


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False


def _show(value: Any, entries: list[Entry]) -> str:
    return f"node '{entries[value.index].name}'" if isinstance(value, Ref) else repr(value)


def _show_path(path: tuple) -> str:
    head, *rest = path
    return (f"{rest[0]}" if head == "kwargs" and rest else f"#{rest[0]}" if rest else head) + \
        "".join(f"[{k}]" for k in rest[1:])


def _constant_edits(plan: dict) -> set:
    return {(i, path, kind) for i, edits in plan.items() for path, kind in edits if kind[0] != "node"}


def _fixed_entries(entries: list[Entry], plan: dict) -> list[Entry]:
    """`entries` with the plan's argument fixes applied (what the graph reads after the first move)."""
    out = list(entries)
    for i, edits in plan.items():
        entry = out[i]
        parts = {"args": entry.args, "kwargs": entry.kwargs}
        for path, kind in edits:
            if kind[0] == "node":
                parts[path[0]] = _replace(parts[path[0]], path[1:], Ref(kind[2]))
        out[i] = Entry(entry.op, entry.target, entry.name, entry.path, parts["args"], parts["kwargs"],
                       entry.alias_of)
    return out


# ---------------------------------------------------------------- the rewrite

def _get(container: Any, path: tuple) -> Any:
    for k in path:
        container = container[k]
    return container


def _replace(container: Any, path: tuple, value: Any) -> Any:
    """`container` (nested tuples, lists, dicts) with the item at `path` replaced; the rest shared."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(container, dict):
        return {**container, head: _replace(container[head], rest, value)}
    items = list(container)
    items[head] = _replace(items[head], rest, value)
    return type(container)(items) if isinstance(container, tuple) else items


class _Runtime:
    """The nodes reading the module's dtype and device at run time, made on first use."""

    def __init__(self, gm: fx.GraphModule, dtype: torch.dtype, device: torch.device):
        self.gm, self.dtype, self.device = gm, dtype, device
        self.nodes: dict[Any, fx.Node] = {}
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in RUNTIME:
                key = node.target if node.target is not finfo_value else (finfo_value, node.args[1])
                self.nodes[key] = node
            elif node.op == "get_attr" and node.target == BUFFER:
                self.nodes[BUFFER] = node

    def _make(self, key: Any, build: Callable[[], fx.Node], val: Any) -> fx.Node:
        if key not in self.nodes:
            graph = self.gm.graph
            anchor = self.nodes.get(BUFFER) if key != BUFFER else None
            if anchor is None:
                placeholders = list(graph.find_nodes(op="placeholder"))
                with (graph.inserting_after(placeholders[-1]) if placeholders else
                      graph.inserting_before(next(iter(graph.nodes)))):
                    node = build()
            else:
                last = max((n for n in self.nodes.values()), key=lambda n: _position(graph, n))
                with graph.inserting_after(last):
                    node = build()
            node.meta.update(surgeon_pass=MADE_BY, surgeon_path="", val=val)
            self.nodes[key] = node
        return self.nodes[key]

    def buffer(self) -> fx.Node:
        if BUFFER not in self.gm._buffers:
            self.gm.register_buffer(BUFFER, torch.empty(0, dtype=self.dtype, device=self.device), persistent=False)
        return self._make(BUFFER, lambda: self.gm.graph.get_attr(BUFFER), self.gm._buffers[BUFFER])

    def dtype_node(self) -> fx.Node:
        ref = self.buffer()
        return self._make(tensor_dtype, lambda: self.gm.graph.call_function(tensor_dtype, (ref,)), self.dtype)

    def device_node(self) -> fx.Node:
        ref = self.buffer()
        return self._make(tensor_device, lambda: self.gm.graph.call_function(tensor_device, (ref,)), self.device)

    def finfo_node(self, attr: str) -> fx.Node:
        dtype = self.dtype_node()
        return self._make((finfo_value, attr), lambda: self.gm.graph.call_function(finfo_value, (dtype, attr)),
                          getattr(torch.finfo(self.dtype), attr))


def _position(graph: fx.Graph, node: fx.Node) -> int:
    return next(i for i, n in enumerate(graph.nodes) if n is node)


def _rewrite(gm: fx.GraphModule, record: CaptureRecord | None, dtype: torch.dtype, device: torch.device,
             dtype_moves: bool) -> None:
    """Make every following constant a run-time read (see the module docstring). Checks first, then edits."""
    edits: list[tuple[fx.Node, tuple, Any]] = []     # (node, argument path, what: "dtype" | "device" | ("finfo", a) | node)
    by_index: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if INDEX in node.meta:
            by_index.setdefault(node.meta[INDEX], []).append(node)
    planned: set[fx.Node] = set()
    if record is not None and record.plan is not None:
        edits += _captured_edits(gm, record, by_index, planned)
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or node.meta.get("surgeon_pass") == MADE_BY:
            continue
        captured = INDEX in node.meta
        for path, value in _leaves(node):
            if isinstance(value, torch.device) and _same_device(value, device):
                edits.append((node, path, "device"))
            elif isinstance(value, torch.dtype) and value == dtype and value.is_floating_point and not captured:
                edits.append((node, path, "dtype"))
    if not edits:
        return
    runtime = _Runtime(gm, dtype, device)
    for node, path, what in edits:
        part = path[0]
        value = (runtime.dtype_node() if what == "dtype" else runtime.device_node() if what == "device"
                 else runtime.finfo_node(what[1]) if isinstance(what, tuple) else what)
        if part == "args":
            node.args = _replace(node.args, path[1:], value)
        else:
            node.kwargs = _replace(node.kwargs, path[1:], value)
    for node in planned:
        node.meta[DONE] = True
    gm.graph.lint()
    recompile(gm)


def _leaves(node: fx.Node):
    """(path, value) of every leaf (a constant or a node) of the node's arguments."""
    yield from _walk_leaves(node.args, node.kwargs)


def _walk_leaves(args: Any, kwargs: Any):
    def walk(value, path):
        if isinstance(value, (tuple, list)):
            for k, v in enumerate(value):
                yield from walk(v, path + (k,))
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, path + (k,))
        else:
            yield path, value
    yield from walk(args, ("args",))
    yield from walk(kwargs, ("kwargs",))


def _captured_edits(gm: fx.GraphModule, record: CaptureRecord, by_index: dict, planned: set) -> list:
    """The first probe's edits on the captured nodes still in the graph (a pass may have changed an
    argument since: then that one is left as the pass made it)."""
    dtype = record.dtype
    edits = []
    for i, changes in record.plan.items():
        for node in by_index.get(i, []):
            if node.meta.get(DONE) or _key(node.target) != record.entries[i].target:
                continue
            planned.add(node)
            for path, kind in changes:
                try:
                    value = _get(node.args if path[0] == "args" else node.kwargs, path[1:])
                except (KeyError, IndexError, TypeError):
                    continue
                if kind[0] == "dtype" and value == dtype:
                    edits.append((node, path, "dtype"))
                elif kind[0] == "finfo" and type(value) is float and value == getattr(torch.finfo(dtype), kind[1]):
                    edits.append((node, path, ("finfo", kind[1])))
                elif kind[0] == "node" and isinstance(value, fx.Node) and value.meta.get(INDEX) == kind[1]:
                    # the cast's input now: the captured node, or what a pass put in its place
                    source = value.args[0] if value.args else None
                    if getattr(value.target, "overloadpacket", None) is not torch.ops.aten.to or \
                            not isinstance(source, fx.Node):
                        raise _Refused(f"node '{node.name}' must read the input of the no-op cast '{value.name}' "
                                       f"(export read it through that cast in {dtype}), which a pass changed")
                    edits.append((node, path, source))
    return edits + _alias_reader_edits(record, by_index)


def _alias_reader_edits(record: CaptureRecord, by_index: dict) -> list:
    """Nodes a pass made that read a no-op cast whose captured readers the probe splits (some read its
    input): such a node stands in for the captured readers that are gone (e.g. a residual add lowered
    into a kernel), or sits beside those of its own module (an adapter beside its site), and reads what
    they read. Where that is not one answer, the move is refused naming the node."""
    moved_off: dict[int, set[int]] = {}      # alias index -> captured readers the probe reads its input in
    for i, changes in record.plan.items():
        for _, kind in changes:
            if kind[0] == "node":
                moved_off.setdefault(kind[1], set()).add(i)
    edits = []
    for index, off in moved_off.items():
        stay = {j for j, entry in enumerate(record.general) if _reads(entry, index)}
        gone = {j for j in off | stay if j not in by_index}
        for alias in by_index.get(index, []):
            for user in list(alias.users):
                if INDEX in user.meta or user.meta.get("surgeon_pass") == MADE_BY:
                    continue
                beside = {j for j in off | stay if j in by_index and any(
                    n.meta.get("surgeon_path") == user.meta.get("surgeon_path") for n in by_index[j])}
                reads_input = _one_answer(gone & off, gone & stay) or _one_answer(beside & off, beside & stay)
                if reads_input is None:
                    raise _Refused(f"node '{user.name}' (made by pass '{user.meta.get('surgeon_pass', '?')}') reads "
                                   f"'{alias.name}', a cast that changes nothing in {record.dtype} and whose captured "
                                   "readers split between it and its input in other dtypes; which one the pass means "
                                   "is unknown")
                if reads_input:
                    edits += [(user, path, alias.args[0]) for path, value in _leaves(user) if value is alias]
    return edits


def _one_answer(off: set, stay: set) -> bool | None:
    """True: read the cast's input; False: read the cast; None: no single answer."""
    if off and not stay:
        return True
    if stay and not off:
        return False
    return None


def _reads(entry: Entry, index: int) -> bool:
    return any(value == Ref(index) for _, value in _walk_leaves(entry.args, entry.kwargs))


# ---------------------------------------------------------------- shape metadata after a move

def refresh_values(gm: fx.GraphModule, move: Move) -> None:
    """Each node's meta["val"] recomputed for the moved module: under the capture's fake mode from the
    inputs (floating inputs take the module's new dtype, inputs on its old device its new one) and the
    moved tensors; a node whose op fails there keeps its value, moved the same way."""
    from torch._subclasses.fake_tensor import FakeTensor

    fake_mode = next((n.meta["val"].fake_mode for n in gm.graph.find_nodes(op="placeholder")
                      if isinstance(n.meta.get("val"), FakeTensor)), None)

    def moved(val: Any) -> Any:
        if not isinstance(val, torch.Tensor):
            return val
        dtype = move.new_dtype if val.is_floating_point() and val.dtype == move.old_dtype else val.dtype
        device = move.new_device if _same_device(val.device, move.old_device) else val.device
        if (dtype, device) == (val.dtype, val.device):
            return val
        try:
            return val.to(device=device, dtype=dtype)
        except Exception:  # noqa: BLE001 - e.g. a fake tensor cannot claim a device this machine lacks
            try:
                return val.to(dtype=dtype)
            except Exception:  # noqa: BLE001
                return val

    env: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        old = node.meta.get("val")
        new = old
        try:
            if node.op == "placeholder":
                new = moved(old)
            elif node.op == "get_attr":
                tensor = _get_attr(gm, node.target)
                if isinstance(tensor, torch.Tensor):
                    new = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode is not None else \
                        torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
            elif node.op == "call_function" and fake_mode is not None and old is not None:
                args, kwargs = fx.node.map_aggregate((node.args, node.kwargs),
                                                     lambda v: env.get(v) if isinstance(v, fx.Node) else v)
                with fake_mode:
                    new = node.target(*args, **kwargs)
            elif node.op != "output":
                new = moved(old) if not isinstance(old, (tuple, list)) else type(old)(moved(v) for v in old)
        except Exception:  # noqa: BLE001 - metadata only: keep the old value, moved
            new = moved(old) if not isinstance(old, (tuple, list)) else type(old)(moved(v) for v in old)
        if new is not None and node.op != "output":
            node.meta["val"] = new
        env[node] = new


def _get_attr(module: nn.Module, target: str) -> Any:
    value: Any = module
    for atom in target.split("."):
        value = getattr(value, atom)
    return value
