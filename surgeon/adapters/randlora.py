"""RandLoRA (Albert et al. 2025): y = W x + b + s * dW x, dW a sum of scaled frozen random bases.

A site with `in -> out` features has m = min(in, out), M = max(in, out) and n = ceil(m / r)
random bases of rank r, so that n r >= m and the update can reach full rank. Two random tensors
are shared (`shared`: stored once per adapter and shape, never trained): A (r x 1 x m) and
B (M x n x r). A site trains two scalings, applied to A, the basis on the small side:

    lambda (r x n), one scale per basis and rank;      gamma (n x m), one per basis and feature.

The scaled basis is A'[k, b, j] = lambda[k, b] A[k, 0, j] gamma[b, j], flattened to (r n) x m with
row k n + b; B is flattened to M x (n r) with column b r + k, and P = B_flat A'_flat (M x m) is
PEFT's product, flat index against flat index, as PEFT contracts them (a fixed pairing of random
rows and columns, itself a random basis). dW = P when in <= out, P^T otherwise (out x in), and
s = alpha / r (PEFT's randlora_alpha / r). In the graph, y + s * B_flat (A'_flat x) (in <= out) or
y + s * A'_flat^T (B_flat^T x), two GEMMs through the r n wide middle. `dropout` (PEFT's
randlora_dropout) drops the branch's input in train mode.

A site costs n (r + m) parameters; A and B are frozen and shared, not counted (as VeRA's).

Bases (`basis`, PEFT's sparse / very_sparse flags): a generator seeded with `projection_seed`
(PEFT's projection_prng_key) draws, for a site's own shape, what PEFT draws for a model whose
largest target has that shape: `dense`, A then n slices of B, kaiming-uniform (a = sqrt(5)) in
bfloat16, each tensor divided by its standard deviation; `sparse` / `very_sparse`, uniform draws
of A then B mapped to -1, 0, +1 (the outer 1 / (2 d) of each tail, d = 3 or sqrt(m)), divided by
the standard deviation. An imported PEFT adapter holds one A and B sized for its largest target:
a site reads A[:, :, :m] and B[:M, :n, :], as PEFT does.

Init (PEFT's init_weights): `identity` (True) sets lambda = 0 and gamma = 1 / m: dW = 0 and
y + s * 0 == y, an exact identity; `random` (False) draws lambda ~ N(0, 1) with gamma = 1 / M and
changes the function. Merge identity: W x + s dW x == (W + s dW) x, dW computed in float32 (float64
for a float64 weight: merge_dtype), on linear and GPT-2 Conv1D sites alike (dW is out x in on both).
"""
from __future__ import annotations

import math

import torch

from . import AdapterKind, Option, aten, merge_dtype


def site_sizes(rank: int, in_features: int, out_features: int) -> tuple[int, int, int]:
    """(m, M, n): the small and large side of the site and its number of bases, ceil(m / r)."""
    small, large = min(in_features, out_features), max(in_features, out_features)
    return small, large, -(-small // rank)


def _kaiming_bf16(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=torch.bfloat16)
    return torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=gen)


def _ternary(draw: torch.Tensor, tail: float) -> torch.Tensor:
    """-1 below `tail`, +1 above 1 - tail, 0 elsewhere."""
    out = torch.zeros(draw.shape)
    out[draw < tail] = -1
    out[draw > 1 - tail] = 1
    return out


def bases(opts: dict, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of shapes (r, 1, m) and (M, n, r) for a site's shape, float32, from `projection_seed`."""
    rank = opts["rank"]
    small, large, count = site_sizes(rank, in_features, out_features)
    gen = torch.Generator().manual_seed(opts["projection_seed"])
    if opts["basis"] == "dense":
        A = _kaiming_bf16((rank, 1, small), gen)
        B = torch.cat([_kaiming_bf16((large, 1, rank), gen) for _ in range(count)], 1)
    else:
        tail = 1 / (2 * (3 if opts["basis"] == "sparse" else math.sqrt(small)))
        A = _ternary(torch.rand((rank, 1, small), generator=gen), tail)
        B = _ternary(torch.rand((large, count, rank), generator=gen), tail)
    return (A / A.std()).float(), (B / B.std()).float()


def _init(opts, in_features, out_features, dtype, gen, weight):
    rank = opts["rank"]
    small, large, count = site_sizes(rank, in_features, out_features)
    A, B = bases(opts, in_features, out_features)
    if opts["init"] == "random":
        scale = torch.randn(rank, count, generator=gen)
        gamma = torch.full((count, small), 1.0 / large)
    else:
        scale = torch.zeros(rank, count)
        gamma = torch.full((count, small), 1.0 / max(count, small))
    return {"randlora_A": A.to(dtype), "randlora_B": B.to(dtype),
            "randlora_lambda": scale.to(dtype), "randlora_gamma": gamma.to(dtype)}


def _factors(branch, params, rank: int, in_features: int, out_features: int):
    """(A'_flat (r n x m), B_flat (M x n r)) from the (possibly larger, shared) bases."""
    small, large, count = site_sizes(rank, in_features, out_features)
    A = branch.op(aten.slice.Tensor, params["randlora_A"], 2, 0, small)
    B = branch.op(aten.slice.Tensor, params["randlora_B"], 0, 0, large)
    B = branch.op(aten.slice.Tensor, B, 1, 0, count)
    scaled = branch.mul(branch.mul(branch.op(aten.unsqueeze.default, params["randlora_lambda"], -1), A),
                        branch.op(aten.unsqueeze.default, params["randlora_gamma"], 0))
    return (branch.op(aten.flatten.using_ints, scaled, 0, 1), branch.op(aten.flatten.using_ints, B, 1, 2))


def _forward(branch, x, y, params, opts):
    in_features, out_features = branch.in_features, branch.out_features
    scaled, basis = _factors(branch, params, opts["rank"], in_features, out_features)
    x = branch.dropout(x, opts.get("dropout", 0.0))
    if in_features <= out_features:
        up = branch.linear(branch.linear(x, scaled), basis)
    else:
        up = branch.linear(branch.linear(x, branch.op(aten.t.default, basis)), branch.op(aten.t.default, scaled))
    return branch.add(y, up, alpha=opts["alpha"] / opts["rank"])


def _delta(params, opts, weight):
    """s dW in merge_dtype(weight), out x in."""
    out_features, in_features = weight.shape
    small, large, count = site_sizes(opts["rank"], in_features, out_features)
    p = {name: t.to(merge_dtype(weight)) for name, t in params.items()}
    A, B = p["randlora_A"][:, :, :small], p["randlora_B"][:large, :count, :]
    scaled = p["randlora_lambda"][:, :, None] * A * p["randlora_gamma"][None]
    product = B.flatten(1) @ scaled.flatten(0, 1)          # M x m
    delta = product if in_features <= out_features else product.T
    return delta.to(weight.device) * (opts["alpha"] / opts["rank"])


def _count(opts, fan_in, fan_out):
    small, _, count = site_sizes(opts["rank"], fan_in, fan_out)
    return count * (opts["rank"] + small)


RANDLORA = AdapterKind(
    name="randlora",
    options={"rank": Option(int, 32, positive=True), "alpha": Option(float, 640.0),
             "projection_seed": Option(int, 0),
             "basis": Option(str, "dense", choices=("dense", "sparse", "very_sparse")),
             "init": Option(str, "identity", choices=("identity", "random")),
             "dropout": Option(float, 0.0, bounds=(0.0, 1.0))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=_count,
    shared=frozenset({"randlora_A", "randlora_B"}),
    init_check=lambda opts: "exact" if opts["init"] == "identity" else "none",
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT takes any rank (one basis past min(in, out))
)
