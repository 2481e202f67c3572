"""unmerge: take merged adapters back out of the base weights and re-attach their branches.

W_merged - delta == W within fp rounding (the delta is recomputed from the kept parameters;
kinds whose delta depends on the weight give the inverse map, e.g. W = W' R^T for a rotation).
A kind whose merged weight no longer determines the base (DoRA's row norms) is refused; with
no merged adapter to unmerge (or a named one not merged) it raises PassError. All or nothing, as
merge: a refusal at any site (hira's 1 + B A with a zero, road's singular block ...) is found before
anything is written, and leaves the graph and every weight as they were.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from surgeon.adapter_ops import SiteRefusal, unmerge_sites
from surgeon.pipeline import Context, PassResult


@dataclass(frozen=True)
class Unmerge:
    adapters: tuple[str, ...] | None = None
    name: ClassVar[str] = "unmerge"
    check: ClassVar[str] = "close"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        result = PassResult()
        chosen = ctx.select(self.adapters, ("merged",), acting=self.name)
        for state in chosen:   # every refusal before any graph change
            if state.spec.kind.refuse_unmerge:
                raise ctx.spec.error(("pipeline",), f"cannot unmerge adapter '{state.spec.name}': "
                                                    f"{state.spec.kind.refuse_unmerge}")
        items = [(state, site) for state in chosen for site in state.sites]
        try:   # all or nothing, as merge: every site's inverse computed and checked before the first write
            unmerge_sites(gm, items, self.name)
        except SiteRefusal as refusal:
            raise ctx.spec.error(("pipeline",), f"cannot unmerge adapter '{refusal.adapter}' at '{refusal.path}': "
                                                f"{refusal.reason} (nothing was unmerged)") from None
        for state in chosen:
            state.status = "inserted"
        result.matches = len(items)
        return result
