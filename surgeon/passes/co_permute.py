"""co-permute: gather the selected units of each coupled group into one dense leading block (S2FT).

    - co-permute: {ffn_fraction: 0.25, head_fraction: 0.25, score: magnitude}
    - co-permute: {select: {"model.layers.0.mlp": [3, 17, 40]}}

For every eligible group of surgeon.groups (residual groups only with allow_residual), pick units:
channels of `channels` groups (FFN hidden units, conv channels) by ffn_fraction, heads of `heads`
groups by head_fraction, scored by weight magnitude (sum of |w| over every coupled slice) or at
random (seeded by the spec), or the explicit unit indices of `select` (keys: a group key or a
module path). One permutation per group puts the selected units first, contiguous and in their
original order; every coupled tensor follows, biases and norm statistics included.
Grouped-query attention: with gqa "groups" (default) whole key/value groups move - a query head
selects its group, and the blocks of query heads move together with their key/value head; with
gqa "within" key/value heads stay and the selected query heads come first inside their block.
Identity relied on: for a producer P and consumer C of a group, C[:, p] (P[p] x) == C P x for
any permutation p of the coupled axis (and the same through the elementwise / gated / norm ops
between them). The function is unchanged ("close"); the permutations and the selections are
recorded in gm.meta["surgeon_permutations"]; un-permute restores the layout.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx as fx

from surgeon.errors import PassError, SpecError
from surgeon.groups import analyze_groups, eligible
from surgeon.groups.permute import apply, entry, first_order, record, unit_perm_to_elements, unit_scores
from surgeon.pipeline import Context, PassResult


@dataclass(frozen=True)
class CoPermute:
    ffn_fraction: float | None = None
    head_fraction: float | None = None
    score: str = "magnitude"                      # magnitude | random
    select: dict[str, list[int]] | None = field(default=None, hash=False)
    gqa: str = "groups"                           # groups | within
    groups: str = "*"                             # glob over group keys
    allow_residual: bool = False
    name: ClassVar[str] = "co-permute"
    check: ClassVar[str] = "close"

    def __post_init__(self) -> None:
        for key in ("ffn_fraction", "head_fraction"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value <= 1):
                raise SpecError(f"co-permute.{key}", f"must be a number in (0, 1], got {value!r}")
        if self.score not in ("magnitude", "random"):
            raise SpecError("co-permute.score", f"must be 'magnitude' or 'random', got {self.score!r}")
        if self.gqa not in ("groups", "within"):
            raise SpecError("co-permute.gqa", f"must be 'groups' or 'within', got {self.gqa!r}")
        if self.select is not None and not (isinstance(self.select, dict) and all(
                isinstance(v, list) and all(isinstance(i, int) for i in v) for v in self.select.values())):
            raise SpecError("co-permute.select", "must map group keys to lists of unit indices")
        if self.select is None and self.ffn_fraction is None and self.head_fraction is None:
            raise SpecError("co-permute", "give ffn_fraction and/or head_fraction, or select")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        spec = analyze_groups(gm, (ctx.example_args, ctx.example_kwargs))
        result, entries = PassResult(), []
        by_id = {g["id"]: g for g in spec["groups"]}
        for group_id, units in self._selection(spec, result, adapter_tensors(ctx)).items():
            made = self._permute_group(gm, ctx, by_id[group_id], units, by_id, result)
            entries += made
            result.matches += bool(made)
        changed = apply(gm, entries)
        record(gm, self.name, entries)
        result.notes.append(f"{len(entries)} groups permuted, {len(changed)} tensors rewritten")
        return result

    # ------------------------------------------------------------------ which units
    def _selection(self, spec: dict, result: PassResult, adapters: set[str]) -> dict:
        """Group id -> explicit unit indices (a list) or None (choose by fraction)."""
        candidates = [g for g in spec["groups"] if g["kind"] != "kv-heads" and _in_scope(g, self.groups)
                      and not {m["tensor"] for m in g["members"]} <= adapters]
        if self.select is not None:
            return {g["id"]: units for g, units in self._explicit(spec, candidates)}
        allowed = {g["id"] for g in eligible(spec, self.allow_residual)}
        chosen = {}
        for g in candidates:
            fraction = self.head_fraction if g["kind"] == "heads" else self.ffn_fraction
            if fraction is None or not _is_structure(g):
                continue          # e.g. the unused tail of a sliced buffer: nothing produces it
            if g["id"] in allowed:
                chosen[g["id"]] = None
            else:
                result.rejections.append((f"co-permute @ {g['key']}", f"{g['status']}: {g['reasons'][0]}"))
        return chosen

    def _explicit(self, spec: dict, candidates: list[dict]) -> list[tuple[dict, list[int]]]:
        out = []
        for key, units in self.select.items():
            hits = [g for g in candidates if g["key"] == key] or [g for g in candidates if g["path"] == key]
            if len(hits) != 1:
                known = ", ".join(g["key"] for g in eligible(spec, self.allow_residual) if g["kind"] != "kv-heads")
                raise PassError(self.name, f"select key '{key}' names {len(hits)} groups; eligible groups: {known}")
            g = hits[0]
            if g["status"] == "ineligible" or (g["status"] == "residual" and not self.allow_residual):
                raise PassError(self.name, f"group '{g['key']}' is {g['status']}: {g['reasons'][0]}")
            bad = [u for u in units if not 0 <= u < g["units"]]
            if bad or not units:
                raise PassError(self.name, f"select '{key}': unit indices {bad or units} out of range "
                                           f"0..{g['units'] - 1} ({g['kind']} of {g['unit']} channels)")
            out.append((g, units))
        return out

    def _fraction(self, group: dict) -> float:
        return self.head_fraction if group["kind"] == "heads" else self.ffn_fraction

    def _top(self, ctx: Context, scores: torch.Tensor, fraction: float) -> list[int]:
        k = max(1, round(fraction * len(scores)))
        if self.score == "random":
            return sorted(torch.randperm(len(scores), generator=ctx.generator)[:k].tolist())
        return sorted(torch.topk(scores, k).indices.tolist())

    # ------------------------------------------------------------------ one group
    def _permute_group(self, gm, ctx, group: dict, units: list[int] | None, by_id: dict,
                       result: PassResult) -> list[dict]:
        tie = group["tie"]
        if tie is None:
            chosen = units if units is not None else self._top(ctx, unit_scores(gm, group),
                                                                self._fraction(group))
            order = first_order(group["units"], chosen)
            result.notes.append(f"{group['key']}: {len(chosen)}/{group['units']} {_noun(group)} first")
            return [entry(group, unit_perm_to_elements(order, group["unit"]), selected=sorted(chosen),
                          layout="first")]
        per_block = tie["coarse"] // group["unit"]
        if self.gqa == "groups" and tie["movable"]:
            return self._whole_groups(gm, ctx, group, by_id[tie["group"]], per_block, units, result)
        if self.gqa == "groups":
            result.notes.append(f"{group['key']}: its key/value heads cannot move; query heads move "
                                "inside their group")
        return self._within_groups(gm, ctx, group, per_block, units, result)

    def _whole_groups(self, gm, ctx, group, kv, per_block, units, result) -> list[dict]:
        blocks = group["units"] // per_block
        if units is not None:
            chosen = sorted({u // per_block for u in units})
        else:
            scores = unit_scores(gm, group).reshape(blocks, per_block).sum(1) + unit_scores(gm, kv)
            chosen = self._top(ctx, scores, self._fraction(group))
        order = first_order(blocks, chosen)
        heads = [b * per_block + i for b in chosen for i in range(per_block)]
        result.notes.append(f"{group['key']}: {len(chosen)}/{blocks} key/value groups "
                            f"({len(heads)} query heads) first")
        q = entry(group, unit_perm_to_elements(order, group["unit"] * per_block), selected=heads, layout="first")
        k = entry(kv, unit_perm_to_elements(order, kv["unit"]), selected=chosen, layout="first")
        return [q, k]

    def _within_groups(self, gm, ctx, group, per_block, units, result) -> list[dict]:
        chosen = units if units is not None else self._top(ctx, unit_scores(gm, group), self._fraction(group))
        order = []
        for block in range(group["units"] // per_block):
            inside = list(range(block * per_block, (block + 1) * per_block))
            order += [u for u in inside if u in set(chosen)] + [u for u in inside if u not in set(chosen)]
        result.notes.append(f"{group['key']}: {len(set(chosen))}/{group['units']} query heads first "
                            f"inside their key/value group")
        return [entry(group, unit_perm_to_elements(order, group["unit"]), selected=sorted(set(chosen)),
                      layout="first-in-block", block=per_block)]


def _in_scope(group: dict, glob: str) -> bool:
    return fnmatch.fnmatchcase(group["key"], glob) or fnmatch.fnmatchcase(group["path"], glob)


def _is_structure(group: dict) -> bool:
    """A producer's output channels (what a fraction would select in), worth naming when refused."""
    return any(m["role"] == "out" for m in group["members"])


def adapter_tensors(ctx: Context) -> set[str]:
    """Targets of inserted adapters' parameters (an adapter's own rank space is not a model structure)."""
    return {t for state in ctx.adapters.values() for site in state.sites for t in site.params.values()}


def _noun(group: dict) -> str:
    return "heads" if group["kind"] == "heads" else "channels"

