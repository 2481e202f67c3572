"""LoRA-SB (Ponkshe et al. 2024, "Initialization using update approximation is a silver bullet ..."): LoRA-XS
initialized from the first full fine-tuning step.

On LoRA-XS's architecture (y = W x + s B R A x, B and A frozen, the r x r R trained), `init: lora_sb`
approximates one full fine-tuning step of W by the adapter. With G = dL/dW the loss gradient on the
compile's example inputs (surgeon.grad_calibration: next-token cross-entropy, labels = input_ids) and
eta = `lora_sb_lr`, the step is

    dW = -eta G            (`lora_sb_update: gradient`, an SGD step; the default)
    dW = -eta sign(G)      (`lora_sb_update: sign`, Adam's first step, as the authors' code takes it)

and with dW = U S V^T its exact SVD, B = U_r (out x r), A = V_r^T (r x in), R = diag(S_r) / s, so that
s B R A is the best rank-r approximation of dW (Eckart-Young) and the inserted adapter *is* that first
step: W + s B R A ~ W + dW. The base weight is left alone, so the insert changes the function ("none",
as the paper intends). B and A span dW's leading subspaces, and a gradient step on R then moves W by
s B (dL/dR) A = s^2 B B^T G A^T A, the full gradient projected onto them. Each component's sign is
fixed with U's entry of largest magnitude positive (its product in B R A does not depend on it).
A loaded adapter holds B, R and A, so it needs no gradient.
"""
from __future__ import annotations

import torch

from ..errors import SpecError
from .lora_ga import gradient_svd

UPDATES = ("gradient", "sign")


def lora_sb_factors(grad: torch.Tensor | None, weight: torch.Tensor, rank: int, scale: float,
                    opts: dict) -> dict[str, torch.Tensor]:
    """{"lora_A", "lora_B", "lora_R"} (float32) from a site's out x in loss gradient (see the module doc)."""
    out_features, in_features = weight.shape[0], weight.shape[1]
    if grad is None and weight.is_meta:   # shapes only (a structure-only graph)
        return {"lora_A": torch.empty(rank, in_features, device="meta"),
                "lora_B": torch.empty(out_features, rank, device="meta"),
                "lora_R": torch.empty(rank, rank, device="meta")}
    if grad is None:
        raise SpecError("init", "lora_sb needs the loss gradient of each site's weight, which only a compile with "
                                "example inputs computes (not a checkpoint merge): compile, then merge")
    if rank > min(out_features, in_features):
        raise SpecError("init", f"lora_sb takes r = {rank} singular components of an {out_features} x "
                                f"{in_features} gradient, which has {min(out_features, in_features)}")
    step = grad.float() if opts["lora_sb_update"] == "gradient" else grad.float().sign()
    U, S, Vh = gradient_svd(step * -opts["lora_sb_lr"], rank)
    return {"lora_A": Vh.contiguous(), "lora_B": U.contiguous(), "lora_R": torch.diag(S / scale)}
