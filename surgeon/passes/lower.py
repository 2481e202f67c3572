"""lower: replace each region found by fuse with one call to a generated-kernel custom op.

  lora_linear   -> torch.ops.surgeon.lora_linear   epilogue(x W^T [+ s (x A^T) B^T]) with bias / gain steps
  bottleneck    -> torch.ops.surgeon.bottleneck    epilogue(y + s U act(D src))
  elementwise   -> torch.ops.surgeon.pointwise     the region's pointwise ops, one pass over memory
  mixed_lora_linear -> a MixedLoraLinear module call (a mixed-batch graph; kernels/mixed_lora_region.py):
                   epilogue(x W^T + b + s[a] B[a] A[a] x) per row, the mixed-batch kernels on CUDA

Identity relied on: each op computes what its region computes (its Triton kernel on CUDA, its
torch reference elsewhere), so the graph's function is unchanged within rounding (check
"close"). Parameters stay `get_attr` nodes feeding the call, so they are still trained, saved
and shared as before; each op's autograd formula gives their gradients.

The generated kernel source of each region is stored in `gm.meta["surgeon_kernels"]` (region
name -> source). A region a template cannot take stays eager, and the report says why.
Importing the kernel modules here is what registers the custom ops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from surgeon.graph import call, module_path, sort_topologically
from surgeon.pipeline import Context, PassResult

from .fuse import Region, partition


@dataclass(frozen=True)
class Lower:
    name: ClassVar[str] = "lower"
    check: ClassVar[str] = "close"
    elementwise: bool = True        # also lower groups of pointwise ops (surgeon::pointwise)

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        # importing the kernel modules registers the custom ops (never at `import surgeon`)
        from surgeon.kernels import bottleneck, pointwise, registry  # noqa: F401

        regions, rejections = partition(gm)
        # fuse, when it ran just before, has already reported why each candidate was not fused
        result = PassResult(rejections=[] if ctx.history[-1:] == ["fuse"] else list(rejections))
        kernels = gm.meta.setdefault("surgeon_kernels", {})
        replaced: dict[fx.Node, fx.Node] = {}   # a lowered region's output -> its call (operands of later ones)
        counts = dict.fromkeys(LOWERINGS, 0)
        for region in regions:
            if region.kind == "elementwise" and not self.elementwise:
                result.rejections.append((region.name, "elementwise regions are off (lower elementwise: false)"))
                continue
            replaced[region.output], kernels[region.name] = LOWERINGS[region.kind](gm, region, replaced)
            counts[region.kind] += 1
        result.matches = sum(counts.values())
        present = {n.name for n in gm.graph.nodes}
        # their branches now live inside kernels (adapters lowered before are left as they are: a
        # second `lower` finds nothing new to replace)
        # (a mixed-batch graph holds no adapter's own nodes: its adapters' states are the compiled module's)
        mixed = any(region.kind == "mixed_lora_linear" for region in regions) or \
            any(n.op == "placeholder" and n.name == "adapter_plan" for n in gm.graph.nodes)
        for state in (a for a in ctx.adapters.values() if a.status == "inserted" and not mixed):
            if any(node not in present for site in state.sites for node in site.nodes):
                state.status = "lowered"
        devices = sorted({p.device.type for p in gm.parameters()}) or ["cpu"]
        result.notes.append(", ".join(f"{n} {kind} regions -> surgeon::{OPS[kind]}" for kind, n in counts.items()
                                      if n or kind != "mixed_lora_linear") +
                            "; backend here: " + ", ".join(f"{d}: {registry.backend(d)}" for d in devices) +
                            ("" if {registry.backend(d) for d in devices} - {"reference"} else
                             " (no CUDA device: the regions run the torch reference math, not Triton, "
                             "slower here than the unlowered graph; lower for a GPU)"))
        return result


OPS = {"lora_linear": "lora_linear", "bottleneck": "bottleneck", "elementwise": "pointwise",
       "mixed_lora_linear": "mixed_lora_linear (module)"}


def lower_lora_linear(gm: fx.GraphModule, region: Region, replaced: dict) -> tuple[fx.Node, str]:
    """One surgeon::lora_linear call for a LoRA / DoRA / IA3 linear region, and its kernel source."""
    from surgeon.kernels.epilogue import steps
    from surgeon.kernels.lora_linear_source import VECTORS, render

    epilogue, operands = region.epilogue()
    parts = region.parts
    program = parts.get("program")
    args = (parts["x"], parts["weight"], parts["bias"], parts["lora_a"], parts["lora_b"],
            operands + (list(program.input_nodes[1:]) if program else []), region.scale, region.weight_layout,
            epilogue, program.encode() if program else "")
    node = replace_region(gm, region, torch.ops.surgeon.lora_linear.default, args, replaced, parts.get("view"))
    chain = steps(epilogue, parts["bias"] is not None)
    mode = "fused" if parts["lora_a"] is not None else "none"
    return node, render(chain, region.name, replaced_lines(region), mode=mode,
                        program=program, input_kinds=parts.get("program_kinds", ()),
                        vectors=tuple(name for name in VECTORS if parts.get(name) is not None))


def lower_bottleneck(gm: fx.GraphModule, region: Region, replaced: dict) -> tuple[fx.Node, str]:
    """One surgeon::bottleneck call for a bottleneck / parallel adapter region, and its kernel source."""
    from surgeon.kernels import bottleneck

    epilogue, operands = region.epilogue()
    parts = region.parts
    args = (parts["source"], parts["residual"], parts["down"], parts["up"], operands, region.scale,
            parts["activation"], epilogue)
    node = replace_region(gm, region, torch.ops.surgeon.bottleneck.default, args, replaced, parts.get("view"))
    return node, bottleneck.render(parts["activation"], epilogue, region.name, replaced_lines(region))


def lower_elementwise(gm: fx.GraphModule, region: Region, replaced: dict) -> tuple[fx.Node, str]:
    """One surgeon::pointwise call for a group of pointwise ops; each output read through getitem."""
    import operator

    from surgeon.kernels import pointwise

    program = region.parts["program"]
    inputs = fx.map_arg(list(program.input_nodes), lambda node: replaced.get(node, node))
    with gm.graph.inserting_before(region.output):
        fused = call(gm.graph, torch.ops.surgeon.pointwise.default, (inputs, program.encode()),
                     made_by=Lower.name, path=module_path(region.output))
        fused.meta["surgeon_region"] = region.name
        for index, old in enumerate(program.output_nodes):
            item = call(gm.graph, operator.getitem, (fused, index), made_by=Lower.name, path=module_path(old))
            item.meta.update({k: old.meta[k] for k in ("val", "tensor_meta", "stack_trace", "nn_module_stack")
                              if k in old.meta})
            old.replace_all_uses_with(item)
            replaced[old] = item
    for node in reversed(region.nodes):
        gm.graph.erase_node(node)
    # an output used by a node placed before the region's last op: pull the call up to its first use
    sort_topologically(gm.graph)
    return replaced[region.output], pointwise.render(program, region.name)


def lower_mixed_lora_linear(gm: fx.GraphModule, region: Region, replaced: dict) -> tuple[fx.Node, str]:
    """A MixedLoraLinear module call (kernels/mixed_lora_region.py) for a mixed graph's base linear, its
    MixedSite and the epilogue; the site moves into the new module. Returns the call and its kernel source."""
    from surgeon.kernels.epilogue import steps
    from surgeon.kernels.mixed_lora_region import MixedLoraLinear, render

    epilogue, operands = region.epilogue()
    parts = region.parts
    base = "addmm" if region.nodes[0].target is torch.ops.aten.addmm.default else "linear"
    target = f"{parts['site']}_lowered"
    gm.add_module(target, MixedLoraLinear(gm.get_submodule(parts["site"]), base, epilogue))
    args = fx.map_arg((parts["plan"], parts["x"], parts["weight"], parts["bias"], list(operands)),
                      lambda node: replaced.get(node, node))
    view, output = parts.get("view"), region.output
    with gm.graph.inserting_before(output):
        fused = gm.graph.call_module(target, args)
        fused.meta.update(surgeon_pass=Lower.name, surgeon_path=module_path(region.nodes[0]),
                          surgeon_region=region.name)
        result = fused if view is None else call(gm.graph, view.target, (fused, *view.args[1:]), made_by=Lower.name,
                                                 path=module_path(view))
    for key in ("val", "tensor_meta", "stack_trace", "nn_module_stack"):
        if key in output.meta:
            result.meta[key] = output.meta[key]
    output.replace_all_uses_with(result)
    for node in reversed(region.nodes):
        gm.graph.erase_node(node)
    gm.delete_submodule(parts["site"])
    return result, render(steps(epilogue, False), region.name, replaced_lines(region))


LOWERINGS = {"lora_linear": lower_lora_linear, "bottleneck": lower_bottleneck, "elementwise": lower_elementwise,
             "mixed_lora_linear": lower_mixed_lora_linear}


def replace_region(gm: fx.GraphModule, region: Region, op, args: tuple, replaced: dict,
                   view: fx.Node | None = None) -> fx.Node:
    """Insert `op(*args)` before the region's output, point the output's users at it, erase the region.

    A region that grew through a view (same last dim) gets that view again after the call.
    """
    output = region.output
    args = fx.map_arg(args, lambda node: replaced.get(node, node))
    with gm.graph.inserting_before(output):
        fused = call(gm.graph, op, args, made_by=Lower.name, path=module_path(region.nodes[0]),
                     adapter=region.adapter)
        result = fused if view is None else call(gm.graph, view.target, (fused, *view.args[1:]), made_by=Lower.name,
                                                 path=module_path(view))
    for key in ("val", "tensor_meta", "stack_trace", "nn_module_stack"):
        if key in output.meta:
            result.meta[key] = output.meta[key]
    fused.meta["surgeon_region"] = region.name
    output.replace_all_uses_with(result)
    for node in reversed(region.nodes):
        gm.graph.erase_node(node)
    return result


def replaced_lines(region: Region) -> list[str]:
    """One line per graph node a region replaces (name, op, module path), for a kernel's header."""
    names, targets = (max(len(n.name) for n in region.nodes), max(len(_target(n)) for n in region.nodes))
    return [f"{n.name.ljust(names)}  {_target(n).ljust(targets)}  {module_path(n)}" for n in region.nodes]


def _target(node: fx.Node) -> str:
    return f"aten.{node.target.__name__}" if hasattr(node.target, "__name__") else str(node.target)
