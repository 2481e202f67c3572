"""AdaLoRA (Zhang et al. 2023): y + s · B diag(E) A x, a low-rank update in SVD form.

A site holds A (r x in, the right singular vectors' role), E (r x 1, the singular values) and
B (out x r, the left ones). The scale divides by the rank the adapter started with:

    s = alpha / (ranknum + 1e-5)

with ranknum (the `ranknum` option; unset: `rank`) PEFT's ranknum, its initial rank init_r, and
the 1e-5 PEFT's guard, kept so an import gives PEFT's numbers. The graph computes PEFT's order:
dropout(x) through (A ⊙ E) (E scales each row of A), then B, then s. `dropout` is PEFT's
lora_dropout (the branch input, train mode only).

Rank pruning: PEFT's RankAllocator zeroes entries of E during training and records, per module, a
mask of the init_r ranks it keeps (the config's rank_pattern). A saved checkpoint holds only the kept
rows of A and E and columns of B, while the divisor stays init_r. So an imported pruned module is a
site with `rank` = the kept count and `ranknum` = init_r; a module with no rank left adds nothing and
gets no site. A zeroed E entry that a checkpoint still holds simply contributes nothing.

Training: surgeon trains AdaLoRA as a fixed-rank SVD-form adapter: A, E and B take gradients at the
rank they have. The budget schedule (the RankAllocator's importance scores, masking and rank_pattern
updates) and PEFT's orthogonality regularizer on A and B (a term of the training loss, not of the
forward) are not run; a new adapter keeps every rank.

Init (PEFT's init_lora_weights=True): E = 0, A and B ~ N(0, 0.02). E = 0 makes A ⊙ E exact zeros,
so the insert is the identity bit for bit. A site trains r (in + out + 1) parameters.

Merge: ΔW = s · B (A ⊙ E) does not depend on the weight it lands on, so the merge adds it and
unmerge subtracts it, as in PEFT.
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option, merge_dtype

EPSILON = 1e-5   # PEFT adds this to ranknum before dividing
INIT_STD = 0.02  # PEFT's normal init of A and B


def scale(opts: dict) -> float:
    """alpha / (ranknum + 1e-5), ranknum defaulting to the site's rank."""
    ranknum = opts.get("ranknum") or opts["rank"]
    return float(opts["alpha"]) / (ranknum + EPSILON)


def _init(opts, in_features, out_features, dtype, gen, weight):
    rank = opts["rank"]
    return {"adalora_A": (torch.randn(rank, in_features, generator=gen) * INIT_STD).to(dtype),
            "adalora_E": torch.zeros(rank, 1, dtype=dtype),
            "adalora_B": (torch.randn(out_features, rank, generator=gen) * INIT_STD).to(dtype)}


def _forward(branch, x, y, params, opts):
    scaled_rows = branch.mul(params["adalora_A"], params["adalora_E"])   # A ⊙ E: row i times E_i
    h = branch.linear(branch.dropout(x, opts.get("dropout", 0.0)), scaled_rows)
    return branch.add(y, branch.linear(h, params["adalora_B"]), alpha=scale(opts))   # add's alpha: the scale


def _delta(params, opts, weight):
    """s · B (A ⊙ E) in merge_dtype(weight) (its value does not depend on `weight`)."""
    p = {name: t.to(merge_dtype(weight)) for name, t in params.items()}
    delta = (p["adalora_B"] @ (p["adalora_A"] * p["adalora_E"])).mul_(scale(opts))
    return delta if weight is None else delta.to(weight.device)


ADALORA = AdapterKind(
    name="adalora",
    options={"rank": Option(int, 12, positive=True),
             "alpha": Option((int, float), 8.0),
             "ranknum": Option(int, None, positive=True),
             "dropout": Option(float, 0.0, bounds=(0.0, 1.0))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: opts["rank"] * (fan_in + fan_out + 1),
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT bounds no init_r
)
