"""The `mixed_lora_linear` region: a mixed-batch graph's base linear, its per-row LoRA update and an epilogue.

In a mixed graph (surgeon/serving.py) an adapted linear is `y = linear(x, W, b)` followed by a `MixedSite`
call that adds, per row m, `s[a] B[a] round(A[a] x[m])` (a = the row's adapter, none for "__base__" rows).
fuse (passes/_fuse_regions.py: `mixed_lora_seed`) makes the two, with the epilogue the LoRA region grows
(silu/gelu/relu, gate multiply, residual add, constant scale, per-output gain; kernels/epilogue.py), one
region; lower puts a `MixedLoraLinear` module call in their place. What it runs:

- every kernel backend (CUDA, or TRITON_INTERPRET=1): the base GEMM as the graph's own op (linear / addmm,
  y stored in x's dtype as the unfused graph stores it), the shrink kernels of kernels/mixed_lora.py
  (BGMV for a decode-sized row count, SGMV above: h = round(A[a] x), computed once per row), then one
  generated expand kernel per epilogue that reads y, adds s[a] B[a] h in fp32, applies the epilogue steps
  in fp32 and stores once. "__base__" rows get the epilogue too (their delta is zero): BGMV launches a
  program per row, and SGMV's tile table for the expand also covers the segment of rows without an adapter
  (`segments_with_base`). With no epilogue step this is kernels/mixed_lora.py's expand, in place.
- no kernel (CPU without the interpreter, fp64): y, then the grouped torch reference
  (`mixed_lora_reference`: one GEMM pair per adapter present), then the epilogue op by op in y's dtype.
- what the kernels do not take falls back to the unfused mixed graph's own code, op for op: the
  `MixedSite` itself and the epilogue in torch (a call that records gradients, a batch whose rows all name
  one adapter, routes that are not plain LoRA, mixed dtypes).

Ranks are padded, as kernels/mixed_lora.py's bank pads them: one bank per site, every adapter zero-padded
to R_MAX, `ranks[a]` bounding what a kernel reads.

Numerics: equal to the unfused mixed graph within rounding. The kernel path rounds once after the epilogue
(the graph rounds after every op); the reference path applies the scale after B (the graph's CPU path folds
it into B' in float64 first).
"""
from __future__ import annotations

import torch
from torch import nn

from . import codegen
from .dispatch import on_device, runs_kernel
from .epilogue import RULES, Step, apply, as_tiles, steps
from .lora_linear_source import epilogue_source, operand_names
from .mixed_lora import (BGMV_GPU_CONFIG, BGMV_INTERPRET_CONFIG, SGMV_GPU_CONFIG, SGMV_INTERPRET_CONFIG, LoraBank,
                         Segments, choose_mode, load_kernels, mixed_lora, mixed_lora_reference, segments)

__all__ = ["MixedLoraLinear", "expand_source", "mixed_lora_linear", "reference", "render",
           "segments_with_base"]

_HEADER = '''"""Mixed-batch LoRA expand with an epilogue (surgeon/kernels/mixed_lora_region.py).

out[m] = epilogue(y[m] + s[a] * B[a] h[m]),  a = index[m]  (-1: epilogue(y[m]))
{region}"""
import triton
import triton.language as tl


@triton.jit
def _lane_add(a, b):
    return a + b
'''

_BGMV = '''

@triton.jit
def {name}_bgmv(
    # pointers: h [M, R_MAX], B [n, N, R_MAX], y [M, N] (the base output, overwritten), index [M], ranks [n],
    # scales [n] (fp32), then the epilogue operands
    h_ptr, b_ptr, out_ptr, index_ptr, rank_ptr, scale_ptr,{operand_ptrs}
    N,
    stride_hm, stride_hr, stride_bn, stride_bo, stride_br, stride_om, stride_on,{operand_strides}
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[m, n] = epilogue(y[m, n] + s[a] sum_r B[a, n, r] h[m, r]) (grid: rows x column tiles; every row)"""
    row = tl.program_id(0).to(tl.int64)
    adapter = tl.load(index_ptr + row).to(tl.int64)
    offs_m = tl.full((1,), 0, tl.int64) + row
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_out = (offs_m[:, None] >= 0) & mask_n[None, :]
    delta = tl.full((BLOCK_N,), 0.0, tl.float32)
    if adapter >= 0:
        rank = tl.load(rank_ptr + adapter)
        scale = tl.load(scale_ptr + adapter)
        b_base = b_ptr + adapter * stride_bn
        for r_start in range(0, rank, BLOCK_R):
            offs_r = r_start + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            h_vec = tl.load(h_ptr + row * stride_hm + offs_r * stride_hr, mask=mask_r, other=0.0)
            b_tile = tl.load(b_base + offs_n[:, None] * stride_bo + offs_r[None, :] * stride_br,
                             mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            delta += tl.reduce(b_tile.to(tl.float32) * h_vec.to(tl.float32)[None, :], 1, _lane_add)
        delta = scale * delta
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    acc = tl.load(out_ptrs, mask=mask_out, other=0.0).to(tl.float32) + delta[None, :]
{epilogue}    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def {name}_sgmv(
    # pointers: h [M, R_MAX] (by sorted position), B [n, N, R_MAX], y [M, N] (overwritten), order [M], the tile
    # table (adapter, -1 for the rows without one; first sorted position; segment end), ranks, scales, operands
    h_ptr, b_ptr, out_ptr, order_ptr, tile_adapter_ptr, tile_start_ptr, tile_end_ptr, rank_ptr, scale_ptr,{operand_ptrs}
    N,
    stride_hm, stride_hr, stride_bn, stride_bo, stride_br, stride_om, stride_on,{operand_strides}
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[order[p], n] = epilogue(y + s[a] (h[p] @ B[a]^T)) on this tile and column tile; a base tile adds 0"""
    tile = tl.program_id(0)
    adapter = tl.load(tile_adapter_ptr + tile).to(tl.int64)
    safe = tl.maximum(adapter, 0)
    rank = tl.where(adapter >= 0, tl.load(rank_ptr + safe), 0)
    scale = tl.load(scale_ptr + safe)
    offs_p = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
    mask_p = offs_p < tl.load(tile_end_ptr + tile)
    offs_m = tl.load(order_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    h_tile = tl.load(h_ptr + offs_p[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                     mask=mask_p[:, None] & mask_r[None, :], other=0.0)
    b_t_tile = tl.load(b_ptr + safe * stride_bn + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bo,
                       mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    delta = tl.dot(h_tile, b_t_tile, input_precision=DOT_PRECISION)
    mask_out = mask_p[:, None] & mask_n[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    acc = tl.load(out_ptrs, mask=mask_out, other=0.0).to(tl.float32) + scale * delta
{epilogue}    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)
'''


def kernel_name(chain: tuple[Step, ...]) -> str:
    return "_".join(["mixed_lora_expand", *(s.rule for s in chain)])


def expand_source(chain: tuple[Step, ...], region: str = "", replaced: list[str] | tuple[str, ...] = ()) -> str:
    """The module source of the two expand kernels (BGMV, SGMV) ending with `chain`."""
    names = operand_names(chain)
    ptrs = "".join(f" {name}_ptr," for name, _ in names)
    strides = "".join(f" stride_{name}_m, stride_{name}_n," if kind == "tile" else f" stride_{name}_n,"
                      for name, kind in names)
    lines = (f"region {region}\n" if region else "") + "".join(f"  {line}\n" for line in replaced)
    return _HEADER.format(region=lines) + _BGMV.format(name=kernel_name(chain), operand_ptrs=ptrs,
                                                      operand_strides=strides, epilogue=epilogue_source(chain))


def render(chain: tuple[Step, ...], region: str = "", replaced: list[str] | tuple[str, ...] = ()) -> str:
    """What a lowered region runs, for gm.meta["surgeon_kernels"]: the generated expand kernels (the shrink
    kernels are kernels/mixed_lora.py's, named in a comment)."""
    return ("# shrink: kernels/mixed_lora.py's mixed_lora_bgmv_shrink / mixed_lora_sgmv_shrink\n"
            + expand_source(chain, region, replaced))


def load_expand(chain: tuple[Step, ...]) -> tuple:
    """(BGMV expand, SGMV expand) for `chain`, compiled or interpreted as TRITON_INTERPRET says now."""
    module = codegen.load(expand_source(chain), kernel_name(chain))
    name = kernel_name(chain)
    return getattr(module, f"{name}_bgmv"), getattr(module, f"{name}_sgmv")


def segments_with_base(index: torch.Tensor, n_adapters: int, block_m: int) -> Segments:
    """`segments` whose table also covers the rows without an adapter (tile_adapter -1, first), with the
    same `order` as `segments(index, ...)`: the expand of an epilogue writes every row."""
    seg = segments(index.reshape(-1).long() + 1, n_adapters + 1, block_m)
    return Segments(seg.order, (seg.tile_adapter - 1).contiguous(), seg.tile_start, seg.tile_end, block_m)


# ---------------------------------------------------------------- the call


def reference(x: torch.Tensor, y: torch.Tensor, bank: LoraBank, index: torch.Tensor, chain: tuple[Step, ...],
              operands: list[torch.Tensor]) -> torch.Tensor:
    """The grouped torch reference, then the epilogue op by op in y's dtype (as the unfused graph runs it)."""
    z = mixed_lora_reference(x, y, bank, index)
    return epilogue_torch(z, chain, operands)


def epilogue_torch(z: torch.Tensor, chain: tuple[Step, ...], operands: list[torch.Tensor]) -> torch.Tensor:
    if not chain:
        return z
    shape = (z.reshape(-1, z.shape[-1]).shape[0], z.shape[-1])
    return apply(z.reshape(shape), chain, None, as_tiles(chain, list(operands), shape))[-1].view(z.shape)


def mixed_lora_linear(x: torch.Tensor, y: torch.Tensor, bank: LoraBank, index: torch.Tensor,
                      chain: tuple[Step, ...], operands: list[torch.Tensor], mode: str | None = None,
                      config: tuple | None = None) -> torch.Tensor:
    """epilogue(y + s[a] B[a] round(A[a] x)) per row, a = index[row] (-1: epilogue(y)); y (the base output,
    a fresh tensor) is overwritten where a kernel runs. The torch reference where none does."""
    if not runs_kernel("mixed_lora_linear", x.device, {x.dtype}):
        return reference(x, y, bank, index, chain, operands)
    if not chain:
        return mixed_lora(x, y, bank, index, inplace=True, mode=mode, config=config, check_index=False)
    K, N = x.shape[-1], y.shape[-1]
    M = y.numel() // N if N else 0
    out = y.view(M, N) if y.is_contiguous() else y.reshape(M, N).contiguous()
    if not (M and N):
        return y
    tiles = as_tiles(chain, list(operands), (M, N))
    with on_device(x.device):
        _run(x.reshape(M, K), out, bank, index.reshape(M), chain, tiles, mode or choose_mode(M), config)
    return out.view(y.shape)


def _run(x2, out, bank: LoraBank, index, chain, tiles, mode, config) -> None:
    shrink = load_kernels()
    bgmv, sgmv = load_expand(chain)
    M, K = x2.shape
    n, r_max, _, N = bank.sizes
    interpreting = codegen.interpreting()
    h = torch.empty((M, r_max), dtype=x2.dtype, device=x2.device)
    ranks = bank.ranks.to(device=x2.device, dtype=torch.int32)
    scales = bank.scales.to(device=x2.device, dtype=torch.float32)
    operand_ptrs, operand_strides = [], []
    for (name, kind), tensor in zip(operand_names(chain), _distinct(chain, tiles)):
        operand_ptrs.append(tensor)
        operand_strides += list(tensor.stride()) if kind == "tile" else [tensor.stride(-1)]
    gpu = {} if interpreting else dict(num_warps=4)
    if mode == "bgmv":
        block_k, block_r_shrink, block_n, block_r_expand = config or (
            BGMV_INTERPRET_CONFIG if interpreting else BGMV_GPU_CONFIG)
        idx = index.to(torch.int32).contiguous()
        if K and r_max:
            shrink["mixed_lora_bgmv_shrink"][(M, -(-r_max // block_r_shrink))](
                x2, bank.a, h, idx, ranks, K, *x2.stride(), *bank.a.stride(), *h.stride(),
                BLOCK_R=block_r_shrink, BLOCK_K=block_k, **gpu)
        bgmv[(M, -(-N // block_n))](
            h, bank.b, out, idx, ranks, scales, *operand_ptrs, N, *h.stride(), *bank.b.stride(), *out.stride(),
            *operand_strides, BLOCK_N=block_n, BLOCK_R=block_r_expand, **gpu)
        return
    block_m, block_n, block_k, warps = config or (SGMV_INTERPRET_CONFIG if interpreting else SGMV_GPU_CONFIG)
    block_r = max(16, 1 << max(r_max - 1, 0).bit_length())
    precision = "ieee" if x2.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    meta = dict(BLOCK_M=block_m, BLOCK_R=block_r, DOT_PRECISION=precision,
                **({} if interpreting else dict(num_warps=warps)))
    seg = segments(index, n, block_m)
    if seg.tiles and K and r_max:
        shrink["mixed_lora_sgmv_shrink"][(seg.tiles,)](
            x2, bank.a, h, seg.order, seg.tile_adapter, seg.tile_start, seg.tile_end, ranks, K, *x2.stride(),
            *bank.a.stride(), *h.stride(), BLOCK_K=block_k, **meta)
    every = segments_with_base(index, n, block_m)
    sgmv[(every.tiles, -(-N // block_n))](
        h, bank.b, out, every.order, every.tile_adapter, every.tile_start, every.tile_end, ranks, scales,
        *operand_ptrs, N, *h.stride(), *bank.b.stride(), *out.stride(), *operand_strides, BLOCK_N=block_n, **meta)


def _distinct(chain: tuple[Step, ...], tiles: list[torch.Tensor]) -> list[torch.Tensor]:
    """The operand tensors in `operand_names` order (one per distinct name)."""
    seen, found = set(), []
    for step in chain:
        if RULES[step.rule].operand in ("tile", "vec") and step.operand not in seen:
            seen.add(step.operand)
            found.append(tiles[step.operand])
    return found


class MixedLoraLinear(nn.Module):
    """A lowered mixed_lora_linear region: `site` (the MixedSite the region replaced, holding its routes),
    the base op ("linear" / "addmm") and the epilogue string; called as (plan, x, weight, bias, operands)."""

    def __init__(self, site: nn.Module, base: str, epilogue: str):
        super().__init__()
        self.site, self.base, self.epilogue = site, base, epilogue
        self.chain = steps(epilogue, False)

    def forward(self, plan, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                operands: list[torch.Tensor]) -> torch.Tensor:
        aten = torch.ops.aten
        y = aten.addmm.default(bias, x, weight) if self.base == "addmm" else aten.linear.default(x, weight, bias)
        if plan is None or plan.all_base:
            return epilogue_torch(y, self.chain, operands)
        if plan.whole is not None or not self.site._kernel_ready(x, y) or \
                any(o.dtype != x.dtype or o.device != x.device for o in operands):
            # the unfused graph's own code: the site (its loop, gathered path or one adapter's forward)
            return epilogue_torch(self.site(plan, x, y), self.chain, operands)
        with torch.no_grad():
            index = self.site.row_index(plan, x)
            return mixed_lora_linear(x, y, self.site._kernel_bank(x), index, self.chain, operands)
