"""Capture, checked against the model itself on the example and on a second shape.

`capture_verified` is what `surgeon.compile` captures with. A graph that bakes a size would pass a
check on the example alone, so the check also runs on a second example derived from the first:
every dynamic size changed by one (a length of 8 becomes 7), by slicing (or, to grow, repeating)
the example's own values. The captures tried, in order, until one reproduces the model on both:
  1. every input dimension dynamic from 2 up (torch.export's default for Dim.AUTO), which keeps the
     ranges the model limits (a position table's length); then each size is tried at 1 against the
     model (a batch of one, a one-token step) and its range widened to 1 where the graph agrees;
  2. every input dimension dynamic, sizes of 0 and 1 included (torch's size-oblivious reasoning:
     tried first when the example itself has a size of 0 or 1, which export would otherwise fix);
  3. the example's static shapes (what `static_shapes: true` asks for directly).
Each fallback leaves a note saying why, in the capture row of the report and on the module.

`optional_inputs` adds what a tokenizer returns and the example left out (`attention_mask`,
`token_type_ids`) as graph inputs when the model gives the same outputs with them filled
(ones, zeros) as without, so `module(**tokenizer(...))` works; a call that omits them gets the fill.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from .capture import capture, split_kwargs
from .errors import SpecError
from .inputs import Fill, Inputs
from .modes import evaluating
from .pipeline import compare, compute_dtypes

# optional inputs a tokenizer returns: name -> (fill kind, the input whose shape it takes)
OPTIONAL = {"attention_mask": ("ones", "input_ids"), "token_type_ids": ("zeros", "input_ids"),
            "decoder_attention_mask": ("ones", "decoder_input_ids")}


def leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def eager(model: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    with evaluating(model), torch.no_grad():
        return leaves(model(*args, **kwargs))


def optional_inputs(model: nn.Module, args: tuple, kwargs: dict | None) -> tuple[dict, dict[str, Fill]]:
    """`kwargs` plus the optional tokenizer inputs that change nothing when filled, and their fills."""
    kwargs = dict(kwargs or {})
    try:
        signature = inspect.signature(model.forward)
        given = signature.bind_partial(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return kwargs, {}
    fills, reference = {}, None
    for name, (kind, like) in OPTIONAL.items():
        ids = given.get(like)
        if name not in signature.parameters or given.get(name) is not None or not isinstance(ids, torch.Tensor) \
                or ids.dim() != 2 or ids.is_floating_point():
            continue
        fill = Fill(kind, like)
        try:
            reference = eager(model, args, kwargs) if reference is None else reference
            filled = eager(model, args, {**kwargs, name: fill.make(ids)})
        except Exception:  # noqa: BLE001 - a model that cannot take it filled: calls must leave it out
            continue
        if compare(reference, filled, "close", compute_dtypes(model))[0]:
            kwargs[name], fills[name] = fill.make(ids), fill
    return kwargs, fills


def capture_verified(model: nn.Module, args: tuple, kwargs: dict | None, dynamic_shapes: Any, dynamic: bool,
                     verify: bool) -> tuple[fx.GraphModule, str, list[tuple[tuple, dict]], list[str]]:
    """(graph, check, more examples to verify passes on, notes); SpecError if no capture reproduces the model."""
    attempts = [{"dynamic": dynamic, "dynamic_shapes": dynamic_shapes}]
    if dynamic and dynamic_shapes is None:
        tiny = any(size in (0, 1) for t in leaves((args, kwargs)) for size in t.shape)
        attempts = [{"dynamic": True, "small": tiny}, {"dynamic": True, "small": not tiny}, {"dynamic": False}]
    notes: list[str] = []
    for i, attempt in enumerate(attempts):
        gm = capture(model, args, kwargs, **attempt)
        inputs: Inputs = gm.meta["surgeon_inputs"]
        if not verify:
            return gm, "skipped", [], notes + inputs.notes
        tensors, constants = split_kwargs(kwargs)
        ok, check = compare(eager(model, args, kwargs), leaves(gm(*args, **tensors)), "close", compute_dtypes(gm))
        if not ok:
            raise SpecError("<model>", f"the captured graph does not reproduce the model: {check}")
        second = second_example(inputs, args, tensors)
        if second is None:
            return gm, check, [], notes + inputs.notes
        args2, tensors2 = second
        why = _check_second(model, gm, args2, {**tensors2, **constants}, tensors2)
        if why == REFUSED:
            notes.append(f"verified on the example only: the model itself does not take a second shape "
                         f"({_shapes(inputs.names, args2, tensors2)})")
            return gm, check, [], notes + inputs.notes
        if why is None:
            notes.append(f"verified on the example ({_shapes(inputs.names, args, tensors)}) and a second shape "
                         f"({_shapes(inputs.names, args2, tensors2)})")
            notes += widen_to_one(model, gm, inputs, args, tensors, constants)
            return gm, check, [(args2, tensors2)], notes + inputs.notes
        if i + 1 == len(attempts):
            raise SpecError("<model>", f"the captured graph does not reproduce the model at a second shape "
                                       f"({_shapes(inputs.names, args2, tensors2)}): {why}")
        notes.append(f"capture {i + 1} ({_describe(attempt)}) failed at a second shape "
                     f"({_shapes(inputs.names, args2, tensors2)}): {why}")
    raise AssertionError("unreachable")


REFUSED = "the model refuses the shape"


def widen_to_one(model, gm, inputs: Inputs, args: tuple, tensors: dict, constants: dict) -> list[str]:
    """Dynamic sizes whose range starts at 2 (export fixes sizes 0 and 1 when it sees them) tried at 1
    against the model, those of one example size together (an input's batch and its mask's batch are
    separate symbols); where the graph agrees, their range starts at 1 (a batch of one, one token)."""
    flat, spec = pytree.tree_flatten((args, tensors))
    positions = [i for i, leaf in enumerate(flat) if isinstance(leaf, torch.Tensor)]
    groups: dict[int, set[str]] = {}
    for name, i in zip(inputs.names, positions):
        for axis, dim in enumerate(inputs.shapes.get(name, ())):
            if dim.symbol and dim.low == 2:
                groups.setdefault(flat[i].shape[axis], set()).add(dim.symbol)
    widened: set[str] = set()
    for size, symbols in sorted(groups.items()):
        probe = list(flat)
        for name, i in zip(inputs.names, positions):
            for axis, dim in enumerate(inputs.shapes.get(name, ())):
                if dim.symbol in symbols:
                    probe[i] = _resize(probe[i], axis, 1)
        args1, tensors1 = pytree.tree_unflatten(probe, spec)
        try:
            reference = eager(model, args1, {**tensors1, **constants})
            with torch.no_grad():
                got = leaves(gm.forward(*(t for t in probe if isinstance(t, torch.Tensor))))
        except Exception:  # noqa: BLE001 - the model or the graph cannot take 1 there: the range stays
            continue
        if compare(reference, got, "close", compute_dtypes(gm))[0]:
            widened |= symbols
    if not widened:
        return []
    inputs.shapes = {name: tuple(dataclasses.replace(d, low=1) if d.symbol in widened else d for d in dims)
                     for name, dims in inputs.shapes.items()}
    where = [f"{name}[{axis}]" for name, dims in inputs.shapes.items() for axis, d in enumerate(dims)
             if d.symbol in widened]
    return [f"checked at size 1 too: {', '.join(where)} accept 1 and up"]


def _check_second(model, gm, args2, kwargs2, tensors2) -> str | None:
    """None when the graph matches the model at the second shape, REFUSED when the model itself fails
    there (nothing to compare), else why the graph differs."""
    try:
        reference = eager(model, args2, kwargs2)
    except Exception:  # noqa: BLE001 - the model does not take this shape either: nothing to compare
        return REFUSED
    try:
        ok, check = compare(reference, leaves(gm(*args2, **tensors2)), "close", compute_dtypes(gm))
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    return None if ok else check


def second_example(inputs: Inputs, args: tuple, tensors: dict) -> tuple[tuple, dict] | None:
    """The example with each dynamic size changed by one (down when its range allows, else up)."""
    flat, spec = pytree.tree_flatten((args, tensors))
    positions = [i for i, leaf in enumerate(flat) if isinstance(leaf, torch.Tensor)]
    if len(positions) != len(inputs.names) or not inputs.shapes:
        return None
    ranges: dict[int, list] = {}   # example size -> the dims of that size (moved together)
    for name, i in zip(inputs.names, positions):
        for axis, dim in enumerate(inputs.shapes.get(name, ())):
            if dim.symbol is not None and dim.symbol.isidentifier():
                ranges.setdefault(flat[i].shape[axis], []).append(dim)
    sizes: dict[str, int] = {}
    for size, dims in ranges.items():
        for new in (size - 1, size + 1):
            if all(new >= max(d.low, 1) and (d.high is None or new <= d.high) for d in dims):
                sizes.update({d.symbol: new for d in dims})
                break
    if not sizes:
        return None
    for name, i in zip(inputs.names, positions):
        for axis, dim in enumerate(inputs.shapes.get(name, ())):
            if dim.symbol in sizes:
                flat[i] = _resize(flat[i], axis, sizes[dim.symbol])
    return pytree.tree_unflatten(flat, spec)


def _resize(tensor: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """`tensor` cut to, or grown to (repeating its own values), `size` along `axis`."""
    while tensor.shape[axis] < size:
        tensor = torch.cat([tensor, tensor.narrow(axis, 0, min(tensor.shape[axis], size - tensor.shape[axis]))], axis)
    return tensor.narrow(axis, 0, size).contiguous()


def _shapes(names: tuple[str, ...], args: tuple, tensors: dict) -> str:
    found = [t for t in pytree.tree_leaves((args, tensors)) if isinstance(t, torch.Tensor)]
    return ", ".join(f"{name} {list(t.shape)}" for name, t in zip(names, found))


def _describe(attempt: dict) -> str:
    if not attempt.get("dynamic"):
        return "static shapes"
    return "dynamic, sizes 0 and 1 included" if attempt.get("small") else "dynamic from 2"
