"""EVA (Paischer et al. 2024, explained variance adaptation): LoRA's A from a PCA of each site's inputs.

With X a site's input rows over the calibration examples (the compile's example inputs, every call's
and every example's rows pooled: surgeon.calibration.input_scatters) and M = sum_i (x_i - mean)(x_i - mean)^T
their scatter matrix, M = V diag(S^2) V^T (V the right-singular vectors of the centered rows, S their
singular values, largest first). LoRA's `init: eva` sets

    A = V_r^T (the r leading components as rows; `eva_whiten`: row k divided by sqrt(S_k)),  B = 0

so the adapter starts in the directions the inputs vary most and the insert is the identity (B = 0:
the base weight is left alone, and A is not scaled). An SVD fixes each component only up to its sign:
as PEFT (its incremental PCA's sign flip), each row's entry of largest magnitude is made positive.

`eva_rho` > 1 redistributes the ranks: every site offers its first round(r rho) components, each with
its explained variance ratio S_k^2 / trace(M); the sum of the sites' ranks goes to the largest ratios
over all sites (ties to the earlier site in graph order), and a site's rank becomes its count there,
its alpha alpha * rank / r with `eva_adjust_alpha` (PEFT's adjust_scaling_factors), so the scale alpha / r
stays the site's original one. A site that gets rank 0 is refused (PEFT drops its LoRA layer; remove it
from the targets or lower eva_rho).

PEFT computes the same decomposition incrementally over a dataloader's batches (a randomized low-rank
SVD per batch, stopping per layer when consecutive batches' components agree to the cosine threshold
tau). surgeon has every calibration row at hand and decomposes them at once and exactly, so there is no
stopping threshold; with one calibration batch PEFT's components equal these up to its randomized SVD's
error. Its singular values count that batch once per pass it made (two when the components converge
at once), so whitened rows differ from PEFT's by a constant factor (2^(1/4) then). Padding positions
are calibration rows too (PEFT drops the rows its attention mask or label mask leaves out): pass
unpadded example inputs.
"""
from __future__ import annotations

import torch

from ..errors import SurgeonError


def eva_components(scatter: torch.Tensor, rank: int, whiten: bool = False) -> torch.Tensor:
    """The `rank` leading principal directions (rank x in, float32) of a site's inputs from their scatter
    matrix (see the module doc), each with its largest-magnitude entry positive."""
    values, vectors = torch.linalg.eigh(scatter.double())
    values, rows = values.flip(0)[:rank].clamp_min(0), vectors.flip(1)[:, :rank].T
    peak = rows.abs().argmax(dim=1, keepdim=True)
    rows = rows * rows.gather(1, peak).sign()
    if whiten:   # PEFT divides by the square root of the singular value S_k = sqrt(eigenvalue)
        rows = rows / values.sqrt().sqrt()[:, None]
    return rows.float().contiguous()


def explained_ratios(scatter: torch.Tensor, count: int) -> torch.Tensor:
    """The explained variance ratios S_k^2 / trace(M) of the `count` leading components, largest first."""
    values = torch.linalg.eigvalsh(scatter.double()).flip(0).clamp_min(0)
    return values[:count] / scatter.double().trace()


def eva_site_options(scatters: dict[str, tuple[torch.Tensor, int]], ranks: dict[str, int],
                     alphas: dict[str, float], options: dict) -> dict[str, dict]:
    """{path: {"rank", "alpha"}} for the sites whose rank EVA's redistribution changes (`eva_rho`, see the
    module doc); `ranks` / `alphas` are each site's own (spec or per-site) values, in graph order."""
    rho = options.get("eva_rho", 1.0)
    offered = {path: round(rank * rho) for path, rank in ranks.items()}
    for path, (scatter, rows) in scatters.items():
        if offered[path] > min(rows, scatter.shape[0]):
            raise SurgeonError(f"eva: site '{path}' needs {offered[path]} components (rank {ranks[path]} x "
                               f"eva_rho {rho}), but its inputs have {scatter.shape[0]} features and the "
                               f"calibration examples give {rows} rows")
    if rho == 1.0:
        return {}
    order = list(ranks)
    candidates = [(ratio, order.index(path), path) for path in order
                  for ratio in explained_ratios(scatters[path][0], offered[path]).tolist()]
    candidates.sort(key=lambda c: (-c[0], c[1]))   # stable: ties go to the earlier site
    counts = dict.fromkeys(order, 0)
    for _, _, path in candidates[:sum(ranks.values())]:
        counts[path] += 1
    empty = [path for path, count in counts.items() if count == 0]
    if empty:
        raise SurgeonError(f"eva: the rank redistribution (eva_rho {rho}) gives sites {empty} rank 0 (PEFT "
                           "drops their LoRA layers): remove them from the targets or lower eva_rho")
    out = {}
    for path, count in counts.items():
        if count != ranks[path]:
            scaled = options.get("eva_adjust_alpha", True)
            out[path] = {"rank": count, "alpha": alphas[path] * count / ranks[path] if scaled else alphas[path]}
    return out
