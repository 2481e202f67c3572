"""A call of the original forward, mapped onto the captured graph's inputs.

The graph takes its tensor inputs as flat positional arguments (the example's positional and tensor
keyword inputs). `Inputs.bind` accepts what the model itself accepted: the original forward's
arguments by position or by name; a non-tensor keyword baked at capture (`use_cache=False`) when
it equals the baked value; an optional input left at its default; an optional input the compile
added (`attention_mask`, filled with ones when a call omits it). Everything else is refused with
InputError naming the argument and what to compile instead. Then each tensor's shape is checked
against what the graph accepts: static sizes, and the range of each dynamic size (a size the
model constrains, e.g. a position table's length), the same symbol the same size everywhere.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InputError


@dataclass(frozen=True)
class Dim:
    """One dimension of a graph input: a static size, or a symbol with its inclusive range."""

    size: int | None = None          # static
    symbol: str | None = None        # dynamic
    low: int = 0
    high: int | None = None          # None: unbounded

    def describe(self) -> str:
        if self.size is not None:
            return str(self.size)
        high = "" if self.high is None else str(self.high)
        return f"{self.symbol} in {self.low}..{high}"


@dataclass(frozen=True)
class Fill:
    """How an optional input the compile added is made when a call omits it: `kind` of `like`'s shape."""

    kind: str      # "ones" | "zeros" | "positions"
    like: str      # the graph input whose (batch, length) it takes
    dtype: torch.dtype = torch.long

    def make(self, like: torch.Tensor) -> torch.Tensor:
        shape = tuple(like.shape[:2])
        if self.kind == "positions":
            return torch.arange(shape[-1], device=like.device, dtype=self.dtype).expand(shape)
        return (torch.ones if self.kind == "ones" else torch.zeros)(shape, dtype=self.dtype, device=like.device)


def fill_input(value: torch.Tensor | None, like: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The graph's first op for an optional input: the value given, or the fill when a call left it out."""
    return value if value is not None else Fill(kind, "", dtype).make(like)


def install_fills(gm, fills: dict[str, Fill]) -> None:
    """Make each optional input's placeholder default to None and fill it inside the graph, so the graph
    takes calls without it from any caller (torch.export and torch.compile of the module included)."""
    graph = gm.graph
    placeholders = {n.target: n for n in graph.find_nodes(op="placeholder")}
    last = list(placeholders.values())[-1]
    for name, fill in fills.items():
        node = placeholders[name]
        node.args = (None,)
        with graph.inserting_after(last):
            filled = graph.call_function(fill_input, (node, placeholders[fill.like], fill.kind, fill.dtype))
        node.replace_all_uses_with(filled, delete_user_cb=lambda user: user is not filled)
        filled.meta.update({k: v for k, v in node.meta.items() if k == "val"}, surgeon_path="",
                           surgeon_pass="capture")
        last = filled


_MISSING = object()


@dataclass
class Inputs:
    """How calls map onto the graph: see the module docstring."""

    model: str                                   # the model's class name, for messages
    names: tuple[str, ...]                       # the graph's inputs, in order
    signature: inspect.Signature | None = None   # the original forward's (None: positional inputs only)
    baked: dict[str, Any] = field(default_factory=dict)
    fills: dict[str, Fill] = field(default_factory=dict)
    shapes: dict[str, tuple[Dim, ...]] = field(default_factory=dict)
    static: bool = False                         # captured with static shapes on request
    notes: list[str] = field(default_factory=list)

    def bind(self, args: tuple, kwargs: dict) -> tuple:
        """The graph's positional inputs for a call of the original forward, checked; InputError if not.
        An optional input the call leaves out is None: the graph fills it (`fill_input`)."""
        if not kwargs and len(args) <= self._positional() and all(isinstance(a, torch.Tensor) for a in args) \
                and all(name in self.fills for name in self.names[len(args):]):
            values = args + (None,) * (len(self.names) - len(args))   # the common call: the example's form
        else:
            values = self._from_call(args, kwargs)
        self.check_shapes(values)
        return values

    def _positional(self) -> int:
        """How many leading graph inputs are also the original forward's leading parameters, in order."""
        if "_prefix" not in self.__dict__:
            params = list(self.signature.parameters.values()) if self.signature else []
            count = 0
            for name, param in zip(self.names, params):
                if name != param.name or param.kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                            inspect.Parameter.POSITIONAL_OR_KEYWORD):
                    break
                count += 1
            self.__dict__["_prefix"] = count if self.signature else len(self.names)
        return self.__dict__["_prefix"]

    def _from_call(self, args: tuple, kwargs: dict) -> tuple:
        given = self._arguments(args, kwargs)
        found = {name: given.pop(name) for name in self.names if given.get(name) is not None}
        for name in self.names:
            if name not in found:
                fill = self.fills.get(name)
                if fill is None or fill.like not in found:
                    raise InputError(f"{self.model}: the input '{name}' is missing; the graph was captured with "
                                     "it as a tensor input, so every call must give one")
                found[name] = None   # the graph fills it
        for name, value in given.items():
            self._check_extra(name, value)
        return tuple(found[name] for name in self.names)

    def _arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        if self.signature is None:
            if len(args) > len(self.names):
                raise InputError(f"{self.model}: {len(args)} positional inputs given; the graph takes "
                                 f"{len(self.names)} ({', '.join(self.names)})")
            return {**dict(zip(self.names, args)), **kwargs}
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as error:
            raise InputError(f"{self.model}: {error} (the original forward{self.signature})") from None
        given = {}
        for name, value in bound.arguments.items():
            kind = self.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                given.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                given.update({f"{name}_{i}": v for i, v in enumerate(value)})
            else:
                given[name] = value
        return given

    def _check_extra(self, name: str, value: Any) -> None:
        """An argument the graph has no input for: fine if baked to this value or left at its default."""
        if name in self.baked:
            if not _same(value, self.baked[name]):
                raise InputError(f"{self.model}: {name}={_show(value)} differs from the value baked into the graph "
                                 f"at capture ({name}={_show(self.baked[name])}); compile again with "
                                 f"example_kwargs={{{name!r}: {_show(value)}}} for that")
            return
        parameter = self.signature.parameters.get(name) if self.signature else None
        if value is None or (parameter is not None and parameter.default is not inspect.Parameter.empty
                             and _same(value, parameter.default)):
            return
        if isinstance(value, torch.Tensor):
            raise InputError(f"{self.model}: '{name}' was not part of the example, so the graph has no input for it; "
                             f"pass one when compiling (example_kwargs={{{name!r}: <a tensor like this one>}}) to "
                             "capture it as an input")
        raise InputError(f"{self.model}: {name}={_show(value)} was not given at capture, so the graph was built "
                         f"without it; compile with example_kwargs={{{name!r}: {_show(value)}}} to bake it")

    def check_shapes(self, values: tuple) -> None:
        sizes: dict[str, tuple[int, str]] = {}
        for name, value in zip(self.names, values):
            dims = self.shapes.get(name)
            if dims is None or value is None:
                continue
            if value.dim() != len(dims):
                raise InputError(f"{self.model}: input '{name}' has {value.dim()} dimensions "
                                 f"{tuple(value.shape)}; the graph takes {len(dims)} ({self._captured(name)})")
            for axis, (size, dim) in enumerate(zip(value.shape, dims)):
                if dim.size is not None and size != dim.size:
                    raise InputError(f"{self.model}: input '{name}' has shape {tuple(value.shape)}, but dimension "
                                     f"{axis} was captured static at {dim.size} ({self._captured(name)}); "
                                     + self._how_to_vary())
                if dim.symbol is None:
                    continue
                if size < dim.low or (dim.high is not None and size > dim.high):
                    raise InputError(f"{self.model}: input '{name}' has shape {tuple(value.shape)}, but the graph "
                                     f"accepts {dim.low}..{'' if dim.high is None else dim.high} for dimension "
                                     f"{axis} ({self._captured(name)}): the model limits it")
                seen = sizes.setdefault(dim.symbol, (size, f"{name}[{axis}]"))
                if seen[0] != size:
                    raise InputError(f"{self.model}: {name}[{axis}] is {size} but {seen[1]} is {seen[0]}; the graph "
                                     f"needs them equal (both are {dim.symbol})")

    def _captured(self, name: str) -> str:
        return f"captured as ({', '.join(d.describe() for d in self.shapes[name])})"

    def _how_to_vary(self) -> str:
        if self.static:
            return ("it was compiled with static shapes: drop `static_shapes: true` / dynamic=False, "
                    "or compile for this shape")
        return ("the model fixes it, or torch.export specialized it; compile with dynamic_shapes= naming this "
                "dimension to make it vary")


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are not the same
        return False


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
