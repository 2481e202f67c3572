"""GraLoRA (Jung et al. 2025): granular low-rank adaptation, y + s (ΔW_blocks + B_h A_h) x.

The input splits into k chunks x_1..x_k (in / k each) and the output into k chunks (out / k each),
k = `blocks` (PEFT's gralora_k, dividing in, out and the rank r). Chunk n of the input has its own
projection A_n (in / k -> r); its r values split into k groups of r / k, and group j of every input
chunk is routed to output chunk j:

    h_n = A_n^T x_n                      (r values, as k groups h_{n,1..k} of r / k)
    g_j = [h_{1,j}, h_{2,j}, ..., h_{k,j}]   (r values gathered for output chunk j)
    out_j = B_j^T g_j                    (out / k values)

so block (j, n) of ΔW (out x in) is a rank-r/k product of slices of B_j and A_n: k² independent
low-rank blocks from the same r (in + out) parameters as a rank-r LoRA. Parameters are kept in
PEFT's layout: gralora_A is k x (in / k) x r and gralora_B is k x r x (out / k). An optional
`hybrid_rank` h adds a plain LoRA (gralora_A_general h x in, gralora_B_general out x h) on the
whole input. The scale is s = alpha / (r + h). `dropout` (PEFT's gralora_dropout) drops the branch
input in train mode.

Init (PEFT's init_weights): `default` (True) draws every A kaiming-uniform and sets every B = 0, an
exact identity at insert; `random` (False) draws B kaiming-uniform too and changes the function. A
site trains (r + h)(in + out) parameters.

Merge: ΔW does not depend on W, so the merge adds s ΔW and unmerge subtracts it, as in PEFT.
"""
from __future__ import annotations

import torch

from . import AdapterKind, EagerBranch, Option, aten, merge_dtype
from .lora import kaiming_uniform


def _split(opts: dict, in_features: int, out_features: int) -> tuple[int, int, int]:
    """(k, in / k, out / k), checking that k divides the rank and both sides."""
    k, rank = opts["blocks"], opts["rank"]
    if rank % k or in_features % k or out_features % k:
        raise ValueError(f"gralora: blocks {k} must divide the rank {rank} and the site's {in_features} input and "
                         f"{out_features} output features")
    return k, in_features // k, out_features // k


def _init(opts, in_features, out_features, dtype, gen, weight):
    k, chunk_in, chunk_out = _split(opts, in_features, out_features)
    rank, hybrid, random = opts["rank"], opts["hybrid_rank"], opts["init"] == "random"
    # each block drawn as nn.Linear's kaiming-uniform over its own fan-in, then put in PEFT's layout
    A = torch.stack([kaiming_uniform((rank, chunk_in), gen) for _ in range(k)]).transpose(1, 2)
    B = torch.stack([kaiming_uniform((chunk_out, rank), gen) if random else torch.zeros(chunk_out, rank)
                     for _ in range(k)]).transpose(1, 2)
    params = {"gralora_A": A.contiguous().to(dtype), "gralora_B": B.contiguous().to(dtype)}
    if hybrid:
        params["gralora_A_general"] = kaiming_uniform((hybrid, in_features), gen).to(dtype)
        params["gralora_B_general"] = (kaiming_uniform((out_features, hybrid), gen) if random
                                       else torch.zeros(out_features, hybrid)).to(dtype)
    return params


def _scale(opts: dict) -> float:
    return opts["alpha"] / (opts["rank"] + opts["hybrid_rank"])


def _blocks(branch, x, params, opts, in_features: int, out_features: int):
    """The block part ΔW_blocks x for x (..., in), unscaled (graph code; eager on tensors)."""
    k, chunk_in, _ = _split(opts, in_features, out_features)
    sub = opts["rank"] // k
    chunks = branch.op(aten.unsqueeze.default, branch.op(aten.unflatten.int, x, -1, [k, chunk_in]), -2)
    h = branch.op(aten.matmul.default, chunks, params["gralora_A"])                 # (..., k_n, 1, r)
    h = branch.op(aten.unflatten.int, branch.op(aten.squeeze.dim, h, -2), -1, [k, sub])   # (..., k_n, k_j, r/k)
    gathered = branch.op(aten.flatten.using_ints, branch.op(aten.transpose.int, h, -3, -2), -2, -1)  # (..., k_j, r)
    out = branch.op(aten.matmul.default, branch.op(aten.unsqueeze.default, gathered, -2), params["gralora_B"])
    return branch.op(aten.flatten.using_ints, out, -3, -1)                          # (..., out)


def _forward(branch, x, y, params, opts):
    x = branch.dropout(x, opts.get("dropout", 0.0))
    update = _blocks(branch, x, params, opts, branch.in_features, branch.out_features)
    if opts["hybrid_rank"]:
        hybrid = branch.linear(branch.linear(x, params["gralora_A_general"]), params["gralora_B_general"])
        update = branch.add(update, hybrid)
    return branch.add(y, update, alpha=_scale(opts))


def _delta(params, opts, weight):
    """s (ΔW_blocks + B_h A_h) in merge_dtype(weight): the block map run on the identity, transposed."""
    out_features, in_features = weight.shape
    dtype = merge_dtype(weight)
    p = {name: t.to(dtype) for name, t in params.items()}
    eye = torch.eye(in_features, dtype=dtype, device=p["gralora_A"].device)
    delta = _blocks(EagerBranch((in_features, out_features)), eye, p, opts, in_features, out_features).T
    if opts["hybrid_rank"]:
        delta = delta + p["gralora_B_general"] @ p["gralora_A_general"]
    return delta.mul_(_scale(opts)).to(weight.device)


GRALORA = AdapterKind(
    name="gralora",
    options={"rank": Option(int, 32, positive=True),
             "alpha": Option(float, 64.0),
             "blocks": Option(int, 2, positive=True),
             "hybrid_rank": Option(int, 0, bounds=(0, float("inf"))),
             "init": Option(str, "default", choices=("default", "random")),
             "dropout": Option(float, 0.0, bounds=(0.0, 1.0))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: (opts["rank"] + opts["hybrid_rank"]) * (fan_in + fan_out),
    init_check=lambda opts: "none" if opts["init"] == "random" else "exact",
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT takes any rank
)
