"""OFT (Qiu et al. 2023): y = W R^T x + b with R = blockdiag(R_1..R_k) orthogonal, via Cayley.

The input is split into k = in / block_size blocks and each block is rotated by R_i, built
from a skew matrix Q_i whose block_size*(block_size-1)/2 upper entries are the trained
parameters (PEFT's layout): R_i = (I - Q_i)(I + Q_i)^-1, or PEFT's truncated Neumann series
with `use_cayley_neumann`. `block_share` uses one R for every block. Q = 0 gives R = I and
an exact identity at insertion. Merge identity: W (x R) == (W R^T) x in row-vector form,
so W' = W R^T; unmerge multiplies by (R^T)^-1.
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option, aten, input_map, merge_dtype
from .rotations import Rotation, cayley, cayley_neumann, rotate_blocks, skew_from_upper


def _blocks(opts: dict, in_features: int) -> tuple[int, int]:
    size = opts["block_size"]
    if in_features % size:
        raise ValueError(f"oft: block_size {size} does not divide the site's {in_features} input features")
    return in_features // size, size


def _init(opts, in_features, out_features, dtype, gen, weight):
    blocks, size = _blocks(opts, in_features)
    return {"oft_R": torch.zeros(1 if opts["block_share"] else blocks, size * (size - 1) // 2, dtype=dtype)}


def _forward_input(branch, x, params, opts):
    blocks, size = _blocks(opts, branch.in_features)
    rows = 1 if opts["block_share"] else blocks
    skew = skew_from_upper(branch, params["oft_R"], rows, size)
    if opts["use_cayley_neumann"]:
        rotation = cayley_neumann(branch, skew, params["oft_R"], rows, size, opts["num_cayley_neumann_terms"])
    else:
        rotation = cayley(branch, skew, params["oft_R"], rows, size)
    if opts["block_share"]:
        rotation = branch.op(aten.expand.default, rotation, [blocks, size, size])
    return rotate_blocks(branch, x, rotation, blocks, size)


def _delta(params, opts, weight):
    dtype = merge_dtype(weight)
    weight = weight.to(dtype)
    return (weight @ input_map(_forward_input, params, opts, weight.shape[1], dtype=dtype).T).sub_(weight)


def _undo(params, opts, merged):
    dtype = merge_dtype(merged)
    merged = merged.to(dtype)
    rotation = input_map(_forward_input, params, opts, merged.shape[1], dtype=dtype).T
    return (merged @ torch.linalg.inv(rotation)).sub_(merged)


def _rotation(params, opts, weight):
    """W' = W R with R = M^T, M the input map; the Neumann series is no rotation."""
    if opts["use_cayley_neumann"]:
        return ("use_cayley_neumann: PEFT's truncated Neumann series is not exactly orthogonal, so it has no "
                "logarithm in the orthogonal group")
    return Rotation(input_map(_forward_input, params, opts, weight.shape[1]).T)


def _count(opts, fan_in, fan_out):
    blocks, size = _blocks(opts, fan_in)
    return (1 if opts["block_share"] else blocks) * size * (size - 1) // 2


OFT = AdapterKind(
    name="oft",
    options={"block_size": Option(int, 32, positive=True), "use_cayley_neumann": Option(bool, False),
             "num_cayley_neumann_terms": Option(int, 5, positive=True), "block_share": Option(bool, False)},
    init=_init,
    forward=None,
    forward_input=_forward_input,
    delta_weight=_delta,
    undo_delta=_undo,
    param_count=_count,
    rotation=_rotation,
)
