"""unmerge: take merged adapters back out of the base weights and re-attach their branches.

W_merged - delta == W within fp rounding (the delta is recomputed from the kept parameters;
kinds whose delta depends on the weight give the inverse map, e.g. W = W' R^T for a rotation).
A kind whose merged weight no longer determines the base (DoRA's row norms) is refused; with
no merged adapter to unmerge (or a named one not merged) it raises PassError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from surgeon.adapter_ops import unmerge_site
from surgeon.pipeline import Context, PassResult


@dataclass(frozen=True)
class Unmerge:
    adapters: tuple[str, ...] | None = None
    name: ClassVar[str] = "unmerge"
    check: ClassVar[str] = "close"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        result = PassResult()
        for state in ctx.select(self.adapters, ("merged",), acting=self.name):
            if state.spec.kind.refuse_unmerge:
                raise ctx.spec.error(("pipeline",), f"cannot unmerge adapter '{state.spec.name}': "
                                                    f"{state.spec.kind.refuse_unmerge}")
            for site in state.sites:
                unmerge_site(gm, state, site, self.name)
                result.matches += 1
            state.status = "inserted"
        return result
