"""DeLoRA (Bini et al. 2025): y + B Ξ A (w ⊙ x), a low-rank update whose norm is bounded by λ.

A site trains A (r x in), B (out x r) and one scalar λ. Each rank-one term b_i a_i is normalized,
so the update's strength is set by λ alone:

    Ξ = diag(λ / r / (‖a_i‖ ‖b_i‖)),   ‖a_i‖: row i of A, ‖b_i‖: column i of B (each clamped to >= 1e-4)

and the input is first scaled per feature by w, the column norms of the base weight W (out x in)
taken when the adapter is made (`delora_w_norm`, frozen: it takes no gradient, is saved with the
adapter, and PEFT saves it too). So ΔW = B Ξ A diag(w), and the graph computes it the cheap way,
from the input side: h = (dropout(x) ⊙ w) A^T, scaled by Ξ's diagonal, then h B^T added to y.
`dropout` is PEFT's module_dropout (an ordinary dropout of the branch input, train mode only).

Init (PEFT's init_weights): `default` (True) draws A kaiming-uniform and sets B = 0, an exact
identity at insert (B's clamped norms keep Ξ finite, so the branch adds exact zeros); `random`
(False) draws B kaiming-uniform too and changes the function. λ starts at the `lambda` option
(PEFT's delora_lambda). A site trains r (in + out) + 1 parameters (w is not trained).

Merge: ΔW = B Ξ A diag(w) does not depend on the weight it lands on (w was fixed at insert), so the
merge adds it and unmerge subtracts it, as in PEFT.
"""
from __future__ import annotations

import torch

from . import AdapterKind, EagerBranch, Option, aten, merge_dtype
from .lora import kaiming_uniform

NORM_FLOOR = 1e-4   # PEFT clamps the row / column norms of A and B to at least this


def _init(opts, in_features, out_features, dtype, gen, weight):
    rank = opts["rank"]
    A = kaiming_uniform((rank, in_features), gen)
    B = kaiming_uniform((out_features, rank), gen) if opts["init"] == "random" else torch.zeros(out_features, rank)
    w_norm = torch.linalg.vector_norm(weight.detach(), 2, dim=0)   # per input feature (meta stays meta)
    return {"delora_A": A.to(dtype), "delora_B": B.to(dtype),
            "delora_lambda": torch.full((1,), float(opts["lambda"]), dtype=dtype),
            "delora_w_norm": w_norm.to(dtype)}


def _scales(branch, params, rank: int):
    """λ / r / (‖a_i‖ ‖b_i‖), one per rank (graph code; eager on tensors)."""
    norm_a = branch.op(aten.clamp_min.default, branch.op(aten.linalg_vector_norm.default, params["delora_A"], 2, [1]),
                       NORM_FLOOR)
    norm_b = branch.op(aten.clamp_min.default, branch.op(aten.linalg_vector_norm.default, params["delora_B"], 2, [0]),
                       NORM_FLOOR)
    return branch.op(aten.div.Tensor, branch.op(aten.div.Tensor, params["delora_lambda"], rank),
                     branch.mul(norm_a, norm_b))


def _forward(branch, x, y, params, opts):
    rank = opts["rank"]
    scaled_input = branch.mul(branch.dropout(x, opts.get("dropout", 0.0)), params["delora_w_norm"])
    h = branch.mul(branch.linear(scaled_input, params["delora_A"]), _scales(branch, params, rank))
    return branch.add(y, branch.linear(h, params["delora_B"]))


def _delta(params, opts, weight):
    """B Ξ A diag(w) in merge_dtype(weight) (its value does not depend on `weight`)."""
    p = {name: t.to(merge_dtype(weight)) for name, t in params.items()}
    scales = _scales(EagerBranch((0, 0)), p, opts["rank"])
    delta = ((p["delora_B"] * scales) @ p["delora_A"]).mul_(p["delora_w_norm"])
    return delta if weight is None else delta.to(weight.device)


DELORA = AdapterKind(
    name="delora",
    options={"rank": Option(int, 8, positive=True),
             "lambda": Option(float, 15.0),
             "init": Option(str, "default", choices=("default", "random")),
             "dropout": Option(float, 0.0, bounds=(0.0, 1.0))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: opts["rank"] * (fan_in + fan_out) + 1,
    frozen=frozenset({"delora_w_norm"}),
    init_check=lambda opts: "none" if opts["init"] == "random" else "exact",
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT takes any rank
)
