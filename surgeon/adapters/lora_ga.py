"""LoRA-GA (Wang et al. 2024, gradient approximation): LoRA factors from the SVD of the weight's gradient.

With G = dL/dW (out x in, float32) the gradient of a training loss on calibration data
(surgeon.grad_calibration: next-token cross-entropy on the compile's example inputs, labels =
input_ids) and G = U S V^T its SVD, LoRA's `init: lora_ga` takes 2r components and splits them between
the factors (`lora_ga_direction`, PEFT's LoraGAConfig.direction):

    ArB2r (default)  A = V^T rows 0..r-1,      B = U columns r..2r-1 times their S
    A2rBr            A = V^T rows r..2r-1,     B = U columns 0..r-1 times their S
    ArBr             A = V^T rows 1, 3, ..,    B = U columns 0, 2, .. times their S
    random           one draw of r of the 2r, A and B the same ones (seed 0, the same at every site, so a
                     loaded adapter's residual is recomputed alike; PEFT draws per layer from its global RNG)

then `lora_ga_scale`: `stable` B *= out^(1/4) / sqrt(gamma) (`lora_ga_gamma`, 16); `weight_svd`
B *= sigma_max(W) / (B's first S); `gd_scale` A /= s and B /= s (s the LoRA scale); `unit` leaves them.
The base keeps the residual W - s B A (A and B in the adapter's dtype, the product in float32), so the
insert is the identity up to rounding ("close"), and the first steps of B and A move W along G's
leading directions.

PEFT takes the components from a randomized SVD (torch.svd_lowrank, q = min(4r, min(out, in)), four
power iterations, random draws from the global RNG); surgeon takes them from the exact SVD, which
equals PEFT's where q reaches min(out, in) and approximates it otherwise. An SVD fixes each component
only up to its sign, which matters here (A and B take different components): surgeon makes each
column of U's entry of largest magnitude positive (V's column flipped with it); PEFT's signs are
whatever its random draws give. A loaded surgeon LoRA-GA adapter recomputes its residual from W and
the example inputs it is compiled with, so they must be the calibration inputs it was trained on.
"""
from __future__ import annotations

import torch

from ..errors import SpecError

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


def gradient_svd(grad: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of the `count` leading components of the exact SVD of `grad` (out x in, float32), each
    component's sign fixed so that its U column's entry of largest magnitude is positive."""
    U, S, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    U, S, Vh = U[:, :count], S[:count], Vh[:count]
    peak = U.abs().argmax(dim=0, keepdim=True)
    sign = U.gather(0, peak).sign()
    sign[sign == 0] = 1
    return U * sign, S, Vh * sign.T


def _picks(rank: int, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the components A takes, those B takes), indices into the leading 2r."""
    if direction == "ArB2r":
        return torch.arange(0, rank), torch.arange(rank, 2 * rank)
    if direction == "A2rBr":
        return torch.arange(rank, 2 * rank), torch.arange(0, rank)
    if direction == "ArBr":
        return torch.arange(1, 2 * rank, 2), torch.arange(0, 2 * rank, 2)
    drawn = torch.randperm(2 * rank, generator=torch.Generator().manual_seed(0))[:rank]
    return drawn, drawn


def lora_ga_factors(weight: torch.Tensor, grad: torch.Tensor | None, rank: int, scale: float,
                    opts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in float32 for an out x in weight from its loss gradient (see the module doc)."""
    if grad is None and weight.is_meta:   # shapes only (a structure-only graph)
        return torch.empty(rank, weight.shape[1], device="meta"), torch.empty(weight.shape[0], rank, device="meta")
    if grad is None:
        raise SpecError("init", "lora_ga needs the loss gradient of each site's weight, which only a compile with "
                                "example inputs computes (not a checkpoint merge): compile, then merge")
    out_features, in_features = grad.shape
    if 2 * rank > min(out_features, in_features):
        raise SpecError("init", f"lora_ga takes 2r = {2 * rank} singular components of an {out_features} x "
                                f"{in_features} gradient, which has {min(out_features, in_features)}")
    U, S, Vh = gradient_svd(grad, 2 * rank)
    for_a, for_b = _picks(rank, opts["lora_ga_direction"])
    A, B, s_b = Vh[for_a], U[:, for_b] * S[for_b], S[for_b]
    how = opts["lora_ga_scale"]
    if how == "stable":
        B = B * (out_features ** 0.25 / opts["lora_ga_gamma"] ** 0.5)
    elif how == "weight_svd" and s_b[0] > 0:
        B = B * (torch.linalg.matrix_norm(weight.detach().float(), ord=2) / s_b[0])
    elif how == "gd_scale":
        A, B = A / scale, B / scale
    return A.contiguous(), B.contiguous()
