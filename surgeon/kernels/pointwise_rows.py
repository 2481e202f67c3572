"""Row kernels: a pointwise program with a reduction over the last dim (RMSNorm's mean of squares).

The full shape F = (rows..., N) of such a program is walked one row per program instance:
the row's N values are one BLOCK_N vector (BLOCK_N = N rounded up to a power of two, masked),
a reduction (`mean_last`: tl.sum over the masked row / N) makes a per-row scalar, and the ops
after it mix scalars and vectors by broadcasting. Each input and output is read or written as
its kind says (pointwise_program.row_kinds):

    row        F itself             ptr + row * N + offs_n
    col        one value per column ptr + offs_n            (a norm's weight)
    rowscalar  one value per row    ptr + row
    scalar     one value            ptr

Every op computes in fp32 and is rounded to its node's dtype after it, as in kernels/pointwise.py,
whose op lines (one per rule) this file reuses, and which renders, caches and launches these
kernels like its own (`pointwise.render`, `pointwise.load_kernel`). Sizes are runtime arguments.
"""
from __future__ import annotations

import math

import torch

from . import codegen
from .pointwise_program import Program, op_lines, row_kinds

MAX_N = 65536        # one row must fit one block of registers / shared memory


def kernel_name(program: Program) -> str:
    rules = [op.rule for op in program.ops]
    return "_".join(["rows", *rules[:6], *(["etc"] if len(rules) > 6 else []), "kernel"])


def kernel_source(program: Program) -> str:
    """The Triton function for a row program (names never appear in it)."""
    kinds = row_kinds(program)
    if isinstance(kinds, str):
        raise ValueError(f"pointwise rows: {kinds}")
    ins, outs = kinds
    load = {"row": "tl.load(in{i}_ptr + row * N + offs_n, mask=mask, other=0.0)",
            "col": "tl.load(in{i}_ptr + offs_n, mask=mask, other=0.0)",
            "rowscalar": "tl.load(in{i}_ptr + row)", "scalar": "tl.load(in{i}_ptr)"}
    store = {"row": "tl.store(out{j}_ptr + row * N + offs_n, v{v}.to(out{j}_ptr.dtype.element_ty), mask=mask)",
             "rowscalar": "tl.store(out{j}_ptr + row, v{v}.to(out{j}_ptr.dtype.element_ty))",
             "scalar": "tl.store(out{j}_ptr, v{v}.to(out{j}_ptr.dtype.element_ty))"}
    lines = []
    for i, kind in enumerate(ins):
        lines += [f"    # %{i}: input {i}, {program.inputs[i].dtype}, {kind}",
                  f"    v{i} = {load[kind].format(i=i)}.to(tl.float32)"]
    lines += op_lines(program)
    lines += ["    " + store[kind].format(j=j, v=v) for j, (v, kind) in enumerate(zip(program.outputs, outs))]
    pointers = [f"in{i}_ptr" for i in range(len(ins))] + [f"out{j}_ptr" for j in range(len(outs))]
    return f'''@triton.jit
def _row_add(a, b):
    return a + b


@triton.jit
def {kernel_name(program)}(
    # pointers: inputs, then outputs (contiguous)
    {", ".join(pointers)},
    # the row length (the reduced dim)
    N,
    # meta
    BLOCK_N: tl.constexpr,
):
    """One row of {len(program.ops)} ops, with a reduction over the row."""
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask = offs_n < N
''' + "\n".join(lines) + "\n"


def launch(kernel, inputs: list[torch.Tensor], outs: list[torch.Tensor], full: torch.Size) -> None:
    """Run a row kernel (kernels/pointwise.py's load_kernel) over every row of the full shape."""
    N = full[-1] if len(full) else 1
    if N > MAX_N:
        raise ValueError(f"pointwise rows: a row of {N} values is over {MAX_N}")
    rows = math.prod(full[:-1])
    if rows == 0 or N == 0:
        return
    meta = dict(BLOCK_N=1 << max(0, (N - 1).bit_length()))
    if not codegen.interpreting():
        meta.update(num_warps=min(16, max(1, meta["BLOCK_N"] // 256)))
    kernel[(rows,)](*(t.contiguous() for t in inputs), *outs, N, **meta)
