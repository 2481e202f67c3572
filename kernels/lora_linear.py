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

Source is generated from `_KERNEL` plus one snippet per epilogue step. The kernel body depends
only on the step list (never on a region's names), so regions with the same steps share one
compiled kernel; `render` adds a region's header naming the graph nodes it replaces.

Shapes never appear in generated source: sizes and strides are runtime arguments, so dynamic
(symbolic) batch and sequence dims need no symbolic index algebra here.
"""
from __future__ import annotations

import torch

from . import codegen, program_epilogue
from .dispatch import KERNEL_DTYPES
from .pointwise_program import Program
from .epilogue import RULES, Step, apply, as_tiles, steps, x_gain as x_gain_operand

_KERNEL = '''@triton.jit
def {name}(
    # pointers
    x_ptr, w_ptr, a_ptr, b_ptr, out_ptr,{operand_ptrs}
    # sizes: x is M x K, W is N x K (read through its strides), A is R x K, B is N x R
    M, N, K, R,
    # strides, in elements
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_om, stride_on,{operand_strides}
    # scalars
    lora_scale,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out = {math}"""
    # tile order: GROUP_M row tiles walk the column tiles together, so W tiles stay in L2
    pid = tl.program_id(0)
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    group_first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    group_rows = min(tiles_m - group_first_m, GROUP_M)
    pid_m = group_first_m + (pid % (GROUP_M * tiles_n)) % group_rows
    pid_n = (pid % (GROUP_M * tiles_n)) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)        # x @ W^T
{tma_setup}{lora_init}    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
{x_load}{x_prologue}{w_load}{lora_load}        acc = tl.dot(x_tile, w_t_tile, acc, input_precision=DOT_PRECISION)
{lora_dot}
{lora_up}    mask_out = mask_m[:, None] & mask_n[None, :]
{epilogue}
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_out)
'''

# tile loads: masked pointer loads, or (sm_90+, "+tma" modes) tensor descriptors, whose bulk
# copies (TMA) feed the tensor cores and read rows past an edge as zeros
_X_LOAD = """        x_tile = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
"""
_W_LOAD = """        w_t_tile = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                           mask=mask_k[:, None] & mask_n[None, :], other=0.0)
"""
_TMA_SETUP = """    # TMA descriptors: x (M x K), W (N x K) and A (R x K), rows contiguous and 16-byte aligned
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
"""
_TMA_SETUP_A = """    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[R, K], strides=[stride_ar, 1],
                                       block_shape=[BLOCK_R, BLOCK_K])
"""
_X_LOAD_TMA = "        x_tile = x_desc.load([pid_m * BLOCK_M, k_start])\n"
_W_LOAD_TMA = "        w_t_tile = w_desc.load([pid_n * BLOCK_N, k_start]).T\n"
_LORA_LOAD_TMA = "        a_t_tile = a_desc.load([0, k_start]).T\n"

# a prologue gain on x (IA3 on the input): x's K columns scaled as they are loaded, rounded as eager's mul
_X_GAIN = """        x_gain = tl.load(x_gain_ptr + offs_k * stride_x_gain_k, mask=mask_k, other=0.0)
        x_tile = x_tile * x_gain[None, :]
"""

# the LoRA parts of the template (left out for a region with no LoRA branch, e.g. IA3 alone)
_LORA_INIT = "    x_lora_a = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)   # x @ A^T, from the same x tiles\n"
_LORA_LOAD = """        a_t_tile = tl.load(a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                           mask=mask_k[:, None] & mask_r[None, :], other=0.0)
"""
_LORA_DOT = "        x_lora_a = tl.dot(x_tile, a_t_tile, x_lora_a, input_precision=DOT_PRECISION)\n"
_LORA_UP_PRECOMPUTED = """    # h = round(x @ A^T) was computed before the launch (M x R; it sits in A's slot:
    # stride_ar steps its rows m, stride_ak its columns r), so the K loop above has the base GEMM's one dot only
    x_lora_a = tl.load(a_ptr + offs_m[:, None] * stride_ar + offs_r[None, :] * stride_ak,
                       mask=mask_m[:, None] & mask_r[None, :], other=0.0)
"""
_LORA_UP = """    # LoRA up-projection: z = x @ W^T + s * round(x @ A^T) @ B^T
    b_t_tile = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                       mask=mask_r[:, None] & mask_n[None, :], other=0.0)
    lora_up = tl.dot(x_lora_a.to(b_t_tile.dtype), b_t_tile, input_precision=DOT_PRECISION)
    acc = acc + lora_scale * lora_up
"""

_LOAD_ROW = ("    {name} = tl.load({name}_ptr + offs_n * stride_{name}_n, mask=mask_n, other=0.0)"
             ".to(tl.float32)\n")
_LOAD_TILE = ("    {name} = tl.load(\n"
              "        {name}_ptr + offs_m[:, None] * stride_{name}_m + offs_n[None, :] * stride_{name}_n,\n"
              "        mask=mask_out, other=0.0).to(tl.float32)\n")

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
# under TRITON_INTERPRET=1 each program instance runs as Python over numpy: few, wide tiles
INTERPRET_CONFIG = (32, 32, 32, 4, 1, 1)


# where x @ A^T is computed: in the base GEMM's K loop ("fused", one launch, the x tile loaded once),
# before the launch ("precomputed": a skinny GEMM, then the kernel's loop has one dot), or nowhere
# ("none": a region without LoRA, e.g. an IA3-scaled linear); or no generated kernel at all ("cublas")
MODES = ("fused", "precomputed", "none", "cublas")   # "cublas": no kernel, torch ops (see _cublas); the kernel
                                                      # modes also as "<mode>+tma" (descriptor loads, sm_90+)
_PREFIX = {"fused": "lora_linear", "precomputed": "lora_linear_precomputed", "none": "linear"}


def kernel_name(chain: tuple[Step, ...], mode: str = "fused", program: Program | None = None,
                x_gain: bool = False) -> str:
    """The kernel's name: the template and its steps, e.g. lora_linear_bias_silu_mul_kernel."""
    return "_".join([_PREFIX[mode.removesuffix("+tma")], *(["tma"] if mode.endswith("+tma") else []),
                     *(["xgain"] if x_gain else []), *(s.rule for s in chain), *(["pointwise"] if program else []),
                     "kernel"])


def operand_name(step: Step) -> str:
    """The kernel's name for what a step reads: `bias`, or role + operand index (`gate0`, `gain1`)."""
    rule = RULES[step.rule]
    return rule.role if rule.operand == "row" else f"{rule.role}{step.operand}"


def operand_names(chain: tuple[Step, ...]) -> list[tuple[str, str]]:
    """(kernel argument name, 'row' | 'vec' | 'tile') for each distinct tensor a step reads."""
    names = []
    for step in chain:
        rule = RULES[step.rule]
        if rule.operand in ("row", "vec", "tile"):
            entry = (operand_name(step), rule.operand)
            if entry not in names:
                names.append(entry)
    return names


def formula(chain: tuple[Step, ...], mode: str = "fused", program: Program | None = None,
            x_gain: bool = False) -> str:
    """The math the kernel computes, e.g. silu(x @ W^T + s * (x @ A^T) @ B^T + bias)."""
    value = {"fused": "x @ W^T + s * (x @ A^T) @ B^T", "precomputed": "x @ W^T + s * h @ B^T",
             "none": "x @ W^T"}[mode]
    value = value.replace("x @", "(x * x_gain[k]) @") if x_gain else value
    for step in chain:
        rule = RULES[step.rule]
        operand = operand_name(step)
        if "({value})" in rule.math and not _is_sum(value):
            rule_math = rule.math.replace("({value})", "{value}")
        else:
            rule_math = rule.math
        value = rule_math.format(value=value, operand=operand, const=step.const)
    return value if program is None else program_epilogue.math(program, value)


def _is_sum(expr: str) -> bool:
    """Whether `expr` has a + outside parentheses (and so needs them before a product)."""
    depth = 0
    for char in expr:
        depth += (char == "(") - (char == ")")
        if char == "+" and depth == 0:
            return True
    return False


def epilogue_source(chain: tuple[Step, ...], indent: str = "    ") -> str:
    """The epilogue's lines over `acc`: per step a comment, its operand load and its rule's line.

    Shared with other GEMM templates (kernels/bottleneck.py): they need `acc`, `offs_m`, `offs_n`,
    `mask_n`, `mask_out` and each operand's `<name>_ptr` and strides in scope.
    """
    lines = []
    for index, step in enumerate(chain):
        rule = RULES[step.rule]
        name = operand_name(step)
        what = {"row": f", adds {name}[n] to each row", "vec": f", times {name}[n] per column",
                "tile": f" with {name}[m, n]", "const": f" by {step.const!r}"}
        lines.append(f"    # epilogue step {index}: {step.rule}{what.get(rule.operand, '')}\n")
        if rule.operand in ("row", "vec", "tile"):
            lines.append((_LOAD_TILE if rule.operand == "tile" else _LOAD_ROW).format(name=name))
        lines.append("    " + rule.triton.format(operand=name, const=step.const) + "\n")
    text = "".join(lines)
    return text if indent == "    " else "".join(indent + line[4:] if line.strip() else line
                                               for line in text.splitlines(keepends=True))


def kernel_source(chain: tuple[Step, ...], mode: str = "fused", program: Program | None = None,
                  input_kinds: tuple[str, ...] = (), x_gain: bool = False) -> str:
    """The Triton function for a step list (the same text for every region with these steps).

    `program` (with its extra inputs' kinds) ends the epilogue: see kernels/program_epilogue.py;
    `x_gain` scales x's columns in the K loop.
    """
    ptrs = "".join(f" {name}_ptr," for name, _ in operand_names(chain)) + (" x_gain_ptr," if x_gain else "")
    strides = "".join(f" stride_{name}_m, stride_{name}_n," if kind == "tile" else f" stride_{name}_n,"
                      for name, kind in operand_names(chain)) + (" stride_x_gain_k," if x_gain else "")
    epilogue = epilogue_source(chain)
    if program is not None:
        more_ptrs, more_strides = program_epilogue.arguments(input_kinds)
        ptrs, strides = ptrs + more_ptrs, strides + more_strides
        epilogue += program_epilogue.source(program, input_kinds)
    lora_mode, tma = mode.removesuffix("+tma"), mode.endswith("+tma")
    fused = lora_mode == "fused"
    return _KERNEL.format(name=kernel_name(chain, mode, program, x_gain), operand_ptrs=ptrs,
                          operand_strides=strides, math=formula(chain, lora_mode, program, x_gain),
                          epilogue=epilogue, x_prologue=_X_GAIN if x_gain else "",
                          tma_setup=(_TMA_SETUP + (_TMA_SETUP_A if fused else "")) if tma else "",
                          x_load=_X_LOAD_TMA if tma else _X_LOAD, w_load=_W_LOAD_TMA if tma else _W_LOAD,
                          lora_init=_LORA_INIT if fused else "",
                          lora_load=(_LORA_LOAD_TMA if tma else _LORA_LOAD) if fused else "",
                          lora_dot=_LORA_DOT if fused else "",
                          lora_up={"fused": _LORA_UP, "precomputed": _LORA_UP_PRECOMPUTED + _LORA_UP,
                                   "none": ""}[lora_mode])


def render(chain: tuple[Step, ...], region: str = "", fused: list[str] | tuple[str, ...] = (),
           mode: str = "fused", program: Program | None = None, input_kinds: tuple[str, ...] = (),
           x_gain: bool = False) -> str:
    """A whole module: a header (region name, graph nodes it replaces), imports and the kernel."""
    title = f"region `{region}`" if region else "a fused linear" if mode.startswith("none") else "a fused LoRA linear"
    header = [f'"""Generated by surgeon (kernels/lora_linear.py) for {title}.', "",
              f"out = {formula(chain, mode.removesuffix('+tma'), program, x_gain)}"]
    if fused:
        header += ["", "graph nodes replaced, in order:"] + [f"    {line}" for line in fused]
    header.append('"""')
    return "\n".join(header) + "\nimport triton\nimport triton.language as tl\n\n\n" + \
        kernel_source(chain, mode, program, input_kinds, x_gain)


_KERNELS: dict[tuple, object] = {}


def load_kernel(chain: tuple[Step, ...], mode: str = "fused", program: Program | None = None,
                input_kinds: tuple[str, ...] = (), x_gain: bool = False):
    """The compiled-on-demand Triton function for a step list and mode (cached, per interpreter flag)."""
    anonymous = None if program is None else program.anonymous()
    key = (chain, mode, anonymous and anonymous.encode(), input_kinds, x_gain, codegen.interpreting())
    if key not in _KERNELS:      # cached here too: rendering and hashing the source costs per call
        name = kernel_name(chain, mode, program, x_gain)
        source = render(chain, mode=mode, program=anonymous, input_kinds=input_kinds, x_gain=x_gain)
        _KERNELS[key] = getattr(codegen.load(source, name), name)
    return _KERNELS[key]


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
    chain, gain_index = steps(epilogue, bias is not None), x_gain_operand(epilogue)
    operands, extra_inputs = split_operands(chain, operands, program, gain_index)
    M, N, K, R = _check(x, weight, bias, lora_a, lora_b, operands, weight_layout, chain, gain_index)
    parsed = _program(program, extra_inputs, M, N)
    gain = None if gain_index is None else operands[gain_index]
    input_kinds = () if parsed is None else program_epilogue.kinds(extra_inputs, M, N)
    kernels = ("none",) if lora_a is None else ("fused", "precomputed")
    x2 = x.reshape(M, K)
    tma = tma_ready(x2, weight, lora_a, weight_layout)
    if mode not in (None, "cublas", *kernels, *(f"{k}+tma" for k in kernels)) or \
            (mode or "").endswith("+tma") and not tma:
        raise ValueError(f"lora_linear: mode {mode!r} with {'no ' if lora_a is None else ''}LoRA tensors"
                         f"{'' if tma else ' and tensors TMA cannot read'}; modes are {MODES}, a kernel mode "
                         f"with '+tma' where rows are contiguous and 16-byte aligned ('none' exactly when "
                         f"lora_a is None)")
    tiles = as_tiles(chain, operands, (M, N))
    if M == 0:
        return x.new_empty((*x.shape[:-1], N))
    w_strides = weight.stride() if weight_layout == "out_in" else weight.stride()[::-1]
    by_name = {"bias": bias, **{operand_name(s): tiles[s.operand] for s in chain
                                if RULES[s.rule].operand in ("tile", "vec")}}
    extra = [by_name[name] for name, _ in operand_names(chain)]
    extra_strides = [st for t in extra for st in t.stride()]
    if gain is not None:
        extra, extra_strides = extra + [gain], extra_strides + [gain.stride(0)]
    if parsed is not None:
        more, more_strides = program_epilogue.launch_tensors(extra_inputs, input_kinds, M, N)
        extra, extra_strides = extra + more, extra_strides + more_strides

    def launch(variant: str, cfg: tuple | None) -> torch.Tensor:
        if variant == "cublas":
            scaled = x2 if gain is None else x2 * gain
            out = _cublas(scaled, weight, bias, lora_a, lora_b, scale, weight_layout, chain, tiles)
            return out if parsed is None else program_epilogue.reference(out, extra_inputs, parsed)
        # "precomputed": h = round(x @ A^T) (M x R) in A's slot; "none": the pointers are never read
        lora_mode = variant.removesuffix("+tma")
        a = lora_a if lora_mode == "fused" else \
            ((x2 if gain is None else x2 * gain) @ lora_a.t()) if lora_mode == "precomputed" else x2
        b = x2 if lora_mode == "none" else lora_b
        if variant.endswith("+tma"):
            _tma_scratch(x2.device)
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
        args = [x2, weight, a, b, out, *extra, M, N, K, R, *x2.stride(), *w_strides, *a.stride(),
                *b.stride(), *out.stride(), *extra_strides, float(scale)]
        _launch(load_kernel(chain, variant, parsed, input_kinds, gain is not None), args, M, N, cfg, block_r,
                precision)
        return out

    block_r = max(16, triton_next_pow2(R))
    precision = "ieee" if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"
    if mode == "cublas" or codegen.interpreting() or config is not None or not x.is_cuda:
        variant, cfg = mode or kernels[0], config or INTERPRET_CONFIG
    else:
        tma_kernels = [f"{k}+tma" for k in kernels] if tma and torch.cuda.get_device_capability(x.device)[0] >= 9 \
            else []
        variant, cfg = _tuned(launch, [mode] if mode else [*kernels, *tma_kernels, "cublas"],
                              (M, N, K, R, x.dtype, epilogue, bias is None, str(x.device), program, input_kinds))
    return launch(variant, cfg).reshape(*x.shape[:-1], N)


def tma_ready(x2: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor | None, weight_layout: str) -> bool:
    """Whether the "+tma" kernels may read x, W and A: rows contiguous, row strides and base addresses
    16-byte aligned (what a TMA descriptor requires), W stored N x K."""
    tensors = [x2, weight] + ([lora_a] if lora_a is not None else [])
    return weight_layout == "out_in" and all(
        t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0 for t in tensors)


_SCRATCH_SET: set[str] = set()


def _tma_scratch(device: torch.device) -> None:
    """Give Triton an allocator for the descriptors kernels build on the device (once per device type)."""
    if device.type not in _SCRATCH_SET:
        import triton

        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))
        _SCRATCH_SET.add(device.type)


def _cublas(x2, weight, bias, lora_a, lora_b, scale, weight_layout, chain, tiles) -> torch.Tensor:
    """The region as torch ops: cuBLAS's GEMM (with the bias when it comes first), the LoRA update as
    addmm's accumulate (out += s (x A^T) B^T, one extra pass over out), then the epilogue's steps.

    Measured on an H200 (fp16, K = N = 4096, r = 16, M = 4096) the one-loop kernel took 1.78x the
    base GEMM where this took 1.28x: cuBLAS's GEMM is compute-optimal there, the LoRA part is under
    1% of the FLOPs. On a GPU the tuner times it beside the kernels; elsewhere it runs when asked.
    """
    w = weight if weight_layout == "out_in" else weight.t()
    bias_first = bool(chain) and chain[0].rule == "bias"
    out = torch.nn.functional.linear(x2, w, bias if bias_first else None)
    if lora_a is not None:
        out.addmm_(x2 @ lora_a.t(), lora_b.t(), alpha=scale)
    rest = chain[1:] if bias_first else chain
    return apply(out, rest, bias, tiles)[-1].to(x2.dtype) if rest else out


def _launch(kernel, args: list, M: int, N: int, cfg: tuple, block_r: int, precision: str) -> None:
    block_m, block_n, block_k, group_m, warps, stages = cfg
    grid = (triton_cdiv(M, block_m) * triton_cdiv(N, block_n),)
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, GROUP_M=group_m,
                DOT_PRECISION=precision)
    if not codegen.interpreting():
        meta.update(num_warps=warps, num_stages=stages)
    kernel[grid](*args, **meta)


_BEST: dict[tuple, tuple[str, tuple]] = {}


def _tuned(launch, modes: list[str], key: tuple) -> tuple[str, tuple]:
    """The fastest (mode, tile config) for this shape bucket on the GPU (benchmarked once per bucket).

    Like triton.autotune, but keyed on M rounded up to a power of two: the token count changes
    on every call of a language model, and retuning for each exact M would stall it. A
    "precomputed" candidate is timed with its x @ A^T GEMM included, "cublas" as a whole.
    """
    M = key[0]
    bucket = (triton_next_pow2(M) if M <= 4096 else 4096,) + key[1:] + tuple(modes)
    if bucket not in _BEST:
        import triton.testing

        limit = next(k for k in (16, 64, None) if k is None or M <= k)
        timings = {}
        for candidate in ((m, cfg) for m in modes for cfg in ([None] if m == "cublas" else GPU_CONFIGS[limit])):
            try:
                timings[candidate] = triton.testing.do_bench(lambda: launch(*candidate), warmup=5, rep=20)
            except Exception:  # noqa: BLE001 - a config may not fit this GPU (shared memory); try the next
                continue
        if not timings:
            raise RuntimeError(f"no tile config of lora_linear ({modes}) launches on this device for "
                               f"(M, N, K, R) = {key[:4]}")
        _BEST[bucket] = min(timings, key=timings.get)
    return _BEST[bucket]


def _check(x, weight, bias, lora_a, lora_b, operands, weight_layout, chain,
           gain_index: int | None = None) -> tuple[int, int, int, int]:
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
    for i, op in enumerate(operands):
        # a tile may have the leading dims of a view the region grew through: same rows, same N
        same_rows = op.dim() >= 1 and op.shape[-1] == N and op.numel() == x.numel() // max(K, 1) * N
        expect[f"operands[{i}]"] = (op, (K,) if i == gain_index else (N,) if i in vec else
                                    tuple(op.shape) if same_rows else (*x.shape[:-1], N))
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
    chain, gain_index = steps(epilogue, bias is not None), x_gain_operand(epilogue)
    operands, extra_inputs = split_operands(chain, operands, program, gain_index)
    if gain_index is not None:
        x = x * operands[gain_index]       # in x's dtype, as the graph's mul rounds it
    z, _ = pre_epilogue(x, weight, lora_a, lora_b, scale, weight_layout)
    tiles = as_tiles(chain, operands, z.shape)
    out = apply(z, chain, bias, tiles)[-1].to(x.dtype)
    parsed = _program(program, extra_inputs, *z.shape)
    if parsed is not None:
        out = program_epilogue.reference(out, extra_inputs, parsed)
    return out.reshape(*x.shape[:-1], z.shape[-1])


def split_operands(chain: tuple[Step, ...], operands: list, program: str = "",
                   gain_index: int | None = None) -> tuple[list, list]:
    """(the steps' operands, a program epilogue's extra inputs): with a program, the steps (and an
    x gain) read operands 0..n-1 and the program's inputs %1.. are the rest; else all are the steps'."""
    if not program:
        return list(operands), []
    used = [s.operand for s in chain if s.operand is not None] + ([gain_index] if gain_index is not None else [])
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


def pre_epilogue(x, weight, lora_a, lora_b, scale, weight_layout):
    """(z, x @ A^T) as 2-D compute-dtype tensors; x @ A^T is rounded to x's dtype as stored eagerly.

    With no LoRA branch (lora_a None) z is x @ W^T and x @ A^T is None.
    """
    dtype = compute_dtype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    w = weight.to(dtype) if weight_layout == "out_in" else weight.to(dtype).t()
    if lora_a is None:
        return x2 @ w.t(), None
    x_lora_a = (x2 @ lora_a.to(dtype).t()).to(x.dtype).to(dtype)
    return x2 @ w.t() + scale * (x_lora_a @ lora_b.to(dtype).t()), x_lora_a
