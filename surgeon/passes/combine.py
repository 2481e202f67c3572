"""combine: merge several inserted adapters of one base into one new adapter, in delta-weight space.

Per module, the inputs' delta weights dW_i (each kind's `delta_weight`, out x in) go through a
merge method (passes/_combine_methods.py: linear, ties, dare_linear, dare_ties,
magnitude_prune, svd). `orthomerge` (OrthoMerge) instead sees each input as W' = diag(s) W R + E:
a rotation kind (AdapterKind.rotation: OFT, BOFT, HRA) gives R (and BOFT s) exactly with E = 0;
any other kind with an exact delta is split by Procrustes (R the rotation closest to W' = W + dW,
E = W' - W R). Rotations merge in the Lie algebra, R* = exp(sum w_i log R_i), s and E linearly, and
the combined delta is diag(s*) W R* + E* - W. A kind whose rotation has no logarithm (ETHER's and
odd-rank HRA's reflections, det -1) is refused with the reason.

The result is a `delta` adapter holding the combined dW per module (merges exactly), or, with
`rank`, a LoRA of that rank from a truncated SVD (alpha = rank, so its scale is 1; the notes give
the relative Frobenius error of the truncation per module). Where an input's merge also changes the
layer's bias (its kind's bias_map: IA3's output scale, RoAd, lora_bias, BEFT, GLoRA's D/E), `linear`
and `svd` carry the weighted sum of the bias deltas (delta's `bias`, LoRA's lora_bias at scale 1), so
the result merges to the sum of the inputs' merges; the other methods refuse such an input (SpecError
naming adapter and module) rather than drop its bias change. The inputs are detached (status
"combined", newest first) and the new adapter is attached to the union of their modules, so the
graph computes base + combined delta. The function changes ("none"), except that combine(linear
or orthomerge, weights [1]) of one adapter reproduces it.

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

from surgeon.adapter_ops import PARAM_SITE, attach, detach, site_bias, site_calls
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
    magnitude_correction: bool | None = None   # orthomerge only: the merged generator gets the inputs' mean norm
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
        splits: dict[str, list[str]] = {}
        biases = {path: b for path in sites if (b := self._bias_delta(gm, ctx, inputs, weights, path)) is not None}
        for path, template in sites.items():
            if self.method in methods.ON_SPLITS:
                result = self._merge_splits(gm, ctx, inputs, weights, options, path, template, splits)
                combined[path] = result if self.rank is None else methods.truncate(result, self.rank)
                continue
            deltas = [_delta_at(gm, state, path, template) for state in inputs]
            site_options = {**options, "seed": _site_seed(options["seed"], path)} if "seed" in options else options
            result = methods.METHODS[self.method](deltas, weights, **site_options)
            if self.rank is not None and isinstance(result, torch.Tensor):
                result = methods.truncate(result, self.rank)
            combined[path] = result
        order = list(ctx.adapters)   # newest first: an input-side adapter stacked on another detaches before it
        for state in sorted(inputs, key=lambda s: order.index(s.spec.name), reverse=True):
            for site in state.sites:
                detach(gm, site)
            state.status = "combined"
        state = self._attach_result(gm, ctx, into, sites, combined, biases)
        return self._report(inputs, weights, state, combined, splits, biases)

    def _bias_delta(self, gm: fx.GraphModule, ctx: Context, inputs: list[AdapterState], weights: list[float],
                    path: str) -> torch.Tensor | None:
        """The combined bias delta at `path` (float64), None where no input's merge changes the bias.

        Each input's merge turns the base bias b into its kind's bias_map(b) (IA3's l b, RoAd's R b,
        b + s b_B, b + Δb ...), a delta db_i = bias_map(b) - b. Methods in BIAS_METHODS are linear in the
        deltas, so sum_i w_i db_i is the combined one, as exact as the weights'. The others (TIES's trim and
        sign election, DARE's drop, orthomerge's split) are defined on weight matrices only: an input with
        a non-zero db_i is refused there rather than dropped.
        """
        deltas = []
        for state in inputs:
            site = next((s for s in state.sites if s.path == path), None)
            kind = state.spec.kind
            target = site_bias(gm, site) if site is not None and kind.bias_map is not None else None
            if target is None:
                continue
            old = get_tensor(gm, target).detach().double()
            params = {p: get_tensor(gm, t).detach().to(old.device) for p, t in site.params.items()}
            try:
                new = kind.bias_map(params, site.options, old, False)
            except ValueError as error:
                raise self._error(ctx, "adapters", f"cannot combine adapter '{state.spec.name}' ({state.spec.type}) "
                                                   f"at '{path}': {error}") from None
            if new is None:
                continue
            delta = new.reshape(old.shape) - old
            if self.method not in methods.BIAS_METHODS and bool(delta.any()):
                raise self._error(ctx, "method", f"cannot combine adapter '{state.spec.name}' ({state.spec.type}) "
                                                 f"at '{path}' with method '{self.method}': its merge also changes "
                                                 f"the layer's bias (max |db| {delta.abs().max().item():.2e}), and "
                                                 f"'{self.method}' is defined on weight deltas only; use "
                                                 f"{' or '.join(sorted(methods.BIAS_METHODS))} (bias deltas add up "
                                                 "there), or merge that adapter on its own")
            deltas.append(weights[inputs.index(state)] * delta)
        if not deltas or not any(bool(d.any()) for d in deltas):
            return None   # no bias change at all (zero deltas drop exactly)
        return sum(deltas[1:], deltas[0])

    def _merge_splits(self, gm: fx.GraphModule, ctx: Context, inputs: list[AdapterState], weights: list[float],
                      options: dict, path: str, template: SiteState, notes: dict[str, list[str]]) -> torch.Tensor:
        """orthomerge at one module: each input split as W' = diag(s) W R + E, merged, minus W (float64)."""
        if template.op == PARAM_SITE:
            raise self._error(ctx, "method", f"orthomerge works on 2-D weights; '{path}' is a parameter site "
                                             "(E x out x in)")
        weight = _base_matrix(gm, template)
        parts = []
        for state in inputs:
            site = next((s for s in state.sites if s.path == path), None)
            if site is None:
                parts.append(methods.Split())
                continue
            part, note = self._split(gm, ctx, state, site, weight)
            notes.setdefault(state.spec.name, []).append(note)
            parts.append(part)
        try:
            merged = methods.orthomerge(parts, weights, **options)
        except methods.NoLogarithm as error:
            state = inputs[error.index]
            raise self._error(ctx, "adapters", f"cannot orthomerge adapter '{state.spec.name}' ({state.spec.type}) "
                                               f"at '{path}': its rotation has {error.reason}") from None
        return merged.apply(weight) - weight

    def _split(self, gm: fx.GraphModule, ctx: Context, state: AdapterState, site: SiteState,
               weight: torch.Tensor) -> tuple[methods.Split, str]:
        """The input at `site` as a Split, and "rotation" or its Procrustes residual share |E| / |dW|."""
        kind = state.spec.kind
        params = {p: get_tensor(gm, t).detach() for p, t in site.params.items()}
        if kind.rotation is not None:
            rotation = kind.rotation(params, site.options, weight)
            if isinstance(rotation, str):
                raise self._error(ctx, "adapters", f"cannot orthomerge adapter '{state.spec.name}' "
                                                   f"({state.spec.type}): {rotation}")
            scale = None if rotation.scale is None else rotation.scale.double()
            return methods.Split(rotation.matrix.double(), scale), "rotation"
        delta = kind.delta_weight(params, site.options, weight).double().reshape(weight.shape)
        rotation = methods.procrustes(weight, weight + delta)
        residual = weight + delta - weight @ rotation
        share = (residual.norm() / delta.norm()).item() if delta.norm() > 0 else 0.0
        return methods.Split(rotation, None, residual), f"{share:.2e}"

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
        given = {"density": self.density, "seed": self.seed, "rank": self.rank if "rank" in accepted else None,
                 "magnitude_correction": self.magnitude_correction}
        for key, value in given.items():
            if value is not None and key not in accepted:
                raise self._error(ctx, key, f"method '{self.method}' takes no '{key}' (its options: "
                                            f"{sorted(accepted) or 'none'})")
        if self.density is not None and not (isinstance(self.density, (int, float)) and 0 < self.density <= 1):
            raise self._error(ctx, "density", f"must be a number in (0, 1], got {self.density!r}")
        if self.magnitude_correction is not None and not isinstance(self.magnitude_correction, bool):
            raise self._error(ctx, "magnitude_correction", f"must be true or false, got {self.magnitude_correction!r}")
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
                       combined: dict, biases: dict[str, torch.Tensor]) -> AdapterState:
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
            if path in biases:   # delta's d, or LoRA's b_B (its scale alpha / rank is 1 here)
                site_opts.update(bias=True, biased=True)
                tensors["lora_bias" if factored else "delta_bias"] = biases[path]
            site = SiteState(path, template.op, template.weight, template.in_features, template.out_features,
                             site_opts)
            dtype = get_tensor(gm, site.weight).dtype
            attach(gm, state, site, site_calls(gm, site),
                   {p: t.to(dtype).contiguous() for p, t in tensors.items()}, self.name)
            state.sites.append(site)
        ctx.adapters[into] = state
        return state

    def _report(self, inputs, weights, state: AdapterState, combined: dict, splits: dict,
                biases: dict) -> PassResult:
        result = PassResult(matches=len(combined))
        names = ", ".join(s.spec.name for s in inputs)
        result.notes.append(f"{state.spec.name}: {self.method} of [{names}] with weights {weights} on "
                            f"{len(combined)} modules -> {state.spec.type}, {state.param_count:,} parameters")
        if biases:
            result.notes.append(f"{state.spec.name}: carries the inputs' bias deltas on {len(biases)} modules")
        for name, notes in splits.items():
            if all(n == "rotation" for n in notes):
                result.notes.append(f"{name}: its rotation on {len(notes)} modules (exact, no residual)")
            else:
                result.notes.append(f"{name}: Procrustes split on {len(notes)} modules, residual |E| / |dW| at most "
                                    f"{max(float(n) for n in notes):.2e}")
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


def _base_matrix(gm: fx.GraphModule, site: SiteState) -> torch.Tensor:
    """The site's base weight as out x in, float64 (a Conv1D's transposed back, a conv's flattened)."""
    weight = get_tensor(gm, site.weight).detach()
    weight = weight.t() if site.op == "addmm" else weight
    return weight.reshape(weight.shape[0], -1).double()


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
