"""unmerge: take merged adapters back out of the base weights and re-attach their branches.

W_merged - delta == W within fp rounding (the delta is recomputed from the kept parameters).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from surgeon.adapter_ops import add_delta, attach, site_calls
from surgeon.pipeline import Context, PassResult


@dataclass(frozen=True)
class Unmerge:
    adapters: tuple[str, ...] | None = None
    name: ClassVar[str] = "unmerge"
    check: ClassVar[str] = "close"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        result = PassResult()
        for state in ctx.select(self.adapters, ("merged",)):
            for site in state.sites:
                add_delta(gm, state, site, -state.spec.kind.delta_weight(site.merged, site.options), self.name)
                attach(gm, state, site, site_calls(gm, site), site.merged, self.name)
                site.merged = {}
                result.matches += 1
            state.status = "inserted"
        return result
