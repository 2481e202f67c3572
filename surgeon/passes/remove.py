"""remove: detach adapters without merging, restoring the base graph and weights exactly.

With no inserted adapter to remove (or a named one not inserted) it raises PassError.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from surgeon.adapter_ops import detach
from surgeon.pipeline import Context, PassResult


@dataclass(frozen=True)
class Remove:
    adapters: tuple[str, ...] | None = None
    name: ClassVar[str] = "remove"
    check: ClassVar[str] = "none"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        result = PassResult()
        for state in ctx.select(self.adapters, ("inserted",), acting=self.name):
            for site in reversed(state.sites):   # a first site may own nodes later ones read (X-LoRA)
                detach(gm, site)
                result.matches += 1
            state.status = "removed"
        return result
