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
separately. Guarantees: linear/ties/magnitude_prune are deterministic; dare_* draw their
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


METHODS = {f.__name__: f for f in (linear, ties, dare_linear, dare_ties, magnitude_prune, svd)}


def schema(method) -> dict[str, inspect.Parameter]:
    """A method's options: its keyword-only parameters (default `inspect.Parameter.empty` = required)."""
    return {name: p for name, p in inspect.signature(method).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}
