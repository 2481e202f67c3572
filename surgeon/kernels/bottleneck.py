"""Fused bottleneck / parallel adapter branch: one Triton kernel for y + s * U act(D source), then an epilogue.

Math (shapes: source [M, K], residual [M, N], D [R, K] `adapter_down`, U [N, R] `adapter_up`, s a
float, R small (1..64); M = product of the leading dims, the same for source and residual):

    h   = act(round(source @ D^T))       act in relu | gelu | gelu_tanh | silu | none
    z   = residual + s * round(h) @ U^T
    out = epilogue(z)                    steps of kernels/epilogue.py, e.g. "add:0,scale:0.5"

The serial (bottleneck) adapter passes source = residual = y, the base layer's output (K == N);
the parallel adapter passes source = x, the layer input, and residual = y. `round` is to the input
dtype: the unfused graph stores source @ D^T, then act of it (computed in fp32 by aten), in that
dtype; the up product and the epilogue stay in fp32 until the one store, as in lora_linear.

Each program owns BLOCK_M rows. It accumulates source @ D^T over K into a BLOCK_M x BLOCK_R fp32
tile (R padded to BLOCK_R >= 16 with masked zeros, which tl.dot needs), applies act, then walks
its columns BLOCK_N at a time: residual tile + s * dot(h, U^T tile), the epilogue steps, one store.
A launch may split the columns over SPLIT_N programs per row block (for decode-sized M, to use
more SMs); each recomputes h, R * K extra multiply-adds per row.

Source is generated from `_KERNEL`, the activation's and each epilogue step's Triton line from
epilogue.RULES and the operand loads of lora_linear; it depends only on (activation, steps), and
sizes and strides are runtime arguments. Importing this module registers `surgeon::bottleneck`.
"""
from __future__ import annotations

import math
import re

import torch

from . import codegen, epilogue_pass, tuning
from .dispatch import KERNEL_DTYPES, on_device, runs_kernel
from .epilogue import RULES, Step, apply, as_tiles, operand_of, parse, tile_shape
from .lora_linear import compute_dtype, triton_cdiv, triton_next_pow2
from .lora_linear_source import epilogue_source, formula as lora_formula, operand_name, operand_names

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "none")

_KERNEL = '''@triton.jit
def {name}(
    # pointers
    source_ptr, residual_ptr, down_ptr, up_ptr, out_ptr,{operand_ptrs}
    # sizes: source is M x K, residual and out are M x N, D is R x K, U is N x R
    M, N, K, R,
    # strides, in elements
    stride_sm, stride_sk, stride_ym, stride_yn, stride_dr, stride_dk, stride_un, stride_ur,
    stride_om, stride_on,{operand_strides}
    # scalars: s, and the columns each program owns (a multiple of BLOCK_N)
    adapter_scale, cols_per_program,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out = {math}"""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R

    # down-projection: source @ D^T over K (columns r >= R of D^T load as 0)
    down_acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        source_tile = tl.load(source_ptr + offs_m[:, None] * stride_sm + offs_k[None, :] * stride_sk,
                              mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        d_t_tile = tl.load(down_ptr + offs_k[:, None] * stride_dk + offs_r[None, :] * stride_dr,
                           mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        down_acc = tl.dot(source_tile, d_t_tile, down_acc, input_precision=DOT_PRECISION)

    # h = act(round(source @ D^T)), rounded as the unfused graph stores it
    hidden = down_acc.to(source_ptr.dtype.element_ty).to(tl.float32)
{activation}    hidden = hidden.to(up_ptr.dtype.element_ty)

    # up-projection and epilogue, BLOCK_N columns at a time: z = y + s * h @ U^T
    # (rows r >= R of U^T load as 0, so h's padded columns add nothing whatever act(0) is)
    col_start = tl.program_id(1) * cols_per_program
    for n_start in range(col_start, min(col_start + cols_per_program, N), BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_out = mask_m[:, None] & mask_n[None, :]
        u_t_tile = tl.load(up_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un,
                           mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        y_tile = tl.load(residual_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                         mask=mask_out, other=0.0).to(tl.float32)
        acc = y_tile + adapter_scale * tl.dot(hidden, u_t_tile, input_precision=DOT_PRECISION)
{epilogue}        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=mask_out)
'''

# tile configs (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_N, num_warps, num_stages) tried on a GPU, by M; few
# rows leave few row blocks, so the columns are split over more programs (each recomputes h)
GPU_CONFIGS = {
    16: [(16, 64, 128, 16, 4, 3), (16, 128, 128, 8, 4, 3), (16, 64, 256, 32, 4, 3), (16, 128, 64, 16, 4, 3),
         (16, 256, 128, 4, 4, 3)],
    256: [(32, 64, 128, 4, 4, 3), (64, 64, 64, 4, 4, 3), (64, 128, 64, 2, 4, 3), (32, 128, 128, 2, 4, 3)],
    None: [(64, 128, 64, 1, 4, 3), (128, 128, 64, 1, 8, 3), (128, 64, 64, 1, 4, 3), (64, 64, 128, 1, 4, 4),
           (128, 128, 32, 2, 8, 3), (64, 256, 64, 1, 8, 3)],
}
# under TRITON_INTERPRET=1 each program instance runs as Python over numpy: few, wide tiles
INTERPRET_CONFIG = (64, 32, 32, 1, 1, 1)


def kernel_name(activation: str, chain: tuple[Step, ...]) -> str:
    """The kernel's name, e.g. bottleneck_relu_add_kernel."""
    return "_".join(["bottleneck", activation, *(s.rule for s in chain), "kernel"])


def formula(activation: str, chain: tuple[Step, ...]) -> str:
    """The math the kernel computes, e.g. y + s * relu(source @ D^T) @ U^T + residual0."""
    hidden = "source @ D^T" if activation == "none" else f"{activation}(source @ D^T)"
    # the epilogue wraps a sum the same way whatever the sum is: reuse lora_linear's formula
    return lora_formula(chain).replace(lora_formula(()), f"y + s * {hidden} @ U^T")


def kernel_source(activation: str, chain: tuple[Step, ...]) -> str:
    """The Triton function for (activation, steps): the same text for every region with them."""
    names = operand_names(chain)
    # the rule's line is written over `acc`; here it runs on `hidden` (a loop-carried `acc` must keep its shape)
    act_line = "" if activation == "none" else re.sub(r"\bacc\b", "hidden", RULES[activation].triton)
    return _KERNEL.format(name=kernel_name(activation, chain), operand_ptrs="".join(f" {n}_ptr," for n, _ in names),
                          operand_strides="".join(f" stride_{n}_m, stride_{n}_n," if kind == "tile" else
                                                  f" stride_{n}_n," for n, kind in names),
                          math=formula(activation, chain),
                          activation=f"    # activation: {activation}\n    {act_line}\n" if act_line else "",
                          epilogue=epilogue_source(chain, indent=" " * 8))


def render(activation: str, epilogue: str, region: str = "", fused: list[str] | tuple[str, ...] = ()) -> str:
    """A whole module: a header (region name, graph nodes it replaces), imports and the kernel."""
    chain = _chain(activation, epilogue)
    title = f"region `{region}`" if region else "a fused adapter branch"
    header = [f'"""Generated by surgeon (kernels/bottleneck.py) for {title}.', "",
              f"out = {formula(activation, chain)}", "",
              "serial (bottleneck) adapter: source = y; parallel adapter: source = the layer input x"]
    if fused:
        header += ["", "graph nodes replaced, in order:"] + [f"    {line}" for line in fused]
    header.append('"""')
    return "\n".join(header) + "\nimport triton\nimport triton.language as tl\n\n\n" + \
        kernel_source(activation, chain)


def _chain(activation: str, epilogue: str) -> tuple[Step, ...]:
    if activation not in ACTIVATIONS:
        raise ValueError(f"bottleneck: activation {activation!r} is not one of {list(ACTIVATIONS)}")
    chain = parse(epilogue)
    if any(RULES[s.rule].operand == "row" for s in chain):
        raise ValueError(f"bottleneck: epilogue {epilogue!r} reads a bias row; the branch has no bias")
    return chain


_KERNELS: dict[tuple, object] = {}


def load_kernel(activation: str, epilogue: str):
    """The compiled-on-demand Triton function for (activation, steps), one module per mode."""
    chain = _chain(activation, epilogue)
    key = (activation, chain, codegen.interpreting())
    if key not in _KERNELS:
        name = kernel_name(activation, chain)
        _KERNELS[key] = getattr(codegen.load(render(activation, epilogue), name), name)
    return _KERNELS[key]


# ---------------------------------------------------------------- launcher


def bottleneck(source: torch.Tensor, residual: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
               operands: list[torch.Tensor], scale: float, activation: str, epilogue: str,
               config: tuple | None = None, composed: bool = False) -> torch.Tensor:
    """Run the generated kernel: check the arguments, allocate the output, launch one grid.

    `composed=True` runs the branch as torch ops instead (`_composed`); on a GPU the tuner times
    that beside the kernel's configs and runs whichever was faster for the shape bucket.
    """
    chain = _chain(activation, epilogue)
    M, N, K, R = _check(source, residual, down, up, operands, chain)
    out = torch.empty((M, N), dtype=residual.dtype, device=residual.device)
    if M == 0 or N == 0:
        return out.reshape(residual.shape)
    source2, residual2 = source.reshape(M, K), residual.reshape(M, N)
    tiles = as_tiles(chain, operands, (M, N))
    by_name = {operand_name(s): tiles[s.operand] for s in chain if s.operand is not None}
    extra = [by_name[name] for name, _ in operand_names(chain)]
    compose = lambda: _composed(source2, residual2, down, up, tiles, scale, activation, chain, extra)  # noqa: E731
    if composed:
        return compose().reshape(residual.shape)
    args = [source2, residual2, down, up, out, *extra, M, N, K, R, *source2.stride(), *residual2.stride(),
            *down.stride(), *up.stride(), *out.stride(), *(st for t in extra for st in t.stride()), float(scale)]
    kernel = load_kernel(activation, epilogue)
    block_r = max(16, triton_next_pow2(R))
    precision = "ieee" if source.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    expected = []

    def agrees(candidate) -> bool:     # a config that launches but computes something else is not a choice
        expected[:] = expected or [reference(source, residual, down, up, operands, scale, activation,
                                             epilogue).reshape(M, N)]
        if candidate == "composed":
            return tuning.agrees(compose(), expected[0])
        out.fill_(float("nan"))
        _launch(kernel, args, M, N, candidate, block_r, precision)
        return tuning.agrees(out, expected[0])

    cfg = config or (INTERPRET_CONFIG if not _tunes(source) else
                     _tuned(kernel, args, block_r, precision, (M, N, K, R, source.dtype, str(source.device)),
                            compose, agrees, lambda: tuning.capture_reason(source)))
    if cfg == "composed":
        return compose().reshape(residual.shape)
    _launch(kernel, args, M, N, cfg, block_r, precision)
    return out.reshape(residual.shape)


def _composed(source2, residual2, down, up, tiles, scale, activation, chain, extra) -> torch.Tensor:
    """The unfused graph's ops: two skinny GEMMs around the activation, the add with alpha = s, then
    the steps as one generated pass (kernels/epilogue_pass.py; `extra` are its operands in order)."""
    hidden = torch.nn.functional.linear(source2, down)
    hidden = hidden if activation == "none" else RULES[activation].torch(hidden, None)
    z = torch.add(residual2, torch.nn.functional.linear(hidden, up), alpha=scale)
    return epilogue_pass.run(z, chain, None, tiles, extra, [st for t in extra for st in t.stride()], None, [], ())


def _launch(kernel, args: list, M: int, N: int, cfg: tuple, block_r: int, precision: str) -> None:
    block_m, block_n, block_k, split_n, warps, stages = cfg
    tiles_n = triton_cdiv(N, block_n)
    cols_per_program = triton_cdiv(tiles_n, min(split_n, tiles_n)) * block_n
    grid = (triton_cdiv(M, block_m), triton_cdiv(N, cols_per_program))
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, DOT_PRECISION=precision)
    if not codegen.interpreting():
        meta.update(num_warps=warps, num_stages=stages)
    kernel[grid](*args, cols_per_program, **meta)


_BEST: dict[tuple, tuple] = {}


def _tunes(x: torch.Tensor) -> bool:
    """Whether this call chooses its config by measurement: compiled kernels on a GPU."""
    return x.is_cuda and not codegen.interpreting()


def _tuned(kernel, args: list, block_r: int, precision: str, key: tuple, compose=None, agrees=None,
           unmeasurable=None) -> "tuple | str":
    """The fastest GPU config for this shape bucket (M rounded up to a power of two; benchmarked once),
    or "composed" when the torch ops (`compose`) were faster than every config; with `agrees`, only
    among the candidates whose output agrees with the torch reference."""
    import triton.testing

    M, N = key[0], key[1]
    bucket = (min(triton_next_pow2(M), 4096), *key[1:], kernel.__name__, compose is not None)
    candidates = GPU_CONFIGS[next(k for k in (16, 256, None) if k is None or M <= k)] + \
        (["composed"] if compose is not None else [])

    def time_one(candidate) -> float:
        run = compose if candidate == "composed" else lambda: _launch(kernel, args, M, N, candidate, block_r,
                                                                      precision)
        return triton.testing.do_bench(run, warmup=5, rep=20)

    return tuning.fastest(_BEST, "bottleneck", bucket, candidates, time_one, agrees, unmeasurable)


def _vec(chain: tuple[Step, ...]) -> set[int]:
    return {s.operand for s in chain if RULES[s.rule].operand == "vec"}


def _check(source, residual, down, up, operands, chain) -> tuple[int, int, int, int]:
    if source.dtype not in KERNEL_DTYPES:
        raise ValueError(f"bottleneck: the kernel takes {[str(d) for d in KERNEL_DTYPES]}, not {source.dtype}")
    if source.dim() == 0 or residual.dim() == 0 or down.dim() != 2:
        raise ValueError(f"bottleneck: source {list(source.shape)}, residual {list(residual.shape)} need a "
                         f"feature dim and down {list(down.shape)} must be R x K")
    K, N, R = source.shape[-1], residual.shape[-1], down.shape[0]
    lead = tuple(source.shape[:-1])
    expect = {"residual": (residual, (*lead, N)), "down": (down, (R, K)), "up": (up, (N, R)),
              **{f"operands[{i}]": (op, (N,) if i in _vec(chain) else tile_shape(op, lead, N))
                 for i, op in enumerate(operands)}}
    for name, (tensor, shape) in expect.items():
        if tuple(tensor.shape) != shape or tensor.dtype != source.dtype or tensor.device != source.device:
            raise ValueError(f"bottleneck: {name} is {tensor.dtype}{list(tensor.shape)} on {tensor.device}, "
                             f"expected {source.dtype}{list(shape)} on {source.device} "
                             f"(source is {list(source.shape)})")
    used = {s.operand for s in chain if s.operand is not None}
    if used - set(range(len(operands))):
        raise ValueError(f"bottleneck: epilogue reads operands {sorted(used)}, got {len(operands)}")
    return math.prod(lead), N, K, R


# ---------------------------------------------------------------- torch reference


def reference(source: torch.Tensor, residual: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
              operands: list[torch.Tensor], scale: float, activation: str, epilogue: str) -> torch.Tensor:
    """The kernel's math in torch, in the kernel's precision (the no-GPU path and the test oracle)."""
    chain = _chain(activation, epilogue)
    z, _, _ = pre_epilogue(source, residual, down, up, scale, activation)
    return apply(z, chain, None, as_tiles(chain, operands, z.shape))[-1].to(residual.dtype).reshape(residual.shape)


def pre_epilogue(source, residual, down, up, scale, activation):
    """(z, a, h) as 2-D compute-dtype tensors: a = round(source @ D^T), h = round(act(a))."""
    dtype = compute_dtype(source.dtype)
    source2 = source.reshape(-1, source.shape[-1]).to(dtype)
    a = (source2 @ down.to(dtype).t()).to(source.dtype).to(dtype)
    h = a if activation == "none" else RULES[activation].torch(a, None).to(source.dtype).to(dtype)
    z = residual.reshape(-1, residual.shape[-1]).to(dtype) + scale * (h @ up.to(dtype).t())
    return z, a, h


# ---------------------------------------------------------------- the custom op

@torch.library.custom_op("surgeon::bottleneck", mutates_args=())
def bottleneck_op(source: torch.Tensor, residual: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                  operands: list[torch.Tensor], scale: float, activation: str, epilogue: str) -> torch.Tensor:
    """epilogue(y + s * act(source @ D^T) @ U^T): the fused adapter branch (per-call backend as lora_linear)."""
    if not runs_kernel("bottleneck", source.device, {source.dtype}):
        return reference(source, residual, down, up, operands, scale, activation, epilogue)
    with on_device(source.device):
        return bottleneck(source, residual, down, up, operands, scale, activation, epilogue)


@bottleneck_op.register_fake
def _(source, residual, down, up, operands, scale, activation, epilogue):
    return torch.empty_like(residual, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    source, residual, down, up, operands, scale, activation, epilogue = inputs
    ctx.save_for_backward(source, residual, down, up, *operands)
    ctx.meta = (scale, activation, epilogue)
    ctx.wants = [t.requires_grad for t in (source, residual, down, up, *operands)]


def _backward(ctx, grad):
    source, residual, down, up, *operands = ctx.saved_tensors
    grads = bottleneck_backward(grad, source, residual, down, up, operands, *ctx.meta)
    grads = [g if want else None for g, want in zip(grads, ctx.wants)]
    return (*grads[:4], grads[4:], None, None, None)


bottleneck_op.register_autograd(_backward, setup_context=_setup_context)


def bottleneck_backward(grad, source, residual, down, up, operands, scale, activation, epilogue) -> list:
    """Gradients of (source, residual, down, up, *operands), from the reference math.

    With g = dL/dz (z before the epilogue), a = source @ D^T and h = act(a), the roundings
    passed straight through: d residual = g, dU = s g^T h, dh = s g U, da = act'(a) dh,
    d source = da D, dD = da^T source. When source is residual (serial adapter) autograd adds
    the two gradients of the one tensor.
    """
    chain = _chain(activation, epilogue)
    dtype = compute_dtype(source.dtype)
    z, a, h = pre_epilogue(source, residual, down, up, scale, activation)
    tiles = [t.to(dtype) for t in as_tiles(chain, operands, z.shape)]
    values = apply(z, chain, None, tiles)
    g = grad.reshape(z.shape).to(dtype)
    operand_grads: list = [torch.zeros_like(t) for t in tiles]
    for step, value in zip(reversed(chain), reversed(values[:-1])):
        g, g_operand = RULES[step.rule].vjp(g, value, operand_of(step, None, tiles))
        if g_operand is not None:
            operand_grads[step.operand] = operand_grads[step.operand] + g_operand
    g_hidden = scale * (g @ up.to(dtype))
    g_a = g_hidden if activation == "none" else RULES[activation].vjp(g_hidden, a, None)[0]
    source2 = source.reshape(z.shape[0], -1).to(dtype)
    return [(g_a @ down.to(dtype)).to(source.dtype).reshape(source.shape), g.to(residual.dtype).reshape(residual.shape),
            (g_a.t() @ source2).to(down.dtype), (scale * g.t() @ h).to(up.dtype),
            *(gr.to(op.dtype).reshape(op.shape) for gr, op in zip(operand_grads, operands))]
