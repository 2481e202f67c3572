"""Attach and detach adapter branches around sites; shared by insert/merge/unmerge/remove/activate.

A site is an `aten.linear(x, W, b)` (W: out x in), GPT-2 Conv1D's `aten.addmm(b, x, W)`
(W: in x out) or, for kinds whose `site_ops` list them, a conv: `aten.conv2d(x, W, b, ...)`
(W: out x in x kh x kw, seen by the kinds as out x (in * kh * kw)), conv1d, conv3d and their
`.padding` overloads (`padding="same"`), grouped only for kinds with `conv_groups`; or a weightless call such as
`aten.scaled_dot_product_attention` (prefix tuning rewrites its arguments); or, for kinds that list
"param", a 3-D parameter (fused MoE experts, E x out x in) targeted by its own name
(`*.experts.gate_up_proj`): the site is the parameter's get_attr, and the kind's forward replaces
the weight itself (W + delta), so it holds whatever ops read the weight (grouped_mm, bmm, an
indexed linear). Attaching builds the kind's forward from the site's input x and base output y
and points every user of y at the adapted output; detaching does the reverse.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .adapters import Branch, ConvGeometry, index_misfit, merged_weight
from .errors import SpecError
from .graph import delete_attr, get_attr, get_tensor, module_path, set_parameter
from .pipeline import AdapterState, Context, PassResult, SiteState
from .rules import CONV_OPS, SIGNATURES, Match, Pattern, find, path_matches

SITE_OPS = ("linear", "addmm", *CONV_OPS)
# Call sites: ops with no base weight (attention); the whole call is the site's input x. A kind's
# forward_input gets the call node and returns {argument name (rules.SIGNATURES): new value};
# attach rewrites the call's arguments, detach restores them.
CALL_SITE_OPS = ("sdpa",)
# A parameter site: a 3-D weight no linear/conv reads directly (transformers 5's fused experts).
# Its "call" is the weight's get_attr node and its "output" the weight; x is None.
PARAM_SITE = "param"
# Weight sites, held as parameter sites (the kind's forward replaces the tensor for every op that reads
# it) but targeted by module: "norm" takes each parameter of a module whose parameters are all 1-D (a
# LayerNorm's weight and bias, an RMSNorm's weight, whatever ops read them: aten.layer_norm or HF's
# `weight * x` decomposition), site `<module>.<name>`; "embedding" takes the table an aten.embedding
# reads, site `<embedding module>.weight` even where a tied lm_head owns the tensor (which then reads
# the replaced table too, as PEFT's trainable tokens do).
WEIGHT_SITE_OPS = ("norm", "embedding")


def discover_sites(gm: fx.GraphModule, state: AdapterState, ctx: Context, index: int,
                   result: PassResult) -> dict[str, list[fx.Node]]:
    """Module path -> its linear-like call nodes, for every path the adapter's targets select."""
    spec = state.spec
    found: dict[str, list[fx.Node]] = {}
    refused: set[str] = set()
    for glob in spec.targets:
        for match in _site_matches(gm, spec.kind.site_ops, glob):
            # a weight site (`<module>.weight`) is excluded by its module's path too
            paths = (match.path, match.path.rpartition(".")[0]) if match.op in WEIGHT_SITE_OPS else (match.path,)
            if match.node.meta.get("surgeon_adapter") or any(path_matches(p, ex) for p in paths for ex in spec.exclude):
                continue   # another adapter's own ops are not sites
            reason = _site_refusal(match, spec.kind, _declared_options(spec, match.path))
            if reason:
                if match.path not in refused and glob != "*":   # a bare "*" means: whatever this kind takes
                    result.rejections.append((f"{spec.name} @ {match.path}", reason))
                refused.add(match.path)
                continue
            nodes = found.setdefault(match.path, [])
            if match.node not in nodes:
                nodes.append(match.node)
    matched_paths = {n.meta.get("surgeon_path", "") for n in gm.graph.nodes if n.op == "call_function"}
    ops, more = _op_names(spec.kind.site_ops)
    for glob in (g for g in spec.targets if g != "*"):
        for path in sorted(p for p in matched_paths if path_matches(p, glob) and p not in found):
            if path not in refused and not any(path.startswith(f + ".") or f.startswith(path + ".") for f in found):
                result.rejections.append((f"{spec.name} @ {path}", f"module has no {ops} "
                                                                   f"op a '{spec.type}' adapter attaches to{more}"))
    if not found:
        raise ctx.spec.error(("adapters", index, "targets"),
                             f"targets {list(spec.targets)} select no {ops} op{more} "
                             "in the captured graph"
                             + "".join(f"; {p}: {r}" for p, r in result.rejections if p.split(" @ ")[1] in refused))
    return found


def _op_names(site_ops: tuple[str, ...]) -> tuple[str, str]:
    """("linear/addmm/conv2d", " (nor conv1d/conv3d)") for messages: a `.padding` overload is the
    same op to a user, and the other conv dimensionalities trail so the usual names read first
    (a kind that adapts 3-D parameters says so: those are named, not ops)."""
    extra = [op for op in ("conv1d", "conv3d") if op in site_ops]
    main = [op for op in site_ops if op not in extra and "." not in op and op != PARAM_SITE]
    more = f" (nor {'/'.join(extra)})" if extra else ""
    if PARAM_SITE in site_ops:
        more += " nor 3-D parameter (fused experts, named in full: '*.experts.gate_up_proj')"
    return "/".join(main), more


def _site_matches(gm: fx.GraphModule, kind_ops: tuple[str, ...], glob: str) -> list:
    """Linear-like ops with a parameter weight, and the call-site ops the kind takes, in graph order."""
    patterns = [Pattern(SITE_OPS, glob)]
    call_ops = tuple(op for op in kind_ops if op in CALL_SITE_OPS)
    if call_ops:
        patterns.append(Pattern(call_ops, glob, params=()))
    matches = [m for node in gm.graph.nodes for p in patterns if (m := p.match(node)) is not None]
    if PARAM_SITE in kind_ops and glob != "*":   # a bare "*" keeps meaning the kind's ops
        matches += _param_matches(gm, glob)
    for op in (op for op in kind_ops if op in WEIGHT_SITE_OPS):
        matches += _weight_matches(gm, op, glob)
    return matches


def _weight_matches(gm: fx.GraphModule, op: str, glob: str) -> list[Match]:
    """The get_attr nodes of a weight site (WEIGHT_SITE_OPS) whose module or site path the glob matches."""
    if op == "embedding":
        return [Match(node.args[0], op, f"{module_path(node)}.weight", {})
                for node in gm.graph.find_nodes(op="call_function", target=torch.ops.aten.embedding.default)
                if isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"
                and any(path_matches(p, glob) for p in (module_path(node), f"{module_path(node)}.weight"))]
    by_owner: dict[str, list[fx.Node]] = {}
    for node in gm.graph.find_nodes(op="get_attr"):
        tensor = _try_tensor(gm, node.target)
        if isinstance(tensor, nn.Parameter) and tensor.is_floating_point() and not node.meta.get("surgeon_adapter"):
            by_owner.setdefault(node.target.rpartition(".")[0], []).append(node)
    return [Match(node, op, node.target, {}) for owner, nodes in by_owner.items()
            if all(get_tensor(gm, n.target).dim() == 1 for n in nodes)
            for node in nodes if path_matches(owner, glob) or path_matches(node.target, glob)]


def _param_matches(gm: fx.GraphModule, glob: str) -> list[Match]:
    """get_attr nodes of 3-D floating parameters whose full name the glob matches and that no
    linear/conv reads as its weight (a conv1d weight is 3-D too, and is a conv site)."""
    op_weights = {m["weight"] for node in gm.graph.nodes if (m := Pattern(SITE_OPS).match(node)) is not None}
    out = []
    for node in gm.graph.find_nodes(op="get_attr"):
        value = node.meta.get("val")
        if value is None or not path_matches(node.target, glob) or node in op_weights:
            continue
        if value.dim() == 3 and value.is_floating_point() and isinstance(_try_tensor(gm, node.target), nn.Parameter):
            out.append(Match(node, PARAM_SITE, node.target, {}))
    return out


def _try_tensor(gm: fx.GraphModule, target: str):
    try:
        return get_tensor(gm, target)
    except AttributeError:
        return None


def _declared_options(spec, path: str) -> dict:
    """The options a site at `path` will get from the spec and a loaded adapter's per-module ones
    (a PEFT rank_pattern), before any the kind reads from the graph."""
    return {**spec.options, **(spec.loaded.site_options.get(path, {}) if spec.loaded else {})}


def _site_refusal(match, kind, opts: dict) -> str:
    """Why a matched base op cannot hold this kind ("" when it can)."""
    if match.op not in kind.site_ops:
        return f"a '{kind.name}' adapter does not attach to {match.op} (it supports {', '.join(kind.site_ops)})"
    if match.op == PARAM_SITE:
        why = kind.param_refusal(opts) if kind.param_refusal is not None else ""
        return f"3-D parameter: {why}" if why else ""
    groups = match["groups"] if match.op in CONV_OPS else None
    if groups in (None, 1):
        return ""
    if kind.conv_groups is None:
        return (f"grouped {match.op} (groups={groups}) is not supported by a '{kind.name}' adapter: "
                "its weight is not one out x in map")
    why = kind.conv_groups(opts, groups)
    return f"grouped {match.op} (groups={groups}): {why}" if why else ""


def conv_geometry(gm: fx.GraphModule, node: fx.Node) -> ConvGeometry:
    """How a conv node applies its weight (stride, padding, dilation per axis, groups), defaults filled in."""
    _, per_group, *kernel = get_tensor(gm, node.args[1].target).shape
    given = dict(zip(("stride", "padding", "dilation", "groups"), node.args[3:7])) | node.kwargs
    axes = len(kernel)

    def per_axis(name: str, default: int):
        value = given.get(name)
        if isinstance(value, str):   # the .padding overloads: "same" / "valid"
            return value
        value = list(value) if value else [default]
        return tuple(value * (axes // len(value)))
    groups = given.get("groups") or 1
    return ConvGeometry(per_group * groups, tuple(kernel), per_axis("stride", 1), per_axis("padding", 0),
                        per_axis("dilation", 1), groups)


def transposed_param(gm: fx.GraphModule, target: str) -> bool:
    """Whether the 3-D parameter `target` holds experts as E x in x out (its module says `is_transposed`,
    as transformers' GPT-OSS experts do) rather than E x out x in."""
    return target in gm.meta.get("surgeon_transposed_params", ())


def site_dims(gm: fx.GraphModule, node: fx.Node, op: str) -> tuple[str, int, int]:
    """(weight target, in_features, out_features) of a site node; for a call site (no weight, target
    "") the key's (heads, head_dim) as the call sees it: (batch, heads, seq, head_dim)."""
    if op in CALL_SITE_OPS:
        _, heads, _, head_dim = node.args[1].meta["val"].shape
        return "", int(heads), int(head_dim)
    if op == PARAM_SITE and get_tensor(gm, node.target).dim() < 3:   # a weight site: 1-D n -> (1, n), a table
        shape = get_tensor(gm, node.target).shape                     # vocab x hidden as out x in
        return node.target, int(shape[-1]) if len(shape) == 2 else 1, int(shape[0])
    if op == PARAM_SITE:   # experts x out x in, PEFT's default expert layout; experts x in x out if transposed
        _, rows, cols = get_tensor(gm, node.target).shape
        if transposed_param(gm, node.target):
            return node.target, int(rows), int(cols)
        return node.target, int(cols), int(rows)
    weight = node.args[2] if op == "addmm" else node.args[1]
    shape = get_tensor(gm, weight.target).shape
    if op in CONV_OPS:   # out x in x kh x kw: a linear map over in * kh * kw patch values (all groups' inputs)
        return weight.target, shape[1:].numel() * conv_geometry(gm, node).groups, shape[0]
    rows, cols = shape
    return (weight.target, cols, rows) if op == "linear" else (weight.target, rows, cols)


def attach(gm: fx.GraphModule, state: AdapterState, site: SiteState, calls: list[fx.Node],
           tensors: dict[str, torch.Tensor], made_by: str) -> None:
    """Register the site's adapter parameters and build the kind's forward around each call.

    The input half (kind.forward_input) goes before the call and replaces its input; the output
    half (kind.forward) goes after it and takes over every user of its output.
    """
    kind, name = state.spec.kind, state.spec.name
    site.params = {pname: _register(gm, state, site, pname, tensor) for pname, tensor in tensors.items()}
    site.nodes, site.base_output, site.output = [], "", ""
    outputs = []
    for node in calls:
        x = _site_input(node, site.op)
        if kind.forward_input is not None:
            with gm.graph.inserting_before(node):
                branch = _branch(gm, state, site, node, made_by)
                new_x = kind.forward_input(branch, x, _refs(gm, branch, site, made_by, name), site.options)
            _drop_unread(gm, branch)
            if site.op in CALL_SITE_OPS:
                _rewrite_call(node, site.op, new_x, branch.created, name)
            elif new_x is not x:   # a kind may leave the input alone for some options
                new_x.meta["surgeon_input_of"] = x.name   # detach puts x back
                node.replace_input_with(x, new_x)
            site.nodes += [n.name for n in branch.created]
        new_y = node
        if kind.forward is not None:
            with gm.graph.inserting_before(node.next):
                branch = _branch(gm, state, site, node, made_by)
                new_y = kind.forward(branch, x, node, _refs(gm, branch, site, made_by, name), site.options)
            _drop_unread(gm, branch, keep=new_y)   # a weight site's forward may return a parameter's read itself
            for user in node.users:   # where the branch reads the base output (a later adapter may rewire it)
                if user in branch.created:
                    user.meta["surgeon_base_args"] = [i for i, a in enumerate(user.args) if a is node]
                    user.meta["surgeon_base_of"] = node.name   # which call: a shared module has several
            if new_y is not node:
                mine = set(branch.created)
                node.replace_all_uses_with(new_y, delete_user_cb=lambda user, mine=mine: user not in mine)
            site.nodes += [n.name for n in branch.created]
        outputs.append(f"{node.name}->{new_y.name}")
    site.output = ",".join(outputs)


def _site_input(node: fx.Node, op: str):
    """What a site's forward_input reads as x: the call itself for a call site, nothing for a
    parameter site (the adapter changes the weight, not an input), else the op's input."""
    if op == PARAM_SITE:
        return None
    return node if op in CALL_SITE_OPS else node.args[1] if op == "addmm" else node.args[0]


def _branch(gm: fx.GraphModule, state: AdapterState, site: SiteState, node: fx.Node, made_by: str) -> Branch:
    if site.op in CALL_SITE_OPS:
        weight, bias = None, None
    elif site.op == PARAM_SITE:
        weight, bias = node, None
    else:
        weight, bias = (node.args[2], node.args[0]) if site.op == "addmm" else (node.args[1], _arg(node, 2))
    return Branch(gm.graph, made_by, site.path, state.spec.name, weight, bias, transposed=site.op == "addmm",
                  dims=(site.in_features, site.out_features),
                  conv=conv_geometry(gm, node) if site.op in CONV_OPS else None)


@dataclass(frozen=True)
class _NodeRef:
    name: str   # a node kept by name in meta (meta is copied shallowly with the graph)


def _rewrite_call(node: fx.Node, op: str, changes: dict, created: list[fx.Node], adapter: str) -> None:
    """Set a call site's arguments named in `changes`; the first adapter node keeps the old ones for detach."""
    if any(a.meta.get("surgeon_adapter") for a in node.all_input_nodes):
        raise ValueError(f"adapter '{adapter}': the {op} call {node.name} at '{node.meta.get('surgeon_path')}' "
                         f"already has another adapter's rewritten arguments; call-site adapters do not stack")
    keep = fx.node.map_arg((node.args, dict(node.kwargs)), lambda n: _NodeRef(n.name))
    created[0].meta["surgeon_call_of"] = (node.name, keep)
    names, args, kwargs = SIGNATURES[op][1], list(node.args), dict(node.kwargs)
    for name, value in changes.items():
        index = names.index(name)
        if index < len(args):
            args[index] = value
        else:
            kwargs[name] = value
    node.args, node.kwargs = tuple(args), kwargs


def _arg(node: fx.Node, index: int):
    return node.args[index] if len(node.args) > index else node.kwargs.get("bias")


def _drop_unread(gm: fx.GraphModule, branch: Branch, keep: fx.Node | None = None) -> None:
    """Erase the parameter reads a half did not use (e.g. IA3's l in the half its `on` option skips)."""
    for node in [n for n in branch.created if n.op == "get_attr" and not n.users and n is not keep]:
        gm.graph.erase_node(node)
        branch.created.remove(node)


def _refs(gm: fx.GraphModule, branch: Branch, site: SiteState, made_by: str, name: str) -> dict[str, fx.Node]:
    refs = {}
    for pname, target in site.params.items():
        refs[pname] = get_attr(gm.graph, target, made_by=made_by, adapter=name)
        branch.created.append(refs[pname])
    return refs


def _register(gm: fx.GraphModule, state: AdapterState, site: SiteState, pname: str, tensor: torch.Tensor) -> str:
    """Store one adapter parameter; a shared one once per adapter, shape (and the kind's shared_group),
    reused by later sites. A trained shared one is one Parameter every site reads, so their gradients
    accumulate in it; a fresh insert keeps the first site's init of it."""
    kind, name = state.spec.kind, state.spec.name
    if pname not in kind.shared:
        owner, _, param = site.path.rpartition(".")   # a parameter site's path is a tensor: no submodule under it
        home = f"{owner + '.' if owner else ''}adapter_{name}.{param}" if site.op == PARAM_SITE else \
            f"{site.path}.adapter_{name}"
        target = f"{home}.{pname}"
        set_parameter(gm, target, tensor, requires_grad=pname not in kind.frozen)
        return target
    group = kind.shared_group(site.options) if kind.shared_group is not None else None
    target = f"adapter_{name}.{pname}_{'x'.join(map(str, tensor.shape))}{'' if group is None else f'_g{group}'}"
    trained = pname in kind.shared_trained
    try:
        existing = get_tensor(gm, target)
    except AttributeError:
        set_parameter(gm, target, tensor, requires_grad=trained)
        return target
    if trained and state.spec.loaded is None and state.status in ("declared", "removed"):
        return target   # a fresh insert (not a re-attach): the first site's init is the tensor, later draws dropped
    if not torch.equal(existing, tensor.to(existing.device, existing.dtype)):
        raise ValueError(f"adapter '{name}': shared parameter '{pname}' for module '{site.path}' differs from "
                         f"the one other {list(tensor.shape)} sites use")
    return target


def detach(gm: fx.GraphModule, site: SiteState) -> dict[str, torch.Tensor]:
    """Remove the site's adapter nodes and parameters; return the parameter tensors.

    A shared parameter stays while another site still reads it.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    mine = {by_name[n] for n in site.nodes}
    for pair in site.output.split(","):
        base, out = (by_name[n] for n in pair.split("->"))
        if out is not base:
            out.replace_all_uses_with(_current_base(base, {n for n in mine if n.meta.get("surgeon_base_of",
                                                                                         base.name) == base.name}))
    for node in mine:
        if "surgeon_input_of" in node.meta:
            original = by_name[node.meta["surgeon_input_of"]]
            for user in [u for u in node.users if u not in mine]:
                user.replace_input_with(node, original)
            # an input-side adapter stacked after this one took `node` as its input: it now takes `original`
            for other in gm.graph.nodes:
                if other not in mine and other.meta.get("surgeon_input_of") == node.name:
                    other.meta["surgeon_input_of"] = original.name
        if "surgeon_call_of" in node.meta:   # a call site gets its arguments back
            call_name, (args, kwargs) = node.meta["surgeon_call_of"]
            refs = fx.node.map_aggregate((args, kwargs), lambda a: by_name[a.name] if isinstance(a, _NodeRef) else a)
            by_name[call_name].args, by_name[call_name].kwargs = refs
    for node_name in reversed(site.nodes):
        gm.graph.erase_node(by_name[node_name])
    tensors = {p: get_tensor(gm, t).detach() for p, t in site.params.items()}
    for target in site.params.values():
        if not gm.graph.find_nodes(op="get_attr", target=target):
            delete_attr(gm, target)
    site.params, site.nodes, site.output = {}, [], ""
    return tensors


def _current_base(base: fx.Node, mine: set[fx.Node]) -> fx.Node:
    """What feeds this adapter's branch in place of the base output now.

    A later adapter on the same op rewires this branch's reads of the base output to its own
    output; attach marked those reads, so whatever they read now replaces `out`.
    """
    for node in mine:
        for index in node.meta.get("surgeon_base_args", ()):
            return node.args[index]
    return base


def site_calls(gm: fx.GraphModule, site: SiteState) -> list[fx.Node]:
    """The base op nodes of a site (the linear/addmm calls whose weight is the site's weight)."""
    if site.op in CALL_SITE_OPS:   # no weight: the base calls at the site's path
        return [m.node for m in find(gm, Pattern((site.op,), site.path, params=()))
                if not m.node.meta.get("surgeon_adapter")]
    if site.op == PARAM_SITE:   # the weight's own reads
        return [n for n in gm.graph.find_nodes(op="get_attr", target=site.weight)
                if not n.meta.get("surgeon_adapter")]
    # the weight's readers, not a scan of the graph (this runs once per site in merge / activate)
    pattern = Pattern(SITE_OPS, site.path)
    readers = sorted({u for ref in gm.graph.find_nodes(op="get_attr", target=site.weight) for u in ref.users})
    return [node for node in readers if (m := pattern.match(node)) is not None and m["weight"].target == site.weight]


def add_delta(gm: fx.GraphModule, state: AdapterState, site: SiteState, delta: torch.Tensor,
              made_by: str) -> None:
    """Set the site's weight to W + delta (delta in out x in layout), as a new tensor.

    When the weight tensor is also read by ops outside this site (tied embeddings), the new
    weight gets its own name and only this site's ops are pointed at it.
    """
    weight = get_tensor(gm, site.weight)
    if site.op == "addmm":
        delta = delta.t()
    delta = delta.reshape(weight.shape)   # a conv's out x (in * kh * kw) delta back to out x in x kh x kw
    new = merged_weight(weight, delta)   # W + dW rounded once to W's dtype, no float64 copy of W
    if site.op == PARAM_SITE:   # the parameter is the site: every read of it is adapted, so it changes in place
        tied = [n for n, p in gm.named_parameters(remove_duplicate=False) if p is weight and n != site.weight]
        set_parameter(gm, site.weight, new, requires_grad=weight.requires_grad)
        for name in tied:   # a tied embedding is one tensor under several names: all of them get the new one
            owner, _, leaf = name.rpartition(".")
            gm.get_submodule(owner)._parameters[leaf] = get_tensor(gm, site.weight)
        return
    readers = [u for n in gm.graph.find_nodes(op="get_attr", target=site.weight) for u in n.users]
    calls = set(site_calls(gm, site))
    if all(r in calls for r in readers):
        set_parameter(gm, site.weight, new, requires_grad=weight.requires_grad)
        return
    target = f"{site.path}.weight_untied"
    set_parameter(gm, target, new, requires_grad=weight.requires_grad)
    for call in calls:
        with gm.graph.inserting_before(call):
            ref = get_attr(gm.graph, target, made_by=made_by)
        call.replace_input_with(call.args[2] if site.op == "addmm" else call.args[1], ref)
    site.weight = target


def site_weight(gm: fx.GraphModule, site: SiteState) -> torch.Tensor:
    """The site's current base weight, out x in (a view for Conv1D's in x out storage; a conv's
    out x in x kh x kw weight flattened to out x (in * kh * kw))."""
    if site.op in CALL_SITE_OPS:   # no base weight: an empty tensor with the call's dtype and device
        val = site_calls(gm, site)[0].meta["val"]
        return torch.empty(0, dtype=val.dtype, device=next((p.device for p in gm.parameters()), val.device))
    weight = get_tensor(gm, site.weight).detach()
    if site.op == PARAM_SITE:   # experts x out x in, as it is
        return weight
    return weight.t() if site.op == "addmm" else weight.flatten(1)


class SiteRefusal(ValueError):
    """A merge or unmerge the values at one site refuse (a kind's ValueError: hira's 1 + B A with a zero,
    road's singular block ...), with the adapter and site it happened at; `merge_sites` / `unmerge_sites`
    raise it before anything is written."""

    def __init__(self, adapter: str, path: str, reason: str):
        super().__init__(f"adapter '{adapter}' at '{path}': {reason}")
        self.adapter, self.path, self.reason = adapter, path, reason


def merge_sites(gm: fx.GraphModule, items: list[tuple[AdapterState, SiteState]], made_by: str) -> None:
    """Merge every (adapter, site) in order, all or nothing: each site's delta and bias are computed and
    checked first (`check_sites`), so a refusal at any site leaves the graph and weights untouched."""
    check_sites(gm, items, undo=False)
    for state, site in items:
        merge_site(gm, state, site, made_by)


def unmerge_sites(gm: fx.GraphModule, items: list[tuple[AdapterState, SiteState]], made_by: str) -> None:
    """Unmerge every (adapter, site) in order, all or nothing, as `merge_sites`."""
    check_sites(gm, items, undo=True)
    for state, site in items:
        unmerge_site(gm, state, site, made_by)


def check_sites(gm: fx.GraphModule, items: list[tuple[AdapterState, SiteState]], undo: bool) -> None:
    """Compute each site's weight change and new bias as merge_site (`undo`: unmerge_site) would, in order,
    writing nothing; raise SiteRefusal at the first the kind refuses (a ValueError from its delta_weight,
    undo_delta or bias_map).

    Memory: one site's change at a time, dropped once checked (the write recomputes it: twice the
    compute of a merge, no second copy of the weights). Only a weight that a later item of this call
    changes again (adapters stacked on one site) is kept, as it will be, so that item is checked
    against the weight it will really see; biases (1-D) likewise.
    """
    remaining: dict[str, int] = {}
    for _, site in items:
        remaining[site.weight] = remaining.get(site.weight, 0) + 1
    weights: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    for state, site in items:
        kind = state.spec.kind
        params = site.merged if undo else {p: get_tensor(gm, t).detach() for p, t in site.params.items()}
        weight = weights[site.weight] if site.weight in weights else site_weight(gm, site)
        bias_target = site_bias(gm, site) if kind.bias_map is not None else None
        try:
            if undo:
                change = kind.undo_delta(params, site.options, weight) if kind.undo_delta is not None \
                    else -kind.delta_weight(params, site.options, weight)
            else:
                change = kind.delta_weight(params, site.options, weight)
            if bias_target is not None:
                old = biases[bias_target] if bias_target in biases else get_tensor(gm, bias_target).detach()
                new = kind.bias_map({p: t.to(old.device) for p, t in params.items()}, site.options, old.double(),
                                    undo)
                if new is not None:
                    biases[bias_target] = new.reshape(old.shape).to(old.dtype)
        except ValueError as error:
            raise SiteRefusal(state.spec.name, site.path, str(error)) from None
        remaining[site.weight] -= 1
        if remaining[site.weight] > 0:   # stacked: the next adapter here merges into W + this change
            weights[site.weight] = merged_weight(weight, change.reshape(weight.shape))
        else:
            weights.pop(site.weight, None)
        del change


def merge_site(gm: fx.GraphModule, state: AdapterState, site: SiteState, made_by: str) -> None:
    """Detach the site's adapter and fold it into the base weight (and bias, for output scaling)."""
    kind = state.spec.kind
    tensors = detach(gm, site)
    add_delta(gm, state, site, kind.delta_weight(tensors, site.options, site_weight(gm, site)), made_by)
    _map_bias(gm, site, kind, tensors, undo=False)
    site.merged = tensors


def unmerge_site(gm: fx.GraphModule, state: AdapterState, site: SiteState, made_by: str) -> None:
    """Take a merged adapter back out of the base weight and re-attach its branch."""
    kind, params = state.spec.kind, site.merged
    weight = site_weight(gm, site)
    undo = kind.undo_delta(params, site.options, weight) if kind.undo_delta is not None \
        else -kind.delta_weight(params, site.options, weight)
    add_delta(gm, state, site, undo, made_by)
    _map_bias(gm, site, kind, params, undo=True)
    attach(gm, state, site, site_calls(gm, site), params, made_by)
    site.merged = {}


def site_bias(gm: fx.GraphModule, site: SiteState) -> str | None:
    """The target of the bias the site's (first) base call adds, None where it adds none (or has no
    bias argument: a parameter or call site)."""
    if site.op in CALL_SITE_OPS or site.op == PARAM_SITE:
        return None
    calls = site_calls(gm, site)
    if not calls:
        return None
    bias = calls[0].args[0] if site.op == "addmm" else _arg(calls[0], 2)
    return bias.target if isinstance(bias, fx.Node) else None


def _map_bias(gm: fx.GraphModule, site: SiteState, kind, params: dict, undo: bool) -> None:
    """The site's bias through the kind's bias_map (merge; `undo`: unmerge), as a new tensor."""
    if kind.bias_map is None:
        return
    target = site_bias(gm, site)
    if target is None:
        return
    old = get_tensor(gm, target)
    new = kind.bias_map({p: t.to(old.device) for p, t in params.items()}, site.options, old.double(), undo)
    if new is not None:
        set_parameter(gm, target, new.reshape(old.shape).to(old.dtype), requires_grad=old.requires_grad)


def place_peft_params(loaded, paths: list[str], found: dict[str, list[fx.Node]], ctx: Context, index: int) -> None:
    """Key a PEFT checkpoint's LoRA of targeted parameters by the parameters' names.

    PEFT wraps each targeted parameter of a module around the previous wrapper, in the order the
    module registers them, and saves each under its module with one `.base_layer` per wrapper
    outside it: of n targeted parameters the first registered is `<module>.base_layer` * (n - 1),
    the last `<module>`. The sites come in graph order, in which a captured graph lists
    parameters (torch.export reads them in registration order).
    """
    by_module: dict[str, list[str]] = {}
    for path in paths:
        value = found[path][0].meta.get("val")   # 3-D: a LoRA of experts (weight sites are keyed by their path)
        if found[path][0].op == "get_attr" and path not in loaded.weights and value is not None and value.dim() == 3:
            by_module.setdefault(path.rpartition(".")[0], []).append(path)
    for module, params in by_module.items():
        held = [key for key in loaded.weights if key == module or key.startswith(module + ".base_layer")
                and not key[len(module):].replace(".base_layer", "")]
        if len(held) != len(params):
            raise ctx.spec.error(("adapters", index, "from_peft"),
                                 f"the checkpoint holds {len(held)} nested LoRA(s) of parameters of '{module}' "
                                 f"({held}), but the targets select {len(params)} there ({params}); PEFT nests one "
                                 "per targeted parameter, so they cannot be told apart")
        for i, path in enumerate(params):
            key = module + ".base_layer" * (len(params) - 1 - i)
            loaded.weights[path] = loaded.weights.pop(key)
            if key in loaded.site_options:
                loaded.site_options[path] = loaded.site_options.pop(key)


def check_loaded_shapes(state: AdapterState, site: SiteState, tensors: dict[str, torch.Tensor],
                        ctx: Context, index: int) -> None:
    """Loaded weights must have the shapes the kind would create for this site."""
    meta_weight = torch.empty(site.out_features, site.in_features, device="meta")
    expected = state.spec.kind.init(site.options, site.in_features, site.out_features, torch.float32,
                                    torch.Generator().manual_seed(0), meta_weight)
    key = "from_peft" if state.spec.from_peft else "from_dir"
    for pname, tensor in expected.items():
        got = tensors.get(pname)
        fits = got is not None and (tuple(got.shape) == tuple(tensor.shape) or (   # a shared one may be larger:
            pname in state.spec.kind.shared and got.dim() == tensor.dim()         # sites read its leading part
            and all(g >= e for g, e in zip(got.shape, tensor.shape))))
        if not fits:
            raise ctx.spec.error(("adapters", index, key),
                                 f"'{pname}' for module '{site.path}' has shape "
                                 f"{None if got is None else list(got.shape)}, expected {list(tensor.shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ctx.spec.error(("adapters", index, key), f"unexpected weights {extra} for module '{site.path}' "
                                                       f"(a {state.spec.type} adapter has {sorted(expected)})")
    misfit = index_misfit(state.spec.kind, site.options, site.in_features, site.out_features, tensors)
    if misfit:
        raise ctx.spec.error(("adapters", index, key), f"module '{site.path}': {misfit}")


__all__ = ["attach", "detach", "discover_sites", "site_dims", "conv_geometry", "CONV_OPS", "SITE_OPS", "PARAM_SITE",
           "transposed_param",
           "add_delta", "site_calls", "site_weight", "site_bias", "merge_site", "unmerge_site", "merge_sites",
           "unmerge_sites", "check_sites", "SiteRefusal", "check_loaded_shapes",
           "place_peft_params", "SpecError"]
