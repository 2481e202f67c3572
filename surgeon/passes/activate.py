"""activate: choose which inserted adapters run, without recompiling the model.

Adapters named in `adapters` are active (their branches in the graph); every other inserted
adapter is parked: its branch is detached and its parameters kept, so a later `activate`
re-attaches it with the same values. With one adapter active, the graph is that adapter's.
Naming an adapter that is neither inserted nor inactive (declared, merged, removed ...), or
activating when no adapter is inserted or inactive, is a PassError rather than a silent no-op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from surgeon.adapter_ops import attach, detach, site_calls
from surgeon.pipeline import Context, PassResult


@dataclass(frozen=True)
class Activate:
    adapters: tuple[str, ...] = ()
    name: ClassVar[str] = "activate"
    check: ClassVar[str] = "none"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        result = PassResult()
        wanted = set(self.adapters)
        ctx.select(self.adapters or None, ("inserted", "inactive"), acting=self.name)   # none to switch: an error
        for state in ctx.select(None, ("inserted",)):
            if state.spec.name not in wanted:
                for site in reversed(state.sites):   # the first site may own nodes later ones read
                    site.parked = detach(gm, site)
                state.status = "inactive"
                result.matches += 1
        for state in [ctx.adapters[n] for n in self.adapters if ctx.adapters[n].status == "inactive"]:
            for site in state.sites:
                attach(gm, state, site, site_calls(gm, site), site.parked, self.name)
                site.parked = {}
            state.status = "inserted"
            result.matches += 1
        active = sorted(a.spec.name for a in ctx.adapters.values() if a.status == "inserted")
        result.notes.append(f"active: {', '.join(active) or 'none'}")
        return result
