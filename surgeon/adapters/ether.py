"""ETHER and ETHER+ (Bini et al. 2024): the weight multiplied by hyperplane reflections.

Spec types `ether` and `ether_plus`; option `blocks` (n, dividing the site's dims).

ETHER: W' = H W, H = blockdiag(H_1 .. H_n) over the output rows, H_j = I - 2 u_j u_j^T / |u_j|^2
(u: n x out/n, `blocks` = n). The site's output is reflected with its bias held out,
y' = H (y - b) + b, which is W' x + b. H is orthogonal and its own inverse: whatever u,
|W' - W| <= 2 |W| (the paper's bounded distance from the base), and unmerge applies H again. u
starts random, as in the paper: a reflection is never the identity, so ETHER changes the
function at insert (check "none").

ETHER+: the relaxed H+ = I - u u^T / |u|^2 + v v^T / |v|^2 per block, on both sides of the
weight, W' = H+ W H~+ (H+ over the output rows from u, v; H~+ over the input columns from
u_in, v_in). It starts with v = u (and v_in = u_in), so H+ = I and insert is the identity up to
rounding ("close"). H+ is not orthogonal and can be singular (u orthogonal to v), so an
ETHER+ merge cannot be undone: unmerge is refused.

Each H is symmetric, so x -> H~+ x on the input is x @ H~+ in row form. Merges are exact:
W' is built from the same reflections, in float32 (float64 for a float64 weight: merge_dtype). Linear and
GPT-2 Conv1D sites.
"""
from __future__ import annotations

import torch

from . import AdapterKind, EagerBranch, Option, aten, input_map, merge_dtype
from .lora import kaiming_uniform


def _block(opts: dict, features: int, side: str) -> int:
    blocks = opts["blocks"]
    if features % blocks:
        raise ValueError(f"ether: blocks {blocks} does not divide the site's {features} {side} features")
    return features // blocks


def _projection(branch, z, w):
    """(w . z) w / |w|^2 per block: z (..., n, d), w (n, d)."""
    norm = branch.op(aten.sum.dim_IntList, branch.mul(w, w), [-1], True)
    dot = branch.op(aten.sum.dim_IntList, branch.mul(z, w), [-1], True)
    return branch.mul(branch.op(aten.div.Tensor, dot, norm), w)


def _reflect(branch, z, u, v, blocks: int, features: int):
    """z through blockdiag(H_j) along its last dim: ETHER's I - 2 P_u (v None) or ETHER+'s I - P_u + P_v."""
    z = branch.op(aten.unflatten.int, z, -1, [blocks, features // blocks])
    if v is None:
        z = branch.add(z, _projection(branch, z, u), alpha=-2)
    else:
        z = branch.add(branch.add(z, _projection(branch, z, u), alpha=-1), _projection(branch, z, v))
    return branch.op(aten.flatten.using_ints, z, -2, -1)


def _forward(branch, x, y, params, opts):
    bias = branch.bias
    z = branch.add(y, bias, alpha=-1) if bias is not None else y
    z = _reflect(branch, z, params["ether_u"], params.get("ether_v"), opts["blocks"], branch.out_features)
    return branch.add(z, bias) if bias is not None else z


def _forward_input(branch, x, params, opts):
    return _reflect(branch, x, params["ether_u_in"], params["ether_v_in"], opts["blocks"], branch.in_features)


def _init(opts, in_features, out_features, dtype, gen, weight, plus: bool):
    out_size = _block(opts, out_features, "output")
    u = kaiming_uniform((opts["blocks"], out_size), gen)
    if not plus:
        return {"ether_u": u.to(dtype)}
    u_in = kaiming_uniform((opts["blocks"], _block(opts, in_features, "input")), gen)
    return {"ether_u": u.to(dtype), "ether_v": u.clone().to(dtype),
            "ether_u_in": u_in.to(dtype), "ether_v_in": u_in.clone().to(dtype)}


def _output_matrix(params, opts, out_features: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """H (out x out, in `dtype`): H is symmetric, so reflecting the rows of I gives H itself."""
    eye = torch.eye(out_features, dtype=dtype, device=params["ether_u"].device)
    v = params["ether_v"].to(dtype) if "ether_v" in params else None
    return _reflect(EagerBranch((out_features, out_features)), eye, params["ether_u"].to(dtype), v, opts["blocks"],
                    out_features)


def _delta(params, opts, weight):
    """H W H~ - W in merge_dtype(weight) (H~ = I for ETHER)."""
    dtype = merge_dtype(weight)
    weight = weight.to(dtype)
    merged = _output_matrix(params, opts, weight.shape[0], dtype) @ weight
    if "ether_u_in" in params:
        merged = merged @ input_map(_forward_input, params, opts, weight.shape[1], dtype=dtype).T
    return merged.sub_(weight)


def _undo(params, opts, merged):
    """W - W' for unmerge: H is its own inverse, so W = H W'."""
    dtype = merge_dtype(merged)
    merged = merged.to(dtype)
    return (_output_matrix(params, opts, merged.shape[0], dtype) @ merged).sub_(merged)


OPTIONS = {"blocks": Option(int, 1, positive=True)}
NO_LOGARITHM = ("H = blockdiag(I - 2 u u^T / |u|^2) reflects the output rows: each block has det -1, so H has no "
                "real principal logarithm to merge in")


ETHER = AdapterKind(
    name="ether",
    options=OPTIONS,
    init=lambda *args: _init(*args, plus=False),
    forward=_forward,
    delta_weight=_delta,
    undo_delta=_undo,
    param_count=lambda opts, fan_in, fan_out: fan_out,
    init_check=lambda opts: "none",
    rotation=lambda params, opts, weight: NO_LOGARITHM,
)

ETHER_PLUS = AdapterKind(
    name="ether_plus",
    options=OPTIONS,
    init=lambda *args: _init(*args, plus=True),
    forward=_forward,
    forward_input=_forward_input,
    delta_weight=_delta,
    refuse_unmerge="ETHER+'s H+ = I - P_u + P_v is not orthogonal and can be singular: the base weight cannot be "
                   "recovered from the merged one",
    param_count=lambda opts, fan_in, fan_out: 2 * (fan_in + fan_out),
    init_check=lambda opts: "close",
)
