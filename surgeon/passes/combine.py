"""combine: merge several inserted adapters of one base into one new adapter, in delta-weight space.

Per module, the inputs' delta weights dW_i (each kind's `delta_weight`, out x in) go through a
merge method (passes/_combine_methods.py: linear, ties, dare_linear, dare_ties,
magnitude_prune, svd). The result is a `delta` adapter holding the combined dW per module
(merges exactly), or, with `rank`, a LoRA of that rank from a truncated SVD (alpha = rank, so
its scale is 1; the notes give the relative Frobenius error of the truncation per module).
The inputs are detached (status "combined") and the new adapter is attached to the union of
their modules, so the graph computes base + combined delta. The function changes ("none"),
except that combine(linear, weights [1]) of one adapter reproduces it.

The dare methods draw each module's masks from its own seed, derived from `seed` and the
module path (equal seeds, equal results). Spec key `into` names the result (`name` is the
pass's own name in the pass protocol).

Guarantees: inputs must be inserted and have a delta weight (else SpecError with the kind's
reason); weights never touch A/B factors separately; the base weights are not changed.
"""
from __future__ import annotations

import inspect
import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from surgeon.adapter_ops import attach, detach, site_calls
from surgeon.adapters import kinds
from surgeon.graph import get_tensor
from surgeon.pipeline import AdapterState, Context, PassResult, SiteState
from surgeon.spec import AdapterSpec

from . import _combine_methods as methods


@dataclass(frozen=True)
class Combine:
    adapters: tuple[str, ...] | None = None
    method: str = "linear"
    weights: tuple[float, ...] | None = None
    density: float | None = None
    seed: int | None = None
    rank: int | None = None
    into: str | None = None          # the new adapter's name (default: inputs and method, '_'-joined)
    name: ClassVar[str] = "combine"
    check: ClassVar[str] = "none"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        inputs = self._inputs(ctx)
        weights = self._weights(ctx, len(inputs))
        options = self._method_options(ctx)
        into = self._output_name(ctx, inputs)
        sites = _union_sites(inputs)
        combined = {}
        for path, template in sites.items():
            deltas = [_delta_at(gm, state, path, template) for state in inputs]
            site_options = {**options, "seed": _site_seed(options["seed"], path)} if "seed" in options else options
            result = methods.METHODS[self.method](deltas, weights, **site_options)
            if self.rank is not None and isinstance(result, torch.Tensor):
                result = methods.truncate(result, self.rank)
            combined[path] = result
        for state in inputs:
            for site in state.sites:
                detach(gm, site)
            state.status = "combined"
        state = self._attach_result(gm, ctx, into, sites, combined)
        return self._report(inputs, weights, state, combined)

    # ------------------------------------------------------------ option checks

    def _error(self, ctx: Context, key: str, message: str):
        return ctx.spec.error(("pipeline", self.name, key), message)

    def _inputs(self, ctx: Context) -> list[AdapterState]:
        names = self.adapters or tuple(n for n, a in ctx.adapters.items() if a.status == "inserted")
        if not names:
            raise self._error(ctx, "adapters", "no inserted adapter to combine")
        inputs = []
        for adapter_name in names:
            state = ctx.adapters.get(adapter_name)
            if state is None:
                raise self._error(ctx, "adapters", f"no adapter named '{adapter_name}'; known: {sorted(ctx.adapters)}")
            if state.status != "inserted":
                raise self._error(ctx, "adapters", f"adapter '{adapter_name}' is {state.status}; combine takes "
                                                   "inserted adapters")
            reason = next((r for s in state.sites if (r := state.spec.kind.refusal(s.options))), "")
            if reason:
                raise self._error(ctx, "adapters", f"cannot combine adapter '{adapter_name}' "
                                                   f"({state.spec.type}): {reason}")
            inputs.append(state)
        return inputs

    def _weights(self, ctx: Context, count: int) -> list[float]:
        weights = [1.0] * count if self.weights is None else list(self.weights)
        if len(weights) != count or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                            for w in weights):
            raise self._error(ctx, "weights", f"must be {count} numbers (one per adapter), got {self.weights!r}")
        return [float(w) for w in weights]

    def _method_options(self, ctx: Context) -> dict:
        if self.method not in methods.METHODS:
            raise self._error(ctx, "method", f"unknown method {self.method!r}; known: {sorted(methods.METHODS)}")
        accepted = methods.schema(methods.METHODS[self.method])
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1):
            raise self._error(ctx, "rank", f"must be a positive integer, got {self.rank!r}")
        given = {"density": self.density, "seed": self.seed, "rank": self.rank if "rank" in accepted else None}
        for key, value in given.items():
            if value is not None and key not in accepted:
                raise self._error(ctx, key, f"method '{self.method}' takes no '{key}' (its options: "
                                            f"{sorted(accepted) or 'none'})")
        if self.density is not None and not (isinstance(self.density, (int, float)) and 0 < self.density <= 1):
            raise self._error(ctx, "density", f"must be a number in (0, 1], got {self.density!r}")
        options = {}
        for key, parameter in accepted.items():
            if given.get(key) is None and parameter.default is inspect.Parameter.empty:
                raise self._error(ctx, key, f"method '{self.method}' needs '{key}'")
            options[key] = parameter.default if given.get(key) is None else given[key]
        return options

    def _output_name(self, ctx: Context, inputs: list[AdapterState]) -> str:
        into = self.into or "_".join([s.spec.name for s in inputs] + [self.method])
        if not isinstance(into, str) or not into.isidentifier():
            raise self._error(ctx, "into", f"must be an identifier, got {into!r}")
        if into in ctx.adapters:
            raise self._error(ctx, "into", f"an adapter named '{into}' already exists; choose another name")
        return into

    # ------------------------------------------------------------ building the result

    def _attach_result(self, gm: fx.GraphModule, ctx: Context, into: str, sites: dict[str, SiteState],
                       combined: dict) -> AdapterState:
        factored = any(isinstance(r, methods.Factors) for r in combined.values())
        kind = kinds()["lora" if factored else "delta"]
        defaults = {k: o.default for k, o in kind.options.items()}
        rank = self.rank
        options = {**defaults, "rank": rank, "alpha": rank} if factored else defaults
        spec = AdapterSpec(into, kind.name, tuple(sites), options)
        state = AdapterState(spec, status="inserted")
        for path, template in sites.items():
            result = combined[path]
            site_opts = dict(options)
            if factored:
                site_opts.update(rank=result.A.shape[0], alpha=result.A.shape[0])
                tensors = {"lora_A": result.A, "lora_B": result.B}
            else:
                tensors = {"delta": result}
            site = SiteState(path, template.op, template.weight, template.in_features, template.out_features,
                             site_opts)
            dtype = get_tensor(gm, site.weight).dtype
            attach(gm, state, site, site_calls(gm, site),
                   {p: t.to(dtype).contiguous() for p, t in tensors.items()}, self.name)
            state.sites.append(site)
        ctx.adapters[into] = state
        return state

    def _report(self, inputs, weights, state: AdapterState, combined: dict) -> PassResult:
        result = PassResult(matches=len(combined))
        names = ", ".join(s.spec.name for s in inputs)
        result.notes.append(f"{state.spec.name}: {self.method} of [{names}] with weights {weights} on "
                            f"{len(combined)} modules -> {state.spec.type}, {state.param_count:,} parameters")
        for path, value in combined.items():
            if isinstance(value, methods.Factors):
                result.notes.append(f"{state.spec.name} @ {path}: rank {value.A.shape[0]} truncation, "
                                    f"rel Frobenius error {value.error:.2e}")
        return result


def _union_sites(inputs: list[AdapterState]) -> dict[str, SiteState]:
    """Module path -> a site of some input there (the first one), in first-seen order."""
    sites: dict[str, SiteState] = {}
    for state in inputs:
        for site in state.sites:
            sites.setdefault(site.path, site)
    return sites


def site_delta(gm: fx.GraphModule, state: AdapterState, site: SiteState,
               params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """W' - W of the adapter at `site` (out x in, float32), from its parameters (or `params`)."""
    weight = get_tensor(gm, site.weight).detach()
    weight = weight.t() if site.op == "addmm" else weight
    if params is None:
        params = {p: get_tensor(gm, t).detach() for p, t in site.params.items()}
    return state.spec.kind.delta_weight(params, site.options, weight).float()


def _delta_at(gm: fx.GraphModule, state: AdapterState, path: str, template: SiteState) -> torch.Tensor:
    """The adapter's delta weight (out x in, float32) at `path`; zeros where it has no site."""
    site = next((s for s in state.sites if s.path == path), None)
    if site is None:
        return torch.zeros(template.out_features, template.in_features)
    return site_delta(gm, state, site)


def _site_seed(seed: int, path: str) -> int:
    """A per-module seed from the pass's seed and the module path, so layers draw independent masks.

    32 bits, because the CPU generator (mt19937) keeps only the low 32 bits of a seed.
    """
    return zlib.crc32(f"{seed}:{path}".encode())
