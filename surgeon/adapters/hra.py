"""HRA (Yuan et al. 2024): y = W H x + b with H = H_1 ... H_r a chain of Householder reflections.

H_i = I - 2 u_i u_i^T for the unit columns u_i of the trained in x r matrix U (PEFT's `hra_u`).
The input side applies H^T = H_r ... H_1 to x one reflection at a time (x - 2 (x . u) u, cost
O(in * r) per token, no in x in matrix). With `apply_GS` the columns are orthonormalized first
(here by QR, which spans the same projector as PEFT's Gram-Schmidt) and H = I - 2 Q Q^T. The
init repeats each column twice (u1, u1, u2, u2, ...), so H = I up to rounding ("close"); an odd
rank has no such init, and I - 2 Q Q^T is never I, so those start away from the identity
("none"), as in PEFT. Merge: W' = W H; unmerge: W = W' H^T.
"""
from __future__ import annotations

import operator

import torch

from . import AdapterKind, Option, aten, input_map, merge_dtype
from .lora import kaiming_uniform
from .rotations import Rotation


def _init(opts, in_features, out_features, dtype, gen, weight):
    rank = opts["rank"]
    if rank % 2:
        return {"hra_u": kaiming_uniform((in_features, rank), gen).to(dtype)}
    half = kaiming_uniform((in_features, rank // 2), gen)
    return {"hra_u": torch.repeat_interleave(half, 2, dim=1).to(dtype)}


def _forward_input(branch, x, params, opts):
    u = params["hra_u"]
    if opts["apply_GS"]:
        basis = branch.op(operator.getitem, branch.op(aten.linalg_qr.default, u), 0)
        return branch.add(x, branch.op(aten.matmul.default, branch.op(aten.matmul.default, x, basis),
                                       branch.op(aten.t.default, basis)), alpha=-2)
    unit = branch.op(aten.div.Tensor, u, branch.op(aten.linalg_vector_norm.default, u, 2, [0], True))
    for i in reversed(range(opts["rank"])):   # x H^T = x H_r ... H_1
        column = branch.op(aten.select.int, unit, 1, i)
        along = branch.op(aten.unsqueeze.default, branch.op(aten.matmul.default, x, column), -1)
        x = branch.add(x, branch.mul(along, column), alpha=-2)
    return x


def _merged(params, opts, weight, inverse: bool):
    dtype = merge_dtype(weight)
    weight = weight.to(dtype)
    reflect_t = input_map(_forward_input, params, opts, weight.shape[1], dtype=dtype)   # H^T
    return (weight @ (reflect_t if inverse else reflect_t.T)).sub_(weight)


def _rotation(params, opts, weight):
    """W' = W H; H is a rotation only for an even number of reflections, and never with apply_GS."""
    if opts["apply_GS"]:
        return ("apply_GS: H = I - 2 Q Q^T reflects a whole subspace (eigenvalue -1, multiplicity rank), so it has "
                "no principal logarithm")
    if opts["rank"] % 2:
        return (f"rank {opts['rank']} is odd: H is a product of {opts['rank']} reflections, det -1, which has no "
                "real logarithm")
    return Rotation(input_map(_forward_input, params, opts, weight.shape[1]).T)


HRA = AdapterKind(
    name="hra",
    options={"rank": Option(int, 8, positive=True), "apply_GS": Option(bool, False)},
    init=_init,
    forward=None,
    forward_input=_forward_input,
    delta_weight=lambda params, opts, weight: _merged(params, opts, weight, inverse=False),
    undo_delta=lambda params, opts, merged: _merged(params, opts, merged, inverse=True),
    param_count=lambda opts, fan_in, fan_out: fan_in * opts["rank"],
    init_check=lambda opts: "none" if opts["rank"] % 2 or opts["apply_GS"] else "close",
    rotation=_rotation,
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT takes any number of reflections
)
