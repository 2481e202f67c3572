"""N:M structured sparsity: the kept magnitude of a mask and a channel-permutation search for it.

An N:M mask on the input channels of a consumer keeps, in every row and every run of M consecutive
input channels, the N entries of largest |w|. Permuting the input channels (with the producers'
output channels, through a coupled group) changes which channels share a run, so it changes how
much magnitude the mask keeps. `search` maximizes it:

    A: |W| of every consumer, rows stacked, columns = the group's channels      (R x C, C % M == 0)
    kept(order) = sum_r sum_b topN(A[r, order[b*M:(b+1)*M]])
    start from the identity order; sweep over blocks i; for every other block j and every pair of
    columns (a in i, b in j) compute the gain of swapping a and b (only blocks i and j change; all
    candidates at once, from each block's leave-one-column-out top-(N-1) sum and N-th value); apply
    the best swap when its gain is positive; stop after a sweep with no improving swap or after
    `max_sweeps` sweeps. Cost per sweep: O((C/M)^2 * M^2 * R).

Every accepted swap strictly increases kept, and the result is compared with the identity once
more at the end (falling back to it), so kept(search) >= kept(identity) always.
"""
from __future__ import annotations

import contextlib

import torch

_CHUNK = 1 << 22     # candidate entries evaluated per batch (memory bound)


def kept(A: torch.Tensor, order: torch.Tensor, n: int, m: int) -> float:
    """Magnitude an N:M mask keeps when A's columns are taken in `order`."""
    blocks = A[:, order].reshape(A.shape[0], -1, m)
    return float(blocks.topk(n, dim=-1).values.sum())


def nm_mask(weight: torch.Tensor, axis: int, n: int, m: int) -> torch.Tensor:
    """The N:M mask of `weight` along `axis` (runs of m consecutive channels, keep the n largest |w|)."""
    moved = weight.detach().abs().movedim(axis, -1)
    runs = moved.reshape(*moved.shape[:-1], -1, m)
    keep = torch.zeros_like(runs, dtype=torch.bool)
    keep.scatter_(-1, runs.topk(n, dim=-1).indices, True)
    return keep.reshape(moved.shape).movedim(-1, axis)


def _block_kept(blocks: torch.Tensor, n: int) -> torch.Tensor:
    return blocks.topk(n, dim=-1).values.sum((-1, -2))


def _leave_one_out(W: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each block and column a: (sum of the n-1 largest, n-th largest) of the other columns.

    With those, the block's kept magnitude after column a is replaced by x is, per row,
    top_{n-1}(rest) + max(x, nth(rest)) - no sort per candidate.
    """
    m = W.shape[-1]
    others = torch.tensor([[c for c in range(m) if c != a] for a in range(m)])
    rest = W[:, :, others].sort(dim=-1, descending=True).values        # blocks x R x m(a) x m-1
    return rest[..., :n - 1].sum(-1).permute(0, 2, 1), rest[..., n - 1].permute(0, 2, 1)


def _best_swap(W: torch.Tensor, kept_blocks: torch.Tensor, top: torch.Tensor, nth: torch.Tensor,
               i: int) -> tuple[float, int, int, int]:
    """Best (gain, j, a, b): swap column a of block i with column b of block j."""
    nb, R, m = W.shape
    best = (0.0, -1, -1, -1)
    step = max(1, _CHUNK // (m * m * R))
    cols_i = W[i].T[None, :, None, :]                                  # 1 x m(a) x 1 x R
    for lo in range(0, nb, step):
        cols_j = W[lo:lo + step].permute(0, 2, 1)[:, None, :, :]       # J x 1 x m(b) x R
        new_i = top[i].sum(-1)[None, :, None] + torch.maximum(cols_j, nth[i][None, :, None, :]).sum(-1)
        new_j = top[lo:lo + step].sum(-1)[:, None, :] + \
            torch.maximum(cols_i, nth[lo:lo + step][:, None, :, :]).sum(-1)
        gain = new_i + new_j - kept_blocks[i] - kept_blocks[lo:lo + step, None, None]
        if lo <= i < lo + step:
            gain[i - lo] = float("-inf")
        flat = int(gain.argmax())
        value = float(gain.flatten()[flat])
        if value > best[0]:
            j, rest = divmod(flat, m * m)
            best = (value, lo + j, *divmod(rest, m))
    return best


@contextlib.contextmanager
def _one_thread():
    """The search runs thousands of tiny ops: intra-op threads only add synchronisation (and stall
    on a loaded machine), so it runs on one thread and restores the caller's setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def search(A: torch.Tensor, n: int, m: int, max_sweeps: int = 20) -> tuple[list[int], float, float]:
    """(gather order, kept without permutation, kept with it) for an N:M mask on A's columns."""
    with _one_thread():
        return _search(A, n, m, max_sweeps)


def _search(A: torch.Tensor, n: int, m: int, max_sweeps: int) -> tuple[list[int], float, float]:
    A = A.detach().abs().double()
    R, C = A.shape
    identity = torch.arange(C)
    base = kept(A, identity, n, m)
    order = identity.clone()
    W = A.reshape(R, C // m, m).permute(1, 0, 2).clone(memory_format=torch.contiguous_format)  # blocks x R x m
    if n >= m or C // m < 2:
        return identity.tolist(), base, base
    kept_blocks = _block_kept(W, n)
    top, nth = _leave_one_out(W, n)
    tolerance = 1e-12 * (1.0 + abs(base))
    for _ in range(max_sweeps):
        improved = False
        for i in range(W.shape[0]):
            gain, j, a, b = _best_swap(W, kept_blocks, top, nth, i)
            if gain <= tolerance:
                continue
            W[i, :, a], W[j, :, b] = W[j, :, b].clone(), W[i, :, a].clone()
            order[i * m + a], order[j * m + b] = int(order[j * m + b]), int(order[i * m + a])
            for k in (i, j):
                kept_blocks[k] = _block_kept(W[k], n)
                top[k], nth[k] = (t[0] for t in _leave_one_out(W[k:k + 1], n))
            improved = True
        if not improved:
            break
    found = kept(A, order, n, m)
    if found < base:
        return identity.tolist(), base, base
    return order.tolist(), base, found
