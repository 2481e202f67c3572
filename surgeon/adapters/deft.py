"""DEFT (decompositional efficient fine-tuning): W' = (I - P_proj) W + s Q_P R, a residual projection.

A site trains P (out x r), the directions of the output subspace it rewrites, and R (r x in), what it
writes there. `decomposition` (PEFT's decomposition_method) turns P into the projector P_proj = Q_P T^T:

- relu (default): Q_P = P, T = relu(P) (a non-orthogonal projector);
- qr: Q_P = the reduced QR's orthonormal Q of P, T = Q_P (the orthogonal projector Q_P Q_P^T).

so ΔW = W' - W = Q_P (s R - T^T W). s = alpha / r (1 without `alpha`, PEFT's alpha=None) scales the
injection only. With `para` (PaRa) there is no R: ΔW = -P_proj W, pure subspace removal. The graph
applies it to activations, as PEFT does: with y = W x + b the base output,

    y - ((y - b) T) Q_P^T + (dropout(x) (s R)^T) Q_P^T

(`dropout`, PEFT's deft_dropout, drops the injection's input only, in train mode). A site costs
r out (+ r in without `para`) parameters; PEFT caps r at out, surgeon refuses a larger one.

Init (PEFT's init_weights): P ~ N(0, 0.02^2). `default` (True) sets R = T^T W / s from the site's
weight (in float32), so ΔW = 0 up to rounding: the identity at insert ("close": the graph's two
terms cancel only to rounding). `random` (False) draws R ~ N(0, (0.02 init_scale)^2) and changes the
function, as `para` always does.

Merge: ΔW depends on the weight it lands on; the merge computes Q_P (s R - T^T W) from W, as PEFT.
Unmerge inverts W' = M W + s Q_P R, M = I - Q_P T^T: for relu by Woodbury,
M^-1 = I + P (I_r - T^T P)^-1 T^T (refused where I_r - T^T P is singular); for qr M is a projector
(it zeroes W's part in span(Q_P), which the merged weight no longer holds), so unmerge is refused.
Linear and GPT-2 Conv1D sites (PEFT's DEFT takes both).
"""
from __future__ import annotations

import operator

import torch

from . import AdapterKind, Option, aten, merge_dtype


def _scaling(opts: dict) -> float:
    return opts["alpha"] / opts["rank"] if opts["alpha"] else 1.0


def _project(branch, P, opts):
    """(Q_P, T) with P_proj = Q_P T^T (graph code; eager on tensors)."""
    if opts["decomposition"] == "relu":
        return P, branch.op(aten.relu.default, P)
    Q = branch.op(operator.getitem, branch.op(aten.linalg_qr.default, P), 0)
    return Q, Q


def _eager_project(P: torch.Tensor, opts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    if opts["decomposition"] == "relu":
        return P, torch.relu(P)
    Q = torch.linalg.qr(P)[0]
    return Q, Q


def _init(opts, in_features, out_features, dtype, gen, weight):
    rank = opts["rank"]
    if rank > out_features:
        raise ValueError(f"deft: rank {rank} exceeds the site's {out_features} output features (P_proj has rank "
                         "at most out)")
    P = torch.randn(out_features, rank, generator=gen) * 0.02
    params = {"deft_P": P.to(dtype)}
    if opts["para"]:
        return params
    if opts["init"] == "random":
        R = torch.randn(rank, in_features, generator=gen) * (0.02 * opts["init_scale"])
    elif weight.is_meta:
        R = torch.empty(rank, in_features, device="meta")
    else:   # T^T W / s: the injection puts back exactly what the projection removes
        _, right = _eager_project(P.to(weight.device), opts)
        R = (right.T @ weight.detach().to(torch.float32)) / _scaling(opts)
    params["deft_R"] = R.to(dtype)
    return params


def _forward(branch, x, y, params, opts):
    Q, right = _project(branch, params["deft_P"], opts)
    Q_t = branch.op(aten.t.default, Q)
    product = y if branch.bias is None else branch.op(aten.sub.Tensor, y, branch.bias)   # W x, bias-free
    out = branch.op(aten.sub.Tensor, y, branch.op(aten.matmul.default,
                                                  branch.op(aten.matmul.default, product, right), Q_t))
    if opts["para"]:
        return out
    R = params["deft_R"]
    if _scaling(opts) != 1.0:
        R = branch.mul(R, _scaling(opts))
    injected = branch.linear(branch.dropout(x, opts.get("dropout", 0.0)), R)
    return branch.add(out, branch.op(aten.matmul.default, injected, Q_t))


def _factors(params, opts, dtype, device):
    P = params["deft_P"].to(device=device, dtype=dtype)
    Q, right = _eager_project(P, opts)
    R = None if opts["para"] else params["deft_R"].to(device=device, dtype=dtype) * _scaling(opts)
    return Q, right, R


def _delta(params, opts, weight):
    """Q_P (s R - T^T W) (-P_proj W with `para`) in merge_dtype(weight)."""
    dtype = merge_dtype(weight)
    Q, right, R = _factors(params, opts, dtype, weight.device)
    removed = right.T @ weight.to(dtype)
    return Q @ (-removed if R is None else R - removed)


def _undo(params, opts, merged):
    """W - W' from W' = M W + s Q_P R: W = M^-1 (W' - s Q_P R), M^-1 = I + P (I_r - T^T P)^-1 T^T (relu)."""
    if opts["decomposition"] == "qr":
        raise ValueError("deft: with decomposition qr the merge projects out the base weight's part in span(Q_P) "
                         "((I - Q_P Q_P^T) is singular), so the merged weight does not determine the base weight")
    dtype = merge_dtype(merged)
    Q, right, R = _factors(params, opts, dtype, merged.device)
    merged = merged.to(dtype)
    rest = merged if R is None else merged - Q @ R
    inner = torch.eye(Q.shape[1], dtype=dtype, device=merged.device) - right.T @ Q
    if not bool(torch.linalg.det(inner) != 0):
        raise ValueError("deft: I - relu(P)^T P is singular, so I - P relu(P)^T has no inverse and the base weight "
                         "cannot be recovered from the merged one")
    return rest + Q @ torch.linalg.solve(inner, right.T @ rest) - merged


def _count(opts, fan_in, fan_out) -> int:
    return opts["rank"] * (fan_out + (0 if opts["para"] else fan_in))


DEFT = AdapterKind(
    name="deft",
    options={"rank": Option(int, 8, positive=True),
             "decomposition": Option(str, "relu", choices=("relu", "qr")),
             "alpha": Option((int, float), None),
             "para": Option(bool, False),
             "init": Option(str, "default", choices=("default", "random")),
             "init_scale": Option(float, 1.0),
             "dropout": Option(float, 0.0, bounds=(0.0, 1.0))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    undo_delta=_undo,
    param_count=_count,
    init_check=lambda opts: "none" if opts["init"] == "random" or opts["para"] else "close",
    rank_limit=lambda opts, fan_in, fan_out: (fan_out, "out"),   # P_proj = Q_P T^T has rank at most out
)
