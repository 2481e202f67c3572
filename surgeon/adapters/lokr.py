"""LoKr (Yeh et al. 2024, LyCORIS): y = W x + s * (W1 ⊗ W2) x, s = alpha / r.

out = a * c and in = b * d are each split into two factors near their square roots (PEFT's
`factorization`, with `decompose_factor` as an upper bound on the first); W1 is a x b and W2 is
c x d, so W1 ⊗ W2 is out x in. Either factor is a full matrix or, when the rank is below half
its larger side, a rank-r product (W2 = W2a W2b always so; W1 = W1a W1b only with
`decompose_both`). Init as PEFT: W1 (or W1a) = 0 by default, W2 (or W2b) = 0 with
`init: lycoris`; either way the product is zero and insertion is exact.
Merge identity: W x + s (W1 ⊗ W2) x == (W + s W1 ⊗ W2) x. On a linear site the forward never builds
W1 ⊗ W2: with x read as a b x d matrix X, (W1 ⊗ W2) x = W1 X W2^T read row-major. On a conv2d site
in = in_channels * kh * kw and the Kronecker delta is built and applied as a conv with the site's
kernel.
"""
from __future__ import annotations

import math

import torch

from . import AdapterKind, Option, aten, merge_dtype
from .lora import kaiming_uniform


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n == dimension: `factor` itself when it divides, else m the largest divisor
    not above sqrt(dimension) nor above `factor` (PEFT's and LyCORIS's rule)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    best = 1
    for m in range(1, math.isqrt(dimension) + 1):
        if dimension % m == 0 and m <= limit:
            best = m
    return best, dimension // best


def lokr_shapes(opts: dict, in_features: int, out_features: int) -> dict[str, tuple[int, int]]:
    """Parameter name -> shape for one site."""
    rank = opts["rank"]
    out_a, out_c = factorization(out_features, opts["decompose_factor"])
    in_b, in_d = factorization(in_features, opts["decompose_factor"])
    shapes = {}
    if opts["decompose_both"] and rank < max(out_a, in_b) / 2:
        shapes.update(lokr_w1_a=(out_a, rank), lokr_w1_b=(rank, in_b))
    else:
        shapes["lokr_w1"] = (out_a, in_b)
    if rank < max(out_c, in_d) / 2:
        shapes.update(lokr_w2_a=(out_c, rank), lokr_w2_b=(rank, in_d))
    else:
        shapes["lokr_w2"] = (out_c, in_d)
    return shapes


def _init(opts, in_features, out_features, dtype, gen, weight):
    # the factor that starts at zero: W1 (or W1a) by default, W2 (or W2b) with init: lycoris
    zero = {"lokr_w2", "lokr_w2_b"} if opts["init"] == "lycoris" else {"lokr_w1", "lokr_w1_a"}
    return {name: (torch.zeros(shape) if name in zero else kaiming_uniform(shape, gen)).to(dtype)
            for name, shape in lokr_shapes(opts, in_features, out_features).items()}


def _scale(opts: dict) -> float:
    return (opts["alpha"] if opts["alpha"] is not None else opts["rank"]) / opts["rank"]


def _factor(params: dict, which: str, matmul):
    full = params.get(f"lokr_{which}")
    return full if full is not None else matmul(params[f"lokr_{which}_a"], params[f"lokr_{which}_b"])


def _forward(branch, x, y, params, opts):
    if branch.conv_geometry is None:
        return branch.add(y, _kron_apply(branch, x, params, opts), alpha=_scale(opts))
    kron = branch.op(aten.kron.default, _factor(params, "w1", branch.mm), _factor(params, "w2", branch.mm))
    return branch.add(y, branch.site_map(x, kron), alpha=_scale(opts))


def _kron_apply(branch, x, params, opts):
    """(W1 ⊗ W2) x without the out x in matrix: with x's in = b * d values read as a b x d matrix X
    (row-major), (W1 ⊗ W2) x is W1 X W2^T read back row-major (a x c). Costs b c (a + d) multiplies
    per row where the Kronecker matrix costs a b c d, and nothing per forward to build."""
    in_b, in_d = factorization(branch.in_features, opts["decompose_factor"])
    rows = branch.op(aten.unflatten.int, x, -1, [in_b, in_d])                         # (..., b, d)
    if "lokr_w2" in params:
        right = branch.linear(rows, params["lokr_w2"])                                  # X W2^T: (..., b, c)
    else:
        right = branch.linear(branch.linear(rows, params["lokr_w2_b"]), params["lokr_w2_a"])
    # W1 from the left as a linear over the transposed pair (one GEMM over all rows, not a batch of
    # small ones): (X W2^T)^T W1^T = (W1 X W2^T)^T, (..., c, a), transposed back and flattened (a copy)
    columns = branch.op(aten.transpose.int, right, -2, -1)                                  # (..., c, b)
    if "lokr_w1" in params:
        both = branch.linear(columns, params["lokr_w1"])                                    # (..., c, a)
    else:
        both = branch.linear(branch.linear(columns, params["lokr_w1_b"]), params["lokr_w1_a"])
    return branch.op(aten.flatten.using_ints, branch.op(aten.transpose.int, both, -2, -1), -2, -1)


def _delta(params, opts, weight=None):
    p = {name: t.to(merge_dtype(weight)) for name, t in params.items()}
    return torch.kron(_factor(p, "w1", torch.mm), _factor(p, "w2", torch.mm)).mul_(_scale(opts))


LOKR = AdapterKind(
    name="lokr",
    options={"rank": Option(int, 8, positive=True), "alpha": Option((int, float), None),
             "decompose_both": Option(bool, False), "decompose_factor": Option(int, -1),
             "init": Option(str, "default", choices=("default", "lycoris"))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: sum(a * b for a, b in lokr_shapes(opts, fan_in, fan_out).values()),
    site_ops=("linear", "addmm", "conv2d"),
    rank_limit=lambda opts, fan_in, fan_out: None,   # PEFT takes any rank (a large one keeps full factors)
)
