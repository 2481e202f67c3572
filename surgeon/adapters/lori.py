"""LoRI (Zhang et al. 2025, LoRA with Reduced Interference): y = W x + b + s (M ⊙ B) A x.

A (r x in) is a frozen random projection: drawn at insertion from the spec's seeded generator
(kaiming-uniform, nn.Linear's init, as LoRA's A), never trained, stored per site and saved with
the adapter. B (out x r) is trained only on a fixed sparse task mask M of
k = max(1, round(density * out * r)) entries, s = alpha / r. The paper calibrates M from the
largest entries of a B trained dense first; surgeon fixes M at insertion with no data: k distinct
entries of B drawn from the spec's seeded generator. A loaded adapter brings its own mask.

Storage: only the masked entries of B are parameters. `lori_values` (k, trained) sit at
`lori_indices`, a 2 x k int64 tensor of (row, column) pairs of B in row-major order (frozen);
`lori_A` is frozen. So the trained parameters are exactly the k values, and a site costs k
parameters (requires_grad holds exactly these; A and the indices take no gradient).

The values start at zero, so B = 0 and insertion is the identity bit for bit. Forward: A x
(r values per position), then the dense B built in the graph (new_zeros + index_put, out x r),
then one small GEMM. Merge identity: W x + s B A x == (W + s B A) x, exact (built in merge_dtype);
unmerge subtracts the same.
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option, merge_dtype
from .lora import kaiming_uniform, lora_scale
from .rosa import support_size
from .shira import dense, pick_support, scatter


def _init(opts, in_features, out_features, dtype, gen, weight):
    rank = opts["rank"]
    A = kaiming_uniform((rank, in_features), gen)
    count = support_size(opts["density"], out_features, rank)
    indices = pick_support(count, out_features, rank, "random", gen)
    return {"lori_A": A.to(dtype), "lori_values": torch.zeros(count, dtype=dtype), "lori_indices": indices}


def _forward(branch, x, y, params, opts):
    # y + s B(A x), B the scattered masked values (out x r)
    B = scatter(branch, params["lori_values"], params["lori_indices"], branch.out_features, opts["rank"])
    update = branch.linear(branch.linear(x, params["lori_A"]), B)
    return branch.add(y, update, alpha=lora_scale(opts))


def _delta(params, opts, weight):
    """s B A in merge_dtype(weight), out x in."""
    dtype = merge_dtype(weight)
    B = dense(params["lori_values"], params["lori_indices"], (weight.shape[0], opts["rank"]), dtype)
    return (B @ params["lori_A"].to(dtype)).mul_(lora_scale(opts))


LORI = AdapterKind(
    name="lori",
    options={"rank": Option(int, 8, positive=True),
             "alpha": Option((int, float), None),
             "density": Option(float, 0.1, positive=True, bounds=(0.0, 1.0))},   # (0, 1]: positive and <= 1
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: support_size(opts["density"], fan_out, opts["rank"]),
    index_bounds=lambda opts, fan_in, fan_out: {"lori_indices": (fan_out, opts["rank"])},
    frozen=frozenset({"lori_A", "lori_indices"}),
)
