"""Applying, recording and inverting group permutations (shared by co-permute, permute-nm, un-permute).

A permutation of a group is an element-level gather order `perm` (new[i] = old[perm[i]]) over the
group's `size` channels that moves whole `unit` blocks. Applying it gathers every member tensor
along its axis inside its [start, stop) segment; each changed tensor is a new tensor (parameters
through surgeon.graph.set_parameter with their requires_grad kept, buffers re-registered), so the
user's weights are never written. Every name a tied tensor has is given the new tensor.
Each application is recorded in gm.meta["surgeon_permutations"] (plain JSON-able data: the
members and the gather order) so un-permute can restore the original layout exactly.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..graph import get_tensor, set_parameter

META = "surgeon_permutations"


def unit_perm_to_elements(order: list[int], unit: int) -> list[int]:
    """Expand a gather order over blocks of `unit` channels into one over channels."""
    return [block * unit + i for block in order for i in range(unit)]


def first_order(count: int, chosen: list[int]) -> list[int]:
    """A gather order that puts `chosen` first (in ascending order), then the rest in order."""
    picked = sorted(set(chosen))
    return picked + [i for i in range(count) if i not in set(picked)]


def channel_scores(gm: fx.GraphModule, group: dict) -> torch.Tensor:
    """Per channel of the group: sum of |w| over every parameter slice that moves with it."""
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    total = torch.zeros(group["size"], dtype=torch.float64)
    for m in group["members"]:
        if m["tensor"] not in params:
            continue            # buffers (running statistics) carry no magnitude
        tensor = get_tensor(gm, m["tensor"]).detach()
        piece = tensor.narrow(m["axis"], m["start"], m["stop"] - m["start"]).movedim(m["axis"], 0)
        total += piece.reshape(piece.shape[0], -1).abs().double().sum(1).cpu()
    return total


def unit_scores(gm: fx.GraphModule, group: dict) -> torch.Tensor:
    return channel_scores(gm, group).reshape(group["units"], group["unit"]).sum(1)


def _aliases(gm: fx.GraphModule, target: str) -> list[str]:
    tensor = get_tensor(gm, target)
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    return sorted({name for name, t in named if t is tensor} | {target})


def set_tensor(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Store `value` as the tensor at `target` and at every other name of the same tensor."""
    old = get_tensor(gm, target)
    new_param = None
    for name in _aliases(gm, target):
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if attr in owner._parameters:
            if new_param is None:
                set_parameter(gm, name, value, requires_grad=old.requires_grad)
                new_param = owner._parameters[attr]
            else:
                del owner._parameters[attr]
                owner.register_parameter(attr, new_param)
        else:
            persistent = attr not in owner._non_persistent_buffers_set
            owner.register_buffer(attr, value, persistent=persistent)


def apply(gm: fx.GraphModule, entries: list[dict]) -> list[str]:
    """Apply each entry's gather order to its members; returns the tensors changed."""
    plan: dict[str, dict[int, torch.Tensor]] = {}
    for entry in entries:
        perm = torch.as_tensor(entry["perm"], dtype=torch.long)
        for m in entry["members"]:
            tensor = get_tensor(gm, m["tensor"])
            axes = plan.setdefault(m["tensor"], {})
            index = axes.setdefault(m["axis"], torch.arange(tensor.shape[m["axis"]]))
            index[m["start"]:m["stop"]] = index[m["start"]:m["stop"]][perm]
    for target, axes in plan.items():
        value = get_tensor(gm, target).detach()
        for axis, index in axes.items():
            value = value.index_select(axis, index.to(value.device))
        set_tensor(gm, target, value)
    return sorted(plan)


def entry(group: dict, perm: list[int], **extra) -> dict:
    """A permutation record for one group (JSON-able)."""
    return {"group": group["key"], "kind": group["kind"], "unit": group["unit"], "size": group["size"],
            "perm": [int(i) for i in perm], "members": [dict(m) for m in group["members"]], **extra}


def record(gm: fx.GraphModule, made_by: str, entries: list[dict]) -> None:
    gm.meta.setdefault(META, []).append({"pass": made_by, "groups": entries})


def inverse(perm: list[int]) -> list[int]:
    out = [0] * len(perm)
    for new, old in enumerate(perm):
        out[old] = new
    return out
