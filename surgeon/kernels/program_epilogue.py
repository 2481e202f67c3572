"""A pointwise program as the last part of a GEMM epilogue (lora_linear's template).

When every use of a GEMM region's output lies in one group of pointwise ops (GPT-2's tanh GELU
after c_fc: 0.5 x (1 + tanh(c (x + 0.044715 x^3))), eight ops reading x three times), the
group's Program (kernels/pointwise_program.py) runs on the accumulator tile before the one
store, instead of a second kernel reading the GEMM's output back:

    %0        = the tile so far, rounded to the output dtype (as the graph stores it)
    %1, %2 .. = the program's other inputs, each one of
                  tile    (M, N) values, the output's own rows and columns
                  vec     N values, one per output column (broadcast over rows)
                  scalar  one value
    acc       = the program's one output

The kinds are read from the tensors at launch (numel 1, N or M * N), so the kernel never
holds a shape. The ops' Triton lines are kernels/pointwise.py's own.
"""
from __future__ import annotations

import torch

from .pointwise import formula as program_formula, op_lines, reference as program_reference
from .pointwise_program import Program


def kinds(inputs: list[torch.Tensor], M: int, N: int) -> tuple[str, ...]:
    """Each extra input's kind (see the module docstring); ValueError for one that is none of them."""
    found = []
    for i, tensor in enumerate(inputs, start=1):
        if tensor.numel() == 1:
            found.append("scalar")
        elif tensor.numel() == N and tensor.shape[-1] == N:
            found.append("vec")
        elif tensor.numel() == M * N and tensor.shape[-1] == N:
            found.append("tile")
        else:
            raise ValueError(f"epilogue program input %{i} has shape {list(tensor.shape)}: not one value, "
                             f"N = {N} values or M x N = {M} x {N} values")
    return tuple(found)


def check(program: Program) -> None:
    """ValueError unless the program has one output, reads its accumulator and reduces no row
    (a tile holds only part of a row). Program.decode has already checked every op's rule."""
    if len(program.outputs) != 1 or not program.inputs:
        raise ValueError(f"an epilogue program has one output and reads %0 (the tile); this one has "
                         f"{len(program.inputs)} inputs and {len(program.outputs)} outputs")
    if program.has_reduction:
        raise ValueError("an epilogue program reduces no row: a GEMM tile holds only part of one")


def arguments(input_kinds: tuple[str, ...]) -> tuple[str, str]:
    """The kernel signature's extra pointers and strides, e.g. (' p1_ptr,', ' stride_p1_m, stride_p1_n,')."""
    ptrs = "".join(f" p{i}_ptr," for i in range(1, len(input_kinds) + 1))
    strides = "".join(f" stride_p{i}_m, stride_p{i}_n," if kind == "tile" else f" stride_p{i}_n," if kind == "vec"
                      else "" for i, kind in enumerate(input_kinds, start=1))
    return ptrs, strides


def source(program: Program, input_kinds: tuple[str, ...]) -> str:
    """The lines that run the program on `acc` (indented for the template's body)."""
    lines = ["    # pointwise program: %0 is the tile so far, rounded to the output dtype as the graph stores it",
             "    v0 = acc.to(out_ptr.dtype.element_ty).to(tl.float32)"]
    for i, kind in enumerate(input_kinds, start=1):
        lines.append(f"    # %{i}: a {kind} input")
        if kind == "tile":
            lines.append(f"    v{i} = tl.load(p{i}_ptr + offs_m[:, None] * stride_p{i}_m + offs_n[None, :] * "
                         f"stride_p{i}_n, mask=mask_out, other=0.0).to(tl.float32)")
        elif kind == "vec":
            lines.append(f"    v{i} = tl.load(p{i}_ptr + offs_n * stride_p{i}_n, mask=mask_n, other=0.0)"
                         f".to(tl.float32)[None, :]")
        else:
            lines.append(f"    v{i} = tl.load(p{i}_ptr).to(tl.float32)")
    lines += op_lines(program)
    lines.append(f"    acc = v{program.outputs[0]}")
    return "\n".join(lines) + "\n"


def launch_tensors(inputs: list[torch.Tensor], input_kinds: tuple[str, ...], M: int, N: int) -> list:
    """(pointer tensors, strides) in the kernel's argument order."""
    tensors, strides = [], []
    for tensor, kind in zip(inputs, input_kinds):
        shaped = tensor.reshape(M, N) if kind == "tile" else tensor.reshape(N) if kind == "vec" else tensor.reshape(())
        tensors.append(shaped)
        strides += list(shaped.stride())
    return [tensors, strides]


def math(program: Program, value: str) -> str:
    """The program's formula with %0 standing for `value`."""
    return program_formula(program, program.outputs[0]).replace("%0", f"({value})")


def reference(z_out: torch.Tensor, inputs: list[torch.Tensor], program: Program) -> torch.Tensor:
    """The program in torch on the (M, N) output tile `z_out` (op by op in each node's dtype)."""
    M, N = z_out.shape
    shaped = [t.reshape(M, N) if kind == "tile" else t.reshape(N) if kind == "vec" else t.reshape(())
              for t, kind in zip(inputs, kinds(inputs, M, N))]
    return program_reference([z_out, *shaped], program)[0].reshape(M, N)
