"""insert: attach each declared adapter to the linear-like ops its targets select.

The base ops a kind takes are its `site_ops` (linear, GPT-2's addmm, and for conv-capable
kinds an ungrouped conv2d; LoRA also conv1d, conv3d, `padding="same"` convs and, through its
`conv_groups`, grouped ones); a selected op of another kind, or a grouped conv the kind does not
take, is reported as a rejection with the reason.

With the kinds' identity inits (LoRA: B = 0) the output is bit-for-bit the original, which
the pass manager checks ("exact"); inits that are the identity only up to rounding (PiSSA's
residual split, HRA's paired reflections) are checked "close"; adapters loaded from files
change the function ("none"). A kind may rewrite the base weight at insertion (PiSSA keeps
the residual W - s B0 A0); the new weight is a new tensor, recomputed for loaded adapters.
Base parameters are frozen: after insertion only adapter parameters require grad.
On a structure-only graph (base weights on the meta device) insert reads no weight values: the
adapter parameters are real tensors on the CPU, drawn from the spec's seed exactly as a compile
with the weights loaded draws them; a parameter a kind computes from the base weight's values
(DoRA's magnitude, PiSSA's factors) has none to compute from, stays on the meta device, and a
note names it.
A selected conv / linear whose weight is computed from parameters on every call (BiT's weight
standardization) gets its weight computed once, as a frozen tensor `<path>.weight_computed`
that then is the site's weight: the base is frozen while adapters train, so this is exact, and
merge then adds into the weight the op really uses (PEFT adds into the raw parameter, which the
standardization then rescales). Sites are taken in graph order; loaded weights keyed "#k"
(checkpoints that name no modules, PEFT prefix tuning) go to the k-th site, and then their count
must equal the site count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from surgeon.adapter_ops import (PARAM_SITE, SITE_OPS, add_delta, attach, check_loaded_shapes, discover_sites,
                                 place_peft_params, site_dims, site_weight)
from surgeon.calibration import input_covariances, input_scatters
from surgeon.errors import SurgeonError
from surgeon.grad_calibration import weight_gradients
from surgeon.graph import get_tensor, module_path
from surgeon.pipeline import Context, PassResult, SiteState
from surgeon.rules import SIGNATURES, Pattern, path_matches

from ._rep_constants import precompute


@dataclass(frozen=True)
class Insert:
    adapters: tuple[str, ...] | None = None
    name: ClassVar[str] = "insert"
    needs_weights: ClassVar[bool] = False   # runs on a structure-only graph (surgeon.pipeline)

    def check(self, ctx: Context) -> str:
        chosen = ctx.select(self.adapters, ("declared", "removed"))
        if any(a.spec.loaded is not None for a in chosen):
            return "none"
        checks = {a.spec.kind.init_check(a.spec.options) for a in chosen}
        return next(c for c in ("none", "close", "exact") if c in checks | {"exact"})

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        result = PassResult()
        adapter_targets = {t for a in ctx.adapters.values() for s in a.sites for t in s.params.values()}
        for target, param in gm.named_parameters():
            if target not in adapter_targets:
                param.requires_grad_(False)   # our own Parameter objects, never the user's
        computed = _compute_weights(gm, ctx.select(self.adapters, ("declared", "removed")), result)
        for state in ctx.select(self.adapters, ("declared", "removed")):
            index = list(ctx.adapters).index(state.spec.name)
            spec = state.spec
            state.sites = []
            without: dict[str, list[str]] = {}   # adapter params left meta (computed from meta weights) -> sites
            found = discover_sites(gm, state, ctx, index, result)
            position = {node: i for i, node in enumerate(gm.graph.nodes)}
            paths = sorted(found, key=lambda p: position[found[p][0]])
            if spec.from_peft is not None:
                _refuse_peft_computed_convs(computed, paths, found, ctx, index)
            if spec.loaded is not None:
                place_peft_params(spec.loaded, paths, found, ctx, index)
            _check_ordinals(spec, paths, ctx, index)
            layout = _layout(gm, spec, paths, found)
            covariances = _calibrate(gm, spec, paths, found, ctx, index, layout)
            for path in paths:
                calls = found[path]
                op = _site_op(calls[0])
                weight, fan_in, fan_out = site_dims(gm, calls[0], op)
                options = {**spec.options, **layout.get(path, {}),
                           **(spec.loaded.site_options.get(path, {}) if spec.loaded else {})}
                if spec.kind.site_options is not None:   # options a kind reads from the graph (S2FT's k)
                    options.update(spec.kind.site_options(gm, path, weight, options))
                site = SiteState(path, op, weight, fan_in, fan_out, options)
                dtype = calls[0].meta["val"].dtype if "val" in calls[0].meta else None
                tensors = self._tensors(gm, state, site, ctx, index, dtype, len(state.sites), covariances.get(path))
                unknown = [p for p, t in tensors.items() if t.is_meta]
                if unknown:
                    without.setdefault(", ".join(unknown), []).append(path)
                attach(gm, state, site, calls, tensors, self.name)
                state.sites.append(site)
                result.matches += len(calls)
            for params, where in without.items():
                result.notes.append(f"{spec.name}: {params} of {len(where)} sites (e.g. '{where[0]}') computed from "
                                    "the base weight's values, which a structure-only graph has none of: left on "
                                    "the meta device")
            if spec.loaded is not None:
                _check_all_placed(spec, state, result, ctx, index)
            state.status = "inserted"
            result.notes.append(f"{spec.name}: {spec.type} on {len(state.sites)} modules, "
                                f"{state.param_count:,} parameters")
        return result

    def _tensors(self, gm, state, site, ctx, index, dtype, ordinal, covariance=None):
        kind, loaded = state.spec.kind, state.spec.loaded
        weight = site_weight(gm, site)
        fresh = None
        if loaded is None or kind.base_delta is not None or kind.recomputed:
            # a loaded adapter leaves ctx.generator alone
            gen = ctx.generator if loaded is None else torch.Generator().manual_seed(0)
            fresh = kind.init(site.options, site.in_features, site.out_features, weight.dtype, gen, weight,
                              **({} if covariance is None else {"covariance": covariance}))
        if loaded is not None:
            tensors = loaded.weights.get(site.path, loaded.weights.get(f"#{ordinal}"))
            if tensors is None:
                raise ctx.spec.error(("adapters", index, "targets"), f"no weights for module '{site.path}'")
            # what PEFT does not save (PSOFT's SVD factors) it rebuilds from the weight when it loads: so does init
            tensors = {**{p: fresh[p] for p in kind.recomputed if p in fresh and p not in tensors}, **tensors}
            check_loaded_shapes(state, site, tensors, ctx, index)
        else:
            tensors = fresh
        if kind.base_delta is not None:
            base_delta = kind.base_delta(fresh, site.options, weight)
            if base_delta is not None:
                add_delta(gm, state, site, base_delta, self.name)
        # floating parameters take the site's dtype; integer ones (SHiRA's indices) keep theirs; on a meta base
        # weight they stay where they were made (the CPU; meta when computed from the weight's values). Always
        # a copy of its own (a kind may return a cached tensor), made once even when the dtype changes
        return {p: t.to(device=t.device if weight.is_meta else weight.device,
                        dtype=(dtype or weight.dtype) if t.is_floating_point() else t.dtype, copy=True)
                for p, t in tensors.items()}


def _calibrate(gm: fx.GraphModule, spec, paths: list[str], found: dict[str, list[fx.Node]], ctx: Context,
               index: int, layout: dict[str, dict]) -> dict:
    """{path: the statistic of the site's inputs} for a kind whose init needs one, over the compile's example
    inputs (surgeon.calibration): `calibrated` names it, "covariance" (or True: CorDA) or "scatter" (EVA,
    whose rank redistribution also sets per-site rank / alpha in `layout`) or "gradient" (LoRA-GA, LoRA-SB: the
    loss gradient of each site's weight, out x in: surgeon.grad_calibration); {} for any other kind, and for
    a loaded EVA adapter (its A is in the checkpoint and its base weight untouched)."""
    statistic = spec.kind.calibrated(spec.options) if spec.kind.calibrated is not None else False
    if not statistic or (spec.loaded is not None and (statistic == "scatter" or (statistic == "gradient"
                                                                               and spec.kind.base_delta is None))):
        return {}   # a loaded adapter that leaves W alone (EVA, LoRA-SB) holds every factor: nothing to compute
    where = ("adapters", index, "init")
    inputs = {}
    for path in paths:
        call = found[path][0]
        op = _site_op(call)
        if op not in ("linear", "addmm") or any(c.target is not call.target for c in found[path]):
            raise ctx.spec.error(where, f"{spec.options.get('init')} gathers input statistics on linear and GPT-2 "
                                        f"Conv1D sites only; '{path}' is a {op} site")
        inputs[path] = [c.args[0] if op == "linear" else c.args[1] for c in found[path]]
    if any(get_tensor(gm, n.target).is_meta for n in gm.graph.find_nodes(op="get_attr")
           if isinstance(get_tensor(gm, n.target), torch.Tensor)):
        raise ctx.spec.error(where, f"{spec.options.get('init')} runs the model on the example inputs, and this "
                                    "graph has no weight values (a structure-only compile)")
    try:
        if statistic == "gradient":
            return weight_gradients(gm, [(ctx.example_args, ctx.example_kwargs)],
                                    {path: (site_dims(gm, found[path][0], _site_op(found[path][0]))[0],
                                            _site_op(found[path][0]) == "addmm", len(found[path])) for path in paths})
        if statistic != "scatter":
            return input_covariances(gm, [(ctx.example_args, ctx.example_kwargs)], inputs)
        from surgeon.adapters.eva import eva_site_options
        scatters = input_scatters(gm, [(ctx.example_args, ctx.example_kwargs)], inputs)
        own = {path: {**spec.options, **layout.get(path, {})} for path in paths}
        for path, changed in eva_site_options(scatters, {p: o["rank"] for p, o in own.items()},
                                              {p: o["alpha"] if o.get("alpha") is not None else o["rank"]
                                               for p, o in own.items()}, spec.options).items():
            layout.setdefault(path, {}).update(changed)
        return {path: scatter for path, (scatter, _) in scatters.items()}
    except SurgeonError as error:   # SpecError is one: eva's refusals get the adapter's init key
        raise ctx.spec.error(where, str(error)) from error


def _site_op(node: fx.Node) -> str:
    """The rules.SIGNATURES name of a site's base op (PARAM_SITE for a parameter's get_attr)."""
    return PARAM_SITE if node.op == "get_attr" else \
        next(name for name, (target, _) in SIGNATURES.items() if target is node.target)


def _layout(gm: fx.GraphModule, spec, paths: list[str], found: dict[str, list[fx.Node]]) -> dict[str, dict]:
    """The kind's site_layout options per path: the sites in module order (the order the model registers their
    weights, which is PEFT's order; graph order for a weight that is no registered parameter)."""
    if spec.kind.site_layout is None:
        return {}
    registered: dict[str, int] = {}
    for name, _ in gm.named_parameters(remove_duplicate=False):
        registered.setdefault(name, len(registered))
    sites = []
    for position, path in enumerate(paths):
        weight, fan_in, fan_out = site_dims(gm, found[path][0], _site_op(found[path][0]))
        sites.append((registered.get(weight, len(registered) + position), path, fan_in, fan_out))
    sites.sort()
    options = spec.kind.site_layout(spec.options, [(path, fan_in, fan_out) for _, path, fan_in, fan_out in sites])
    return {path: opts for (_, path, _, _), opts in zip(sites, options)}


def _compute_weights(gm: fx.GraphModule, states, result: PassResult) -> dict[str, str]:
    """Weights computed from parameters only, of the conv / linear ops some adapter's targets select,
    computed once and stored frozen (see the module's docstring); {new weight target: module class}."""
    takers = [s.spec for s in states if set(s.spec.kind.site_ops) & set(SITE_OPS)]

    def selected(path: str) -> bool:
        return any(path_matches(path, glob) and not any(path_matches(path, ex) for ex in spec.exclude)
                   for spec in takers for glob in spec.targets)

    weights = {m["weight"] for node in gm.graph.nodes
               if (m := Pattern(SITE_OPS, params=()).match(node)) is not None and isinstance(m["weight"], fx.Node)
               and m["weight"].op == "call_function" and not node.meta.get("surgeon_adapter") and selected(m.path)}
    if not weights:
        return {}
    classes = {module_path(w): _module_class(w) for w in weights}
    log: list[str] = []
    made = precompute(gm, "insert", log, result.rejections, lambda node: node in weights, stem="weight_computed")
    result.notes += [f"{target}: the op's weight is computed from parameters on every call; computed once and "
                     "frozen here (the base is frozen while adapters train)" for target in made]
    return {target: classes.get(target.rpartition(".")[0], "?") for target in made}


def _module_class(node: fx.Node) -> str:
    """The class name of the module a node came from (export records its qualified name)."""
    stack = node.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][1]).rpartition(".")[2] if stack else "?"


def _refuse_peft_computed_convs(computed: dict[str, str], paths: list[str], found: dict, ctx: Context,
                                index: int) -> None:
    """PEFT builds a conv's lora_A as an instance of the conv's own class, so where that class computes
    its weight (BiT's StdConv2d standardizes it), PEFT's A is transformed the same way on every call:
    a computation surgeon cannot replay on A's shape. Say so rather than import something else."""
    for path in paths:
        calls = found[path]
        weight = calls[0].args[1] if calls[0].op == "call_function" and len(calls[0].args) > 1 else None
        if not (isinstance(weight, fx.Node) and weight.target in computed) or "conv" not in str(calls[0].target):
            continue
        cls = computed[weight.target]
        raise ctx.spec.error(("adapters", index, "from_peft"),
                             f"module '{path}' ({cls}) computes its conv weight from its parameter on every call; "
                             f"PEFT builds that module's lora_A as a {cls} too, so the checkpoint's A is transformed "
                             "the same way, which surgeon cannot replay on A's shape. Train this adapter with "
                             "surgeon (a LoRA spec on the same targets), or target modules whose weight is a "
                             "plain parameter")


def _check_all_placed(spec, state, result: PassResult, ctx: Context, index: int) -> None:
    """Every module a loaded adapter holds tensors for got a site, or SpecError names those that did not
    (a partly placed adapter computes neither the base model nor the adapter's model); `allow_partial`
    imports the rest with a note saying what was left out."""
    placed = {site.path for site in state.sites}
    left = [path for path in spec.loaded.weights if not path.startswith("#") and path not in placed]
    if not left:
        return
    why = {where.split(" @ ", 1)[1]: reason for where, reason in result.rejections if " @ " in where}
    detail = "; ".join(f"'{path}' ({', '.join(sorted(spec.loaded.weights[path]))}): "
                       f"{why.get(path, 'no linear/conv op of that module runs in the captured graph')}"
                       for path in left[:6]) + (f"; and {len(left) - 6} more" if len(left) > 6 else "")
    total = sum(not path.startswith("#") for path in spec.loaded.weights)
    what = f"{len(left)} of the {total} modules {spec.name}'s checkpoint holds tensors for were not placed: {detail}"
    if spec.allow_partial:
        result.notes.append(f"WARNING (allow_partial): {what}; the compiled model runs the adapter without them")
        return
    raise ctx.spec.error(("adapters", index, "from_peft" if spec.from_peft else "from_dir"),
                         f"{what}. Importing part of an adapter gives neither the base model nor the adapter's; "
                         "set `allow_partial: true` on the adapter to import the rest anyway")


def _check_ordinals(spec, paths: list[str], ctx: Context, index: int) -> None:
    """Ordinal-keyed loaded weights ("#k") must cover the selected sites one to one."""
    count = sum(key.startswith("#") for key in (spec.loaded.weights if spec.loaded else ()))
    if count and count != len(paths):
        raise ctx.spec.error(("adapters", index, "from_peft" if spec.from_peft else "from_dir"),
                             f"the checkpoint holds weights for {count} sites in order (no module paths), but the "
                             f"targets {list(spec.targets)} select {len(paths)}: {paths[:4]}")
