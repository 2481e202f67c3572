"""permute-nm: permute channels so an N:M sparsity mask keeps more weight magnitude.

    - permute-nm: {n: 2, m: 4, apply_mask: false}

For every eligible channel group of surgeon.groups (unit 1; residual groups only with
allow_residual), the consumers are the members whose group axis is a weight's input-channel axis
(linear columns, addmm / Conv1D rows, conv2d input channels). An N:M mask keeps, in each row and
each run of M consecutive input channels, the N largest |w|. surgeon.groups.nm.search finds a gather
order of the group's channels (swap search from the identity) that maximizes the magnitude kept
over all consumers at once; the order is applied to every coupled tensor (producers' rows, biases,
norms), so the unmasked function is unchanged ("close"). With apply_mask the consumers are then
masked in the permuted layout (the function changes: "none"). The notes give, per group and in
total, the kept magnitude without and with the permutation (never lower with it); the permutation
is recorded for un-permute.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from surgeon.errors import SpecError
from surgeon.graph import get_tensor
from surgeon.groups import analyze_groups, eligible
from surgeon.groups.nm import nm_mask, search
from surgeon.groups.permute import apply, entry, record, set_tensor
from surgeon.pipeline import Context, PassResult

from .co_permute import adapter_tensors


@dataclass(frozen=True)
class PermuteNm:
    n: int = 2
    m: int = 4
    apply_mask: bool = False
    groups: str = "*"              # glob over group keys / module paths
    allow_residual: bool = False
    max_sweeps: int = 20
    name: ClassVar[str] = "permute-nm"

    def __post_init__(self) -> None:
        for key in ("n", "m", "max_sweeps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"permute-nm.{key}", f"must be a positive integer, got {value!r}")
        if self.n > self.m:
            raise SpecError("permute-nm.n", f"n={self.n} exceeds m={self.m}")

    def check(self, ctx: Context) -> str:
        return "none" if self.apply_mask else "close"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        spec = analyze_groups(gm, (ctx.example_args, ctx.example_kwargs))
        result, entries, consumers = PassResult(), [], []
        totals = [0.0, 0.0]
        adapters = adapter_tensors(ctx)
        for group in eligible(spec, self.allow_residual):
            if not (fnmatch.fnmatchcase(group["key"], self.groups) or fnmatch.fnmatchcase(group["path"], self.groups)) \
                    or {m["tensor"] for m in group["members"]} <= adapters:
                continue
            reason, inputs = self._consumers(gm, group)
            if reason:
                result.rejections.append((f"permute-nm @ {group['key']}", reason))
                continue
            matrix = torch.cat([_columns(gm, m) for m in inputs], dim=0)
            order, base, found = search(matrix, self.n, self.m, self.max_sweeps)
            totals[0], totals[1] = totals[0] + base, totals[1] + found
            result.notes.append(f"{group['key']}: {self.n}:{self.m} kept |w| {base:.6g} -> {found:.6g} "
                                f"({_percent(base, found)}) over {len(inputs)} consumer(s)")
            entries.append(entry(group, order, kept=[base, found], n=self.n, m=self.m))
            consumers += inputs
            result.matches += 1
        apply(gm, entries)
        record(gm, self.name, entries)
        if self.apply_mask:
            self._mask(gm, consumers)
        result.notes.append(f"total: {self.n}:{self.m} kept |w| {totals[0]:.6g} without the permutation, "
                            f"{totals[1]:.6g} with it ({_percent(*totals)})"
                            + (f"; mask applied to {len({m['tensor'] for m in consumers})} tensors"
                               if self.apply_mask else ""))
        return result

    def _consumers(self, gm: fx.GraphModule, group: dict) -> tuple[str, list[dict]]:
        """(why the group is skipped, or '') and its input-channel members."""
        if group["unit"] != 1:
            if group["unit"] % self.m == 0:
                return f"moves whole blocks of {group['unit']} channels ({group['kind']}): no permutation of " \
                       f"them changes which channels share a run of {self.m}", []
            return f"moves blocks of {group['unit']} channels ({group['kind']}): the search permutes single " \
                   "channels only", []
        inputs = [m for m in group["members"] if m["role"] == "in"]
        if not inputs:
            return "no consumer reads this group as input channels", []
        for m in inputs:
            length = get_tensor(gm, m["tensor"]).shape[m["axis"]]
            if m["start"] % self.m or (m["stop"] - m["start"]) % self.m or length % self.m:
                return f"{m['tensor']} axis {m['axis']}: channels {m['start']}:{m['stop']} of {length} " \
                       f"do not fall in whole runs of {self.m}", []
        return "", inputs

    def _mask(self, gm: fx.GraphModule, consumers: list[dict]) -> None:
        """Zero all but the N largest |w| of every run of M input channels (new tensors)."""
        for m in consumers:
            weight = get_tensor(gm, m["tensor"]).detach()
            masked = weight.clone()
            piece = masked.narrow(m["axis"], m["start"], m["stop"] - m["start"])
            piece.mul_(nm_mask(piece, m["axis"], self.n, self.m).to(weight.dtype))   # our clone, not the user's
            set_tensor(gm, m["tensor"], masked)


def _columns(gm: fx.GraphModule, member: dict) -> torch.Tensor:
    """The member's weight as rows x (group channels)."""
    weight = get_tensor(gm, member["tensor"]).detach()
    piece = weight.narrow(member["axis"], member["start"], member["stop"] - member["start"])
    return piece.movedim(member["axis"], -1).reshape(-1, member["stop"] - member["start"])


def _percent(base: float, found: float) -> str:
    return f"{100.0 * (found - base) / base:+.2f}%" if base else "+0.00%"
