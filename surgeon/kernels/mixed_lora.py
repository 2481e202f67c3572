"""Mixed-batch LoRA: each row of a batch uses its own adapter from a bank (S-LoRA / Punica-style serving).

Math (shapes: x [M, K], y [M, N], a bank of n adapters with A [n, R_MAX, K], B [n, N, R_MAX], scales
[n] and ranks [n], index [M] with -1 for a row without an adapter, PEFT's "__base__"):

    h[m]   = round(A[a] x[m])                  a = index[m], only the first ranks[a] rows of A[a]
    out[m] = y[m] + scales[a] * B[a] h[m]      (out[m] = y[m] where a = -1)

computed in fp32 for 16-bit inputs, with h rounded to x's dtype as the unfused graph stores x @ A^T,
and out rounded once; y is the base layer's output (updated in place with `inplace=True`).

Ranks: the bank is padded, every adapter's A and B zero-padded to R_MAX (one tensor per bank, one
pointer per adapter: adapter a starts at a * stride), and `ranks[a]` bounds what a kernel reads, so a
rank-1 adapter in a bank with a rank-64 one loads one row of A and one column of B (BGMV), or masked
lanes past its rank (SGMV, whose tensor-core dot runs BLOCK_R = max(16, next_pow2(R_MAX)) wide). The
padding itself is never read by the kernels; the reference reads A[a, :rank] too.

Two shapes, each a shrink kernel (x -> h, an [M, R_MAX] workspace in x's dtype) and an expand kernel
(h -> out, updating out in place), so h is computed once per row, not once per column tile:

- BGMV (decode: few rows): a program per (row, rank block) for the shrink and per (row, column tile)
  for the expand; each gathers its row's adapter by pointer offset. No tl.dot (one row is too few for a
  tensor-core tile): an elementwise product and a sum over K (shrink) or over the rank (expand). A row
  with index -1 loads and stores nothing, and a rank block past the adapter's rank is skipped.
- SGMV (prefill: many rows): the rows are sorted by adapter (a stable argsort: rows keep their order in
  a segment) and each segment cut into BLOCK_M-row tiles; a program per tile (shrink) or per (tile,
  column tile) (expand) runs a small GEMM with tl.dot, reading and writing x's and y's rows through
  the sort order (no gathered copies). Tiles come from a table (adapter, first sorted position, segment
  end) made with torch ops (`segments`: bincount, cumsum, repeat_interleave; no Python loop over rows),
  so an adapter no row uses has no tile and rows with -1 are in no segment.

`mixed_lora` checks the arguments and dispatches: the torch reference where no kernel runs (no GPU, or
fp64), else BGMV for at most BGMV_MAX_ROWS rows and SGMV above. The kernels are hand-written source
loaded through kernels/codegen.py (Triton's JIT reads source with `inspect`, and the interpreter flag is
read when a kernel is decorated: one module per flag), with sizes and strides as runtime arguments.
Tile sizes are fixed per shape (no tuner yet); nothing here has been timed on a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import codegen
from .dispatch import KERNEL_DTYPES, on_device, runs_kernel
from .lora_linear_reference import compute_dtype

__all__ = ["BGMV_MAX_ROWS", "LoraBank", "Segments", "choose_mode", "load_kernels", "mixed_lora",
           "mixed_lora_reference", "segments"]

# rows up to which the dispatcher runs BGMV (a decode step of up to 32 sequences); above, SGMV
BGMV_MAX_ROWS = 32

# BGMV: (BLOCK_K, BLOCK_R shrink, BLOCK_N, BLOCK_R expand); SGMV: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps).
# GPU values are a first choice, not measured (no GPU here); under TRITON_INTERPRET=1 each program
# instance runs as Python over numpy, so few programs: narrow rank blocks would multiply them.
BGMV_GPU_CONFIG = (256, 4, 128, 16)
BGMV_INTERPRET_CONFIG = (32, 16, 32, 16)
SGMV_GPU_CONFIG = (32, 128, 64, 4)
SGMV_INTERPRET_CONFIG = (16, 32, 32, 1)

_SOURCE = '''"""Mixed-batch LoRA kernels (surgeon/kernels/mixed_lora.py): one adapter per row, from a padded bank.

out[m] = y[m] + s[a] * B[a] round(A[a] x[m]),  a = index[m]  (-1: out[m] = y[m])
"""
import triton
import triton.language as tl


# the sums' combine function, here rather than tl.sum (a @jit helper of Triton's, fixed as compiled or
# interpreted when triton is imported; this module is loaded once per mode)
@triton.jit
def _lane_add(a, b):
    return a + b


@triton.jit
def mixed_lora_bgmv_shrink(
    # pointers: x [M, K], the bank's A [n, R_MAX, K], h [M, R_MAX] (x's dtype), index [M], ranks [n]
    x_ptr, a_ptr, h_ptr, index_ptr, rank_ptr,
    # sizes
    K,
    # strides, in elements
    stride_xm, stride_xk, stride_an, stride_ar, stride_ak, stride_hm, stride_hr,
    # meta
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h[m, r] = round(sum_k A[a, r, k] x[m, k]) for this program's rank block of row m (grid: rows x rank blocks)"""
    row = tl.program_id(0).to(tl.int64)
    adapter = tl.load(index_ptr + row).to(tl.int64)
    r_start = tl.program_id(1) * BLOCK_R
    rank = tl.load(rank_ptr + tl.maximum(adapter, 0))
    # a row without an adapter, or a rank block past its adapter's rank: nothing to load or store
    if (adapter >= 0) & (r_start < rank):
        offs_r = r_start + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        a_base = a_ptr + adapter * stride_an
        acc = tl.full((BLOCK_R,), 0.0, tl.float32)
        for k_start in range(0, K, BLOCK_K):
            offs_k = k_start + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x_vec = tl.load(x_ptr + row * stride_xm + offs_k * stride_xk, mask=mask_k, other=0.0)
            a_tile = tl.load(a_base + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                             mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            acc += tl.reduce(a_tile.to(tl.float32) * x_vec.to(tl.float32)[None, :], 1, _lane_add)
        # rounded to x's dtype, as the unfused graph stores x @ A^T
        tl.store(h_ptr + row * stride_hm + offs_r * stride_hr, acc.to(h_ptr.dtype.element_ty), mask=mask_r)


@triton.jit
def mixed_lora_bgmv_expand(
    # pointers: h [M, R_MAX], the bank's B [n, N, R_MAX], out [M, N] (y, updated in place), index [M],
    # ranks [n], scales [n] (fp32)
    h_ptr, b_ptr, out_ptr, index_ptr, rank_ptr, scale_ptr,
    # sizes
    N,
    # strides, in elements
    stride_hm, stride_hr, stride_bn, stride_bo, stride_br, stride_om, stride_on,
    # meta
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[m, n] += s[a] * sum_r B[a, n, r] h[m, r] on this column tile of row m (grid: rows x column tiles)"""
    row = tl.program_id(0).to(tl.int64)
    adapter = tl.load(index_ptr + row).to(tl.int64)
    if adapter >= 0:
        rank = tl.load(rank_ptr + adapter)
        scale = tl.load(scale_ptr + adapter)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        b_base = b_ptr + adapter * stride_bn
        acc = tl.full((BLOCK_N,), 0.0, tl.float32)
        for r_start in range(0, rank, BLOCK_R):
            offs_r = r_start + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            h_vec = tl.load(h_ptr + row * stride_hm + offs_r * stride_hr, mask=mask_r, other=0.0)
            b_tile = tl.load(b_base + offs_n[:, None] * stride_bo + offs_r[None, :] * stride_br,
                             mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            acc += tl.reduce(b_tile.to(tl.float32) * h_vec.to(tl.float32)[None, :], 1, _lane_add)
        out_ptrs = out_ptr + row * stride_om + offs_n * stride_on
        y_vec = tl.load(out_ptrs, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (y_vec + scale * acc).to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def mixed_lora_sgmv_shrink(
    # pointers: x [M, K], A [n, R_MAX, K], h [M, R_MAX] (by sorted position), order [M] (sorted position ->
    # row), the tile table [tiles] x 3 (adapter, first sorted position, segment end), ranks [n]
    x_ptr, a_ptr, h_ptr, order_ptr, tile_adapter_ptr, tile_start_ptr, tile_end_ptr, rank_ptr,
    # sizes
    K,
    # strides, in elements
    stride_xm, stride_xk, stride_an, stride_ar, stride_ak, stride_hm, stride_hr,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """h[p] = round(x[order[p]] @ A[a]^T) for the BLOCK_M sorted positions p of this tile, all of adapter a"""
    tile = tl.program_id(0)
    adapter = tl.load(tile_adapter_ptr + tile).to(tl.int64)
    rank = tl.load(rank_ptr + adapter)
    offs_p = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
    mask_p = offs_p < tl.load(tile_end_ptr + tile)
    rows = tl.load(order_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    a_base = a_ptr + adapter * stride_an
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x_tile = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=mask_p[:, None] & mask_k[None, :], other=0.0)
        # A[a]^T's columns past the adapter's rank load as 0
        a_t_tile = tl.load(a_base + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                           mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(x_tile, a_t_tile, acc, input_precision=DOT_PRECISION)
    tl.store(h_ptr + offs_p[:, None] * stride_hm + offs_r[None, :] * stride_hr, acc.to(h_ptr.dtype.element_ty),
             mask=mask_p[:, None] & mask_r[None, :])


@triton.jit
def mixed_lora_sgmv_expand(
    # pointers: h [M, R_MAX] (by sorted position), B [n, N, R_MAX], out [M, N] (y, updated in place),
    # order [M], the tile table, ranks [n], scales [n] (fp32)
    h_ptr, b_ptr, out_ptr, order_ptr, tile_adapter_ptr, tile_start_ptr, tile_end_ptr, rank_ptr, scale_ptr,
    # sizes
    N,
    # strides, in elements
    stride_hm, stride_hr, stride_bn, stride_bo, stride_br, stride_om, stride_on,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[order[p], n] += s[a] * (h[p] @ B[a]^T)[n] on this tile and column tile (grid: tiles x column tiles)"""
    tile = tl.program_id(0)
    adapter = tl.load(tile_adapter_ptr + tile).to(tl.int64)
    rank = tl.load(rank_ptr + adapter)
    scale = tl.load(scale_ptr + adapter)
    offs_p = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_M)
    mask_p = offs_p < tl.load(tile_end_ptr + tile)
    rows = tl.load(order_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    h_tile = tl.load(h_ptr + offs_p[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                     mask=mask_p[:, None] & mask_r[None, :], other=0.0)
    b_t_tile = tl.load(b_ptr + adapter * stride_bn + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bo,
                       mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    delta = tl.dot(h_tile, b_t_tile, input_precision=DOT_PRECISION)
    mask_out = mask_p[:, None] & mask_n[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    y_tile = tl.load(out_ptrs, mask=mask_out, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (y_tile + scale * delta).to(out_ptr.dtype.element_ty), mask=mask_out)
'''

KERNEL_NAMES = ("mixed_lora_bgmv_shrink", "mixed_lora_bgmv_expand", "mixed_lora_sgmv_shrink",
                "mixed_lora_sgmv_expand")


def source() -> str:
    """The kernels' module source (what is written to the kernel cache and imported)."""
    return _SOURCE


def load_kernels() -> dict:
    """name -> the Triton function (compiled or interpreted, as TRITON_INTERPRET says now)."""
    module = codegen.load(_SOURCE, "mixed_lora")
    return {name: getattr(module, name) for name in KERNEL_NAMES}


# ---------------------------------------------------------------- the bank


@dataclass(frozen=True)
class LoraBank:
    """n adapters' LoRA tensors, padded to one rank R_MAX: a [n, R_MAX, K] (A, zero rows past each rank),
    b [n, N, R_MAX] (B, zero columns past each rank), scales [n] fp32 (alpha / r, or rsLoRA's), ranks [n]
    int32 (1 <= ranks[a] <= R_MAX; 0 makes an adapter add nothing)."""

    a: torch.Tensor
    b: torch.Tensor
    scales: torch.Tensor
    ranks: torch.Tensor

    @staticmethod
    def build(adapters: list, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
              r_max: int | None = None) -> "LoraBank":
        """A bank from (A [r, K], B [N, r], scale) per adapter (its index is its place in the list)."""
        if not adapters:
            raise ValueError("LoraBank.build: no adapters")
        first = adapters[0][0]
        dtype, device = dtype or first.dtype, torch.device(device) if device is not None else first.device
        K, N = first.shape[1], adapters[0][1].shape[0]
        ranks = [int(a.shape[0]) for a, _, _ in adapters]
        r_max = max(ranks) if r_max is None else r_max
        for i, (a, b, _) in enumerate(adapters):
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != K or b.shape != (N, a.shape[0]) or a.shape[0] > r_max:
                raise ValueError(f"LoraBank.build: adapter {i} has A {list(a.shape)}, B {list(b.shape)}; expected "
                                 f"A [r, {K}] and B [{N}, r] with r <= {r_max}")
        bank_a = torch.zeros((len(adapters), r_max, K), dtype=dtype, device=device)
        bank_b = torch.zeros((len(adapters), N, r_max), dtype=dtype, device=device)
        with torch.no_grad():   # a copy for inference: no autograd history from trainable tensors
            for i, (a, b, _) in enumerate(adapters):   # once per adapter when the bank is built
                bank_a[i, :a.shape[0]] = a.to(device=device, dtype=dtype)
                bank_b[i, :, :a.shape[0]] = b.to(device=device, dtype=dtype)
        scales = torch.tensor([float(s) for _, _, s in adapters], dtype=torch.float32, device=device)
        return LoraBank(bank_a, bank_b, scales, torch.tensor(ranks, dtype=torch.int32, device=device))

    @property
    def sizes(self) -> tuple[int, int, int, int]:
        """(n adapters, R_MAX, K, N)."""
        n, r_max, K = self.a.shape
        return n, r_max, K, self.b.shape[1]


# ---------------------------------------------------------------- segments (SGMV's tile table)


@dataclass(frozen=True)
class Segments:
    """The rows sorted by adapter and cut into tiles of at most BLOCK_M rows of one adapter each.

    order[p] is the row at sorted position p (rows with -1 first, then adapter 0's, 1's, ...; a stable
    sort keeps each segment's rows in order); tile t covers sorted positions tile_start[t] ..
    min(tile_start[t] + BLOCK_M, tile_end[t]) - 1, all of adapter tile_adapter[t]. int32, on the index's
    device."""

    order: torch.Tensor
    tile_adapter: torch.Tensor
    tile_start: torch.Tensor
    tile_end: torch.Tensor
    block_m: int

    @property
    def tiles(self) -> int:
        return int(self.tile_adapter.numel())


def segments(index: torch.Tensor, n_adapters: int, block_m: int) -> Segments:
    """The tile table for `index` (one adapter index per row, -1 for none) over a bank of n_adapters, with
    torch ops only (no loop over rows or adapters); one host sync, for the number of tiles."""
    idx = index.reshape(-1).long()
    device = idx.device
    order = torch.argsort(idx, stable=True)
    counts = torch.bincount(idx + 1, minlength=n_adapters + 1)        # [no adapter, adapter 0, 1, ...]
    starts = (torch.cumsum(counts, 0) - counts)[1:]
    counts = counts[1:]
    tiles = (counts + block_m - 1) // block_m                           # 0 for an adapter no row uses
    total = int(tiles.sum())
    tile_adapter = torch.repeat_interleave(torch.arange(n_adapters, device=device), tiles, output_size=total)
    first_tile = torch.cumsum(tiles, 0) - tiles
    tile_start = starts[tile_adapter] + (torch.arange(total, device=device) - first_tile[tile_adapter]) * block_m
    tile_end = starts[tile_adapter] + counts[tile_adapter]
    as32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return Segments(as32(order), as32(tile_adapter), as32(tile_start), as32(tile_end), block_m)


# ---------------------------------------------------------------- launcher


def choose_mode(rows: int) -> str:
    """"bgmv" for a decode-sized batch (at most BGMV_MAX_ROWS rows), else "sgmv"."""
    return "bgmv" if rows <= BGMV_MAX_ROWS else "sgmv"


def mixed_lora(x: torch.Tensor, y: torch.Tensor, bank: LoraBank, index: torch.Tensor, inplace: bool = False,
               mode: str | None = None, config: tuple | None = None, check_index: bool = True) -> torch.Tensor:
    """y + scales[a] * B[a] round(A[a] x) per row, a = index[row] (-1: y's row unchanged).

    x [..., K] and y [..., N] share their leading dims (M rows in all); index has M entries. With
    `inplace` y is updated and returned. `mode` forces "bgmv" or "sgmv" (default: `choose_mode(M)`),
    `config` a tile config of that mode. Where no kernel runs (no GPU and no interpreter, or fp64) this is
    `mixed_lora_reference`. `check_index=False` skips the range check of index (a host sync) for a caller
    that made it itself.
    """
    M, N, K = _check(x, y, bank, index, mode)
    if check_index and M and (int(index.min()) < -1 or int(index.max()) >= bank.a.shape[0]):
        raise ValueError(f"mixed_lora: index holds {int(index.min())}..{int(index.max())}; each entry must be -1 "
                         f"(no adapter) or an adapter of the bank (0..{bank.a.shape[0] - 1})")
    if not runs_kernel("mixed_lora", x.device, {x.dtype}):
        return mixed_lora_reference(x, y, bank, index, inplace)
    out, copy_back = _output(y, M, N, inplace)
    if M and N and K and bank.a.shape[1]:
        with on_device(x.device):
            _run(x.reshape(M, K), out, bank, index.reshape(M), mode or choose_mode(M), config)
    if copy_back:
        y.copy_(out.view(y.shape))
    return y if inplace else out.view(y.shape)


def _output(y: torch.Tensor, M: int, N: int, inplace: bool) -> tuple[torch.Tensor, bool]:
    """(the [M, N] tensor the kernels update, whether it must be copied into y afterwards)."""
    if not inplace:
        return y.reshape(M, N).clone(memory_format=torch.contiguous_format), False
    try:
        return y.view(M, N), False
    except RuntimeError:   # y's leading dims do not flatten to a view: update a copy, then write it back
        return y.reshape(M, N).clone(memory_format=torch.contiguous_format), True


def _run(x2: torch.Tensor, out: torch.Tensor, bank: LoraBank, index: torch.Tensor, mode: str,
         config: tuple | None) -> None:
    kernels = load_kernels()
    M, K = x2.shape
    n, r_max, _, N = bank.sizes
    interpreting = codegen.interpreting()
    h = torch.empty((M, r_max), dtype=x2.dtype, device=x2.device)
    bank_a, bank_b, ranks = bank.a, bank.b, bank.ranks.to(device=x2.device, dtype=torch.int32)
    scales = bank.scales.to(device=x2.device, dtype=torch.float32)
    gpu = {} if interpreting else dict(num_warps=4)
    if mode == "bgmv":
        block_k, block_r_shrink, block_n, block_r_expand = config or (
            BGMV_INTERPRET_CONFIG if interpreting else BGMV_GPU_CONFIG)
        idx = index.to(torch.int32).contiguous()
        kernels["mixed_lora_bgmv_shrink"][(M, _cdiv(r_max, block_r_shrink))](
            x2, bank_a, h, idx, ranks, K, *x2.stride(), *bank_a.stride(), *h.stride(),
            BLOCK_R=block_r_shrink, BLOCK_K=block_k, **gpu)
        kernels["mixed_lora_bgmv_expand"][(M, _cdiv(N, block_n))](
            h, bank_b, out, idx, ranks, scales, N, *h.stride(), *bank_b.stride(), *out.stride(),
            BLOCK_N=block_n, BLOCK_R=block_r_expand, **gpu)
        return
    block_m, block_n, block_k, warps = config or (SGMV_INTERPRET_CONFIG if interpreting else SGMV_GPU_CONFIG)
    seg = segments(index, n, block_m)
    if seg.tiles == 0:      # every row without an adapter: y as it is
        return
    table = (seg.order, seg.tile_adapter, seg.tile_start, seg.tile_end)
    block_r = max(16, 1 << (r_max - 1).bit_length())
    precision = "ieee" if x2.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    meta = dict(BLOCK_M=block_m, BLOCK_R=block_r, DOT_PRECISION=precision, **({} if interpreting else
                                                                                dict(num_warps=warps)))
    kernels["mixed_lora_sgmv_shrink"][(seg.tiles,)](
        x2, bank_a, h, *table, ranks, K, *x2.stride(), *bank_a.stride(), *h.stride(), BLOCK_K=block_k, **meta)
    kernels["mixed_lora_sgmv_expand"][(seg.tiles, _cdiv(N, block_n))](
        h, bank_b, out, *table, ranks, scales, N, *h.stride(), *bank_b.stride(), *out.stride(),
        BLOCK_N=block_n, **meta)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(x, y, bank: LoraBank, index, mode) -> tuple[int, int, int]:
    if mode not in (None, "bgmv", "sgmv"):
        raise ValueError(f"mixed_lora: mode {mode!r}; modes are 'bgmv' (decode) and 'sgmv' (prefill)")
    if x.dim() == 0 or y.dim() == 0 or x.shape[:-1] != y.shape[:-1]:
        raise ValueError(f"mixed_lora: x {list(x.shape)} and y {list(y.shape)} need a feature dim and the same "
                         "leading dims")
    M, K, N = math.prod(x.shape[:-1]), x.shape[-1], y.shape[-1]
    if bank.a.dim() != 3 or bank.b.dim() != 3:
        raise ValueError(f"mixed_lora: the bank's a {list(bank.a.shape)} must be [n, R_MAX, K] and b "
                         f"{list(bank.b.shape)} [n, N, R_MAX]")
    n, r_max = bank.a.shape[:2]
    expect = {"bank.a": (bank.a, (n, r_max, K), x.dtype), "bank.b": (bank.b, (n, N, r_max), x.dtype),
              "y": (y, tuple(y.shape), x.dtype)}
    for name, (tensor, shape, dtype) in expect.items():
        if tuple(tensor.shape) != shape or tensor.dtype != dtype or tensor.device != x.device:
            raise ValueError(f"mixed_lora: {name} is {tensor.dtype}{list(tensor.shape)} on {tensor.device}, "
                             f"expected {dtype}{list(shape)} on {x.device} (x is {list(x.shape)})")
    if tuple(bank.scales.shape) != (n,) or tuple(bank.ranks.shape) != (n,):
        raise ValueError(f"mixed_lora: the bank's scales {list(bank.scales.shape)} and ranks "
                         f"{list(bank.ranks.shape)} need one entry per adapter ({n})")
    if index.dtype.is_floating_point or index.dtype == torch.bool or index.numel() != M or \
            index.device != x.device:
        raise ValueError(f"mixed_lora: index is {index.dtype}{list(index.shape)} on {index.device}; expected an "
                         f"integer index with one entry per row ({M}) on {x.device}")
    return M, N, K


# ---------------------------------------------------------------- torch reference


def mixed_lora_reference(x: torch.Tensor, y: torch.Tensor, bank: LoraBank, index: torch.Tensor,
                         inplace: bool = False) -> torch.Tensor:
    """The kernels' math in torch, in their precision (the no-GPU path and the tests' oracle): the rows
    grouped by adapter (a stable sort and the segments' sizes), one GEMM pair per adapter present (a
    loop over the adapters in the batch, never over rows, and none for an adapter no row uses)."""
    K, N = x.shape[-1], y.shape[-1]
    x2, y2 = x.reshape(-1, K), y.reshape(-1, N)
    dtype = compute_dtype(x.dtype)
    idx = index.reshape(-1).to(device=x.device, dtype=torch.long)
    n = bank.a.shape[0]
    counts = torch.bincount(idx + 1, minlength=n + 1)
    groups = torch.split(torch.argsort(idx, stable=True), counts.tolist())[1:]   # rows per adapter, in order
    ranks = bank.ranks.tolist()
    out = y2.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
    for adapter in torch.nonzero(counts[1:]).flatten().tolist():
        rows, rank = groups[adapter], ranks[adapter]
        a, b = bank.a[adapter, :rank].to(dtype), bank.b[adapter, :, :rank].to(dtype)
        h = (x2.index_select(0, rows).to(dtype) @ a.t()).to(x.dtype).to(dtype)
        out.index_add_(0, rows, bank.scales[adapter].to(dtype) * (h @ b.t()))
    out = out.to(y.dtype).view(y.shape)
    if inplace:
        y.copy_(out)
        return y
    return out
