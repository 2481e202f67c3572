"""delta: a full dense weight update per site, y = W x + D x, with D (out x in).

The result kind of `combine` when no rank is asked for: it stores a combined delta weight
as it is, so a merge is exact (W x + D x == (W + D) x). It starts at D = 0, so an inserted
delta adapter leaves the function unchanged. It costs in*out parameters per site, as many as
the base weight, so it is meant as an intermediate form (merge it, or re-factorize with rank).
"""
from __future__ import annotations

import torch

from . import AdapterKind, merge_dtype


def _init(opts: dict, in_features: int, out_features: int, dtype: torch.dtype, gen: torch.Generator,
          weight: torch.Tensor | None = None):
    return {"delta": torch.zeros(out_features, in_features, dtype=dtype)}


def _forward(branch, x, y, params, opts):
    # y + D x: one GEMM against the stored delta and one add
    return branch.op(torch.ops.aten.add.Tensor, y, branch.linear(x, params["delta"]))


def _delta_weight(params, opts, weight=None):
    # D in merge_dtype(weight), as the merge adds it to the base weight (D does not depend on W)
    return params["delta"].to(merge_dtype(weight))


DELTA = AdapterKind(
    name="delta",
    options={},
    init=_init,
    forward=_forward,
    delta_weight=_delta_weight,
    param_count=lambda opts, fan_in, fan_out: fan_in * fan_out,
)
