"""LoHa (Hyeon-Woo et al. 2022, FedPara): y = W x + s * ((W1a W1b) ⊙ (W2a W2b)) x, s = alpha / r.

W1a, W2a are out x r and W1b, W2b are r x in; the Hadamard product of two rank-r matrices
has rank up to r^2. Init as PEFT: W1a, W1b, W2a kaiming-uniform and W2b = 0, so the product is
zero and insertion is exact. Merge identity: W x + s (P ⊙ Q) x == (W + s P ⊙ Q) x.
On a conv2d site in = in_channels * kh * kw and the delta is applied as a conv with the site's
kernel (PEFT's layout without `use_effective_conv2d`).
"""
from __future__ import annotations

import torch

from . import AdapterKind, Option
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


def _forward(branch, x, y, params, opts):
    # the full-size delta, then one GEMM: y + s * x (P ⊙ Q)^T
    first = branch.mm(params["hada_w1_a"], params["hada_w1_b"])
    second = branch.mm(params["hada_w2_a"], params["hada_w2_b"])
    return branch.add(y, branch.site_map(x, branch.mul(first, second)), alpha=loha_scale(opts))


def _delta(params, opts, weight=None):
    p = {name: t.double() for name, t in params.items()}
    return loha_scale(opts) * (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])


LOHA = AdapterKind(
    name="loha",
    options={"rank": Option(int, 8, positive=True), "alpha": Option((int, float), None)},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: 2 * opts["rank"] * (fan_in + fan_out),
    site_ops=("linear", "addmm", "conv2d"),
)
