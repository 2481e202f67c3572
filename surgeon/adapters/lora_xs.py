"""LoRA-XS (Bałazy et al. 2024): y = W x + s * B R A x, with B, A frozen from W's SVD.

With W = U S V^T, B = U_r S_r (out x r) and A = V_r^T (r x in) are fixed (`frozen`) and only
the r x r matrix R is trained, so a site costs r^2 parameters whatever its size. R starts at
zero (the paper draws it small; zero keeps insertion exact), s = alpha / r.
Merge identity: W x + s B R A x == (W + s B R A) x. `dropout` drops the branch's input in train
mode, as LoRA's does: s B R A dropout(x).

`init: lora_sb` (LoRA-SB, surgeon.adapters.lora_sb; `lora_sb_lr`, `lora_sb_update`) takes B, A and R from
the SVD of one full fine-tuning step computed from the loss gradient on the compile's example inputs
(surgeon.grad_calibration), so the insert applies that step's rank-r part ("none": W is left alone).
It is an init of this kind rather than a kind of its own: the architecture, forward, merge, parameter
count and frozen factors are LoRA-XS's, and only where B, A and R come from differs.
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option, merge_dtype
from .lora_sb import UPDATES, lora_sb_factors


def _scale(opts: dict) -> float:
    return (opts["alpha"] if opts["alpha"] is not None else opts["rank"]) / opts["rank"]


def _init(opts, in_features, out_features, dtype, gen, weight, covariance=None):
    rank = opts["rank"]
    if opts.get("init") == "lora_sb":   # `covariance`: the site's loss gradient (insert's calibration)
        return {p: t.to(dtype) for p, t in lora_sb_factors(covariance, weight, rank, _scale(opts), opts).items()}
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return {"lora_A": Vh[:rank].to(dtype), "lora_B": (U[:, :rank] * S[None, :rank]).to(dtype),
            "lora_R": torch.zeros(rank, rank, dtype=dtype)}


def _forward(branch, x, y, params, opts):
    # three skinny GEMMs: A x (r), R (A x) (r), B R A x (out)
    x = branch.dropout(x, opts.get("dropout", 0.0))
    update = branch.linear(branch.linear(branch.linear(x, params["lora_A"]), params["lora_R"]), params["lora_B"])
    return branch.add(y, update, alpha=_scale(opts))


def _delta(params, opts, weight=None):
    p = {name: t.to(merge_dtype(weight)) for name, t in params.items()}
    return (p["lora_B"] @ p["lora_R"] @ p["lora_A"]).mul_(_scale(opts))


LORA_XS = AdapterKind(
    name="lora-xs",
    options={"rank": Option(int, 8, positive=True), "alpha": Option((int, float), None),
             "dropout": Option(float, 0.0, bounds=(0.0, 1.0)),
             "init": Option(str, "svd", choices=("svd", "lora_sb")),   # lora_sb: LoRA-SB (surgeon.adapters.lora_sb)
             "lora_sb_lr": Option((int, float), 1e-3, positive=True),   # the simulated first step's learning rate
             "lora_sb_update": Option(str, "gradient", choices=UPDATES)},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: opts["rank"] ** 2,
    frozen=frozenset({"lora_A", "lora_B"}),
    init_check=lambda opts: "none" if opts.get("init") == "lora_sb" else "exact",   # LoRA-SB applies a step
    calibrated=lambda opts: "gradient" if opts.get("init") == "lora_sb" else False,
)
