"""merge: fold adapters into their base weights exactly, leaving only the base graph's ops.

Identity relied on (LoRA): W x + s B A x == (W + s B A) x; each kind supplies its delta
weight from its parameters and the base weight it lands on (out x in; transposed for GPT-2
Conv1D's addmm), e.g. W R - W for an input rotation; a kind that scales the whole output also
scales the bias. Kinds with no exact delta (a nonlinearity in the branch) are refused with the
kind's reason. With no inserted adapter to merge (or a named one not inserted) it raises
PassError instead of doing nothing. All or nothing: every site's delta and bias are computed and
checked first (adapter_ops.check_sites, one site's delta at a time, recomputed for the write), so a
refusal that depends on the values at some site (a SpecError naming adapter and site) leaves the
graph and every weight as they were.

Merging reads the weights' values, so on a structure-only graph (meta weights) the pass manager
refuses it; `plan` says what a merge would do there without computing anything: per site, the
weight (and bias) it would replace, the delta's shape and dtype and the parameters it is made of, and whether the bias changes too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from surgeon.adapter_ops import PARAM_SITE, SiteRefusal, merge_sites, site_calls
from surgeon.graph import get_tensor
from surgeon.pipeline import Context, PassResult


@dataclass(frozen=True)
class Merge:
    adapters: tuple[str, ...] | None = None
    name: ClassVar[str] = "merge"
    check: ClassVar[str] = "close"
    needs_weights: ClassVar[bool] = True    # W + delta: refused on a structure-only graph (surgeon.pipeline)
    structure_hint: ClassVar[str] = "; Compiled.merge_plan() lists what it would change without computing it"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        result = PassResult()
        chosen = ctx.select(self.adapters, ("inserted",), acting=self.name)
        for state in chosen:   # every refusal before any graph change
            reason = next((r for s in state.sites if (r := state.spec.kind.refusal(s.options))), "")
            if reason:
                raise ctx.spec.error(("pipeline",), f"cannot merge adapter '{state.spec.name}': {reason}")
        items = [(state, site) for state in chosen for site in state.sites]
        try:   # all or nothing: every site's delta and bias computed and checked before the first write
            merge_sites(gm, items, self.name)
        except SiteRefusal as refusal:
            raise ctx.spec.error(("pipeline",), f"cannot merge adapter '{refusal.adapter}' at '{refusal.path}': "
                                                f"{refusal.reason} (nothing was merged)") from None
        for state in chosen:
            state.status = "merged"
        result.matches = len(items)
        return result


def plan(gm: fx.GraphModule, ctx: Context, adapters: tuple[str, ...] | None = None) -> list[dict]:
    """What merging the inserted adapters (all, or those named) would do, one record per site, reading
    only shapes and dtypes (so it runs on a structure-only graph): the weight replaced (a new tensor
    named `weight_untied` where other ops read the weight too), its shape and dtype, the delta (same
    shape; from which adapter parameters), whether the bias changes too, and the kind's refusal if any."""
    steps = []
    for state in ctx.select(adapters, ("inserted",), acting=Merge.name):
        kind = state.spec.kind
        for site in state.sites:
            weight = get_tensor(gm, site.weight) if site.weight else None
            calls = set(site_calls(gm, site))
            readers = {u for n in gm.graph.find_nodes(op="get_attr", target=site.weight) for u in n.users} \
                if site.weight else set()
            untied = site.op != PARAM_SITE and not readers <= calls
            steps.append({
                "adapter": state.spec.name, "kind": state.spec.type, "site": site.path, "op": site.op,
                "weight": f"{site.path}.weight_untied" if untied else site.weight, "replaces": site.weight,
                "shape": list(weight.shape) if weight is not None else None,
                "dtype": str(weight.dtype).replace("torch.", "") if weight is not None else None,
                "delta_from": sorted(site.params), "bias_mapped": _maps_bias(gm, kind, site),
                "refusal": kind.refusal(site.options) or None})
    return steps


def _maps_bias(gm: fx.GraphModule, kind, site) -> bool:
    """Whether the kind's merge changes a bias at this site (where the site has one): its bias_map asked on
    meta tensors of the parameters' shapes (no values read), e.g. False for a LoRA without lora_bias."""
    if kind.bias_map is None:
        return False
    params = {p: torch.empty(get_tensor(gm, t).shape, dtype=torch.float64, device="meta")
              for p, t in site.params.items()}
    bias = torch.empty(site.out_features, dtype=torch.float64, device="meta")
    try:
        return kind.bias_map(params, site.options, bias, False) is not None
    except Exception:  # noqa: BLE001 - not answerable on shapes alone: say it may
        return True
