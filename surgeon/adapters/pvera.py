"""PVeRA (probabilistic VeRA): y + b ⊙ B z with (mu, logvar) = split(d ⊙ A x) and z = mu at inference.

As in VeRA, the projections are frozen, random and shared (stored once per adapter and shape, never
trained or counted): A is 2r x in, B is out x r. Each site trains d (2r, starts at `d_initial`) and
b (out, starts at zero, so insertion is an exact identity). The branch scales A x by d and splits the
2r values into a mean mu (the first r) and a log-variance (the last r). In eval mode z = mu, a
deterministic low-rank update; in train mode z is sampled, z = mu + eps ⊙ exp(logvar / 2) with
eps ~ N(0, 1) (a run-time helper reads the compiled module's training flag, so `.train()` samples and
`.eval()` does not). PEFT's `sample_at_inference=True` (sampling in eval too) has no deterministic
function to compile, merge or check, and is refused on import. `dropout` (PEFT's pvera_dropout)
drops the branch input in train mode.

The projections are kaiming-uniform with gain sqrt(2), like VeRA's, each from its own stream seeded
by `projection_seed`; an imported PEFT adapter holds one A and B sized for its largest layer and a
site reads A[:, :in] and B[:out, :], as PEFT does. A site trains 2r + out parameters.

Merge (the eval function): W x + b ⊙ B (d_mu ⊙ A_mu x) == (W + diag(b) B diag(d_mu) A_mu) x, with A_mu
and d_mu the first r rows of A and entries of d; the merge adds that, and unmerge subtracts it.
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option, aten, merge_dtype
from .vera import _projection


def sample(training: bool, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """z: mu in eval mode; in train mode mu + eps * exp(logvar / 2), eps ~ N(0, 1) (a graph call)."""
    if not training:
        return mu
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


def _init(opts, in_features, out_features, dtype, gen, weight):
    rank, seed = opts["rank"], opts["projection_seed"]
    pvera_A = _projection((2 * rank, in_features), torch.Generator().manual_seed(2 * seed))
    pvera_B = _projection((out_features, rank), torch.Generator().manual_seed(2 * seed + 1))
    return {"pvera_A": pvera_A.to(dtype), "pvera_B": pvera_B.to(dtype),
            "pvera_lambda_d": torch.full((2 * rank,), opts["d_initial"], dtype=dtype),
            "pvera_lambda_b": torch.zeros(out_features, dtype=dtype)}


def _forward(branch, x, y, params, opts):
    rank = opts["rank"]
    site_A = branch.op(aten.slice.Tensor, params["pvera_A"], 1, 0, branch.in_features)
    site_B = branch.op(aten.slice.Tensor, params["pvera_B"], 0, 0, branch.out_features)
    x = branch.dropout(x, opts.get("dropout", 0.0))
    hidden = branch.mul(branch.linear(x, site_A), params["pvera_lambda_d"])
    mu = branch.op(aten.slice.Tensor, hidden, -1, 0, rank)
    logvar = branch.op(aten.slice.Tensor, hidden, -1, rank, 2 * rank)
    z = branch.when_training(sample, mu, logvar, like=mu)
    return branch.add(y, branch.mul(branch.linear(z, site_B), params["pvera_lambda_b"]))


def _delta(params, opts, weight):
    """diag(b) B diag(d_mu) A_mu in merge_dtype(weight)."""
    out_features, in_features = weight.shape
    rank = opts["rank"]
    p = {name: t.to(merge_dtype(weight)) for name, t in params.items()}
    left = p["pvera_lambda_b"][:, None] * p["pvera_B"][:out_features]
    right = p["pvera_lambda_d"][:rank, None] * p["pvera_A"][:rank, :in_features]
    return (left @ right).to(weight.device)


PVERA = AdapterKind(
    name="pvera",
    options={"rank": Option(int, 256, positive=True), "d_initial": Option(float, 0.1),
             "projection_seed": Option(int, 0), "dropout": Option(float, 0.0, bounds=(0.0, 1.0))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: 2 * opts["rank"] + fan_out,
    shared=frozenset({"pvera_A", "pvera_B"}),
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT takes any rank
)
