"""lower: replace each lora_linear region (see fuse) by one call to `torch.ops.surgeon.lora_linear`.

Identity relied on: the region computes epilogue(x W^T + b + s (x A^T) B^T), which is what the
custom op computes (its Triton kernel on CUDA, its torch reference elsewhere), so the graph's
function is unchanged within rounding (check "close"). The base and adapter parameters stay
`get_attr` nodes feeding the call, so they are still trained, saved and shared as before; the
custom op's autograd formula gives their gradients.

The generated kernel source of each region is stored in `gm.meta["surgeon_kernels"]`
(region name -> source). Regions of other kinds (elementwise chains) stay eager, and the
report says so. Importing surgeon.kernels.registry here is what registers the custom op.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from surgeon.graph import call, module_path
from surgeon.pipeline import Context, PassResult

from .fuse import Region, partition


@dataclass(frozen=True)
class Lower:
    name: ClassVar[str] = "lower"
    check: ClassVar[str] = "close"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        from surgeon.kernels import registry   # registers torch.ops.surgeon.lora_linear

        regions, rejections = partition(gm)
        # fuse, when it ran just before, has already reported why each candidate was not fused
        result = PassResult(rejections=[] if ctx.history[-1:] == ["fuse"] else list(rejections))
        kernels = gm.meta.setdefault("surgeon_kernels", {})
        replaced: dict[fx.Node, fx.Node] = {}   # a lowered region's output -> its call (operands of later ones)
        for region in regions:
            if region.kind != "lora_linear":
                result.rejections.append((region.name, "no template for an elementwise-only region; runs eager"))
                continue
            replaced[region.output] = lower_region(gm, region, self.name, replaced)
            kernels[region.name] = source(region)
            result.matches += 1
        present = {n.name for n in gm.graph.nodes}
        for state in ctx.select(None, ("inserted",)):   # their branches now live inside kernels
            if any(node not in present for site in state.sites for node in site.nodes):
                state.status = "lowered"
        devices = sorted({p.device.type for p in gm.parameters()}) or ["cpu"]
        result.notes.append(f"{result.matches} regions -> surgeon::lora_linear; backend here: " +
                            ", ".join(f"{d}: {registry.backend(d)}" for d in devices) +
                            ("" if "triton" in {registry.backend(d) for d in devices} else
                             " (no CUDA device: the regions run the torch reference math, not Triton)"))
        return result


def lower_region(gm: fx.GraphModule, region: Region, made_by: str, replaced: dict[fx.Node, fx.Node]) -> fx.Node:
    """Insert the custom-op call computing the region, point its users at it, erase the region."""
    epilogue, operands = region.epilogue()
    parts = region.parts
    output = region.output
    args = (parts["x"], parts["weight"], parts["bias"], parts["lora_a"], parts["lora_b"], operands,
            region.scale, region.weight_layout, epilogue)
    args = fx.map_arg(args, lambda node: replaced.get(node, node))
    with gm.graph.inserting_before(output):
        fused = call(gm.graph, torch.ops.surgeon.lora_linear.default, args,
                     made_by=made_by, path=module_path(region.nodes[0]), adapter=region.adapter)
    for key in ("val", "tensor_meta", "stack_trace", "nn_module_stack"):
        if key in output.meta:
            fused.meta[key] = output.meta[key]
    fused.meta["surgeon_region"] = region.name
    output.replace_all_uses_with(fused)
    for node in reversed(region.nodes):
        gm.graph.erase_node(node)
    return fused


def source(region: Region) -> str:
    """The generated module for a region, its header naming the graph nodes it replaces."""
    from surgeon.kernels.epilogue import steps
    from surgeon.kernels.lora_linear import render

    epilogue, _ = region.epilogue()
    chain = steps(epilogue, region.parts["bias"] is not None)
    names, targets = (max(len(n.name) for n in region.nodes), max(len(_target(n)) for n in region.nodes))
    fused = [f"{n.name.ljust(names)}  {_target(n).ljust(targets)}  {module_path(n)}" for n in region.nodes]
    return render(chain, region.name, fused)


def _target(node: fx.Node) -> str:
    return f"aten.{node.target.__name__}" if hasattr(node.target, "__name__") else str(node.target)
