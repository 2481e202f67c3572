"""Fused LoRA linear: one Triton kernel for a base GEMM, its unmerged LoRA branch and an epilogue.

Math (shapes: x [M, K], W [N, K], A [R, K], B [N, R], s a float; M = product of x's leading
dims):

    z   = x @ W^T + s * (x @ A^T) @ B^T
    out = epilogue(z)          e.g. mul(silu(z + bias), gate) + residual

Each program owns a BLOCK_M x BLOCK_N tile of out. Its K loop loads the x tile once and feeds
two dots: x @ W^T into the fp32 accumulator and x @ A^T into a BLOCK_M x BLOCK_R one (R is
padded to BLOCK_R >= 16 with masked zeros, which tl.dot needs). After the loop, x @ A^T is
rounded to the input dtype (as the unfused graph stores it), multiplied by B^T and s, and
added to the accumulator; the epilogue steps (kernels/epilogue.py) run on the fp32 values and
the tile is stored once. W is read through its strides, so GPT-2 Conv1D's in x out weight
(weight_layout="in_out") needs no copy. x @ A^T is recomputed by every column tile: extra
work R / BLOCK_N of the base GEMM.

The source is generated in kernels/lora_linear_source.py (template, snippets, `render`); this
file holds the launcher (checks, strategy choice, launch), the GPU tuner and the torch reference.
On a GPU the launcher times, once per shape bucket, the kernel with x @ A^T in its K loop, with
x @ A^T computed first, both with TMA loads on sm_90+, both with the K loop split over SPLIT_K
programs per tile (for M <= 64, decode shapes, where M x N alone makes too few tiles; the last
program of a tile sums the slices' fp32 partials in a fixed order and runs the epilogue), and the
cuBLAS composition, and keeps the fastest of those whose output agrees with the torch reference's.

Shapes never appear in generated source: sizes and strides are runtime arguments, so dynamic
(symbolic) batch and sequence dims need no symbolic index algebra here.
"""
from __future__ import annotations

import torch

from . import codegen, epilogue_pass, program_epilogue, tuning
from .dispatch import KERNEL_DTYPES, split_workspace
from .epilogue import RULES, Step, apply, as_tiles, prologue, steps, tile_shape
from .lora_linear_source import MODES, VECTORS, load_kernel, operand_name, operand_names, render, split_mode

__all__ = ["GPU_CONFIGS", "MODES", "SPLITK_CONFIGS", "lora_linear", "load_kernel", "reference", "render", "tma_ready"]
from .pointwise_program import Program



# tile configs (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) tried on a GPU, by M;
# decode shapes (M <= 16) want many narrow column tiles to spread W's bytes over the SMs
GPU_CONFIGS = {
    16: [(16, 32, 128, 1, 4, 4), (16, 64, 128, 1, 4, 4), (16, 64, 256, 1, 4, 3), (16, 128, 64, 1, 4, 4),
         (16, 16, 256, 1, 2, 4), (16, 32, 256, 1, 4, 4), (16, 32, 512, 1, 4, 3), (16, 16, 512, 1, 4, 3)],
    64: [(32, 64, 64, 8, 4, 4), (64, 64, 64, 8, 4, 4), (64, 128, 32, 8, 4, 4), (32, 128, 64, 8, 4, 4),
         (64, 64, 128, 8, 4, 4), (32, 32, 256, 8, 4, 4)],
    None: [(128, 128, 32, 8, 4, 4), (128, 128, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4),
           (128, 256, 32, 8, 8, 3), (64, 256, 32, 8, 4, 4), (128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4),
           (256, 128, 64, 8, 8, 3), (128, 128, 64, 8, 4, 5), (128, 128, 128, 8, 8, 3)],
}
# "+splitk" configs, the last entry SPLIT_K: for M <= 64 the row tiles are one or two, so the column
# tiles alone give too few programs; cutting K over SPLIT_K programs per tile gives the SMs enough, and
# wide column tiles re-read A (R x K, fused mode) fewer times: A's extra bytes are R / BLOCK_N of W's
SPLITK_CONFIGS = {
    16: [(16, 64, 128, 1, 4, 4, 4), (16, 128, 128, 1, 4, 4, 4), (16, 128, 128, 1, 4, 4, 8),
         (16, 256, 64, 1, 4, 4, 8), (16, 128, 64, 1, 4, 4, 16), (16, 64, 256, 1, 4, 3, 8)],
    64: [(64, 64, 64, 1, 4, 4, 4), (32, 128, 64, 1, 4, 4, 4), (64, 128, 64, 1, 4, 3, 8), (32, 64, 128, 1, 4, 4, 8)],
}
# under TRITON_INTERPRET=1 each program instance runs as Python over numpy: few, wide tiles
INTERPRET_CONFIG = (32, 32, 32, 4, 1, 1)
INTERPRET_SPLITK_CONFIG = (*INTERPRET_CONFIG, 2)
# no generated kernel: cuBLAS's GEMM then addmm's accumulate of the LoRA term, or the LoRA term
# first with the GEMM adding it in its epilogue (see _cublas)
CUBLAS_MODES = ("cublas", "cublas+beta")



# ---------------------------------------------------------------- launcher


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor | None,
                lora_b: torch.Tensor | None, operands: list[torch.Tensor], scale: float,
                weight_layout: str = "out_in", epilogue: str = "", config: tuple | None = None,
                mode: str | None = None, program: str = "") -> torch.Tensor:
    """Run the region: check the arguments, then the generated kernel (or the cuBLAS composition).

    With lora_a = lora_b = None the region has no LoRA branch (an IA3-scaled linear): the
    template is generated without the x @ A^T dot. `mode` (see MODES) and `config` force a
    strategy and a tile config; by default the interpreter runs "fused" (or "none") and a GPU
    the fastest (mode, config) measured for this shape bucket. `program` (an encoded pointwise
    Program) ends the epilogue; its inputs after %0 are the operands after the steps' own.
    """
    chain, where = steps(epilogue, bias is not None), prologue(epilogue)
    operands, extra_inputs = split_operands(chain, operands, program, where)
    M, N, K, R = _check(x, weight, bias, lora_a, lora_b, operands, weight_layout, chain, where)
    parsed = _program(program, extra_inputs, M, N)
    vectors = {name: operands[i] for name, i in where.items()}
    gain = vectors.get("x_gain")
    input_kinds = () if parsed is None else program_epilogue.kinds(extra_inputs, M, N)
    kernels = ("none",) if lora_a is None else ("fused", "precomputed")
    x2 = x.reshape(M, K)
    # TMA readiness (alignment) matters only where a "+tma" mode is asked for or tuned
    tma = (mode is None and _tunes(x) or (mode or "").endswith("+tma")) and tma_ready(x2, weight, lora_a, weight_layout)
    _check_mode(mode, kernels, tma, lora_a is None)
    tiles = as_tiles(chain, operands, (M, N))
    if M == 0:
        return x.new_empty((*x.shape[:-1], N))
    w_strides = weight.stride() if weight_layout == "out_in" else weight.stride()[::-1]
    extra, extra_strides = _epilogue_arguments(chain, bias, tiles, vectors, parsed, extra_inputs, input_kinds, M, N)

    def launch(variant: str, cfg: tuple | None) -> torch.Tensor:
        if variant.startswith("cublas"):
            scaled = x2 if gain is None else x2 * gain
            z, rest = _cublas(scaled, weight, bias, lora_a, lora_b, scale, weight_layout, chain, vectors,
                              lora_first=variant == "cublas+beta")
            tensors, strides = _epilogue_arguments(rest, bias, tiles, {}, parsed, extra_inputs, input_kinds, M, N)
            return epilogue_pass.run(z, rest, bias, tiles, tensors, strides, parsed, extra_inputs, input_kinds)
        # "precomputed": h = round(x @ A^T) (M x R) in A's slot; "none": the pointers are never read
        lora_mode, suffix = split_mode(variant)
        a = lora_a if lora_mode == "fused" else \
            ((x2 if gain is None else x2 * gain) @ lora_a.t()) if lora_mode == "precomputed" else x2
        b = x2 if lora_mode == "none" else lora_b
        if suffix == "tma":
            _tma_scratch(x2.device)
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
        split = list(_split_buffers(x2.device, M, N, cfg, block_r)) if suffix == "splitk" else []
        args = [x2, weight, a, b, out, *split, *extra, M, N, K, R, *x2.stride(), *w_strides, *a.stride(),
                *b.stride(), *out.stride(), *extra_strides, float(scale)]
        _launch(load_kernel(chain, variant, parsed, input_kinds, tuple(vectors)), args, M, N, cfg, block_r,
                precision)
        return out

    block_r = max(16, triton_next_pow2(R))
    precision = "ieee" if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    if mode in CUBLAS_MODES or config is not None or not _tunes(x):
        variant = mode or kernels[0]
        cfg = config or (INTERPRET_SPLITK_CONFIG if variant.endswith("+splitk") else INTERPRET_CONFIG)
    else:
        tma_kernels = [f"{k}+tma" for k in kernels] if tma and _has_tma(x.device) else []
        split_kernels = [f"{k}+splitk" for k in kernels] if M <= max(SPLITK_CONFIGS) else []

        expected = []

        def agrees(candidate) -> bool:    # a candidate that launches but computes something else is not a choice
            expected[:] = expected or [reference(x, weight, bias, lora_a, lora_b, operands + extra_inputs, scale,
                                                 weight_layout, epilogue, program).reshape(M, N)]
            if candidate[0].endswith("+splitk"):    # NaN slots: a partial read before it is written shows
                # (only the workspace this launch uses: others may be in use on other streams)
                _split_buffers(x2.device, M, N, candidate[1], block_r)[0].fill_(float("nan"))
            return tuning.agrees(launch(*candidate), expected[0])

        cublas = ["cublas"] if lora_a is None else list(CUBLAS_MODES)
        variant, cfg = _tuned(launch, [mode] if mode else [*kernels, *tma_kernels, *split_kernels, *cublas],
                              (M, N, K, R, x.dtype, epilogue, bias is None, str(x.device), program, input_kinds),
                              agrees)
    return launch(variant, cfg).reshape(*x.shape[:-1], N)


def _tunes(x: torch.Tensor) -> bool:
    """Whether this call chooses its strategy by measurement: compiled kernels on a GPU."""
    return x.is_cuda and not codegen.interpreting()


def _has_tma(device: torch.device) -> bool:
    """Whether the GPU has TMA (sm_90+)."""
    return torch.cuda.get_device_capability(device)[0] >= 9


def _check_mode(mode: str | None, kernels: tuple[str, ...], tma: bool, no_lora: bool) -> None:
    if mode in (None, *CUBLAS_MODES, *kernels, *(f"{k}+splitk" for k in kernels)) or \
            mode in (f"{k}+tma" for k in kernels) and tma:
        return
    raise ValueError(f"lora_linear: mode {mode!r} with {'no ' if no_lora else ''}LoRA tensors"
                     f"{'' if tma else ' and tensors TMA cannot read'}; modes are {MODES}, a kernel mode with "
                     f"'+splitk', or with '+tma' where rows are contiguous and 16-byte aligned ('none' exactly "
                     f"when lora_a is None)")


def _split_buffers(device: torch.device, M: int, N: int, cfg: tuple, block_r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(workspace, counters) for a "+splitk" launch with tile config `cfg` (its last entry SPLIT_K)."""
    tiles = triton_cdiv(M, cfg[0]) * triton_cdiv(N, cfg[1])
    return split_workspace(device, tiles * cfg[6] * cfg[0] * (cfg[1] + block_r), tiles)


def _epilogue_arguments(chain, bias, tiles, vectors, program, program_inputs, input_kinds, M, N) -> tuple[list, list]:
    """The kernel's tensors after out, and their strides, in its signature's order: the steps'
    operands, the prologue vectors (VECTORS order), a program epilogue's inputs."""
    by_name = {"bias": bias, **{operand_name(s): tiles[s.operand] for s in chain
                                if RULES[s.rule].operand in ("tile", "vec")}}
    extra = [by_name[name] for name, _ in operand_names(chain)]
    strides = [st for t in extra for st in t.stride()]
    for name in (v for v in VECTORS if v in vectors):
        extra, strides = extra + [vectors[name]], strides + list(vectors[name].stride())
    if program is not None:
        more, more_strides = program_epilogue.launch_tensors(program_inputs, input_kinds, M, N)
        extra, strides = extra + more, strides + more_strides
    return extra, strides


def tma_ready(x2: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor | None, weight_layout: str) -> bool:
    """Whether the "+tma" kernels may read x, W and A: rows contiguous, row strides and base addresses
    16-byte aligned (what a TMA descriptor requires), W stored N x K."""
    tensors = [x2, weight] + ([lora_a] if lora_a is not None else [])
    return weight_layout == "out_in" and all(
        t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0 for t in tensors)


_SCRATCH_SET: set[str] = set()


def _tma_scratch(device: torch.device) -> None:
    """Give Triton an allocator for the descriptors kernels build on the device (once per device type;
    "cuda" allocates on the current device, the one the kernel launches on)."""
    if device.type not in _SCRATCH_SET:
        import triton

        kind = device.type
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=kind))
        _SCRATCH_SET.add(kind)


def _cublas(x2, weight, bias, lora_a, lora_b, scale, weight_layout, chain, vectors=None,
            lora_first: bool = False) -> tuple[torch.Tensor, tuple[Step, ...]]:
    """(z, the steps left): the region's GEMMs as torch ops, cuBLAS's GEMM (with the bias when it comes
    first) and the LoRA update as addmm's accumulate (out += s (x A^T) B^T, one extra pass over out).
    The steps left then run as one generated pass over z (kernels/epilogue_pass.py).

    Measured on an H200 (fp16, K = N = 4096, r = 16, M = 4096) the one-loop kernel took 1.78x the
    base GEMM where this took 1.28x: cuBLAS's GEMM is compute-optimal there, the LoRA part is under
    1% of the FLOPs. On a GPU the tuner times it beside the kernels; elsewhere it runs when asked.

    `lora_first` ("cublas+beta") computes the LoRA term u = (x A^T) B^T first and lets the base GEMM
    add it in its epilogue, out = s u + x W^T (addmm's beta = s): u is written once and read once
    where the accumulate reads and writes out on top of writing it.
    """
    w = weight if weight_layout == "out_in" else weight.t()
    bias_first = bool(chain) and chain[0].rule == "bias" and not lora_first
    vectors = vectors or {}
    if lora_a is not None and lora_first:
        out = torch.addmm(_lora_term(x2, lora_a, lora_b, vectors), x2, w.t(), beta=scale)
    else:
        out = torch.nn.functional.linear(x2, w, bias if bias_first else None)
        if lora_a is not None and not {"vera_d", "vera_b", "xs_r"} & set(vectors):
            out.addmm_(x2 @ lora_a.t(), lora_b.t(), alpha=scale)
        elif lora_a is not None:
            out.add_(_lora_term(x2, lora_a, lora_b, vectors), alpha=scale)
    return out, chain[1:] if bias_first else chain


def _lora_term(x2, lora_a, lora_b, vectors: dict) -> torch.Tensor:
    """(x A^T) B^T with LoRA-XS's R and VeRA's d and b where present, each product rounded as the graph
    stores it."""
    h = x2 @ lora_a.t()
    h = h @ vectors["xs_r"].t() if "xs_r" in vectors else h
    up = (h * vectors["vera_d"] if "vera_d" in vectors else h) @ lora_b.t()
    return up * vectors["vera_b"] if "vera_b" in vectors else up


def _launch(kernel, args: list, M: int, N: int, cfg: tuple, block_r: int, precision: str) -> None:
    block_m, block_n, block_k, group_m, warps, stages = cfg[:6]
    grid = (triton_cdiv(M, block_m) * triton_cdiv(N, block_n),) + tuple(cfg[6:])    # (tiles, SPLIT_K) split
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, GROUP_M=group_m,
                DOT_PRECISION=precision, **({"SPLIT_K": cfg[6]} if len(cfg) > 6 else {}))
    if not codegen.interpreting():
        meta.update(num_warps=warps, num_stages=stages)
    kernel[grid](*args, **meta)


_BEST: dict[tuple, tuple[str, tuple]] = {}


def _tuned(launch, modes: list[str], key: tuple, agrees=None) -> tuple[str, tuple]:
    """The fastest (mode, tile config) for this shape bucket on the GPU (benchmarked once per bucket).

    Like triton.autotune, but keyed on M rounded up to a power of two: the token count changes
    on every call of a language model, and retuning for each exact M would stall it. A
    "precomputed" candidate is timed with its x @ A^T GEMM included, "cublas" as a whole.
    """
    import triton.testing

    M = key[0]
    bucket = (triton_next_pow2(M) if M <= 4096 else 4096,) + key[1:] + tuple(modes)
    limit = next(k for k in (16, 64, None) if k is None or M <= k)
    candidates = [(m, cfg) for m in modes for cfg in ([None] if m in CUBLAS_MODES else
                                                      SPLITK_CONFIGS[limit or 64] if m.endswith("+splitk") else
                                                      GPU_CONFIGS[limit])]
    return tuning.fastest(_BEST, "lora_linear", bucket, candidates,
                          lambda c: triton.testing.do_bench(lambda: launch(*c), warmup=5, rep=20), agrees)


def _check(x, weight, bias, lora_a, lora_b, operands, weight_layout, chain,
           where: dict | None = None) -> tuple[int, int, int, int]:
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"lora_linear: the kernel takes {[str(d) for d in KERNEL_DTYPES]}, not {x.dtype}")
    if weight_layout not in ("out_in", "in_out"):
        raise ValueError(f"weight_layout must be 'out_in' or 'in_out', got {weight_layout!r}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_linear: lora_a and lora_b are both tensors or both None")
    K = x.shape[-1]
    N, K_w = weight.shape if weight_layout == "out_in" else weight.shape[::-1]
    R = 0 if lora_a is None else lora_a.shape[0]
    expect = {"weight": (weight, (N, K) if weight_layout == "out_in" else (K, N))}
    if lora_a is not None:
        expect.update(lora_a=(lora_a, (R, K)), lora_b=(lora_b, (N, R)))
    if bias is not None:
        expect["bias"] = (bias, (N,))
    vec = {s.operand for s in chain if RULES[s.rule].operand == "vec"}
    sizes = {i: {"x_gain": (K,), "vera_d": (R,), "vera_b": (N,), "xs_r": (R, R)}[name]
             for name, i in (where or {}).items()}
    for i, op in enumerate(operands):
        expect[f"operands[{i}]"] = (op, sizes[i] if i in sizes else (N,) if i in vec else
                                    tile_shape(op, tuple(x.shape[:-1]), N))
    for name, (tensor, shape) in expect.items():
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != x.dtype or tensor.device != x.device:
            raise ValueError(f"lora_linear: {name} is {tensor.dtype}{list(tensor.shape)} on {tensor.device}, "
                             f"expected {x.dtype}{list(shape)} on {x.device} (x is {list(x.shape)})")
    used = {s.operand for s in chain if s.operand is not None}
    if used - set(range(len(operands))):
        raise ValueError(f"lora_linear: epilogue reads operands {sorted(used)}, got {len(operands)}")
    return x.numel() // K if K else 0, N, K, R


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ---------------------------------------------------------------- torch reference


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernel accumulates in: fp32 for 16-bit inputs, else the input's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
              lora_b: torch.Tensor, operands: list[torch.Tensor], scale: float, weight_layout: str = "out_in",
              epilogue: str = "", program: str = "") -> torch.Tensor:
    """The kernel's math in torch, in the kernel's precision (the no-GPU path and the test oracle)."""
    chain, where = steps(epilogue, bias is not None), prologue(epilogue)
    operands, extra_inputs = split_operands(chain, operands, program, where)
    vectors = {name: operands[i] for name, i in where.items()}
    if "x_gain" in vectors:
        x = x * vectors["x_gain"]         # in x's dtype, as the graph's mul rounds it
    z, _ = pre_epilogue(x, weight, lora_a, lora_b, scale, weight_layout, vectors)
    tiles = as_tiles(chain, operands, z.shape)
    out = apply(z, chain, bias, tiles)[-1].to(x.dtype)
    parsed = _program(program, extra_inputs, *z.shape)
    if parsed is not None:
        out = program_epilogue.reference(out, extra_inputs, parsed)
    return out.reshape(*x.shape[:-1], z.shape[-1])


def split_operands(chain: tuple[Step, ...], operands: list, program: str = "",
                   where: dict | None = None) -> tuple[list, list]:
    """(the steps' operands, a program epilogue's extra inputs): with a program, the steps (and the
    prologue vectors) read operands 0..n-1 and the program's inputs %1.. are the rest; else all are
    the steps'."""
    if not program:
        return list(operands), []
    used = [s.operand for s in chain if s.operand is not None] + list((where or {}).values())
    n = 1 + max(used, default=-1)
    return list(operands[:n]), list(operands[n:])


def _program(program: str, extra_inputs: list, M: int, N: int) -> "Program | None":
    if not program:
        return None
    parsed = Program.decode(program)
    program_epilogue.check(parsed)
    if len(parsed.inputs) != 1 + len(extra_inputs):
        raise ValueError(f"lora_linear: the epilogue program reads {len(parsed.inputs) - 1} inputs after %0, "
                         f"got {len(extra_inputs)}")
    return parsed


def pre_epilogue(x, weight, lora_a, lora_b, scale, weight_layout, vectors=None):
    """(z, x @ A^T) as 2-D compute-dtype tensors; x @ A^T is rounded to x's dtype as stored eagerly.

    With no LoRA branch (lora_a None) z is x @ W^T and x @ A^T is None. LoRA-XS's `xs_r` multiplies
    x @ A^T by R^T, VeRA's vectors (`vera_d`, `vera_b`) scale x @ A^T and the up-projection, each
    product rounded as the graph stores it.
    """
    dtype, vectors = compute_dtype(x.dtype), vectors or {}
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    w = weight.to(dtype) if weight_layout == "out_in" else weight.to(dtype).t()
    if lora_a is None:
        return x2 @ w.t(), None
    round_ = lambda t: t.to(x.dtype).to(dtype)  # noqa: E731
    x_lora_a = round_(x2 @ lora_a.to(dtype).t())
    middle = round_(x_lora_a @ vectors["xs_r"].to(dtype).t()) if "xs_r" in vectors else x_lora_a
    hidden = round_(middle * vectors["vera_d"].to(dtype)) if "vera_d" in vectors else middle
    up = hidden @ lora_b.to(dtype).t()
    up = round_(round_(up) * vectors["vera_b"].to(dtype)) if "vera_b" in vectors else up
    return x2 @ w.t() + scale * up, x_lora_a
