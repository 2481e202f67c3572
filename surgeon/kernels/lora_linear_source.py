"""The source of the fused LoRA linear kernel: the template, its snippets, and code generation.

`kernel_source(chain, mode, ...)` fills `_KERNEL` with one snippet per part: the tile loads
(masked pointer loads, or TMA tensor descriptors in the "+tma" modes), the LoRA dot (in the K
loop, precomputed, or none), the prologue operands (an x gain; VeRA's vectors and LoRA-XS's R
on the LoRA branch), the epilogue steps (kernels/epilogue.py) and a pointwise program epilogue
(kernels/program_epilogue.py). The kernel body depends only on
those choices, never on a region's names, so regions with the same steps share one compiled
kernel; `render` adds a region's header naming the graph nodes it replaces. The launcher, the
tuner and the torch reference are in kernels/lora_linear.py.
"""
from __future__ import annotations

from . import codegen, program_epilogue
from .epilogue import RULES, Step
from .pointwise_program import Program

_SIGNATURE = '''@triton.jit
def {name}(
    # pointers
    x_ptr, w_ptr, a_ptr, b_ptr, out_ptr,{split_ptrs}{operand_ptrs}
    # sizes: x is M x K, W is N x K (read through its strides), A is R x K, B is N x R
    M, N, K, R,
    # strides, in elements
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_om, stride_on,{operand_strides}
    # scalars
    lora_scale,{rows_args}
    # meta
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,{split_meta}
):
    """out = {math}"""
{body}'''

# one program per output tile
_TILE_BODY = '''    # tile order: GROUP_M row tiles walk the column tiles together, so W tiles stay in L2
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
{tma_setup}{lora_init}{k_range}    for k_start in range({k_bounds}, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
{x_load}{x_prologue}{w_load}{lora_load}        acc = tl.dot(x_tile, w_t_tile, acc, input_precision=DOT_PRECISION)
{lora_dot}
{tail}'''

# "fused+rows" (prefill): a program per row tile and chunk of column tiles, run in turn; x @ A^T is
# computed in the first tile's K loop (its x tiles loaded once) and kept for the others, so the extra
# tensor-core work is R / (BLOCK_N x tiles per chunk) of the GEMM's, not R / BLOCK_N, and no pass
# over x is added (as "precomputed" adds)
_ROWS_BODY = '''    # row-stationary order: program (row tile, chunk) runs the chunk's column tiles in turn
    pid = tl.program_id(0)
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    per_chunk = (tiles_n + column_chunks - 1) // column_chunks
    pid_m = pid // column_chunks
    n_first = (pid % column_chunks) * per_chunk
    n_last = min(n_first + per_chunk, tiles_n)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
{lora_init}    for pid_n in range(n_first, n_last):
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)        # x @ W^T
        if pid_n == n_first:        # the chunk's first tile: x @ A^T in the same K loop
            for k_start in range(0, K, BLOCK_K):
                offs_k = k_start + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
{first_loads}                acc = tl.dot(x_tile, w_t_tile, acc, input_precision=DOT_PRECISION)
{lora_dot}        else:                       # the others: the base GEMM's one dot
            for k_start in range(0, K, BLOCK_K):
                offs_k = k_start + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
{loads}                acc = tl.dot(x_tile, w_t_tile, acc, input_precision=DOT_PRECISION)
{tail}'''
_KERNEL = _SIGNATURE.replace("{body}", _TILE_BODY)

# after the K loop: the LoRA up-projection, the epilogue and the one store (in the "+splitk" modes
# run by the last of a tile's programs only, so indented one level more)
_TAIL = '''{lora_up}    mask_out = mask_m[:, None] & mask_n[None, :]
{epilogue}
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=mask_out)
'''
# split-K ("+splitk", for few rows: M x N alone gives too few tiles to spread W's bytes over the
# SMs): the grid's second axis cuts the K loop into SPLIT_K slices. Each program stores its fp32
# partial sums in a workspace slot of its own; the last of a tile's programs to arrive (a counter
# per tile, acq_rel atomics) adds the slots up in slot order, so the result does not depend on
# arrival order, resets the counter for the next launch, and runs the tail
_K_RANGE_SPLIT = """    split = tl.program_id(1)
    k_step = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT_K - 1) // SPLIT_K * BLOCK_K
    k_first = split * k_step
    k_last = min(K, k_first + k_step)
"""
_SPLIT_PUBLISH = """    # split-K: publish this slice's partial sums, then count the arrivals of this tile's programs
    slots = tiles_m * tiles_n * SPLIT_K
    slot = pid * SPLIT_K + split
    tile_offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(ws_ptr + slot * (BLOCK_M * BLOCK_N) + tile_offs, acc)
{lora_publish}    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT_K - 1:      # the last slice: sum the slots in order, reset the counter, finish the tile
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
{lora_reset}        for part in range(0, SPLIT_K):
            acc += tl.load(ws_ptr + (pid * SPLIT_K + part) * (BLOCK_M * BLOCK_N) + tile_offs, cache_modifier=".cg")
{lora_gather}        tl.atomic_xchg(count_ptr + pid, 0)
"""
_SPLIT_LORA_PUBLISH = """    h_offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :]
    h_ws = ws_ptr + slots * (BLOCK_M * BLOCK_N)      # x @ A^T partials after the tiles' slots
    tl.store(h_ws + slot * (BLOCK_M * BLOCK_R) + h_offs, x_lora_a)
"""
_SPLIT_LORA_RESET = "        x_lora_a = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)\n"
_SPLIT_LORA_GATHER = """            x_lora_a += tl.load(h_ws + (pid * SPLIT_K + part) * (BLOCK_M * BLOCK_R) + h_offs, cache_modifier=".cg")
"""

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
# VeRA's vectors on the LoRA branch: h = round(x @ A^T) * d[r] (rounded), u = round(h @ B^T) * b[n]
_VERA_D = """    vera_d = tl.load(vera_d_ptr + offs_r * stride_vera_d_r, mask=mask_r, other=0.0)
    x_lora_a = (x_lora_a.to(vera_d.dtype) * vera_d[None, :]).to(tl.float32)
"""
_VERA_B = """    vera_b = tl.load(vera_b_ptr + offs_n * stride_vera_b_n, mask=mask_n, other=0.0)
    lora_up = (lora_up.to(vera_b.dtype) * vera_b[None, :]).to(tl.float32)
"""
# LoRA-XS's R (R x R, out x in like a linear's weight) between A and B: h = round(round(x @ A^T) @ R^T)
_XS_R = """    xs_r_t = tl.load(xs_r_ptr + offs_r[:, None] * stride_xs_r_in + offs_r[None, :] * stride_xs_r_out,
                     mask=mask_r[:, None] & mask_r[None, :], other=0.0)
    x_lora_a = tl.dot(x_lora_a.to(xs_r_t.dtype), xs_r_t, input_precision=DOT_PRECISION)
    x_lora_a = x_lora_a.to(xs_r_t.dtype).to(tl.float32)     # rounded as stored; fp32 as declared
"""
VECTORS = ("x_gain", "vera_d", "vera_b", "xs_r")   # the order of their pointers in the kernel's signature
_VECTOR_STRIDE = {"x_gain": "stride_x_gain_k", "vera_d": "stride_vera_d_r", "vera_b": "stride_vera_b_n",
                  "xs_r": "stride_xs_r_out, stride_xs_r_in"}

# the LoRA parts of the template (left out for a region with no LoRA branch, e.g. IA3 alone)
_LORA_INIT = "    x_lora_a = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)   # x @ A^T, from the same x tiles\n"
_LORA_LOAD = """        a_t_tile = tl.load(a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                           mask=mask_k[:, None] & mask_r[None, :], other=0.0)
"""
_VERA_DOT = "        x_lora_a = tl.dot(x_tile, a_t_tile, x_lora_a, input_precision=DOT_PRECISION)\n"
_LORA_UP_PRECOMPUTED = """    # h = round(x @ A^T) was computed before the launch (M x R; it sits in A's slot:
    # stride_ar steps its rows m, stride_ak its columns r), so the K loop above has the base GEMM's one dot only
    x_lora_a = tl.load(a_ptr + offs_m[:, None] * stride_ar + offs_r[None, :] * stride_ak,
                       mask=mask_m[:, None] & mask_r[None, :], other=0.0)
"""
_LORA_UP = """    # LoRA up-projection: z = x @ W^T + s * round(x @ A^T) @ B^T
    b_t_tile = tl.load(b_ptr + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                       mask=mask_r[:, None] & mask_n[None, :], other=0.0)
{xs_r}{vera_d}{up}"""
# the up-projection accumulates into acc, as s * (acc / s + h @ B^T): one BLOCK_M x BLOCK_N fp32 tile
# stays live, not two (a second one spills registers at 128 x 128 per warpgroup on sm_90; the
# extra roundings are fp32's, a few ulp); |s| is within 2^-24..2^24 (the launcher sees to it)
_UP_INTO_ACC = """    acc = tl.dot(x_lora_a.to(b_t_tile.dtype), b_t_tile, acc * (1.0 / lora_scale),
                 input_precision=DOT_PRECISION) * lora_scale
"""
# VeRA's b scales (and rounds) the up-projection by column first: a tile of its own
_UP_APART = """    lora_up = tl.dot(x_lora_a.to(b_t_tile.dtype), b_t_tile, input_precision=DOT_PRECISION)
{vera_b}    acc = acc + lora_scale * lora_up
"""

_LOAD_ROW = ("    {name} = tl.load({name}_ptr + offs_n * stride_{name}_n, mask=mask_n, other=0.0)"
             ".to(tl.float32)\n")
_LOAD_TILE = ("    {name} = tl.load(\n"
              "        {name}_ptr + offs_m[:, None] * stride_{name}_m + offs_n[None, :] * stride_{name}_n,\n"
              "        mask=mask_out, other=0.0).to(tl.float32)\n")


# where x @ A^T is computed: in the base GEMM's K loop ("fused", one launch, the x tile loaded once),
# before the launch ("precomputed": a skinny GEMM, then the kernel's loop has one dot), or nowhere
# ("none": a region without LoRA, e.g. an IA3-scaled linear); or no generated kernel at all ("cublas",
# also as "cublas+beta": the LoRA term first, added by the GEMM's epilogue)
MODES = ("fused", "precomputed", "none", "cublas")   # "cublas": torch ops (kernels/lora_linear_cublas.py); the kernel
                                                      # modes also as "<mode>+tma" (descriptor loads, sm_90+)
                                                      # and "<mode>+splitk" (the K loop cut over a 2-D grid);
                                                      # "fused+rows": a program per row tile and column chunk
SUFFIXES = ("tma", "splitk", "rows")


def split_mode(mode: str) -> tuple[str, str]:
    """("fused" | "precomputed" | "none" | "cublas", "" | "tma" | "splitk" | "rows") for a mode string."""
    base, _, suffix = mode.partition("+")
    return base, suffix
_PREFIX = {"fused": "lora_linear", "precomputed": "lora_linear_precomputed", "none": "linear"}


def kernel_name(chain: tuple[Step, ...], mode: str = "fused", program: Program | None = None,
                vectors: tuple[str, ...] = ()) -> str:
    """The kernel's name: the template and its steps, e.g. lora_linear_bias_silu_mul_kernel."""
    base, suffix = split_mode(mode)
    return "_".join([_PREFIX[base], *([suffix] if suffix else []),
                     *(v.replace("_", "") for v in VECTORS if v in vectors), *(s.rule for s in chain),
                     *(["pointwise"] if program else []), "kernel"])


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
            vectors: tuple[str, ...] = ()) -> str:
    """The math the kernel computes, e.g. silu(x @ W^T + s * (x @ A^T) @ B^T + bias)."""
    value = {"fused": "x @ W^T + s * (x @ A^T) @ B^T", "precomputed": "x @ W^T + s * h @ B^T",
             "none": "x @ W^T"}[mode]
    value = value.replace("(x @ A^T)", "((x @ A^T) @ R^T)") if "xs_r" in vectors else value
    value = value.replace("(x @ A^T)", "((x @ A^T) * d[r])") if "vera_d" in vectors else value
    value = value.replace("@ B^T", "@ B^T * b[n]") if "vera_b" in vectors else value
    value = value.replace("x @", "(x * x_gain[k]) @") if "x_gain" in vectors else value
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
                  input_kinds: tuple[str, ...] = (), vectors: tuple[str, ...] = ()) -> str:
    """The Triton function for a step list (the same text for every region with these steps).

    `program` (with its extra inputs' kinds) ends the epilogue: see kernels/program_epilogue.py;
    `vectors` names the prologue vectors present (VECTORS; kernels/epilogue.PROLOGUE).
    """
    present = [v for v in VECTORS if v in vectors]
    ptrs = "".join(f" {name}_ptr," for name, _ in operand_names(chain)) + "".join(f" {v}_ptr," for v in present)
    strides = "".join(f" stride_{name}_m, stride_{name}_n," if kind == "tile" else f" stride_{name}_n,"
                      for name, kind in operand_names(chain)) + "".join(f" {_VECTOR_STRIDE[v]}," for v in present)
    epilogue = epilogue_source(chain)
    if program is not None:
        more_ptrs, more_strides = program_epilogue.arguments(input_kinds)
        ptrs, strides = ptrs + more_ptrs, strides + more_strides
        epilogue += program_epilogue.source(program, input_kinds)
    lora_mode, suffix = split_mode(mode)
    tma, split, rows, fused = suffix == "tma", suffix == "splitk", suffix == "rows", lora_mode == "fused"
    if rows and (not fused or {"vera_d", "xs_r"} & set(vectors)):
        raise ValueError(f"mode {mode!r}: '+rows' keeps x @ A^T for a chunk's tiles, so it takes the 'fused' "
                         f"kernel with no vector that rewrites it (vera_d, xs_r)")
    up = _LORA_UP.format(xs_r=_XS_R if "xs_r" in vectors else "", vera_d=_VERA_D if "vera_d" in vectors else "",
                         up=_UP_APART.format(vera_b=_VERA_B) if "vera_b" in vectors else _UP_INTO_ACC)
    tail = _TAIL.format(epilogue=epilogue,
                        lora_up={"fused": up, "precomputed": _LORA_UP_PRECOMPUTED + up, "none": ""}[lora_mode])
    if split:
        publish = _SPLIT_PUBLISH.format(lora_publish=_SPLIT_LORA_PUBLISH if fused else "",
                                        lora_reset=_SPLIT_LORA_RESET if fused else "",
                                        lora_gather=_SPLIT_LORA_GATHER if fused else "")
        tail = publish + _indent(tail, 4)
    signature = _SIGNATURE.replace("{body}", "").format(
        name=kernel_name(chain, mode, program, vectors), operand_ptrs=ptrs, operand_strides=strides,
        math=formula(chain, lora_mode, program, vectors), split_ptrs=" ws_ptr, count_ptr," if split else "",
        split_meta=" SPLIT_K: tl.constexpr," if split else "", rows_args=" column_chunks," if rows else "")
    x_prologue = _X_GAIN if "x_gain" in vectors else ""
    if rows:
        loads = _X_LOAD + x_prologue + _W_LOAD
        return signature + _ROWS_BODY.format(lora_init=_LORA_INIT, first_loads=_indent(loads + _LORA_LOAD, 8),
                                             loads=_indent(loads, 8), lora_dot=_indent(_VERA_DOT, 8),
                                             tail=_indent(tail, 4))
    return signature + _TILE_BODY.format(
        k_range=_K_RANGE_SPLIT if split else "", tail=tail, k_bounds="k_first, k_last" if split else "0, K",
        x_prologue=x_prologue, tma_setup=(_TMA_SETUP + (_TMA_SETUP_A if fused else "")) if tma else "",
        x_load=_X_LOAD_TMA if tma else _X_LOAD, w_load=_W_LOAD_TMA if tma else _W_LOAD,
        lora_init=_LORA_INIT if fused else "", lora_load=(_LORA_LOAD_TMA if tma else _LORA_LOAD) if fused else "",
        lora_dot=_VERA_DOT if fused else "")


def _indent(text: str, spaces: int) -> str:
    """Every non-blank line of generated code `spaces` deeper (a snippet placed inside a loop or branch)."""
    return "".join(" " * spaces + line if line.strip() else line for line in text.splitlines(keepends=True))


def render(chain: tuple[Step, ...], region: str = "", fused: list[str] | tuple[str, ...] = (),
           mode: str = "fused", program: Program | None = None, input_kinds: tuple[str, ...] = (),
           vectors: tuple[str, ...] = ()) -> str:
    """A whole module: a header (region name, graph nodes it replaces), imports and the kernel."""
    title = f"region `{region}`" if region else "a fused linear" if mode.startswith("none") else "a fused LoRA linear"
    header = [f'"""Generated by surgeon (kernels/lora_linear.py) for {title}.', "",
              f"out = {formula(chain, split_mode(mode)[0], program, vectors)}"]
    if fused:
        header += ["", "graph nodes replaced, in order:"] + [f"    {line}" for line in fused]
    if region and not split_mode(mode)[1]:
        header += ["", "On a GPU the launcher times, once per shape bucket, the kernel modes",
                   f"    {', '.join(_variants(mode, vectors))}",
                   "(+tma on sm_90+, +splitk for M <= 64, +rows above) and cuBLAS with the epilogue as one pass",
                   "(kernels/epilogue_pass.py), and runs the fastest; this source is the first mode",
                   "(render(..., mode=...) prints another)."]
    header.append('"""')
    return "\n".join(header) + "\nimport triton\nimport triton.language as tl\n\n\n" + \
        kernel_source(chain, mode, program, input_kinds, vectors)


def _variants(mode: str, vectors: tuple[str, ...] = ()) -> list[str]:
    """The kernel modes a GPU may run for a region rendered in `mode` ("fused" or "none"): "+rows" not
    where VeRA's d or LoRA-XS's R rewrite the x @ A^T its tiles share."""
    kernels = ["none"] if mode == "none" else ["fused", "precomputed"]
    return [f"{k}{suffix}" for suffix in ("", "+tma", "+splitk") for k in kernels] + \
        ([] if mode == "none" or {"vera_d", "xs_r"} & set(vectors) else ["fused+rows"])


_KERNELS: dict[tuple, object] = {}


def load_kernel(chain: tuple[Step, ...], mode: str = "fused", program: Program | None = None,
                input_kinds: tuple[str, ...] = (), vectors: tuple[str, ...] = ()):
    """The compiled-on-demand Triton function for a step list and mode (cached, per interpreter flag)."""
    anonymous = None if program is None else program.anonymous()
    vectors = tuple(v for v in VECTORS if v in vectors)
    key = (chain, mode, anonymous and anonymous.encode(), input_kinds, vectors, codegen.interpreting())
    if key not in _KERNELS:      # cached here too: rendering and hashing the source costs per call
        name = kernel_name(chain, mode, program, vectors)
        source = render(chain, mode=mode, program=anonymous, input_kinds=input_kinds, vectors=vectors)
        _KERNELS[key] = getattr(codegen.load(source, name), name)
    return _KERNELS[key]
