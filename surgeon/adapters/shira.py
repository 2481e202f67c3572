"""SHiRA (Bhardwaj et al. 2024): y = W x + b + S x, S sparse with a fixed support.

S is zero except at k fixed positions of the out x in weight: k = rank * (in + out) when the
`rank` option is set (PEFT's sizing, as many parameters as a rank-r LoRA), else
k = round(fraction * out * in) (at least one). The trained values (`shira_values`, k of them) sit
at `shira_indices`, a 2 x k int64 tensor of (row, column) pairs in row-major order (PEFT's layout;
frozen, never trained). The support is chosen at insertion:
`mask: random` draws it from the spec's seeded generator, `mask: magnitude` takes the k
largest |W| entries. A loaded adapter brings its own indices, so the support survives a
save/load and a merge (unmerge reads the stored indices, not the merged weight).

The values start at zero, so S = 0, S x = 0 and y + 0 == y: insertion is exact. Forward: the
dense S is built in the graph (new_zeros + index_put, out x in) and applied with one GEMM.
Merge identity: W x + S x == (W + S) x, exact; unmerge subtracts S. A site costs k parameters.

PEFT import/export (surgeon.adapters.peft_formats): PEFT saves the indices too (2 x k int32), so
a checkpoint's support is read, never regenerated; export needs `rank` (PEFT has no fraction).
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option, aten, merge_dtype


def support_size(opts: dict, fan_in: int, fan_out: int) -> int:
    """k, the number of trained entries of an out x in weight (at least one)."""
    if opts.get("rank") is not None:
        return opts["rank"] * (fan_in + fan_out)
    return max(1, round(opts["fraction"] * fan_in * fan_out))


def _init(opts, in_features, out_features, dtype, gen, weight):
    if opts["fraction"] > 1:
        raise ValueError(f"shira: fraction must be in (0, 1], got {opts['fraction']}")
    count = support_size(opts, in_features, out_features)
    if count > in_features * out_features:
        raise ValueError(f"shira: rank {opts['rank']} asks for {count} entries of a {out_features} x {in_features} "
                         "weight")
    return {"shira_values": torch.zeros(count, dtype=dtype),
            "shira_indices": pick_support(count, out_features, in_features, opts["mask"], gen, weight)}


def pick_support(count: int, rows: int, cols: int, mask: str, gen: torch.Generator,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """The 2 x count int64 (row, column) pairs of a fixed support of a rows x cols matrix, sorted
    row-major: the count largest |weight| entries (`magnitude`) or count distinct entries drawn from
    `gen` (`random`). (SHiRA's, RoSA's and LoRI's supports.)"""
    if mask == "magnitude":   # on the weight's device (meta too: a loaded adapter's shape check calls init)
        flat = torch.topk(weight.detach().abs().flatten(), count).indices
    else:
        flat = torch.randperm(rows * cols, generator=gen)[:count]
    flat = torch.sort(flat).values
    return torch.stack([flat // cols, flat % cols])


def scatter(branch, values, indices, rows: int, cols: int):
    """The rows x cols matrix that is `values` at `indices` and zero elsewhere, as graph code."""
    zeros = branch.op(aten.new_zeros.default, values, [rows, cols])
    at = [branch.op(aten.select.int, indices, 0, axis) for axis in (0, 1)]
    return branch.op(aten.index_put.default, zeros, at, values)


def dense(values: torch.Tensor, indices: torch.Tensor, shape, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """`values` at `indices` in a zero matrix of `shape`, in `dtype` (for a merge: merge_dtype)."""
    out = torch.zeros(shape, dtype=dtype, device=values.device)
    rows, cols = indices.long()
    out[rows, cols] = values.to(dtype)
    return out


def _forward(branch, x, y, params, opts):
    # y + S x with S = scatter(values at indices) in an out x in zero matrix
    sparse = scatter(branch, params["shira_values"], params["shira_indices"], branch.out_features,
                     branch.in_features)
    return branch.add(y, branch.linear(x, sparse))


def _delta(params, opts, weight):
    """S in merge_dtype(weight), the shape of `weight` (out x in)."""
    return dense(params["shira_values"], params["shira_indices"], weight.shape, merge_dtype(weight))


SHIRA = AdapterKind(
    name="shira",
    options={"fraction": Option(float, 0.01, positive=True),
             "rank": Option(int, None, positive=True),
             "mask": Option(str, "random", choices=("random", "magnitude"))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=support_size,
    index_bounds=lambda opts, fan_in, fan_out: {"shira_indices": (fan_out, fan_in)},
    frozen=frozenset({"shira_indices"}),
    # k = r (in + out) entries must fit the in x out weight
    rank_limit=lambda opts, fan_in, fan_out: (fan_in * fan_out // (fan_in + fan_out), "in·out / (in + out)"),
)
