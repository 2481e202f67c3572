"""LoftQ (Li et al. 2023): a quantized base plus a LoRA initialized to what the quantization lost.

LoRA's `init: loftq` alternates, `loftq_iter` times, between quantizing what the adapter does not
hold and refitting the adapter to what the quantization lost:

    Q_1 = deq(quant(W)),  L_t R_t = top-r SVD of W - Q_t,  Q_{t+1} = deq(quant(W - L_t R_t))

and ends with the base weight replaced by the last Q and the adapter s B A = L R (the SVD's singular
values split evenly, sqrt(S) on each side), so Q + s B A is W's best rank-r correction of its
quantization. The quantizers are simulated in float32 on any device, with bitsandbytes' layouts:

- 4 bits (NF4, bnb's `quant_type="nf4"` without double quantization): the weight flattened row by
  row into blocks of 64, each scaled by its absolute maximum and every value rounded to the nearest
  of the 16 NormalFloat levels below;
- 8 bits (bnb's Int8Params, row-wise): each output row scaled by its absolute maximum to [-127, 127]
  and rounded to an integer.

The base then holds the dequantized Q in the weight's dtype (a simulation: surgeon stores no packed
4-bit tensor), which is what a quantized layer computes with. PEFT 0.21's `init_lora_weights="loftq"`
runs the same loop through bitsandbytes on a GPU, and takes B = L and A = R whatever the LoRA scale
s = alpha / r is; surgeon divides B by s, so that Q + s B A = Q + L R for any alpha (the two agree at
alpha = r, PEFT's LoftQ examples' setting).
"""
from __future__ import annotations

import torch

from ..errors import SpecError

# the 16 NF4 levels (QLoRA's NormalFloat: quantiles of N(0, 1) scaled to [-1, 1], with an exact 0)
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
NF4_BLOCK = 64


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """deq(quant(W)) for NF4 with blocks of 64 consecutive values (row-major), float32."""
    flat = weight.detach().float().reshape(-1)
    pad = (-flat.numel()) % NF4_BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, NF4_BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=flat.device)
    # nearest level: search the midpoints between consecutive levels
    index = torch.bucketize(blocks / scale, (levels[1:] + levels[:-1]) / 2)
    out = levels[index] * absmax
    return out.reshape(-1)[:flat.numel()].view(weight.shape)


def int8_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """deq(quant(W)) for bitsandbytes' row-wise int8: each row scaled to [-127, 127], float32."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    return torch.round(w * (127.0 / scale)) * (scale / 127.0)


ROUND_TRIPS = {4: nf4_round_trip, 8: int8_round_trip}


def _steps(weight: torch.Tensor, rank: int, bits: int, iterations: int, fit_last: bool):
    """The loop: (left, right, Q) with left @ right the rank-r fit of W - Q (None unless fit_last)."""
    if bits not in ROUND_TRIPS:
        raise SpecError("loftq_bits", f"LoftQ quantizes to 4 bits (NF4) or 8 bits (int8), got {bits}")
    if iterations < 1:
        raise SpecError("loftq_iter", f"LoftQ needs at least one iteration, got {iterations}")
    w = weight.detach().float()
    target, left, right = w, None, None
    for step in range(iterations):
        quantized = ROUND_TRIPS[bits](target)
        if step + 1 == iterations and not fit_last:
            break
        U, S, Vh = torch.linalg.svd(w - quantized, full_matrices=False)
        root = S[:rank].sqrt()
        left, right = U[:, :rank] * root, root[:, None] * Vh[:rank]
        target = w - left @ right
    return left, right, quantized


def loftq_factors(weight: torch.Tensor, rank: int, scale: float, bits: int, iterations: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for an out x in weight, float32: s B A is the rank-r fit of W - Q (Q: `loftq_base`)."""
    left, right, _ = _steps(weight, rank, bits, iterations, fit_last=True)
    return right.contiguous(), (left / scale).contiguous()


def loftq_base(weight: torch.Tensor, rank: int, bits: int, iterations: int) -> torch.Tensor:
    """Q, the dequantized base the loop ends with (float32); one SVD fewer than the factors need."""
    return _steps(weight, rank, bits, iterations, fit_last=False)[2]
