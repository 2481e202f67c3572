"""BOFT (Liu et al. 2024): y = s ⊙ (W M^T x) + b with M a product of butterfly-sparse rotations.

M = B_{N-1} ... B_0 (N = `butterfly_factor`); B_i = P_i blockdiag(R_i1..R_iD) P_i^T with
D = in / block_size orthogonal blocks R = (I - Q)(I + Q)^-1, Q = (X - X^T) / 2 for a trained
block_size x block_size X (PEFT's layout: X is (N, D, b, b)). P_i is PEFT's butterfly
permutation: within groups of b * 2^i inputs, half-blocks of size b/2 are reordered evens
first, then odds; here it is a reshape and a transpose, so no index tensor is stored. N = 1
is plain block-diagonal OFT. s (out) is a trained output scale. X = 0 and s = 1 give R = I
and out = y + (s - 1)(y - b) == y exactly. Merge: W' = diag(s) W M^T; unmerge inverts it.
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option, aten, input_map, merge_dtype
from .rotations import Rotation, cayley, rotate_blocks


def _layout(opts: dict, in_features: int) -> tuple[int, int, int]:
    """(factors N, blocks D, block size b), checked against PEFT's constraints."""
    size, factors = opts["block_size"], opts["butterfly_factor"]
    group = size * 2 ** (factors - 1)
    if in_features % group or (factors > 1 and (size % 2 or (in_features // size) % 2)):
        raise ValueError(f"boft: {in_features} input features do not split into blocks of {size} with "
                         f"{factors} butterfly factors (needs in % (block_size * 2^(factors-1)) == 0, even sizes)")
    return factors, in_features // size, size


def _init(opts, in_features, out_features, dtype, gen, weight):
    factors, blocks, size = _layout(opts, in_features)
    return {"boft_R": torch.zeros(factors, blocks, size, size, dtype=dtype),
            "boft_s": torch.ones(out_features, dtype=dtype)}


def _shuffle(branch, x, in_features: int, size: int, level: int, inverse: bool):
    """x @ P_level^T (gather: evens first) or, with inverse, x @ P_level."""
    groups, half = in_features // (size * 2 ** level), 2 ** level
    shape = [groups, 2, half, size // 2] if inverse else [groups, half, 2, size // 2]
    split = branch.op(aten.unflatten.int, x, -1, shape)
    return branch.op(aten.flatten.using_ints, branch.op(aten.transpose.int, split, -3, -2), -4)


def _forward_input(branch, x, params, opts):
    factors, blocks, size = _layout(opts, branch.in_features)
    raw = branch.op(aten.reshape.default, params["boft_R"], [factors * blocks, size, size])
    skew = branch.mul(branch.op(aten.sub.Tensor, raw, branch.op(aten.transpose.int, raw, -1, -2)), 0.5)
    rotations = cayley(branch, skew, raw, factors * blocks, size)
    for level in reversed(range(factors)):   # x @ M = x @ B_{N-1} @ ... @ B_0
        rotation = branch.op(aten.slice.Tensor, rotations, 0, level * blocks, (level + 1) * blocks)
        if level:
            x = _shuffle(branch, x, branch.in_features, size, level, inverse=True)
        x = rotate_blocks(branch, x, rotation, blocks, size)
        if level:
            x = _shuffle(branch, x, branch.in_features, size, level, inverse=False)
    return x


def _forward(branch, x, y, params, opts):
    if branch.bias is None:
        return branch.mul(y, params["boft_s"])
    # (y - b) * s + b, written so that s == 1 gives y bit for bit
    shift = branch.mul(branch.op(aten.sub.Tensor, params["boft_s"], 1), branch.op(aten.sub.Tensor, y, branch.bias))
    return branch.add(y, shift)


def _merged(params, opts, weight, inverse: bool):
    dtype = merge_dtype(weight)
    weight = weight.to(dtype)
    out_features, in_features = weight.shape
    rotation_t = input_map(_forward_input, params, opts, in_features, dtype=dtype).T
    scale = params["boft_s"].to(dtype)[:, None]
    if inverse:
        return ((weight / scale) @ torch.linalg.inv(rotation_t)).sub_(weight)
    return (weight @ rotation_t).mul_(scale).sub_(weight)


def _rotation(params, opts, weight):
    """W' = diag(s) W R with R = M^T, M the input map."""
    return Rotation(input_map(_forward_input, params, opts, weight.shape[1]).T, params["boft_s"].double())


def _count(opts, fan_in, fan_out):
    factors, blocks, size = _layout(opts, fan_in)
    return factors * blocks * size * size + fan_out


BOFT = AdapterKind(
    name="boft",
    options={"block_size": Option(int, 8, positive=True), "butterfly_factor": Option(int, 1, positive=True)},
    init=_init,
    forward=_forward,
    forward_input=_forward_input,
    delta_weight=lambda params, opts, weight: _merged(params, opts, weight, inverse=False),
    undo_delta=lambda params, opts, merged: _merged(params, opts, merged, inverse=True),
    param_count=_count,
    rotation=_rotation,
)
