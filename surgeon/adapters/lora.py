"""LoRA (Hu et al. 2021): y = W x + s * B A x, with A (r x in), B (out x r), s = alpha / r.

rsLoRA scaling (`use_rslora`) uses s = alpha / sqrt(r). B starts at zero, so an inserted LoRA
leaves the function unchanged; the merge identity is W x + s B A x == (W + s B A) x.
"""
from __future__ import annotations

import math

import torch

from . import AdapterKind, Option


def lora_scale(opts: dict) -> float:
    """The LoRA scaling factor alpha/r (or alpha/sqrt(r) with rsLoRA)."""
    rank, alpha = opts["rank"], opts["alpha"] if opts["alpha"] is not None else opts["rank"]
    return alpha / math.sqrt(rank) if opts["use_rslora"] else alpha / rank


def _init(opts: dict, in_features: int, out_features: int, dtype: torch.dtype, gen: torch.Generator):
    rank = opts["rank"]
    A = torch.empty(rank, in_features)
    if opts["init"] == "gaussian":
        A.normal_(0.0, 1.0 / rank, generator=gen)
    else:  # kaiming-uniform with a = sqrt(5), the nn.Linear default init
        bound = 1.0 / math.sqrt(in_features)
        A.uniform_(-bound, bound, generator=gen)
    return {"lora_A": A.to(dtype), "lora_B": torch.zeros(out_features, rank, dtype=dtype)}


def _forward(branch, x, y, params, opts):
    # y + s * B(A x): two GEMMs and one add (aten.add's alpha carries the scale)
    update = branch.linear(branch.linear(x, params["lora_A"]), params["lora_B"])
    return branch.op(torch.ops.aten.add.Tensor, y, update, alpha=lora_scale(opts))


def _delta_weight(params, opts):
    return lora_scale(opts) * (params["lora_B"].float() @ params["lora_A"].float())


LORA = AdapterKind(
    name="lora",
    options={
        "rank": Option(int, 8, positive=True),
        "alpha": Option((int, float), None),
        "use_rslora": Option(bool, False),
        "init": Option(str, "default", choices=("default", "gaussian")),
    },
    init=_init,
    forward=_forward,
    delta_weight=_delta_weight,
    param_count=lambda opts, fan_in, fan_out: opts["rank"] * (fan_in + fan_out),
)
