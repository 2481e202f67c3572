"""SHiRA (Bhardwaj et al. 2024): y = W x + b + S x, S sparse with a fixed support.

S is zero except at k = round(fraction * out * in) fixed positions of the out x in weight (at
least one): the trained values (`shira_values`, k of them) sit at the flat row-major indices
`shira_indices` (k int64 entries, frozen, never trained). The support is chosen at insertion:
`mask: random` draws it from the spec's seeded generator, `mask: magnitude` takes the k
largest |W| entries. A loaded adapter brings its own indices, so the support survives a
save/load and a merge (unmerge reads the stored indices, not the merged weight).

The values start at zero, so S = 0, S x = 0 and y + 0 == y: insertion is exact. Forward: the
dense S is built in the graph (new_zeros + index_put, out x in) and applied with one GEMM.
Merge identity: W x + S x == (W + S) x, exact; unmerge subtracts S. A site costs k parameters.

Unlike PEFT's SHiRA (sized r * (in + out), indices regenerated from a seed and not saved), the
indices are stored with the adapter; there is no PEFT import/export.
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option, aten


def support_size(opts: dict, fan_in: int, fan_out: int) -> int:
    """k, the number of trained entries of an out x in weight (at least one)."""
    return max(1, round(opts["fraction"] * fan_in * fan_out))


def _init(opts, in_features, out_features, dtype, gen, weight):
    if opts["fraction"] > 1:
        raise ValueError(f"shira: fraction must be in (0, 1], got {opts['fraction']}")
    count = support_size(opts, in_features, out_features)
    if opts["mask"] == "magnitude":
        # the k largest |W| entries (out x in, row-major flat positions)
        indices = torch.topk(weight.detach().abs().flatten(), count).indices.cpu()
    else:
        indices = torch.randperm(in_features * out_features, generator=gen)[:count]
    return {"shira_values": torch.zeros(count, dtype=dtype), "shira_indices": torch.sort(indices).values}


def _forward(branch, x, y, params, opts):
    # y + S x with S = scatter(values at indices) in an out x in zero matrix
    rows, cols = branch.out_features, branch.in_features
    flat = branch.op(aten.new_zeros.default, params["shira_values"], [rows * cols])
    dense = branch.op(aten.index_put.default, flat, [params["shira_indices"]], params["shira_values"])
    sparse = branch.op(aten.view.default, dense, [rows, cols])
    return branch.add(y, branch.linear(x, sparse))


def _delta(params, opts, weight):
    """S in float64, the shape of `weight` (out x in)."""
    flat = torch.zeros(weight.numel(), dtype=torch.float64, device=params["shira_values"].device)
    flat[params["shira_indices"].long()] = params["shira_values"].double()
    return flat.view(weight.shape)


SHIRA = AdapterKind(
    name="shira",
    options={"fraction": Option(float, 0.01, positive=True),
             "mask": Option(str, "random", choices=("random", "magnitude"))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: support_size(opts, fan_in, fan_out),
    frozen=frozenset({"shira_indices"}),
)
