"""CorDA (Yang et al. 2024): LoRA factors from the SVD of the weight times its inputs' covariance.

With C the covariance of a site's inputs over calibration examples (surgeon.calibration: the
compile's example inputs), CorDA decomposes W C rather than W, so the split follows the directions
the inputs actually excite:

    C' = C + d·mean(diag C)·I   (d = 0.01, doubled until ‖C' C'^-1 - I‖ < 0.05, as PEFT damps it)
    W C' = U S Vh,   V = (Vh C'^-1)^T   so that W = U S V^T exactly

and LoRA's `init: corda` takes r of those components: `corda_mode: ipm` (instruction-previewed) the r
largest, so the adapter starts with what the task's inputs use most; `kpm` (knowledge-preserved) the
r smallest, so the base keeps what they use most. With S divided by the LoRA scale s:
A = sqrt(S_r) V_r^T, B = U_r sqrt(S_r), and the base keeps the residual W - s B A, as for PiSSA (insert
is the identity up to rounding). A loaded CorDA adapter recomputes that residual from W and the
example inputs it is compiled with, so they must be the calibration inputs it was trained on.
"""
from __future__ import annotations

import torch

from ..errors import SpecError

DAMP, INVERSE_ERROR = 0.01, 0.05


def corda_components(weight: torch.Tensor, covariance: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(U, S, V) with W = U diag(S) V^T, from the SVD of W C' (float32; see the module doc)."""
    cov = covariance.float()
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    damp = DAMP
    for _ in range(64):
        fixed = cov + eye * cov.diagonal().mean() * damp
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < INVERSE_ERROR:
            break
        damp *= 2
    else:
        raise SpecError("init", "corda: the input covariance stays singular however much it is damped")
    U, S, Vh = torch.linalg.svd(weight.detach().float() @ fixed, full_matrices=False)
    return U, S, (Vh @ inverse).T


def corda_factors(weight: torch.Tensor, covariance: torch.Tensor | None, rank: int, scale: float,
                  mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for an out x in weight: ipm takes the r largest components of W C', kpm the r smallest."""
    if covariance is None and weight.is_meta:   # shapes only (a structure-only graph, a loaded adapter's check)
        return (torch.empty(rank, weight.shape[1], device="meta"), torch.empty(weight.shape[0], rank, device="meta"))
    if covariance is None:
        raise SpecError("init", "corda needs the covariance of each site's inputs, which only a compile with "
                                "example inputs gathers (not a checkpoint merge): compile, then merge")
    U, S, V = corda_components(weight, covariance)
    pick = slice(0, rank) if mode == "ipm" else slice(S.shape[0] - rank, S.shape[0])
    root = (S[pick] / scale).sqrt()
    return (V[:, pick].T * root[:, None]).contiguous(), (U[:, pick] * root).contiguous()
