"""VeRA (Kopiczko et al. 2024): y = W x + b ⊙ B (d ⊙ A x), with A, B frozen and random.

A (r x in) and B (out x r) are shared: stored once per adapter and shape and read by every
site, never trained (`shared`); each site trains only the vectors d (r, starts at `d_initial`)
and b (out, starts at zero, so insertion is exact). The projections come from a generator
seeded from `projection_seed` (like PEFT's `projection_prng_key`, one stream for A and one
for B), kaiming-uniform with gain sqrt(2) as in PEFT, so sites of a shape see the same A and B. An imported
PEFT adapter holds one A and B sized for its largest layer: a site reads A[:, :in] and
B[:out, :], as PEFT does. Merge identity: W x + b ⊙ B (d ⊙ A x) == (W + diag(b) B diag(d) A) x.
`dropout` (PEFT's vera_dropout) drops the branch's input in train mode: b ⊙ B (d ⊙ A dropout(x)).
"""
from __future__ import annotations

import math

import torch

from . import AdapterKind, Option, aten, merge_dtype


def _projection(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    bound = math.sqrt(6.0 / shape[1])   # kaiming-uniform, gain sqrt(2), fan_in = shape[1]
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def _init(opts, in_features, out_features, dtype, gen, weight):
    rank = opts["rank"]
    # each projection from its own stream, so that it depends only on its own shape and the seed
    vera_A = _projection((rank, in_features), torch.Generator().manual_seed(2 * opts["projection_seed"]))
    vera_B = _projection((out_features, rank), torch.Generator().manual_seed(2 * opts["projection_seed"] + 1))
    return {"vera_A": vera_A.to(dtype), "vera_B": vera_B.to(dtype),
            "vera_lambda_d": torch.full((rank,), opts["d_initial"], dtype=dtype),
            "vera_lambda_b": torch.zeros(out_features, dtype=dtype)}


def _forward(branch, x, y, params, opts):
    in_features, out_features = branch.in_features, branch.out_features
    site_A = branch.op(aten.slice.Tensor, params["vera_A"], 1, 0, in_features)
    site_B = branch.op(aten.slice.Tensor, params["vera_B"], 0, 0, out_features)
    x = branch.dropout(x, opts.get("dropout", 0.0))
    hidden = branch.mul(branch.linear(x, site_A), params["vera_lambda_d"])
    return branch.add(y, branch.mul(branch.linear(hidden, site_B), params["vera_lambda_b"]))


def _delta(params, opts, weight):
    out_features, in_features = weight.shape
    p = {name: t.to(merge_dtype(weight)) for name, t in params.items()}
    left = p["vera_lambda_b"][:, None] * p["vera_B"][:out_features]
    return left @ (p["vera_lambda_d"][:, None] * p["vera_A"][:, :in_features])


VERA = AdapterKind(
    name="vera",
    options={"rank": Option(int, 256, positive=True), "d_initial": Option(float, 0.1),
             "projection_seed": Option(int, 0), "dropout": Option(float, 0.0, bounds=(0.0, 1.0))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: opts["rank"] + fan_out,
    shared=frozenset({"vera_A", "vera_B"}),
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT takes any rank
)
