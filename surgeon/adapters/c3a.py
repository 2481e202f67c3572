"""C3A (Chen et al. 2025): y + (ΔW / in) x, ΔW made of circulant blocks (block circular convolution).

With block size b (dividing in and out), the site trains one length-b kernel per block of the
out x in weight: `c3a_kernel` is (out / b) x (in / b) x b. Block (i, j) of ΔW is the b x b circulant
matrix of kernel w = c3a_kernel[i, j] in PEFT's orientation,

    C(w)[u, t] = w[(t - u) mod b]        (row u is w rotated right by u),

i.e. output entry u of the block is sum_s w[s] x_j[(u + s) mod b], a circular cross-correlation of
the input chunk with the kernel (PEFT evaluates it with FFTs: fft(ifft(x) * fft(w))). The whole
update is divided by in_features, as in PEFT. surgeon builds the blocks explicitly in the graph
(w repeated twice, its length-b windows, flipped: one gather-free view per block row) and applies
ΔW / in with one GEMM; the result equals the FFT form up to rounding.

Init (PEFT's init_weights): `zeros` (True) is an exact identity at insert; `xavier_uniform` (PEFT's
default, also init_weights=False) draws U(-a, a) with a = sqrt(6 / (in + out)); `kaiming_uniform`
U(-1/sqrt(in), 1/sqrt(in)); `gaussian` N(0, 1). The last three change the function. A site trains
out · in / b parameters.

Merge: ΔW / in does not depend on W, so the merge adds it and unmerge subtracts it, as in PEFT.
"""
from __future__ import annotations

import math

import torch

from . import AdapterKind, EagerBranch, Option, aten, merge_dtype

INITS = ("zeros", "xavier_uniform", "kaiming_uniform", "gaussian")


def _blocks(opts: dict, in_features: int, out_features: int) -> tuple[int, int, int]:
    size = opts["block_size"]
    if in_features % size or out_features % size:
        raise ValueError(f"c3a: block_size {size} must divide the site's {in_features} input and {out_features} "
                         "output features")
    return out_features // size, in_features // size, size


def _init(opts, in_features, out_features, dtype, gen, weight):
    shape = _blocks(opts, in_features, out_features)
    init = opts["init"]
    if init == "zeros":
        kernel = torch.zeros(shape)
    elif init == "gaussian":
        kernel = torch.randn(shape, generator=gen)
    else:
        bound = math.sqrt(6.0 / (in_features + out_features)) if init == "xavier_uniform" \
            else 1.0 / math.sqrt(in_features)
        kernel = torch.empty(shape).uniform_(-bound, bound, generator=gen)
    return {"c3a_kernel": kernel.to(dtype)}


def circulant(branch, kernel, size: int):
    """The out x in matrix of circulant blocks C(w)[u, t] = w[(t - u) mod b] of an (m, n, b) kernel."""
    doubled = branch.op(aten.cat.default, [kernel, kernel], -1)                    # (m, n, 2b)
    windows = branch.op(aten.unfold.default, doubled, -1, size, 1)                 # (m, n, b + 1, b): w[s + t]
    # row u needs window s = b - u (w[(t - u) mod b] = doubled[b - u + t]): windows b, b-1, ..., 1
    rows = branch.op(aten.flip.default, branch.op(aten.slice.Tensor, windows, 2, 1, size + 1), [2])
    return branch.op(aten.flatten.using_ints, branch.op(aten.flatten.using_ints,
                                                        branch.op(aten.permute.default, rows, [0, 2, 1, 3]), 2, 3),
                     0, 1)


def _forward(branch, x, y, params, opts):
    kernel = params["c3a_kernel"]
    delta = branch.op(aten.div.Tensor, circulant(branch, kernel, opts["block_size"]), branch.in_features)
    return branch.add(y, branch.linear(x, delta))


def _delta(params, opts, weight):
    """ΔW / in in merge_dtype(weight)."""
    kernel = params["c3a_kernel"].to(merge_dtype(weight))
    return circulant(EagerBranch((0, 0)), kernel, opts["block_size"]).div_(weight.shape[1]).to(weight.device)


C3A = AdapterKind(
    name="c3a",
    options={"block_size": Option(int, 256, positive=True),
             "init": Option(str, "zeros", choices=INITS)},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: fan_in * fan_out // opts["block_size"],
    init_check=lambda opts: "exact" if opts["init"] == "zeros" else "none",
)
