"""insert: attach each declared adapter to the linear-like ops its targets select.

With the kinds' identity inits (LoRA: B = 0) the output is bit-for-bit the original, which
the pass manager checks ("exact"); adapters loaded from files change the function ("none").
Base parameters are frozen: after insertion only adapter parameters require grad.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from surgeon.adapter_ops import attach, check_loaded_shapes, discover_sites, site_dims
from surgeon.pipeline import Context, PassResult, SiteState


@dataclass(frozen=True)
class Insert:
    adapters: tuple[str, ...] | None = None
    name: ClassVar[str] = "insert"

    def check(self, ctx: Context) -> str:
        loaded = any(a.spec.loaded is not None for a in ctx.select(self.adapters, ("declared", "removed")))
        return "none" if loaded else "exact"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        result = PassResult()
        adapter_targets = {t for a in ctx.adapters.values() for s in a.sites for t in s.params.values()}
        for target, param in gm.named_parameters():
            if target not in adapter_targets:
                param.requires_grad_(False)   # our own Parameter objects, never the user's
        for state in ctx.select(self.adapters, ("declared", "removed")):
            index = list(ctx.adapters).index(state.spec.name)
            spec = state.spec
            state.sites = []
            for path, calls in discover_sites(gm, state, ctx, index, result).items():
                op = "linear" if calls[0].target is torch.ops.aten.linear.default else "addmm"
                weight, fan_in, fan_out = site_dims(gm, calls[0], op)
                options = {**spec.options, **(spec.loaded.site_options.get(path, {}) if spec.loaded else {})}
                site = SiteState(path, op, weight, fan_in, fan_out, options)
                dtype = calls[0].meta["val"].dtype if "val" in calls[0].meta else None
                tensors = self._tensors(gm, state, site, ctx, index, dtype)
                attach(gm, state, site, calls, tensors, self.name)
                state.sites.append(site)
                result.matches += len(calls)
            state.status = "inserted"
            result.notes.append(f"{spec.name}: {spec.type} on {len(state.sites)} modules, "
                                f"{state.param_count:,} parameters")
        return result

    def _tensors(self, gm, state, site, ctx, index, dtype):
        from surgeon.graph import get_tensor

        weight = get_tensor(gm, site.weight)
        if state.spec.loaded is not None:
            tensors = state.spec.loaded.weights.get(site.path)
            if tensors is None:
                raise ctx.spec.error(("adapters", index, "targets"), f"no weights for module '{site.path}'")
            check_loaded_shapes(state, site, tensors, ctx, index)
        else:
            tensors = state.spec.kind.init(site.options, site.in_features, site.out_features,
                                           weight.dtype, ctx.generator)
        return {p: t.to(device=weight.device, dtype=dtype or weight.dtype).clone() for p, t in tensors.items()}
