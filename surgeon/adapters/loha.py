"""LoHa (Hyeon-Woo et al. 2022, FedPara): y = W x + s * ((W1a W1b) ⊙ (W2a W2b)) x, s = alpha / r.

W1a, W2a are out x r and W1b, W2b are r x in; the Hadamard product of two rank-r matrices
has rank up to r^2. Init as PEFT: W1a, W1b, W2a kaiming-uniform and W2b = 0, so the product is
zero and insertion is exact. Merge identity: W x + s (P ⊙ Q) x == (W + s P ⊙ Q) x.
On a linear site where r^2 (in + out) < in * out the forward never builds the out x in delta: by
the face-splitting identity (P ⊙ Q) x = U (D x), D = rows W1b[i] ⊙ W2b[j] (r^2 x in) and
U = columns W1a[:, i] ⊙ W2a[:, j] (out x r^2), so the site is a rank-r^2 LoRA (and `fuse` lowers
it as one). On a conv2d site, and on linear sites too small for that to pay, the delta is built
(on a conv2d site in = in_channels * kh * kw and the delta is applied as a conv with the site's
kernel: PEFT's layout without `use_effective_conv2d`).
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option, aten, merge_dtype
from .lora import kaiming_uniform


def loha_scale(opts: dict) -> float:
    return (opts["alpha"] if opts["alpha"] is not None else opts["rank"]) / opts["rank"]


def _init(opts, in_features, out_features, dtype, gen, weight):
    rank = opts["rank"]
    params = {"hada_w1_a": kaiming_uniform((out_features, rank), gen),
              "hada_w1_b": kaiming_uniform((rank, in_features), gen),
              "hada_w2_a": kaiming_uniform((out_features, rank), gen),
              "hada_w2_b": torch.zeros(rank, in_features)}
    return {name: tensor.to(dtype) for name, tensor in params.items()}


def factored(rank: int, in_features: int, out_features: int) -> bool:
    """Whether a linear site runs LoHa as a rank-r^2 LoRA: its factors, r^2 (in + out) values, are
    fewer than the full delta's in x out."""
    return rank * rank * (in_features + out_features) < in_features * out_features


def _forward(branch, x, y, params, opts):
    rank = opts["rank"]
    if branch.conv_geometry is None and factored(rank, branch.in_features, branch.out_features):
        # face-splitting identity: (P ⊙ Q)[n, k] = sum_ij (W1a[n,i] W2a[n,j]) (W1b[i,k] W2b[j,k]), so
        # (P ⊙ Q) x = U (D x) with D = rows W1b[i] ⊙ W2b[j] (r^2 x in), U = columns W1a[:, i] ⊙ W2a[:, j]
        # (out x r^2), pairs (i, j) in the same order: a rank-r^2 LoRA, no out x in delta per forward
        unsqueeze = lambda t, dim: branch.op(aten.unsqueeze.default, t, dim)  # noqa: E731
        down = branch.op(aten.view.default, branch.mul(unsqueeze(params["hada_w1_b"], 1),
                                                       unsqueeze(params["hada_w2_b"], 0)),
                         [rank * rank, branch.in_features])
        up = branch.op(aten.view.default, branch.mul(unsqueeze(params["hada_w1_a"], 2),
                                                     unsqueeze(params["hada_w2_a"], 1)),
                       [branch.out_features, rank * rank])
        return branch.add(y, branch.linear(branch.linear(x, down), up), alpha=loha_scale(opts))
    # the full-size delta, then one GEMM: y + s * x (P ⊙ Q)^T
    first = branch.mm(params["hada_w1_a"], params["hada_w1_b"])
    second = branch.mm(params["hada_w2_a"], params["hada_w2_b"])
    return branch.add(y, branch.site_map(x, branch.mul(first, second)), alpha=loha_scale(opts))


def _delta(params, opts, weight=None):
    p = {name: t.to(merge_dtype(weight)) for name, t in params.items()}
    return (p["hada_w1_a"] @ p["hada_w1_b"]).mul_(loha_scale(opts)).mul_(p["hada_w2_a"] @ p["hada_w2_b"])


LOHA = AdapterKind(
    name="loha",
    options={"rank": Option(int, 8, positive=True), "alpha": Option((int, float), None)},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: 2 * opts["rank"] * (fan_in + fan_out),
    site_ops=("linear", "addmm", "conv2d"),
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT takes any rank
)
