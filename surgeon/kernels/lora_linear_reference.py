"""The fused LoRA linear's math in torch: the no-GPU path, the autograd formula's forward and the
kernels' test oracle (kernels/lora_linear.py launches the generated kernel for the same call).

    z = x @ W^T + s * round(x @ A^T) @ B^T,   out = epilogue(z)   (then the program epilogue)

computed in the kernel's precision: fp32 for 16-bit inputs, with x @ A^T rounded to x's dtype as
the unfused graph stores it.
"""
from __future__ import annotations

import torch

from . import program_epilogue
from .epilogue import Step, apply, as_tiles, prologue, steps
from .pointwise_program import Program

__all__ = ["compute_dtype", "parse_program", "pre_epilogue", "reference", "split_operands"]




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
    parsed = parse_program(program, extra_inputs, *z.shape)
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


def parse_program(program: str, extra_inputs: list, M: int, N: int) -> "Program | None":
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
