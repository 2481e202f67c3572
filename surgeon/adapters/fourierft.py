"""FourierFT (Gao et al. 2024): y = W x + b + dW x, dW the inverse 2-D DFT of a sparse spectrum.

A site trains n = `frequencies` spectral coefficients (`fourierft_spectrum`). They sit at n fixed
positions (u_k, v_k) of an out x in spectrum F (zero elsewhere), and

    dW = scaling * Re(ifft2(F)),   dW[m, j] = scaling / (out * in) * sum_k s_k cos(2 pi (m u_k / out + j v_k / in)).

The positions are PEFT's: the first n entries of torch.randperm(out * in) drawn from a CPU
generator seeded with `frequency_seed` (PEFT's random_loc_seed), flat index p -> (p // in, p % in).
PEFT saves no positions, so they are a function of (seed, n, out, in), never stored: sites of one
shape share them, and an imported PEFT checkpoint gets the positions PEFT used. dW is built per
forward by one graph call, `fourier_delta` (PEFT's computation: dense F in float32, ifft2, real
part times scaling, cast to the spectrum's dtype; ifft2 has no 16-bit CPU kernel), then applied
with one GEMM: y + x dW^T. The spectrum starts at zero (`init: zeros`, PEFT's init_weights=True),
so dW = 0 and insertion is exact; `init: normal` (PEFT's default init_weights=False) draws it from
N(0, 1) and changes the function. A site costs n parameters (n <= out * in).

Merge identity: W x + dW x == (W + dW) x; the merge computes dW in float32 (float64 for a float64
weight: merge_dtype). Linear and GPT-2 Conv1D sites (dW is out x in on both, as in PEFT).
"""
from __future__ import annotations

import functools

import torch
from torch._subclasses.fake_tensor import FakeTensor

from . import AdapterKind, Option, merge_dtype


@functools.lru_cache(maxsize=256)
def _support(seed: int, count: int, rows: int, cols: int, device: str) -> torch.Tensor:
    flat = torch.randperm(rows * cols, generator=torch.Generator().manual_seed(seed))[:count]
    return torch.stack([flat // cols, flat % cols]).to(device)


def support(seed: int, count: int, rows: int, cols: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 2 x count int64 (row, column) positions of the trained frequencies in a rows x cols
    spectrum, as PEFT draws them (cached per seed, shape and device; do not modify the result)."""
    if count > rows * cols:
        raise ValueError(f"fourierft: {count} frequencies do not fit a {rows} x {cols} spectrum")
    return _support(seed, count, rows, cols, str(device))


def fourier_delta(spectrum: torch.Tensor, seed: int, rows: int, cols: int, scaling: float) -> torch.Tensor:
    """dW (rows x cols, the spectrum's dtype) from the trained coefficients: a graph call (differentiable)."""
    if isinstance(spectrum, FakeTensor) or spectrum.device.type == "meta":   # shape propagation only
        return spectrum.new_empty((rows, cols))
    rows_at, cols_at = support(seed, spectrum.shape[0], rows, cols, spectrum.device)
    dense = torch.zeros(rows, cols, dtype=torch.float32, device=spectrum.device)
    dense = dense.index_put((rows_at, cols_at), spectrum.float())
    return (torch.fft.ifft2(dense).real * scaling).to(spectrum.dtype)


def _init(opts, in_features, out_features, dtype, gen, weight):
    count = opts["frequencies"]
    if count > in_features * out_features:
        raise ValueError(f"fourierft: frequencies {count} exceeds the {out_features} x {in_features} = "
                         f"{in_features * out_features} entries of the site's weight")
    spectrum = torch.randn(count, generator=gen) if opts["init"] == "normal" else torch.zeros(count)
    return {"fourierft_spectrum": spectrum.to(dtype)}


def _forward(branch, x, y, params, opts):
    delta = branch.op(fourier_delta, params["fourierft_spectrum"], opts["frequency_seed"], branch.out_features,
                      branch.in_features, float(opts["scaling"]))
    return branch.add(y, branch.linear(x, delta))


def _delta(params, opts, weight):
    """dW in merge_dtype(weight), the shape of `weight` (out x in)."""
    rows, cols = weight.shape
    spectrum = params["fourierft_spectrum"].to(merge_dtype(weight))
    rows_at, cols_at = support(opts["frequency_seed"], spectrum.shape[0], rows, cols, spectrum.device)
    dense = torch.zeros(rows, cols, dtype=spectrum.dtype, device=spectrum.device)
    dense[rows_at, cols_at] = spectrum
    return torch.fft.ifft2(dense).real.mul_(opts["scaling"])


FOURIERFT = AdapterKind(
    name="fourierft",
    options={"frequencies": Option(int, 1000, positive=True), "scaling": Option(float, 150.0),
             "frequency_seed": Option(int, 777), "init": Option(str, "zeros", choices=("zeros", "normal"))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: opts["frequencies"],
    init_check=lambda opts: "exact" if opts["init"] == "zeros" else "none",
)
