"""The fused LoRA linear's argument checks: what a call must be for the launcher to run it.

`check` raises ValueError naming the first argument whose shape, dtype or device does not fit
x [.., K], W [N, K] (or [K, N] for GPT-2's Conv1D, weight_layout "in_out"), A [R, K], B [N, R],
a bias [N], the epilogue's operands (tiles of the output's shape, per-column vectors [N]) and the
prologue vectors (x's gain [K], VeRA's d [R] and b [N], LoRA-XS's R [R, R]); `tma_ready` says
whether TMA descriptors may read x, W and A. The launcher runs both once per plan
(kernels/lora_linear.py).
"""
from __future__ import annotations

import math

import torch

from .dispatch import KERNEL_DTYPES
from .epilogue import RULES, tile_shape

__all__ = ["check", "tma_ready"]


def tma_ready(x2: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor | None, weight_layout: str) -> bool:
    """Whether the "+tma" kernels may read x, W and A: rows contiguous, row strides and base addresses
    16-byte aligned (what a TMA descriptor requires), W stored N x K."""
    tensors = [x2, weight] + ([lora_a] if lora_a is not None else [])
    return weight_layout == "out_in" and all(
        t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0 for t in tensors)


def check(x, weight, bias, lora_a, lora_b, operands, weight_layout, chain,
          where: dict | None = None) -> tuple[int, int, int, int]:
    """(M, N, K, R) of a valid call: M the rows of x (its leading dims' product), N the outputs, K the
    inputs, R the rank (0 without a LoRA branch); ValueError naming the first misfit otherwise."""
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
    return math.prod(x.shape[:-1]), N, K, R
