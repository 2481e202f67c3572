"""HiRA (Huang et al. 2025): y = W x + b + (W ⊙ (B A)) x, a Hadamard high-rank update.

A site trains A (r x in) and B (out x r). Their product B A modulates the base weight entry by
entry, so the update W ⊙ (B A) has the rank of W, not r. As in PEFT there is no alpha or scaling
factor: the update is W ⊙ B A exactly. In the graph it is built per forward from the site's own
weight node (out x in: transposed on a GPT-2 Conv1D site) and applied with one GEMM:
y + dropout(x) (W ⊙ B A)^T. `dropout` (PEFT's hira_dropout) drops the branch's input in train mode.

Init (PEFT's init_weights): `default` (True) draws A as nn.Linear's kaiming-uniform and sets B = 0;
`gaussian` draws A ~ N(0, 1/r) (std 1/r), B = 0; both are an exact identity at insert (B A = 0).
`random` (init_weights=False) draws A and B ~ N(0, 1) and changes the function. A site costs
r (in + out) parameters.

Merge identity: W x + (W ⊙ BA) x == (W ⊙ (1 + BA)) x, so W' = W + W ⊙ BA (the delta depends on the
weight it lands on; PEFT's merge is the same). Unmerge divides: W = W' / (1 + BA), refused where
an entry of 1 + BA is 0 (that entry of W is lost in W').
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option, merge_dtype
from .lora import kaiming_uniform


def _init(opts, in_features, out_features, dtype, gen, weight):
    rank = opts["rank"]
    if opts["init"] == "random":
        A = torch.randn(rank, in_features, generator=gen)
        B = torch.randn(out_features, rank, generator=gen)
    else:
        A = kaiming_uniform((rank, in_features), gen) if opts["init"] == "default" \
            else torch.randn(rank, in_features, generator=gen) / rank
        B = torch.zeros(out_features, rank)
    return {"hira_A": A.to(dtype), "hira_B": B.to(dtype)}


def _forward(branch, x, y, params, opts):
    modulation = branch.mm(params["hira_B"], params["hira_A"])            # out x in
    update = branch.mul(branch.base_weight(), modulation)                  # W ⊙ B A
    return branch.add(y, branch.linear(branch.dropout(x, opts.get("dropout", 0.0)), update))


def _product(params, dtype: torch.dtype) -> torch.Tensor:
    return params["hira_B"].to(dtype) @ params["hira_A"].to(dtype)


def _delta(params, opts, weight):
    """W ⊙ B A in merge_dtype(weight)."""
    return _product(params, merge_dtype(weight)).to(weight.device).mul_(weight)


def _undo(params, opts, merged):
    """W' / (1 + BA) - W'."""
    dtype = merge_dtype(merged)
    factor = _product(params, dtype).to(merged.device).add_(1.0)
    if not bool((factor != 0).all()):
        raise ValueError("hira: an entry of 1 + B A is 0, so that entry of the base weight was zeroed by the merge "
                         "and cannot be recovered from the merged weight")
    merged = merged.to(dtype)
    return (merged / factor).sub_(merged)


HIRA = AdapterKind(
    name="hira",
    options={"rank": Option(int, 32, positive=True),
             "init": Option(str, "default", choices=("default", "gaussian", "random")),
             "dropout": Option(float, 0.0, bounds=(0.0, 1.0))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    undo_delta=_undo,
    param_count=lambda opts, fan_in, fan_out: opts["rank"] * (fan_in + fan_out),
    init_check=lambda opts: "none" if opts["init"] == "random" else "exact",
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT takes any rank: W ⊙ B A has W's shape
)
