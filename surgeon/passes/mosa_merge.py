"""mosa-merge: fold a MoSA adapter's sparse modules into one plain adapter of its kind.

A `lora` or `bottleneck` adapter with `mosa_modules: N > 1` (surgeon.adapters.mosa) holds its parameters
once, with a frozen assignment of every entry to one of N modules that do not overlap; in train mode each
forward reads one sampled module, in eval all of them: the dense adapter. Since the modules partition
each parameter, their sum is the parameter itself, so folding them is exact and moves no value: per site
the pass takes out the sampling (the `draw` node and each `select` node, its readers then read the
parameter directly), the assignment tensors, and the training flag where nothing else reads it (LoRA's
dropout keeps it), and sets the site's and the adapter's mosa_modules to 1. What remains is the plain
kind's graph, node for node, with the same Parameter objects (an optimizer holding them keeps working),
so the output is unchanged bit for bit ("exact") and merge, fuse, lower and export see a plain adapter.

Inserted and inactive (parked by `activate`) adapters are folded; `adapters` names them (default: every
inserted or inactive one with mosa_modules > 1). Naming an adapter that has no MoSA modules, or running it
with none to fold, is an error rather than a silent no-op.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch.fx as fx

from surgeon.adapters.mosa import draw, is_mosa, modules_of, select
from surgeon.errors import PassError
from surgeon.graph import delete_attr
from surgeon.modes import FLAG
from surgeon.pipeline import AdapterState, Context, PassResult, SiteState


@dataclass(frozen=True)
class MosaMerge:
    adapters: tuple[str, ...] | None = None
    name: ClassVar[str] = "mosa-merge"
    check: ClassVar[str] = "exact"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        result = PassResult()
        chosen = ctx.select(self.adapters, ("inserted", "inactive"), acting=self.name)
        split = [state for state in chosen if _is_mosa(state)]
        plain = [state.spec.name for state in chosen if not _is_mosa(state)]
        if self.adapters and plain:
            raise ctx.spec.error(("pipeline", self.name, "adapters"),
                                 f"adapter(s) {plain} have no MoSA modules (mosa_modules is 1): nothing to fold")
        if not split:
            names = ", ".join(f"{s.spec.name} ({s.spec.type})" for s in chosen)
            raise PassError(self.name, f"no adapter with mosa_modules > 1 to fold (inserted or inactive: {names})",
                            before=ctx.history)
        for state in split:
            modules = max(modules_of(site.options) for site in state.sites)
            for site in state.sites:
                if state.status == "inactive":
                    site.parked = {p: t for p, t in site.parked.items() if not is_mosa(p)}
                else:
                    _fold_site(gm, site)
                site.options = {**site.options, "mosa_modules": 1}
                result.matches += 1
            state.spec = dataclasses.replace(state.spec, options={**state.spec.options, "mosa_modules": 1})
            result.notes.append(f"{state.spec.name}: {modules} MoSA modules folded into one {state.spec.type} "
                                f"adapter on {len(state.sites)} modules ({state.param_count:,} parameters)")
        return result


def _is_mosa(state: AdapterState) -> bool:
    return any(modules_of(site.options) > 1 for site in state.sites) or modules_of(state.spec.options) > 1


def _fold_site(gm: fx.GraphModule, site: SiteState) -> None:
    """Take one inserted site's sampling out of the graph: each select's readers read its parameter."""
    by_name = {n.name: n for n in gm.graph.nodes}
    mine = [by_name[n] for n in site.nodes]
    for node in mine:
        if node.op == "call_function" and node.target is select:
            node.replace_all_uses_with(node.args[1])
    masks = {target for p, target in site.params.items() if is_mosa(p)}
    erased = set()
    for node in reversed(mine):   # readers before what they read
        gone = (node.op == "call_function" and node.target in (select, draw)) or \
            (node.op == "get_attr" and (node.target in masks or node.target == FLAG))
        if gone and not node.users:
            gm.graph.erase_node(node)
            erased.add(node.name)
    site.nodes = [n for n in site.nodes if n not in erased]
    for p in [p for p in site.params if is_mosa(p)]:
        target = site.params.pop(p)
        if not gm.graph.find_nodes(op="get_attr", target=target):
            delete_attr(gm, target)
