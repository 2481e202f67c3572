"""LoHa: Hadamard product of two rank-r factors; exact identity, merge, PEFT parity."""
from __future__ import annotations

import pytest

from tests.adapters.helpers import (assert_identity_insert, assert_merge, assert_param_count, assert_round_trip,
                                    assert_trains, compile_kind, peft_export, peft_parity)

peft = pytest.importorskip("peft")


def test_loha_lifecycle(tmp_path):
    model, args, compiled = compile_kind("loha", ["*.q_proj", "*.down_proj"], rank=4, alpha=8)
    assert_identity_insert(compiled, model, args)     # W2b = 0
    assert_param_count(compiled, 2 * 2 * 4 * (64 + 64) + 2 * 2 * 4 * (128 + 64))
    assert_trains(compiled, args)
    peft_export(compiled, model, args, tmp_path / "peft")
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_peft_parity(tmp_path):
    config = peft.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})
    peft_parity(config, tmp_path)


@pytest.mark.parametrize("rank,factored", [(4, True), (6, False)])
def test_linear_sites_run_loha_as_a_rank_r2_lora_without_the_full_delta(rank, factored):
    """Before: (W1a W1b) ⊙ (W2a W2b) built (out x in) every forward, then a GEMM. After, where
    r^2 (in + out) < in * out: x through D (r^2 x in), then U (out x r^2), D and U built from the
    factors by the face-splitting identity. q_proj is 64 x 64: r = 4 gives 16 * 128 < 4096, r = 6
    gives 36 * 128 > 4096 and keeps the full delta. Both equal the float64 delta's output (on a
    48 x 40 site: r = 4 factored, r = 6 not)."""
    import torch

    from surgeon.adapters import EagerBranch, kinds

    model, args, compiled = compile_kind("loha", ["*.q_proj"], rank=rank, alpha=2 * rank)
    shapes = {tuple(d if isinstance(d, int) else str(d) for d in n.meta["val"].shape)   # batch, length: symbols
              for n in compiled.module.graph.nodes if n.meta.get("surgeon_adapter") and hasattr(n.meta.get("val"), "shape")}
    assert ((64, 64) in shapes) != factored and ((rank * rank, 64) in shapes) == factored
    gen = torch.Generator().manual_seed(0)
    params = {name: torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3 for name, shape in
              (("hada_w1_a", (48, rank)), ("hada_w1_b", (rank, 40)), ("hada_w2_a", (48, rank)),
               ("hada_w2_b", (rank, 40)))}
    opts = {"rank": rank, "alpha": 2 * rank}
    x, y = torch.randn(3, 5, 40, generator=gen, dtype=torch.float64), torch.zeros(3, 5, 48, dtype=torch.float64)
    loha = kinds()["loha"]
    got = loha.forward(EagerBranch((40, 48)), x, y, params, opts)
    torch.testing.assert_close(got, x @ loha.delta_weight(params, opts).T, rtol=1e-12, atol=1e-12)
