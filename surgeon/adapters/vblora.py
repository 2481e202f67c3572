"""VB-LoRA (Li et al. 2024, arXiv 2405.15179): LoRA factors mixed from one trained vector bank all sites share.

The adapter holds one bank V of n vectors of length L (n x L, `vblora_vector_bank`), trained and shared:
one nn.Parameter every site reads (`shared_trained`), so its gradient sums the sites' contributions, and
it is counted and saved once. A site with in -> out features (L dividing both) cuts a rank-r LoRA pair
into sub-vectors of length L, A (r x in) into r x in/L of them and B (out x r) into out/L x r, and trains
one logit per bank vector for each sub-vector: logits_A (r x in/L x n), logits_B (out/L x r x n). A
sub-vector is a mix of k bank vectors, picked by its top-k logits l_I and weighted by their softmax:

    v = sum_j softmax(l_I)_j V[I_j]          A[i, t L : (t+1) L] = v_A(i, t)
                                             B[t L : (t+1) L, i] = v_B(t, i)

and the update is PEFT's y + B (A dropout(x)) (`dropout`: PEFT's vblora_dropout, train mode only). Only
the k picked logits and bank rows of each sub-vector take gradient (top-k is piecewise constant).

Init, as PEFT's: logits ~ N(0, init_logits_std), bank ~ U(-init_bank_bound, init_bank_bound) (the first
site's draw: the bank is one tensor); B A is not zero, so insertion changes the function. A site trains
n r (in + out) / L logits; the bank adds n L once per adapter.

Merge identity: W x + B A x == (W + B A) x; B A does not depend on W, so unmerge subtracts it.
"""
from __future__ import annotations

import operator

import torch

from . import AdapterKind, EagerBranch, Option, aten, merge_dtype


def _tiles(opts: dict, in_features: int, out_features: int) -> tuple[int, int]:
    """(in / L, out / L), checking that the vector length L divides both."""
    length = opts["vector_length"]
    if in_features % length or out_features % length:
        raise ValueError(f"vblora: vector_length {length} must divide the site's {in_features} input and "
                         f"{out_features} output features")
    if opts["topk"] > opts["num_vectors"]:
        raise ValueError(f"vblora: topk {opts['topk']} exceeds num_vectors {opts['num_vectors']}")
    return in_features // length, out_features // length


def _init(opts, in_features, out_features, dtype, gen, weight):
    rank, count, bound = opts["rank"], opts["num_vectors"], opts["init_bank_bound"]
    tiles_in, tiles_out = _tiles(opts, in_features, out_features)
    std = opts["init_logits_std"]
    return {"vblora_logits_A": (torch.randn(rank, tiles_in, count, generator=gen) * std).to(dtype),
            "vblora_logits_B": (torch.randn(tiles_out, rank, count, generator=gen) * std).to(dtype),
            "vblora_vector_bank": torch.empty(count, opts["vector_length"]).uniform_(-bound, bound, generator=gen)
            .to(dtype)}


def _mix(branch, logits, bank, topk: int):
    """(..., L): each sub-vector's top-k bank vectors weighted by the softmax of their logits."""
    picked = branch.op(aten.topk.default, logits, topk, -1)
    weights = branch.op(aten._softmax.default, branch.op(operator.getitem, picked, 0), -1, False)
    rows = branch.op(aten.index.Tensor, bank, [branch.op(operator.getitem, picked, 1)])    # (..., k, L)
    return branch.op(aten.sum.dim_IntList, branch.mul(branch.op(aten.unsqueeze.default, weights, -1), rows), [-2])


def factors(branch, params, opts) -> tuple:
    """(A: r x in, B: out x r) built from the logits and the bank (graph code; eager with an EagerBranch)."""
    bank, rank = params["vblora_vector_bank"], opts["rank"]
    A = branch.op(aten.reshape.default, _mix(branch, params["vblora_logits_A"], bank, opts["topk"]), [rank, -1])
    B = _mix(branch, params["vblora_logits_B"], bank, opts["topk"])                       # out/L x r x L
    B = branch.op(aten.reshape.default, branch.op(aten.transpose.int, B, 1, 2), [-1, rank])
    return A, B


def _forward(branch, x, y, params, opts):
    A, B = factors(branch, params, opts)
    x = branch.dropout(x, opts.get("dropout", 0.0))
    return branch.add(y, branch.linear(branch.linear(x, A), B))


def _delta(params, opts, weight):
    """B A in merge_dtype(weight), out x in."""
    out_features, in_features = weight.shape
    p = {name: t.to(merge_dtype(weight)) for name, t in params.items()}
    A, B = factors(EagerBranch((in_features, out_features)), p, opts)
    return (B @ A).to(weight.device)


def _count(opts, fan_in, fan_out):
    return opts["num_vectors"] * opts["rank"] * (fan_in + fan_out) // opts["vector_length"]


VBLORA = AdapterKind(
    name="vblora",
    options={"rank": Option(int, 4, positive=True), "num_vectors": Option(int, 256, positive=True),
             "vector_length": Option(int, 256, positive=True), "topk": Option(int, 2, positive=True),
             "init_bank_bound": Option(float, 0.02), "init_logits_std": Option(float, 0.1),
             "dropout": Option(float, 0.0, bounds=(0.0, 1.0))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=_count,
    shared=frozenset({"vblora_vector_bank"}),
    shared_trained=frozenset({"vblora_vector_bank"}),
    shared_count=lambda opts: opts["num_vectors"] * opts["vector_length"],
    init_check=lambda opts: "none",
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT takes any rank
)
