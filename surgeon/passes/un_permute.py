"""un-permute: restore the original channel layout after co-permute / permute-nm.

Reads the permutations those passes recorded in gm.meta["surgeon_permutations"] and applies the
inverse of each, newest first (`steps`: how many recorded passes to undo; all by default). The
inverse gather of p is argsort(p), so every coupled tensor returns to its original index order;
weights trained or masked in the permuted layout keep their values, only their positions change
back. New tensors only; the function is unchanged ("close"). Refused while an s2ft adapter is
inserted and not merged: its update is tied to the permuted leading columns (merge it first).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from surgeon.errors import PassError, SpecError
from surgeon.groups.permute import META, apply, inverse
from surgeon.pipeline import Context, PassResult


@dataclass(frozen=True)
class UnPermute:
    steps: int | None = None
    name: ClassVar[str] = "un-permute"
    check: ClassVar[str] = "close"

    def __post_init__(self) -> None:
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise SpecError("un-permute.steps", f"must be a positive integer, got {self.steps!r}")

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        stack = gm.meta.get(META, [])
        if not stack:
            raise PassError(self.name, "nothing to undo: no co-permute or permute-nm ran on this graph")
        count = len(stack) if self.steps is None else self.steps
        if count > len(stack):
            raise PassError(self.name, f"steps={count} but only {len(stack)} permutations are recorded")
        unmerged = [a.spec.name for a in ctx.adapters.values()
                    if a.spec.type == "s2ft" and a.status not in ("declared", "merged", "removed")]
        if unmerged:   # an s2ft delta sits on the permuted leading columns; moving them would scatter it
            raise PassError(self.name, f"s2ft adapter(s) {unmerged} are trained on the permuted columns: "
                                       "merge first, then un-permute")
        result = PassResult()
        for _ in range(count):
            done = stack.pop()
            undo = [{**e, "perm": inverse(e["perm"])} for e in done["groups"]]
            changed = apply(gm, undo)
            result.matches += len(undo)
            result.notes.append(f"undid {done['pass']}: {len(undo)} groups, {len(changed)} tensors restored")
        return result
