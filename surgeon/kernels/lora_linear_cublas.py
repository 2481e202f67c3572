"""The fused LoRA linear with no generated GEMM: cuBLAS's GEMM and the LoRA term as torch ops.

    z = x @ W^T (+ bias) + s (x A^T) B^T

"cublas" runs the GEMM, then addmm's accumulate of the LoRA term (out += s (x A^T) B^T);
"cublas+beta" computes the LoRA term u first and lets the GEMM add it (addmm(u, x, W^T, beta=s)).
The epilogue steps left then run as one generated pass (kernels/epilogue_pass.py). On a GPU the
LoRA launcher's tuner times both beside the generated kernels (kernels/lora_linear.py).
"""
from __future__ import annotations

import math

import torch

from .epilogue import Step

__all__ = ["cublas", "lora_term"]


def cublas(x2, weight, bias, lora_a, lora_b, scale, weight_layout, chain, vectors=None,
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
    # BLAS skips a product scaled by 0 (addmm's alpha or beta), so a NaN in the LoRA branch would
    # vanish where the graph's z + 0 * up keeps it: a zero or non-finite s takes the elementwise add
    blas_scale = scale != 0 and math.isfinite(scale)
    lora_first = lora_first and blas_scale
    bias_first = bool(chain) and chain[0].rule == "bias" and not lora_first
    vectors = vectors or {}
    if lora_a is not None and lora_first:
        out = torch.addmm(lora_term(x2, lora_a, lora_b, vectors), x2, w.t(), beta=scale)
    else:
        out = torch.nn.functional.linear(x2, w, bias if bias_first else None)
        if lora_a is not None and blas_scale and not {"vera_d", "vera_b", "xs_r"} & set(vectors):
            out.addmm_(x2 @ lora_a.t(), lora_b.t(), alpha=scale)
        elif lora_a is not None:
            out.add_(lora_term(x2, lora_a, lora_b, vectors), alpha=scale)
    return out, chain[1:] if bias_first else chain


def lora_term(x2, lora_a, lora_b, vectors: dict) -> torch.Tensor:
    """(x A^T) B^T with LoRA-XS's R and VeRA's d and b where present, each product rounded as the graph
    stores it."""
    h = x2 @ lora_a.t()
    h = h @ vectors["xs_r"].t() if "xs_r" in vectors else h
    up = (h * vectors["vera_d"] if "vera_d" in vectors else h) @ lora_b.t()
    return up * vectors["vera_b"] if "vera_b" in vectors else up
