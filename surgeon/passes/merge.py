"""merge: fold adapters into their base weights exactly, leaving only the base graph's ops.

Identity relied on (LoRA): W x + s B A x == (W + s B A) x; each kind supplies its delta
weight from its parameters and the base weight it lands on (out x in; transposed for GPT-2
Conv1D's addmm), e.g. W R - W for an input rotation; a kind that scales the whole output also
scales the bias. Kinds with no exact delta (a nonlinearity in the branch) are refused with the
kind's reason. With no inserted adapter to merge (or a named one not inserted) it raises
PassError instead of doing nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from surgeon.adapter_ops import merge_site
from surgeon.pipeline import Context, PassResult


@dataclass(frozen=True)
class Merge:
    adapters: tuple[str, ...] | None = None
    name: ClassVar[str] = "merge"
    check: ClassVar[str] = "close"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        result = PassResult()
        chosen = ctx.select(self.adapters, ("inserted",), acting=self.name)
        for state in chosen:   # every refusal before any graph change
            reason = next((r for s in state.sites if (r := state.spec.kind.refusal(s.options))), "")
            if reason:
                raise ctx.spec.error(("pipeline",), f"cannot merge adapter '{state.spec.name}': {reason}")
        for state in chosen:
            for site in state.sites:
                merge_site(gm, state, site, self.name)
                result.matches += 1
            state.status = "merged"
        return result
