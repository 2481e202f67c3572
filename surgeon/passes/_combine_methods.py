"""Merge methods for the `combine` pass: one layer's delta weights in, one combined delta out.

A method is a plain function `method(deltas, weights, *, <options>)`. Its keyword-only
parameters are its config schema (name, type, default; no default means required), as
mergekit's easy_define declares merge methods: `combine` reads the schema with
inspect.signature, refuses options a method does not take and demands the required ones.

- `deltas`: the input adapters' delta weights at one module, float tensors (out x in), all
  the same shape (an adapter absent at that module contributes zeros);
- `weights`: one float per input adapter;
- returns the combined delta (out x in), or `Factors` (B, A) for a method that is itself a
  low-rank factorization (svd).

Every method is a function of the delta weights dW_i, never of A and B factors combined
separately, except the methods in ON_SPLITS (orthomerge): they take each input as a `Split`,
W' = diag(s) W R + E with R a rotation, and return the merged Split (the pass turns it into a
delta for the base weight W). Guarantees: linear/ties/magnitude_prune are deterministic; dare_* draw their
masks from a generator seeded with `seed` alone, so equal seeds give equal results.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Factors:
    """A rank-r approximation B @ A of a delta (B: out x r, A: r x in) and its truncation error."""

    B: torch.Tensor
    A: torch.Tensor
    error: float   # ||M - B A||_F / ||M||_F


# ---------------------------------------------------------------- building blocks

def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top `density` fraction of entries by magnitude (ties at the threshold are kept)."""
    keep = math.floor(density * delta.numel() + 1e-9)
    if keep <= 0:
        return torch.zeros_like(delta)
    if keep >= delta.numel():
        return delta
    magnitude = delta.abs().flatten()
    threshold = magnitude.kthvalue(magnitude.numel() - keep + 1).values   # the keep-th largest
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: drop each entry with probability 1 - density and scale the survivors by 1/density.

    E[result] == delta entrywise: each entry survives with probability density.
    """
    keep = torch.rand(delta.shape, generator=generator).to(delta.device) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def disjoint_mean(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES sign election and disjoint mean over already trimmed (or dropped) deltas.

    With t_i the trimmed deltas: the elected sign per entry is sign(sum_i w_i t_i); adapter i
    agrees at an entry when w_i t_i is non-zero with that sign; the result is
        sum_{i agrees} w_i t_i / sum_{i agrees} |w_i|     (0 where none agrees).
    Averaging convention: a weighted mean over the agreeing adapters only. With equal weights
    it is the TIES paper's disjoint mean; it is a convex combination of the agreeing values,
    so an entry kept by a single adapter keeps its full value instead of being diluted by
    adapters that had nothing there, and with weights summing to 1 and full agreement it
    equals the linear mix. The weights are therefore relative: scaling all of them by c > 0
    leaves the result unchanged (|w_i| in the denominator keeps a negated adapter negated).
    """
    weighted = torch.stack([w * t for w, t in zip(weights, deltas)])
    elected = torch.sign(weighted.sum(0))
    agree = (torch.sign(weighted) == elected) & (weighted != 0)
    shape = (-1,) + (1,) * (weighted.dim() - 1)
    magnitude = torch.tensor([abs(w) for w in weights], dtype=weighted.dtype, device=weighted.device)
    total = (magnitude.view(shape) * agree).sum(0)
    summed = (weighted * agree).sum(0)
    return torch.where(total > 0, summed / total.clamp_min(1e-30), torch.zeros_like(summed))


def truncate(delta: torch.Tensor, rank: int) -> Factors:
    """Best rank-r approximation of `delta` (Eckart-Young) as balanced factors B = U sqrt(S), A = sqrt(S) V^T."""
    U, S, Vh = torch.linalg.svd(delta.float(), full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    # ||M - U_r S_r V_r^T||_F^2 == sum_{i > r} s_i^2, so the error needs no product
    total = S.square().sum()
    error = (S[r:].square().sum() / total).sqrt().item() if total > 0 else 0.0
    return Factors(U[:, :r] * root, root[:, None] * Vh[:r], error)


# ---------------------------------------------------------------- the methods

def linear(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Task arithmetic: sum_i w_i dW_i."""
    return sum((w * d for w, d in zip(weights, deltas)), torch.zeros_like(deltas[0]))


def ties(deltas: list[torch.Tensor], weights: list[float], *, density: float = 0.5) -> torch.Tensor:
    """TIES: trim each dW_i to its top `density` by magnitude, elect signs, disjoint mean."""
    return disjoint_mean([trim(d, density) for d in deltas], weights)


def dare_linear(deltas: list[torch.Tensor], weights: list[float], *, density: float = 0.5,
                seed: int = 0) -> torch.Tensor:
    """DARE then task arithmetic: random drop at rate 1 - density, rescale by 1/density, weighted sum."""
    generator = torch.Generator().manual_seed(seed)
    return linear([drop_and_rescale(d, density, generator) for d in deltas], weights)


def dare_ties(deltas: list[torch.Tensor], weights: list[float], *, density: float = 0.5,
              seed: int = 0) -> torch.Tensor:
    """DARE then TIES sign election and disjoint mean (no magnitude trim: the drop replaces it)."""
    generator = torch.Generator().manual_seed(seed)
    return disjoint_mean([drop_and_rescale(d, density, generator) for d in deltas], weights)


def magnitude_prune(deltas: list[torch.Tensor], weights: list[float], *, density: float = 0.5) -> torch.Tensor:
    """Trim each dW_i to its top `density` by magnitude (no rescale), then sum_i w_i trim(dW_i)."""
    return linear([trim(d, density) for d in deltas], weights)


def svd(deltas: list[torch.Tensor], weights: list[float], *, rank: int) -> Factors:
    """The weighted sum sum_i w_i dW_i, truncated to rank `rank` by SVD (PEFT's 'svd' combination)."""
    return truncate(linear(deltas, weights), rank)


# ---------------------------------------------------------------- orthomerge: merging in the Lie algebra

class NoLogarithm(ValueError):
    """A rotation orthomerge cannot take the logarithm of (with `index`: which input, set by orthomerge)."""

    def __init__(self, reason: str, index: int | None = None):
        super().__init__(reason)
        self.reason, self.index = reason, index


@dataclass(frozen=True)
class Split:
    """One input's update of one weight as W' = diag(scale) W rotation + residual (orthomerge's view).

    `rotation`: in x in, orthogonal with det +1, float64 (None: I); `scale`: (out,) (None: 1);
    `residual`: out x in (None: 0). A rotation kind (AdapterKind.rotation) gives its rotation, and
    BOFT its scale, exactly and no residual; every other kind is split by `procrustes`.
    """

    rotation: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    residual: torch.Tensor | None = None

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """W' for the base weight `weight` (out x in), in float64."""
        result = weight.double()
        if self.rotation is not None:
            result = result @ self.rotation
        if self.scale is not None:
            result = self.scale[:, None] * result
        return result if self.residual is None else result + self.residual


def procrustes(weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The rotation R (det +1) minimizing |W R - W'|_F for W = `weight`, W' = `target` (out x in), float64.

    With W^T W' = U S V^T the optimum is R = U V^T, with the smallest singular direction of U negated
    when det(U V^T) = -1 (the rotation group's Procrustes solution: that flip costs the least). Where W^T W' is
    singular (out < in, or a rank-deficient W), W does not determine R on the singular directions
    (U_0, V_0): there R maps V_0 to U_0 as close to the identity as possible (max tr R), so the split
    does not depend on how the SVD chose those vectors.
    """
    weight, target = weight.double(), target.double()
    U, S, Vh = torch.linalg.svd(weight.T @ target)
    rank = int((S > S[0] * 1e-10).sum()) if S.numel() and S[0] > 0 else 0
    V = Vh.T
    if rank == S.numel():
        rotation = U @ Vh
        if torch.linalg.det(rotation) < 0:
            U = U.clone()
            U[:, -1] = -U[:, -1]
            rotation = U @ Vh
        return rotation
    U0, V0 = U[:, rank:], V[:, rank:]
    P, _, Th = torch.linalg.svd(U0.T @ V0)           # max tr(U0 Q V0^T) over orthogonal Q: Q = P Th
    fixed = U[:, :rank] @ Vh[:rank]
    rotation = fixed + U0 @ (P @ Th) @ V0.T
    if torch.linalg.det(rotation) < 0:
        P = P.clone()
        P[:, -1] = -P[:, -1]
        rotation = fixed + U0 @ (P @ Th) @ V0.T
    return rotation


def rotation_log(rotation: torch.Tensor) -> torch.Tensor:
    """The principal logarithm L (skew, float64) of a rotation R: matrix_exp(L) == R.

    R is normal, so its symmetric part C = (R + R^T)/2 and skew part K = (R - R^T)/2 commute; on each
    invariant plane of angle t, C = cos t and K = sin t J, so L = t J = g(C) K with g(c) = arccos(c) /
    sqrt(1 - c^2) (t / sin t, 1 at c = 1). g(C) comes from the symmetric eigendecomposition of C (eigh,
    stable under the repeated eigenvalues block rotations have); no complex arithmetic.
    Refused (NoLogarithm): R not orthogonal, det -1 (a reflection), or an eigenvalue at -1 (a half
    turn, where the logarithm is not unique).
    """
    R = rotation.double()
    eye = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    drift = (R.T @ R - eye).abs().max().item() if R.numel() else 0.0
    if drift > 1e-9:
        raise NoLogarithm(f"not orthogonal (max |R^T R - I| = {drift:.1e})")
    if R.numel() and torch.linalg.det(R) < 0:
        raise NoLogarithm("det -1 (a reflection), which has no real logarithm")
    cosines, basis = torch.linalg.eigh((R + R.T) / 2)
    if cosines.numel() and cosines.min() < -1 + 1e-9:
        raise NoLogarithm("an eigenvalue at -1 (a half turn): its logarithm is not unique")
    cosines = cosines.clamp(-1.0, 1.0)
    gap = 1 - cosines                                        # exact for cos >= 1/2 (Sterbenz)
    tiny = gap < 1e-12
    safe = torch.where(tiny, torch.full_like(cosines, 0.5), cosines)
    ratio = torch.arccos(safe) / torch.sqrt((1 - safe) * (1 + safe))
    ratio = torch.where(tiny, 1 + gap / 3, ratio)             # t / sin t = 1 + (1 - c)/3 + O((1 - c)^2)
    log = (basis * ratio) @ basis.T @ ((R - R.T) / 2)
    return (log - log.T) / 2


def orthomerge(splits: list[Split], weights: list[float], *, magnitude_correction: bool = False) -> Split:
    """OrthoMerge: rotations in the Lie algebra, scales and residuals linearly.

    R* = matrix_exp(G), G = sum_i w_i log R_i (orthogonal: the exponential of a skew matrix),
    s* = 1 + sum_i w_i (s_i - 1), E* = sum_i w_i E_i. With `magnitude_correction` (the paper's
    magnitude-corrected merge), G keeps its direction but gets the norm sum_i |w_i| |log R_i|_F: the
    weighted mean of the inputs' rotation angles, which a plain mean of generators pointing apart
    shrinks (a G that cancels to rounding, |G| <= 1e-12 of that norm, becomes 0). One input at
    weight 1 gives itself back (to float64 rounding), with or without it. Raises NoLogarithm with the input's index when a rotation has no logarithm.
    """
    generator = scale = residual = None
    magnitude = 0.0
    for index, (split, w) in enumerate(zip(splits, weights)):
        if split.rotation is not None:
            try:
                term = w * rotation_log(split.rotation)
            except NoLogarithm as error:
                raise NoLogarithm(error.reason, index) from None
            generator = term if generator is None else generator + term
            magnitude += term.norm().item()        # |w_i| |log R_i|_F
        if split.scale is not None:
            term = w * (split.scale.double() - 1)
            scale = term if scale is None else scale + term
        if split.residual is not None:
            term = w * split.residual.double()
            residual = term if residual is None else residual + term
    if magnitude_correction and generator is not None:
        size = generator.norm().item()
        # generators that cancel to rounding have no direction to rescale: the merge is the identity
        generator = generator * (magnitude / size) if size > 1e-12 * magnitude else torch.zeros_like(generator)
    rotation = None if generator is None else torch.linalg.matrix_exp(generator)
    return Split(rotation, None if scale is None else 1 + scale, residual)


METHODS = {f.__name__: f for f in (linear, ties, dare_linear, dare_ties, magnitude_prune, svd, orthomerge)}
# methods linear in the deltas (sum_i w_i dW_i, before any truncation): the inputs' bias deltas add up the same way,
# so combine carries them; the others refuse an input whose merge changes the bias
BIAS_METHODS = frozenset({"linear", "svd"})
ON_SPLITS = frozenset({"orthomerge"})   # methods given each input as a Split (W' = diag(s) W R + E), not its delta


def schema(method) -> dict[str, inspect.Parameter]:
    """A method's options: its keyword-only parameters (default `inspect.Parameter.empty` = required)."""
    return {name: p for name, p in inspect.signature(method).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}
