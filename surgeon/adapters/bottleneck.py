"""Bottleneck (serial) adapter (Houlsby et al. 2019, Pfeiffer et al. 2020): y' = y + s * U act(D y).

The branch reads the targeted linear op's full output y = W x + b: D (rank x out, `adapter_down`)
starts kaiming-uniform and U (out x rank, `adapter_up`) at zero, so insertion adds exactly zero
and is bit for bit the identity. `activation` is relu (default), gelu, silu or none; `scale` is
s. A site costs 2 * rank * out parameters.

Placement is chosen by the targets, not by an option: Pfeiffer's adapter sits after each block's
FFN only (targets ["*.mlp.down_proj"] on LLaMA, ["*.mlp.c_proj"] on GPT-2); Houlsby's after both
the attention output and the FFN (["*.o_proj", "*.down_proj"], GPT-2: ["*.attn.c_proj",
"*.mlp.c_proj"]). As in Pfeiffer's form, the adapter acts on the sublayer output before the
residual add; the layer norms are left as they are.

Merge is refused. With a nonlinearity no weight reproduces the branch. Without one,
y' = (I + s U D)(W x + b) would fold exactly into W' = (I + s U D) W and b' = (I + s U D) b, but
the merge interface changes a bias only by a per-output factor, and a full out x out mix of the
bias cannot be written through it.
"""
from __future__ import annotations

from . import AdapterKind
from .mosa import with_mosa
from .parallel_adapter import PARALLEL_OPTIONS, branch_params, branch_update


def _init(opts, in_features, out_features, dtype, gen, weight):
    return branch_params(opts, out_features, out_features, dtype, gen)


def _forward(branch, x, y, params, opts):
    return branch_update(branch, y, y, params, opts)   # serial: the branch reads the base output itself


BOTTLENECK = AdapterKind(
    name="bottleneck",
    options=PARALLEL_OPTIONS,
    init=_init,
    forward=_forward,
    delta_weight=None,
    refuse_merge=("a serial adapter transforms the layer's output y = W x + b; with a nonlinearity no weight "
                  "reproduces it, and even with activation: none the merge would have to mix the bias "
                  "(b' = (I + s U D) b), which merge cannot write (it only scales a bias per output)"),
    param_count=lambda opts, fan_in, fan_out: 2 * opts["rank"] * fan_out,
)
BOTTLENECK = with_mosa(BOTTLENECK, ("adapter_down", "adapter_up"))   # MoSA's mosa_modules / mosa_seed (adapters.mosa)
