"""Graph code shared by the orthogonal kinds (OFT, BOFT): skew matrices, Cayley, block rotation.

Every helper builds nodes through a Branch and creates its constants from an input tensor
(`new_ones`, `new_zeros`), so the graph follows the module to whatever device it is moved to.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import Branch, aten


class Rotation(NamedTuple):
    """An adapter's merge as a rotation of the site's input (AdapterKind.rotation, read by `combine`'s
    orthomerge): W' = diag(scale) W matrix, `matrix` in x in orthogonal, in float64; `scale` (out,)
    float64, or None for 1 (BOFT's output scale)."""

    matrix: torch.Tensor
    scale: torch.Tensor | None = None


def skew_from_upper(branch: Branch, packed, blocks: int, size: int):
    """(blocks, size, size) skew matrices Q - Q^T from rows of `size*(size-1)/2` upper entries."""
    upper = branch.op(aten.triu.default, branch.op(aten.new_ones.default, packed, [size, size]), 1)
    mask = branch.op(aten.gt.Scalar, upper, 0)
    zeros = branch.op(aten.new_zeros.default, packed, [blocks, size, size])
    filled = branch.op(aten.masked_scatter.default, zeros, mask, packed)   # row-major, as triu_indices
    return branch.op(aten.sub.Tensor, filled, branch.op(aten.transpose.int, filled, -1, -2))


def identity(branch: Branch, like, blocks: int, size: int):
    return branch.op(aten.diag_embed.default, branch.op(aten.new_ones.default, like, [blocks, size]))


def cayley(branch: Branch, skew, like, blocks: int, size: int):
    """(I - Q)(I + Q)^-1, an orthogonal matrix for skew Q (PEFT's exact OFT/BOFT form)."""
    eye = identity(branch, like, blocks, size)
    return branch.op(aten.linalg_solve.default, branch.add(eye, skew), branch.op(aten.sub.Tensor, eye, skew),
                     left=False)


def neumann_terms(terms: int) -> list[tuple[int, float]]:
    """(power, coefficient) of PEFT's truncated series for (I + Q)(I - Q)^-1 ~ I + 2Q + 2Q^2 + ...

    PEFT's loop gives: I + 2Q for 2 terms; for more, 2Q + 2Q^2 + ... with the last power
    (at least Q^3) taken once, so 3 and 4 terms give the same matrix.
    """
    if terms <= 1:
        return []
    if terms == 2:
        return [(1, 2.0)]
    last = max(terms - 1, 3)
    return [(k, 2.0) for k in range(1, last)] + [(last, 1.0)]


def cayley_neumann(branch: Branch, skew, like, blocks: int, size: int, terms: int):
    """PEFT's `use_cayley_neumann` rotation (not exactly orthogonal); see neumann_terms."""
    result, power, have = identity(branch, like, blocks, size), skew, 1
    for k, coefficient in neumann_terms(terms):
        while have < k:
            power, have = branch.op(aten.bmm.default, power, skew), have + 1
        result = branch.add(result, power, alpha=coefficient)
    return result


def rotate_blocks(branch: Branch, x, rotation, blocks: int, size: int):
    """x (..., blocks*size) times blockdiag(rotation) (blocks, size, size), block by block."""
    split = branch.op(aten.unflatten.int, x, -1, [blocks, size])
    turned = branch.op(aten.einsum.default, "...rk,rkc->...rc", [split, rotation])
    return branch.op(aten.flatten.using_ints, turned, -2)
