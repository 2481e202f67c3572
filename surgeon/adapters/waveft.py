"""WaveFT (Bilican et al. 2025): y = W x + b + dW x, dW a one-level inverse 2-D wavelet transform of
a sparse coefficient matrix.

A site trains n = `frequencies` wavelet coefficients (`waveft_spectrum`). They sit at n fixed
positions of an out x in coefficient matrix C, which is zero elsewhere, and

    dW = scaling * crop(IDWT2(pad(C)))

The positions are PEFT's: the first n entries of torch.randperm(out * in) drawn from a CPU generator
seeded with `frequency_seed` (PEFT's random_loc_seed), flat index p -> (p // in, p % in). PEFT saves
no positions, so they are a function of (seed, n, out, in), never stored: an imported checkpoint gets
the positions PEFT used.

The transform is PEFT's (its own pytorch-wavelets port, `waverec2d`), written here as two separable
1-D syntheses. A wavelet of filter length L loses L - 2 rows and columns in a synthesis, so C is
first padded: H = out + L - 2 rows (one more if odd), W likewise, C centered in it (offset
(H - out) // 2). The H x W matrix is read as four H/2 x W/2 sub-bands: top-left approximation,
top-right "horizontal" detail (high-pass along the rows, low-pass along the columns), bottom-left
"vertical" detail (low-pass along the rows) and bottom-right diagonal. A 1-D synthesis of low-pass
coefficients a and high-pass coefficients d (length m each) is

    s[2k + i] += a[k] lo[i] + d[k] hi[i]    (i < L; lo, hi the reconstruction filters)

cropped by L - 2 at both ends: 2m - L + 2 samples. It runs over the columns, then over the rows, and
the result is cropped (centered) to out x in. With `idwt: false` (PEFT's use_idwt=False) there is no
transform: dW = scaling * C.

Wavelets: Daubechies `db1` (Haar, PEFT's default) to `db10`, their reconstruction filters computed
here from Daubechies' spectral factorization (the minimum-phase root of each pair; db1 is
[1, 1] / sqrt 2). PEFT also names symlets and coiflets, whose filters are tables rather than a
construction; they are refused with a SpecError (import included).

The spectrum starts at zero (`init: zeros`, PEFT's init_weights=True), so dW = 0 and insertion is
exact; `init: normal` (PEFT's init_weights=False) draws it from N(0, 0.01^2) and changes the function.
A site costs n parameters (n <= out * in). dW is built per forward by one graph call (`wavelet_delta`,
in float32, cast to the spectrum's dtype) and applied with one GEMM, as PEFT does.

Merge identity: W x + dW x == (W + dW) x; dW does not depend on W, so unmerge subtracts it. Linear
and GPT-2 Conv1D sites (dW is out x in on both, as in PEFT, which takes Conv1D too).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from ..errors import SpecError
from . import AdapterKind, Option, merge_dtype

DAUBECHIES = tuple(f"db{order}" for order in range(1, 11))
# families PEFT names that surgeon refuses: their filters are published tables, not a construction
TABLE_FAMILIES = ("sym", "coif")


def wavelet_refusal(name: str) -> str:
    """Why surgeon cannot build this wavelet's filters; "" when it can."""
    if name in DAUBECHIES:
        return ""
    if name.startswith(TABLE_FAMILIES):
        return (f"wavelet '{name}' is not supported: surgeon builds Daubechies filters (db1 to db10) from "
                "their construction, and symlet / coiflet filters are tables it does not carry")
    return f"unknown wavelet '{name}' (surgeon supports db1 to db10, PEFT's Daubechies names)"


@functools.lru_cache(maxsize=16)
def reconstruction_filters(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) float64 reconstruction filters of a Daubechies wavelet, PyWavelets' convention.

    dbN's low-pass filter is sqrt(2) ((1 + z) / 2)^N Q(z), |Q|^2 = P(sin^2(w / 2)) with
    P(y) = sum_k<N C(N - 1 + k, k) y^k. Each root y of P gives z + 1/z = 2 - 4y; the root with |z| < 1
    is kept (minimum phase). Coefficients in descending powers, normalized to sum sqrt(2);
    hi[i] = (-1)^i lo[L - 1 - i].
    """
    order = int(name[2:])
    poly = torch.tensor([1.0], dtype=torch.complex128)
    for _ in range(order):   # (z + 1)^N
        poly = _poly_times(poly, torch.tensor([1.0, 1.0], dtype=torch.complex128))
    if order > 1:
        # P's coefficients, highest power first; its roots are the eigenvalues of the companion matrix
        coeffs = torch.tensor([math.comb(order - 1 + k, k) for k in range(order)][::-1], dtype=torch.float64)
        companion = torch.zeros(order - 1, order - 1, dtype=torch.float64)
        companion[0] = -coeffs[1:] / coeffs[0]
        companion[1:, :-1] = torch.eye(order - 2, dtype=torch.float64)
        for y in torch.linalg.eigvals(companion):
            b = 2 - 4 * y   # z^2 - b z + 1 = 0
            root = (b + torch.sqrt(b * b - 4)) / 2
            root = root if root.abs() < 1 else 1 / root
            poly = _poly_times(poly, torch.stack([torch.ones((), dtype=torch.complex128), -root]))
    lo = poly.real
    lo = lo * (math.sqrt(2) / lo.sum())
    signs = torch.tensor([(-1.0) ** i for i in range(lo.numel())], dtype=torch.float64)
    return lo, lo.flip(0) * signs


def _poly_times(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(a.numel() + b.numel() - 1, dtype=a.dtype)
    for i, coefficient in enumerate(b):
        out[i:i + a.numel()] += coefficient * a
    return out


class Layout:
    """Where a site's coefficients go: the padded size, the (row, column) of each coefficient in the
    sub-band matrix [[approx, vertical], [horizontal, diagonal]] (low-pass rows first, then
    high-pass; likewise for columns), and the crop of the synthesized matrix to out x in."""

    def __init__(self, seed: int, count: int, rows: int, cols: int, wavelet: str, idwt: bool):
        flat = torch.randperm(rows * cols, generator=torch.Generator().manual_seed(seed))[:count]
        self.positions = torch.stack([flat // cols, flat % cols])   # PEFT's waveft_indices
        self.rows, self.cols, self.idwt = rows, cols, idwt
        if not idwt:
            self.padded, self.at = (rows, cols), self.positions
            return
        lo, _ = reconstruction_filters(wavelet)
        loss = lo.numel() - 2
        padded = tuple(n + loss + (n + loss) % 2 for n in (rows, cols))
        at = self.positions + torch.tensor([[(padded[0] - rows) // 2], [(padded[1] - cols) // 2]])
        half_rows, half_cols = padded[0] // 2, padded[1] // 2
        top, left = at[0] < half_rows, at[1] < half_cols
        # PEFT's top-right band is high-pass along the rows, its bottom-left band high-pass along the columns
        swap = top != left
        at[0] = torch.where(swap, torch.where(top, at[0] + half_rows, at[0] - half_rows), at[0])
        at[1] = torch.where(swap, torch.where(left, at[1] + half_cols, at[1] - half_cols), at[1])
        self.padded, self.at, self.wavelet = padded, at, wavelet


@functools.lru_cache(maxsize=256)
def layout(seed: int, count: int, rows: int, cols: int, wavelet: str, idwt: bool) -> Layout:
    """A site's Layout (cached per seed, count, shape and wavelet; do not modify it)."""
    if count > rows * cols:
        raise ValueError(f"waveft: {count} coefficients do not fit a {rows} x {cols} weight")
    if idwt and wavelet_refusal(wavelet):
        raise ValueError(f"waveft: {wavelet_refusal(wavelet)}")
    return Layout(seed, count, rows, cols, wavelet, idwt)


def _synthesize(bands: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """One 1-D synthesis along the last axis of a (rows, 2m) matrix whose first m columns are low-pass
    and last m high-pass coefficients: (rows, 2m - L + 2)."""
    rows, width = bands.shape
    pairs = bands.reshape(rows, 2, width // 2)
    out = F.conv_transpose1d(pairs, torch.stack([lo, hi]).unsqueeze(1), stride=2)[:, 0]
    loss = lo.numel() - 2
    return out[:, loss:out.shape[1] - loss] if loss else out


def wavelet_delta(spectrum: torch.Tensor, seed: int, rows: int, cols: int, scaling: float, wavelet: str,
                  idwt: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """dW (rows x cols) from the trained coefficients (differentiable), computed in `dtype` (float32 when
    None, the forward's choice, as PEFT's float32 spectrum) and returned in the spectrum's dtype when
    `dtype` is None. A graph call."""
    if isinstance(spectrum, FakeTensor) or spectrum.device.type == "meta":   # shape propagation only
        return spectrum.new_empty((rows, cols))
    work = dtype or torch.float32
    where = layout(seed, spectrum.shape[0], rows, cols, wavelet, idwt)
    at = where.at.to(spectrum.device)
    dense = torch.zeros(where.padded, dtype=work, device=spectrum.device)
    dense = dense.index_put((at[0], at[1]), spectrum.to(work))
    if idwt:
        lo, hi = (f.to(device=spectrum.device, dtype=work) for f in reconstruction_filters(wavelet))
        dense = _synthesize(_synthesize(dense, lo, hi).t(), lo, hi).t()   # columns, then rows
        top, left = (dense.shape[0] - rows) // 2, (dense.shape[1] - cols) // 2
        dense = dense[top:top + rows, left:left + cols]
    delta = dense * scaling
    return delta if dtype is not None else delta.to(spectrum.dtype)


def _init(opts, in_features, out_features, dtype, gen, weight):
    count = opts["frequencies"]
    if count > in_features * out_features:
        raise ValueError(f"waveft: frequencies {count} exceeds the {out_features} x {in_features} = "
                         f"{in_features * out_features} entries of the site's weight")
    if opts["idwt"] and wavelet_refusal(opts["wavelet"]):
        raise SpecError("wavelet", f"waveft: {wavelet_refusal(opts['wavelet'])}")
    spectrum = torch.randn(count, generator=gen) * 0.01 if opts["init"] == "normal" else torch.zeros(count)
    return {"waveft_spectrum": spectrum.to(dtype)}


def _forward(branch, x, y, params, opts):
    delta = branch.op(wavelet_delta, params["waveft_spectrum"], opts["frequency_seed"], branch.out_features,
                      branch.in_features, float(opts["scaling"]), opts["wavelet"], bool(opts["idwt"]))
    return branch.add(y, branch.linear(x, delta))


def _delta(params, opts, weight):
    """dW in merge_dtype(weight), the shape of `weight` (out x in)."""
    rows, cols = weight.shape
    return wavelet_delta(params["waveft_spectrum"].detach(), opts["frequency_seed"], rows, cols,
                         float(opts["scaling"]), opts["wavelet"], bool(opts["idwt"]), merge_dtype(weight))


WAVEFT = AdapterKind(
    name="waveft",
    options={"frequencies": Option(int, 2592, positive=True), "scaling": Option(float, 25.0),
             "wavelet": Option(str, "db1"), "idwt": Option(bool, True), "frequency_seed": Option(int, 777),
             "init": Option(str, "zeros", choices=("zeros", "normal"))},
    init=_init,
    forward=_forward,
    delta_weight=_delta,
    param_count=lambda opts, fan_in, fan_out: opts["frequencies"],
    init_check=lambda opts: "exact" if opts["init"] == "zeros" else "none",
)
