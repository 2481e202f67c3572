"""PSOFT (principal-subspace orthogonal fine-tuning): y + s B (R - I) A x with A, B frozen from W's SVD.

For a site with weight W (out x in) and rank r, the top r singular triplets W ~ U_r S_r V_r^T fix
two frozen factors (`ab_init`, PEFT's ab_svd_init), with s = alpha / r the scaling:

- psoft (default): A = V_r^T (r x in, orthonormal rows), B = U_r diag(S_r / s) (out x r);
- pissa: A = diag(sqrt(S_r / s)) V_r^T, B = U_r diag(sqrt(S_r / s)).

Only the r x r matrix R between them trains: ΔW = s B (R - I) A, so W + ΔW rotates W's principal
subspace and leaves the rest alone. With `orth` (default) R = diag(b) C diag(a), C the Cayley map
(I + Q)(I - Q)^-1 of a skew Q whose r (r - 1) / 2 upper entries are trained (`psoft_R`), or PEFT's
truncated Neumann series of it (`use_cayley_neumann`, `num_cayley_neumann_terms`; with
`cayley_neumann_eps` Q is first scaled down to that Frobenius norm when it is larger); without
`orth` R is a free r x r matrix times the same vectors. a (`mag_a`) and b (`mag_b`) are optional
trained vectors of r scales on R's input and output side. The SVD is torch.linalg.svd (`svd: full`)
or torch.svd_lowrank with `lowrank_niter` power iterations, seeded by `seed` (`svd: lowrank`),
computed in float32 as PEFT computes it.

Graph: h = dropout(x) A^T, then y + s ((h R^T - h) B^T). `dropout` is PEFT's psoft_dropout.

Init (PEFT's init_weights): `default` sets Q = 0 (or R = I without `orth`) and both vectors to 1:
R = I and the branch adds exact zeros. `random` draws Q ~ N(0, 0.1) (R = I + N(0, 0.1) without
`orth`) and changes the function. A site trains r (r - 1) / 2 (r^2 without `orth`) parameters
plus r per vector; A and B are frozen and, like PEFT (which saves neither), rebuilt from the
site's weight when a PEFT checkpoint is loaded (AdapterKind.recomputed).

Merge: ΔW = s B (R - I) A does not depend on the weight it lands on (A and B were fixed at insert),
so the merge adds it and unmerge subtracts it, as in PEFT. Linear and GPT-2 Conv1D sites (PEFT's
PSOFT takes only nn.Linear, so PEFT parity is on linear sites).
"""
from __future__ import annotations

import torch

from . import AdapterKind, EagerBranch, Option, aten, merge_dtype
from .rotations import cayley_neumann, identity, skew_from_upper


def svd_factors(weight: torch.Tensor, opts: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r, S_r, V_r^T) of the out x in weight, in float32 (float64 for a float64 weight)."""
    rank = opts["rank"]
    W = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
    if opts["svd"] == "full":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    # torch.svd_lowrank draws a random projection from the global generator: a forked one, seeded
    fork = {"devices": []} if W.device.type == "cpu" else {"devices": [W.device], "device_type": W.device.type}
    with torch.random.fork_rng(**fork):
        torch.manual_seed(opts["seed"])
        U, S, V = torch.svd_lowrank(W, q=rank, niter=opts["lowrank_niter"])
    return U[:, :rank], S[:rank], V[:, :rank].T


def _scaling(opts: dict) -> float:
    return opts["alpha"] / opts["rank"]


def _init(opts, in_features, out_features, dtype, gen, weight):
    rank = opts["rank"]
    if weight.is_meta:   # shapes only (no values to decompose)
        A, B = torch.empty(rank, in_features, device="meta"), torch.empty(out_features, rank, device="meta")
    else:
        U, S, Vh = svd_factors(weight, opts)
        scaled = S / _scaling(opts)
        if opts["ab_init"] == "psoft":
            A, B = Vh, U * scaled
        else:
            root = scaled.sqrt()
            A, B = root[:, None] * Vh, U * root
    if opts["orth"]:
        R = torch.zeros(rank * (rank - 1) // 2)
        if opts["init"] == "random":
            R = torch.randn(R.shape, generator=gen) * 0.1
    else:
        R = torch.eye(rank)
        if opts["init"] == "random":
            R = R + torch.randn(R.shape, generator=gen) * 0.1
    params = {"psoft_A": A.contiguous().to(dtype), "psoft_B": B.contiguous().to(dtype), "psoft_R": R.to(dtype)}
    for side in ("a", "b"):
        if opts[f"mag_{side}"]:
            params[f"psoft_vector_{side}"] = torch.ones(rank, dtype=dtype)
    return params


def _bounded(branch, skew, eps: float):
    """PEFT's cayley_neumann_eps: Q scaled to Frobenius norm eps where its norm is finite and larger."""
    norm = branch.op(aten.linalg_vector_norm.default, skew, 2)
    shrink = branch.op(aten.logical_and.default, branch.op(aten.isfinite.default, norm),
                       branch.op(aten.gt.Scalar, norm, eps))
    factor = branch.mul(branch.op(aten.reciprocal.default, branch.add(norm, 1e-12)), eps)
    return branch.mul(skew, branch.op(aten.where.ScalarOther, shrink, factor, 1.0))


def rotation_matrix(branch, params, opts):
    """R (r x r): diag(b) C diag(a), C the Cayley map of the trained skew matrix (or the free matrix)."""
    rank, packed = opts["rank"], params["psoft_R"]
    if opts["orth"]:
        skew = skew_from_upper(branch, packed, 1, rank)
        if opts["use_cayley_neumann"]:
            if opts["cayley_neumann_eps"] is not None:
                skew = _bounded(branch, skew, opts["cayley_neumann_eps"])
            R = cayley_neumann(branch, skew, packed, 1, rank, opts["num_cayley_neumann_terms"])
        else:   # (I + Q)(I - Q)^-1
            eye = identity(branch, packed, 1, rank)
            R = branch.op(aten.linalg_solve.default, branch.op(aten.sub.Tensor, eye, skew), branch.add(eye, skew),
                          left=False)
        R = branch.op(aten.view.default, R, [rank, rank])
    else:
        R = packed
    if opts["mag_b"]:
        R = branch.mul(branch.op(aten.unsqueeze.default, params["psoft_vector_b"], 1), R)
    if opts["mag_a"]:
        R = branch.mul(R, params["psoft_vector_a"])
    return R


def _forward(branch, x, y, params, opts):
    h = branch.linear(branch.dropout(x, opts.get("dropout", 0.0)), params["psoft_A"])
    turned = branch.op(aten.sub.Tensor, branch.linear(h, rotation_matrix(branch, params, opts)), h)
    return branch.add(y, branch.mul(branch.linear(turned, params["psoft_B"]), _scaling(opts)))


def _delta(params, opts, weight):
    """s B (R - I) A in merge_dtype(weight) (its value does not depend on `weight`)."""
    p = {name: t.to(merge_dtype(weight)) for name, t in params.items()}
    R = rotation_matrix(EagerBranch((0, 0)), p, opts)
    R = R - torch.eye(opts["rank"], dtype=R.dtype, device=R.device)
    delta = (p["psoft_B"] @ R @ p["psoft_A"]).mul_(_scaling(opts))
    return delta if weight is None else delta.to(weight.device)


def _count(opts, fan_in, fan_out) -> int:
    rank = opts["rank"]
    return (rank * (rank - 1) // 2 if opts["orth"] else rank * rank) + rank * (opts["mag_a"] + opts["mag_b"])


PSOFT = AdapterKind(
    name="psoft",
    options={"rank": Option(int, 32, positive=True), "alpha": Option((int, float), 32, positive=True),
             "dropout": Option(float, 0.0, bounds=(0.0, 1.0)),
             "ab_init": Option(str, "psoft", choices=("psoft", "pissa")),
             "svd": Option(str, "full", choices=("full", "lowrank")),
             "lowrank_niter": Option(int, 10, positive=True), "seed": Option(int, 0),
             "orth": Option(bool, True), "mag_a": Option(bool, True), "mag_b": Option(bool, True),
             "use_cayley_neumann": Option(bool, False), "num_cayley_neumann_terms": Option(int, 5, positive=True),
             "cayley_neumann_eps": Option(float, None, bounds=(0.0, 1.0)),
             "init": Option(str, "default", choices=("default", "random"))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=_count,
    frozen=frozenset({"psoft_A", "psoft_B"}),
    recomputed=frozenset({"psoft_A", "psoft_B"}),
    init_check=lambda opts: "none" if opts["init"] == "random" else "exact",
)
