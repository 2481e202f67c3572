"""RoSA (Nikdan et al. 2024, Robust Adaptation): y = W x + b + s B A x + S x, low-rank plus sparse.

A (r x in) and B (out x r) are LoRA's factors with s = alpha / r; S is an out x in update that is
zero except on a fixed support of k = max(1, round(density * out * in)) entries. The paper picks
that support from gradients accumulated in a short warm-up; surgeon picks it at insertion, with
no data: `mask: magnitude` (the default) takes the k largest |W| entries of the site's base
weight (deterministic, the same on every run), `mask: random` draws k distinct entries from the
spec's seeded generator. The support is then fixed: the k trained values (`rosa_values`) sit at
`rosa_indices`, a 2 x k int64 tensor of (row, column) pairs in row-major order, frozen and saved
with the adapter, so a loaded adapter keeps its support (it is never re-selected).

Trained: A, B and the k values; a site costs r * (in + out) + k parameters. Init: A
kaiming-uniform (nn.Linear's), B = 0 and the values 0, so s B A x = 0, S = 0 and insertion is
the identity bit for bit. Forward: two GEMMs for the low-rank part; S x without a dense S: the k
inputs S reads are gathered (index_select on x's last dim), scaled by the values and added into
their output rows (index_add), O(tokens * k) instead of a dense out x in GEMM. Merge identity:
W x + s B A x + S x == (W + s B A + S) x, exact (built in merge_dtype); unmerge subtracts the same.
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option, aten, merge_dtype
from .lora import kaiming_uniform, lora_scale
from .shira import dense, pick_support


def support_size(density: float, rows: int, cols: int) -> int:
    """k, the number of trained entries of a rows x cols matrix at this density (at least one)."""
    return max(1, round(density * rows * cols))


def _init(opts, in_features, out_features, dtype, gen, weight):
    rank = opts["rank"]
    A = kaiming_uniform((rank, in_features), gen)
    count = support_size(opts["density"], out_features, in_features)
    indices = pick_support(count, out_features, in_features, opts["mask"], gen, weight)
    return {"rosa_A": A.to(dtype), "rosa_B": torch.zeros(out_features, rank, dtype=dtype),
            "rosa_values": torch.zeros(count, dtype=dtype), "rosa_indices": indices}


def _forward(branch, x, y, params, opts):
    # y + s B(A x), then + S x: (S x)[.., r] = sum over the support entries (r, c) of value * x[.., c]
    low_rank = branch.linear(branch.linear(x, params["rosa_A"]), params["rosa_B"])
    y = branch.add(y, low_rank, alpha=lora_scale(opts))
    rows, cols = (branch.op(aten.select.int, params["rosa_indices"], 0, axis) for axis in (0, 1))
    picked = branch.op(aten.mul.Tensor, branch.op(aten.index_select.default, x, -1, cols), params["rosa_values"])
    return branch.op(aten.index_add.default, y, -1, rows, picked)


def _delta(params, opts, weight):
    """s B A + S in merge_dtype(weight), out x in."""
    dtype = merge_dtype(weight)
    low_rank = (params["rosa_B"].to(dtype) @ params["rosa_A"].to(dtype)).mul_(lora_scale(opts))
    return low_rank.add_(dense(params["rosa_values"], params["rosa_indices"], weight.shape, dtype))


ROSA = AdapterKind(
    name="rosa",
    options={"rank": Option(int, 8, positive=True),
             "alpha": Option((int, float), None),
             "density": Option(float, 0.01, positive=True, bounds=(0.0, 1.0)),   # (0, 1]: positive and <= 1
             "mask": Option(str, "magnitude", choices=("magnitude", "random"))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: opts["rank"] * (fan_in + fan_out)
    + support_size(opts["density"], fan_out, fan_in),
    index_bounds=lambda opts, fan_in, fan_out: {"rosa_indices": (fan_out, fan_in)},
    frozen=frozenset({"rosa_indices"}),
)
