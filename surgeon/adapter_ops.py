"""Attach and detach adapter branches around linear-like sites; shared by insert/merge/unmerge/remove.

A site is an `aten.linear(x, W, b)` (W: out x in) or GPT-2 Conv1D's `aten.addmm(b, x, W)`
(W: in x out). Attaching builds the kind's forward from the site's input x and base output y
and points every user of y at the adapted output; detaching does the reverse.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .adapters import Branch
from .errors import SpecError
from .graph import delete_attr, get_attr, get_tensor, set_parameter
from .pipeline import AdapterState, Context, PassResult, SiteState
from .rules import Pattern, find, path_matches

SITE_OPS = ("linear", "addmm")


def discover_sites(gm: fx.GraphModule, state: AdapterState, ctx: Context, index: int,
                   result: PassResult) -> dict[str, list[fx.Node]]:
    """Module path -> its linear-like call nodes, for every path the adapter's targets select."""
    spec = state.spec
    found: dict[str, list[fx.Node]] = {}
    for glob in spec.targets:
        for match in find(gm, Pattern(SITE_OPS, glob)):
            if match.node.meta.get("surgeon_adapter") or any(path_matches(match.path, ex) for ex in spec.exclude):
                continue   # another adapter's own ops are not sites
            nodes = found.setdefault(match.path, [])
            if match.node not in nodes:
                nodes.append(match.node)
    matched_paths = {n.meta.get("surgeon_path", "") for n in gm.graph.nodes if n.op == "call_function"}
    for glob in spec.targets:
        for path in sorted(p for p in matched_paths if path_matches(p, glob) and p not in found):
            if not any(path.startswith(f + ".") for f in found):
                result.rejections.append((f"{spec.name} @ {path}", "module has no linear-like op (linear/addmm "
                                                                   "with a parameter weight)"))
    if not found:
        raise ctx.spec.error(("adapters", index, "targets"),
                             f"targets {list(spec.targets)} select no linear-like op in the captured graph")
    return found


def site_dims(gm: fx.GraphModule, node: fx.Node, op: str) -> tuple[str, int, int]:
    """(weight target, in_features, out_features) of a site node."""
    weight = node.args[1] if op == "linear" else node.args[2]
    rows, cols = get_tensor(gm, weight.target).shape
    return (weight.target, cols, rows) if op == "linear" else (weight.target, rows, cols)


def attach(gm: fx.GraphModule, state: AdapterState, site: SiteState, calls: list[fx.Node],
           tensors: dict[str, torch.Tensor], made_by: str) -> None:
    """Register the site's adapter parameters and build the kind's forward after each call."""
    kind, name = state.spec.kind, state.spec.name
    site.params = {}
    for pname, tensor in tensors.items():
        target = f"{site.path}.adapter_{name}.{pname}"
        set_parameter(gm, target, tensor, requires_grad=True)
        site.params[pname] = target
    site.nodes, site.base_output, site.output = [], "", ""
    outputs = []
    for node in calls:
        x = node.args[0] if site.op == "linear" else node.args[1]
        with gm.graph.inserting_before(node.next):
            branch = Branch(gm.graph, made_by, site.path, name)
            refs = {}
            for pname, target in site.params.items():
                refs[pname] = get_attr(gm.graph, target, made_by=made_by, adapter=name)
                branch.created.append(refs[pname])
            new_y = kind.forward(branch, x, node, refs, site.options)
        node.replace_all_uses_with(new_y, delete_user_cb=lambda user, mine=set(branch.created): user not in mine)
        site.nodes += [n.name for n in branch.created]
        outputs.append(f"{node.name}->{new_y.name}")
    site.output = ",".join(outputs)


def detach(gm: fx.GraphModule, site: SiteState) -> dict[str, torch.Tensor]:
    """Remove the site's adapter nodes and parameters; return the parameter tensors."""
    by_name = {n.name: n for n in gm.graph.nodes}
    mine = {by_name[n] for n in site.nodes}
    for pair in site.output.split(","):
        base, out = (by_name[n] for n in pair.split("->"))
        out.replace_all_uses_with(_current_base(base, out, mine))
    for node_name in reversed(site.nodes):
        gm.graph.erase_node(by_name[node_name])
    tensors = {p: get_tensor(gm, t).detach() for p, t in site.params.items()}
    for target in site.params.values():
        delete_attr(gm, target)
    site.params, site.nodes, site.output = {}, [], ""
    return tensors


def _current_base(base: fx.Node, out: fx.Node, mine: set[fx.Node]) -> fx.Node:
    """What feeds this adapter's branch in place of the base output now.

    A later adapter on the same op rewires this branch's use of the base output to its own
    output, so the branch's non-parameter input other than x is what must replace `out`.
    """
    x = base.args[0] if base.target is torch.ops.aten.linear.default else base.args[1]
    feeds = {i for n in mine for i in n.all_input_nodes if i not in mine and i.op != "get_attr" and i is not x}
    feeds.discard(base) if len(feeds) > 1 else None
    return feeds.pop() if len(feeds) == 1 else base


def site_calls(gm: fx.GraphModule, site: SiteState) -> list[fx.Node]:
    """The base op nodes of a site (the linear/addmm calls whose weight is the site's weight)."""
    return [m.node for m in find(gm, Pattern(SITE_OPS, site.path))
            if (m["weight"].target == site.weight)]


def add_delta(gm: fx.GraphModule, state: AdapterState, site: SiteState, delta: torch.Tensor,
              made_by: str) -> None:
    """Set the site's weight to W + delta (delta in out x in layout), as a new tensor.

    When the weight tensor is also read by ops outside this site (tied embeddings), the new
    weight gets its own name and only this site's ops are pointed at it.
    """
    weight = get_tensor(gm, site.weight)
    if site.op == "addmm":
        delta = delta.t()
    new = (weight.double() + delta.double()).to(weight.dtype)
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
        call.replace_input_with(call.args[1] if site.op == "linear" else call.args[2], ref)
    site.weight = target


def check_loaded_shapes(state: AdapterState, site: SiteState, tensors: dict[str, torch.Tensor],
                        ctx: Context, index: int) -> None:
    """Loaded weights must have the shapes the kind would create for this site."""
    expected = state.spec.kind.init(site.options, site.in_features, site.out_features, torch.float32,
                                    torch.Generator().manual_seed(0))
    key = "from_peft" if state.spec.from_peft else "from_dir"
    for pname, tensor in expected.items():
        got = tensors.get(pname)
        if got is None or tuple(got.shape) != tuple(tensor.shape):
            raise ctx.spec.error(("adapters", index, key),
                                 f"'{pname}' for module '{site.path}' has shape "
                                 f"{None if got is None else list(got.shape)}, expected {list(tensor.shape)}")


__all__ = ["attach", "detach", "discover_sites", "site_dims", "add_delta", "site_calls", "SpecError"]
