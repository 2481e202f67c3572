"""The tensor identities behind fold-bn and reparameterize, as pure functions.

Weights are laid out as aten uses them: conv2d (out, in/groups, kh, kw), linear (out, in).
A linear is treated as a 1x1 conv with one group wherever the identity is the same. Every
function returns new tensors computed in float64 (callers cast back), never writing into its
inputs. A missing bias is a zero bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Affine:
    """y[:, c] = scale[c] * x[:, c] + shift[c]: what an eval-mode BatchNorm computes along dim 1."""

    scale: Tensor
    shift: Tensor


def batch_norm_affine(weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                      eps: float) -> Affine:
    """BN(x) = g (x - mu) / sqrt(v + eps) + beta = s x + (beta - s mu), with s = g / sqrt(v + eps)."""
    mean, var = mean.double(), var.double()
    gamma = torch.ones_like(var) if weight is None else weight.double()
    beta = torch.zeros_like(var) if bias is None else bias.double()
    scale = gamma / torch.sqrt(var + eps)
    return Affine(scale, beta - scale * mean)


def zero_bias(weight: Tensor, bias: Tensor | None) -> Tensor:
    """The bias as float64, zeros when the op has none."""
    return torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.double()


def affine_after(weight: Tensor, bias: Tensor | None, affine: Affine) -> tuple[Tensor, Tensor]:
    """Fold op-then-affine: s (W x + b) + t == (s W) x + (s b + t), scaling output channels."""
    rows = affine.scale.view(-1, *([1] * (weight.dim() - 1)))
    return weight.double() * rows, affine.scale * zero_bias(weight, bias) + affine.shift


def affine_before(weight: Tensor, bias: Tensor | None, affine: Affine, groups: int) -> tuple[Tensor, Tensor]:
    """Fold affine-then-op (no padding): W (s x + t) + b == (W diag(s)) x + (W t + b).

    For a grouped conv, output channel o reads the input channels of its own group, so the
    per-input-channel scale and shift are taken group by group.
    """
    out_ch, in_per_group = weight.shape[0], weight.shape[1]
    blocks = weight.double().reshape(groups, out_ch // groups, in_per_group, -1)
    scale = affine.scale.view(groups, 1, in_per_group, 1)
    shift = affine.shift.view(groups, 1, in_per_group, 1)
    new_weight = (blocks * scale).reshape(weight.shape)
    new_bias = (blocks * shift).sum(dim=(2, 3)).reshape(out_ch) + zero_bias(weight, bias)
    return new_weight, new_bias


def centred(weight: Tensor, kernel: tuple[int, int]) -> Tensor:
    """Zero-pad a conv kernel to `kernel`, centred (each size difference must be even)."""
    dh, dw = kernel[0] - weight.shape[2], kernel[1] - weight.shape[3]
    return torch.nn.functional.pad(weight.double(), (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


def identity_kernel(channels: int, groups: int, kernel: tuple[int, int], diagonal: Tensor | None = None) -> Tensor:
    """A (C, C/groups, kh, kw) kernel computing diag(d) x: channel c reads local input c mod C/groups."""
    in_per_group = channels // groups
    out = torch.zeros(channels, in_per_group, *kernel, dtype=torch.float64)
    index = torch.arange(channels)
    values = torch.ones(channels, dtype=torch.float64) if diagonal is None else diagonal.double()
    out[index, index % in_per_group, kernel[0] // 2, kernel[1] // 2] = values
    return out


def identity_matrix(features: int, diagonal: Tensor | None = None) -> Tensor:
    """diag(d) as a linear weight (the identity when d is None)."""
    values = torch.ones(features, dtype=torch.float64) if diagonal is None else diagonal.double()
    return torch.diag(values)


def to_dense(weight: Tensor, groups: int) -> Tensor:
    """A grouped conv weight as the block-diagonal dense weight (out, in, kh, kw)."""
    out_ch, in_per_group = weight.shape[0], weight.shape[1]
    dense = weight.new_zeros(out_ch, in_per_group * groups, *weight.shape[2:], dtype=torch.float64)
    per_out = out_ch // groups
    for g in range(groups):
        dense[g * per_out:(g + 1) * per_out, g * in_per_group:(g + 1) * in_per_group] = \
            weight[g * per_out:(g + 1) * per_out].double()
    return dense


def from_dense(dense: Tensor, groups: int) -> Tensor:
    """The diagonal blocks of a block-diagonal dense weight, as a grouped conv weight."""
    out_ch, in_ch = dense.shape[0], dense.shape[1]
    per_out, per_in = out_ch // groups, in_ch // groups
    return torch.cat([dense[g * per_out:(g + 1) * per_out, g * per_in:(g + 1) * per_in]
                      for g in range(groups)])


def compose_convs(first: tuple[Tensor, Tensor | None, int], second: tuple[Tensor, Tensor | None, int],
                  groups: int) -> tuple[Tensor, Tensor]:
    """conv2(conv1(x)) as one conv when one of them is 1x1 (no padding meets a nonzero bias).

    1x1 then kxk: W[o,i] = sum_m W2[o,m] W1[m,i], b = b2 + sum_{m,h,w} W2[o,m,h,w] b1[m];
    kxk then 1x1: W[o,i] = sum_m W2[o,m] W1[m,i],  b = b2 + W2 b1. Result has `groups` groups.
    """
    (w1, b1, g1), (w2, b2, g2) = first, second
    dense1, dense2 = to_dense(w1, g1), to_dense(w2, g2)
    if w1.shape[2:] == (1, 1):
        weight = torch.einsum("omhw,mi->oihw", dense2, dense1[:, :, 0, 0])
        bias = zero_bias(w2, b2) + dense2.sum(dim=(2, 3)) @ zero_bias(w1, b1)
    else:
        weight = torch.einsum("om,mihw->oihw", dense2[:, :, 0, 0], dense1)
        bias = zero_bias(w2, b2) + dense2[:, :, 0, 0] @ zero_bias(w1, b1)
    return from_dense(weight, groups), bias


def compose_linears(first: tuple[Tensor, Tensor | None], second: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor]:
    """W2 (W1 x + b1) + b2 == (W2 W1) x + (W2 b1 + b2)."""
    (w1, b1), (w2, b2) = first, second
    return w2.double() @ w1.double(), w2.double() @ zero_bias(w1, b1) + zero_bias(w2, b2)
