"""quantize-adapters: store inserted adapters' weights packed at 1/2/4/8 bits, decoded in the graph.

Every floating-point adapter parameter with two or more dims (LoRA's A and B, a delta's D)
is replaced by buffers holding its packed codes and per-group float32 scales (surgeon/
quantized_io.py has the formats: `sign` 1-bit with the error-minimizing scale mean |w|,
`ternary` ComPEFT-style sparsify + ternary in 2-bit codes, `affine` asymmetric 2/4/8-bit).
Graph nodes unpack and dequantize those buffers on the fly and feed the adapter's own
forward, so the module only stores the packed form. Parameters with fewer than two dims
(e.g. a magnitude vector) and parameters a kind shares across sites stay in floating point.

The function changes ("none"). The notes give, per adapter, the bytes of its stored tensors
against fp32 and bf16, the relative output error ||y_q - y|| / ||y|| against the unquantized
adapter on the example inputs, and the relative Frobenius error of its delta weight.
A quantized adapter has status "quantized": merge/unmerge/remove leave it alone; save it
with surgeon.quantized_io.save_quantized_adapter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx as fx

from surgeon.adapters import Branch
from surgeon.capture import _ensure_path
from surgeon.fastpath import recompile
from surgeon.graph import delete_attr, get_attr, get_tensor
from surgeon.pipeline import AdapterState, Context, PassResult, SiteState, run_outputs
from surgeon.quantized_io import METHOD_BITS, dequantize, dequantize_with, quantize

from .combine import site_delta


@dataclass(frozen=True)
class QuantizeAdapters:
    adapters: tuple[str, ...] | None = None
    bits: int = 4
    group_size: int = 64
    method: str | None = None     # sign (1-bit default) | affine (2/4/8-bit default) | ternary (2-bit codes)
    density: float | None = None  # ternary only: fraction of each tensor's entries kept (default 0.1)
    name: ClassVar[str] = "quantize-adapters"
    check: ClassVar[str] = "none"

    def run(self, gm: fx.GraphModule, ctx: Context) -> PassResult:
        method = self._validate(ctx)
        result = PassResult()
        for state in self._selected(ctx):
            before = run_outputs(gm, ctx)
            tally = Tally()
            for site in state.sites:
                self._quantize_site(gm, state, site, method, tally)
                result.matches += 1
            state.status = "quantized"
            recompile(gm)
            output_error = _relative_error(before, run_outputs(gm, ctx))
            result.notes.append(self._note(state, method, tally, output_error))
        return result

    def _error(self, ctx: Context, key: str, message: str):
        return ctx.spec.error(("pipeline", self.name, key), message)

    def _validate(self, ctx: Context) -> str:
        if self.bits not in (1, 2, 4, 8):
            raise self._error(ctx, "bits", f"must be one of 1, 2, 4, 8, got {self.bits!r}")
        method = self.method or ("sign" if self.bits == 1 else "affine")
        if method not in METHOD_BITS:
            raise self._error(ctx, "method", f"must be one of {sorted(METHOD_BITS)}, got {method!r}")
        if self.bits not in METHOD_BITS[method]:
            raise self._error(ctx, "bits", f"method '{method}' stores {' or '.join(map(str, METHOD_BITS[method]))}"
                                           f"-bit codes, not {self.bits}")
        if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 8:
            raise self._error(ctx, "group_size", f"must be a positive multiple of 8, got {self.group_size!r}")
        if self.density is not None and method != "ternary":
            raise self._error(ctx, "density", f"only the ternary method takes a density, not '{method}'")
        if self.density is not None and not (isinstance(self.density, (int, float)) and 0 < self.density <= 1):
            raise self._error(ctx, "density", f"must be a number in (0, 1], got {self.density!r}")
        return method

    def _selected(self, ctx: Context) -> list[AdapterState]:
        for adapter_name in self.adapters or ():
            state = ctx.adapters.get(adapter_name)
            if state is None or state.status != "inserted":
                status = "unknown" if state is None else state.status
                raise self._error(ctx, "adapters", f"adapter '{adapter_name}' is {status}; quantize-adapters "
                                                   "takes inserted adapters")
        return ctx.select(self.adapters, ("inserted",))

    def _quantize_site(self, gm: fx.GraphModule, state: AdapterState, site: SiteState, method: str,
                       tally: "Tally") -> None:
        """Replace the site's matrix parameters by packed buffers and decode nodes; tally sizes and errors."""
        originals = {p: get_tensor(gm, t).detach() for p, t in site.params.items()}
        decoded, params, formats = dict(originals), {}, {}
        for pname, target in site.params.items():
            tensor = originals[pname]
            if tensor.dim() < 2 or not tensor.is_floating_point() or pname in state.spec.kind.shared:
                params[pname] = target
                tally.add(target, tensor, tensor.numel() * tensor.element_size(), packed=False)
                continue
            q = quantize(tensor, self.bits, self.group_size, method, self.density or 0.1)
            params.update(self._replace(gm, state, site, pname, target, q))
            formats[pname] = q.format.to_json()
            decoded[pname] = dequantize(q)
            tally.add(target, tensor, q.nbytes, packed=True)
        site.params = params
        site.options = {**site.options, "quantized": formats}
        if state.spec.kind.delta_weight is not None:
            exact = site_delta(gm, state, site, originals).double()
            tally.delta_error += (site_delta(gm, state, site, decoded).double() - exact).square().sum().item()
            tally.delta_norm += exact.square().sum().item()

    def _replace(self, gm: fx.GraphModule, state: AdapterState, site: SiteState, pname: str, target: str,
                 q) -> dict[str, str]:
        """Store q's parts as buffers next to `target`, decode them where `target` was read, drop it."""
        owner_path = target.rpartition(".")[0]
        owner = _ensure_path(gm, owner_path)
        targets = {}
        for part, value in q.parts().items():
            owner.register_buffer(f"{pname}_{part}", value)
            targets[part] = f"{owner_path}.{pname}_{part}"
        mine = set(site.nodes)
        for ref in [n for n in gm.graph.find_nodes(op="get_attr", target=target) if n.name in mine]:
            with gm.graph.inserting_before(ref):
                branch = Branch(gm.graph, self.name, site.path, state.spec.name)
                refs = {part: get_attr(gm.graph, t, made_by=self.name, adapter=state.spec.name)
                        for part, t in targets.items()}
                branch.created += list(refs.values())
                value = dequantize_with(branch.op, refs["packed"], refs["scales"], refs.get("minimum"), q.format,
                                        q.packed.device)
            ref.replace_all_uses_with(value)
            at = site.nodes.index(ref.name)
            site.nodes[at:at + 1] = [n.name for n in branch.created]
            gm.graph.erase_node(ref)
        delete_attr(gm, target)
        return {f"{pname}_{part}": t for part, t in targets.items()}

    def _note(self, state: AdapterState, method: str, tally: "Tally", output_error: float) -> str:
        t = tally
        delta = f"{math.sqrt(t.delta_error / t.delta_norm):.2e}" if t.delta_norm > 0 else "n/a"
        kept = f" ({t.kept} 1-D or shared tensors kept in float)" if t.kept else ""
        return (f"{state.spec.name}: {t.packed} tensors {self.bits}-bit {method}{kept}, groups of "
                f"{self.group_size}: {t.stored:,} B stored vs {t.fp32:,} B fp32 ({t.fp32 / max(t.stored, 1):.1f}x "
                f"smaller), {t.bf16:,} B bf16 ({t.bf16 / max(t.stored, 1):.1f}x); output rel err "
                f"{output_error:.2e} vs unquantized (||y_q - y|| / ||y||, example inputs); delta rel err {delta}")


@dataclass
class Tally:
    """Bytes and errors of one adapter's quantization; a tensor shared by several sites counts once."""

    stored: int = 0
    fp32: int = 0
    bf16: int = 0
    packed: int = 0
    kept: int = 0
    delta_error: float = 0.0
    delta_norm: float = 0.0
    seen: set = field(default_factory=set)

    def add(self, target: str, tensor: torch.Tensor, stored: int, packed: bool) -> None:
        if target in self.seen:
            return
        self.seen.add(target)
        self.stored += stored
        self.fp32 += tensor.numel() * 4
        self.bf16 += tensor.numel() * 2
        self.packed += packed
        self.kept += not packed


def _relative_error(before: list[torch.Tensor], after: list[torch.Tensor]) -> float:
    """||after - before|| / ||before|| over all floating-point outputs together."""
    diff = sum((a.double() - b.double()).square().sum().item()
               for a, b in zip(after, before) if b.is_floating_point())
    norm = sum(b.double().square().sum().item() for b in before if b.is_floating_point())
    return math.sqrt(diff / norm) if norm > 0 else math.sqrt(diff)
