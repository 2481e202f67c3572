"""OSF (orthogonal subspace fine-tuning): W's top singular directions frozen, the rest trained.

The site's weight splits by its SVD into a high part, the top k = `effective_rank` triplets, and a
low part, the other m = min(in, out) - k:

    W = U_h S_h V_h^T + U_0 S_0 V_0^T

The low factors U (out x m), S (m) and V (m x in) are trained from U_0, S_0, V_0; the adapted weight
is W + U S V - U_0 S_0 V_0 = U_h S_h V_h^T + U S V (PEFT's form: the base keeps W and the branch adds
the difference, so the base weight is never rewritten). The graph computes both low products from
the input, y + ((x V^T) S) U^T - ((x V_0^T) S_0) U_0^T, which cancel bit for bit at insert: an exact
identity. Training keeps the update off the high subspace: the gradients of U and V are projected
orthogonally to span(U_h) and span(V_h) (PEFT's gradient hooks; here `orthogonal_grad`, the identity
in the forward). U_0, S_0, V_0, U_h and V_h are frozen; like PEFT (which saves only U, S, V) they are
rebuilt from the site's weight when a PEFT checkpoint is loaded (AdapterKind.recomputed).

`effective_rank` (PEFT's): None for min(in, out) // 2, a float in (0, 1] for that fraction of
min(in, out), an integer for itself; PEFT's rank_pattern gives per-module values. The SVD is
torch.linalg.svd in float32, as PEFT's. `init: random` (PEFT's init_weights=False) draws U, S, V
from N(0, 1) and changes the function. A site trains m (out + in + 1) parameters.

Merge: ΔW = U S V - U_0 S_0 V_0 does not depend on the weight it lands on, so the merge adds it and
unmerge subtracts it (PEFT refuses unmerge: it keeps no copy of the base; surgeon keeps U_0 S_0 V_0).
Linear and GPT-2 Conv1D sites (PEFT's OSF takes only nn.Linear, so PEFT parity is on linear sites).
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option, merge_dtype

TRAINED = ("osf_U", "osf_S", "osf_V")
FROZEN = ("osf_U0", "osf_S0", "osf_V0", "osf_U_high", "osf_V_high")


def resolve_rank(value, in_features: int, out_features: int) -> int:
    """PEFT's effective rank for a site: None -> half of min(in, out), a float in (0, 1] -> that fraction,
    else the integer, at most min(in, out)."""
    smaller = min(in_features, out_features)
    if value is None:
        return smaller // 2
    if isinstance(value, float) and 0 < value <= 1:
        return int(smaller * value)
    return max(min(smaller, int(value)), 0)


def _sizes(opts, in_features: int, out_features: int) -> tuple[int, int]:
    """(k, m): the frozen and the trained ranks of a site."""
    k = resolve_rank(opts["effective_rank"], in_features, out_features)
    m = min(in_features, out_features) - k
    if k <= 0 or m <= 0:
        raise ValueError(f"osf: effective_rank {opts['effective_rank']!r} keeps {k} of the site's "
                         f"{min(in_features, out_features)} singular directions; it must keep at least one and leave "
                         "at least one to train")
    return k, m


def _init(opts, in_features, out_features, dtype, gen, weight):
    k, m = _sizes(opts, in_features, out_features)
    if weight.is_meta:   # shapes only
        U, S, Vh = (torch.empty(out_features, k + m, device="meta"), torch.empty(k + m, device="meta"),
                    torch.empty(k + m, in_features, device="meta"))
    else:
        U, S, Vh = torch.linalg.svd(weight.detach().to(torch.float64 if weight.dtype == torch.float64
                                                       else torch.float32), full_matrices=False)
    low = {"osf_U0": U[:, k:], "osf_S0": S[k:], "osf_V0": Vh[k:]}
    if opts["init"] == "random":
        trained = {"osf_U": torch.randn(out_features, m, generator=gen), "osf_S": torch.randn(m, generator=gen),
                   "osf_V": torch.randn(m, in_features, generator=gen)}
    else:
        trained = {"osf_U": low["osf_U0"], "osf_S": low["osf_S0"], "osf_V": low["osf_V0"]}
    params = {**trained, **low, "osf_U_high": U[:, :k], "osf_V_high": Vh[:k]}
    return {name: t.contiguous().to(dtype) for name, t in params.items()}


class _Orthogonal(torch.autograd.Function):
    """The factor itself; its gradient without its part along the frozen basis."""

    @staticmethod
    def forward(ctx, factor, basis, left):
        ctx.save_for_backward(basis)
        ctx.left = left
        return factor.view_as(factor)

    @staticmethod
    def backward(ctx, grad):
        basis, = ctx.saved_tensors
        if ctx.left:   # U (out x m) against U_h (out x k): (I - U_h U_h^T) grad
            return grad - basis @ (basis.T @ grad), None, None
        return grad - (grad @ basis.T) @ basis, None, None   # V (m x in) against V_h (k x in)


def orthogonal_grad(factor: torch.Tensor, basis: torch.Tensor, left: bool) -> torch.Tensor:
    """`factor` unchanged, with its gradient projected off span(basis): the columns of `basis` when `left`
    (U against U_h), its rows otherwise (V against V_h); OSF's training rule (a graph node's target)."""
    return _Orthogonal.apply(factor, basis, left)


def _low_product(branch, x, U, S, V):
    """((x V^T) S) U^T."""
    return branch.linear(branch.mul(branch.linear(x, V), S), U)


def _projected(branch, factor, basis, left: bool):
    node = branch.op(orthogonal_grad, factor, basis, left)
    if "val" in getattr(factor, "meta", {}):
        node.meta["val"] = factor.meta["val"]
    return node


def _forward(branch, x, y, params, opts):
    U = _projected(branch, params["osf_U"], params["osf_U_high"], True)
    V = _projected(branch, params["osf_V"], params["osf_V_high"], False)
    trained = _low_product(branch, x, U, params["osf_S"], V)
    initial = _low_product(branch, x, params["osf_U0"], params["osf_S0"], params["osf_V0"])
    return branch.add(y, branch.op(torch.ops.aten.sub.Tensor, trained, initial))


def _delta(params, opts, weight):
    """U S V - U_0 S_0 V_0 in merge_dtype(weight) (its value does not depend on `weight`)."""
    p = {name: params[name].to(merge_dtype(weight)) for name in TRAINED + FROZEN[:3]}
    delta = (p["osf_U"] * p["osf_S"]) @ p["osf_V"] - (p["osf_U0"] * p["osf_S0"]) @ p["osf_V0"]
    return delta if weight is None else delta.to(weight.device)


def _count(opts, fan_in, fan_out) -> int:
    _, m = _sizes(opts, fan_in, fan_out)
    return m * (fan_out + fan_in + 1)


OSF = AdapterKind(
    name="osf",
    options={"effective_rank": Option((int, float), None, positive=True),
             "init": Option(str, "default", choices=("default", "random"))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=_count,
    frozen=frozenset(FROZEN),
    recomputed=frozenset(FROZEN),
    init_check=lambda opts: "none" if opts["init"] == "random" else "exact",
    rank_limit=lambda opts, fan_in, fan_out: None,   # no `rank` option: effective_rank is checked per site
)
