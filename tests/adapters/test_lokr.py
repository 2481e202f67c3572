"""LoKr: Kronecker product of two factors, PEFT's factorization and full/low-rank factor rules."""
from __future__ import annotations

import pytest

from surgeon.adapters.lokr import factorization, lokr_shapes
from tests.adapters.helpers import (NAME, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, peft_export, peft_parity)

peft = pytest.importorskip("peft")


def test_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dimension in range(1, 300):
        for factor in (-1, 2, 3, 4, 8, 16):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor)


def test_factor_shapes():
    opts = {"rank": 4, "decompose_both": False, "decompose_factor": -1}
    assert lokr_shapes(opts, 64, 64) == {"lokr_w1": (8, 8), "lokr_w2": (8, 8)}              # 4 >= 8 / 2
    assert lokr_shapes(opts, 128, 64) == {"lokr_w1": (8, 8), "lokr_w2_a": (8, 4), "lokr_w2_b": (4, 16)}
    both = {**opts, "rank": 2, "decompose_both": True}
    assert lokr_shapes(both, 128, 64) == {"lokr_w1_a": (8, 2), "lokr_w1_b": (2, 8), "lokr_w2_a": (8, 2),
                                          "lokr_w2_b": (2, 16)}


@pytest.mark.parametrize("options", [{}, {"init": "lycoris", "decompose_both": True, "rank": 2}])
def test_lokr_lifecycle(options, tmp_path):
    options = {"rank": 4, "alpha": 8, **options}
    model, args, compiled = compile_kind("lokr", ["*.q_proj", "*.down_proj"], **options)
    assert_identity_insert(compiled, model, args)     # one factor is zero
    expected = sum(a * b for s in compiled.adapters[NAME].sites
                   for a, b in lokr_shapes(s.options, s.in_features, s.out_features).values())
    assert_param_count(compiled, expected)
    assert_trains(compiled, args)
    peft_export(compiled, model, args, tmp_path / "peft")
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_peft_parity(tmp_path):
    config = peft.LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], decompose_both=True,
                             rank_pattern={"v_proj": 2})
    peft_parity(config, tmp_path)


@pytest.mark.parametrize("options", [{"rank": 4}, {"rank": 2, "decompose_both": True}, {"rank": 1, "decompose_factor": 4}])
def test_linear_sites_apply_the_kronecker_product_without_building_it(options):
    """Before: kron(W1, W2) (out x in) built every forward, then a GEMM. After: x read as a b x d
    matrix X, W1 X W2^T read back (a x c); no aten.kron and no out x in value in the graph. Equal
    to the float64 Kronecker delta's output, for full and low-rank factors (b = 8, d = 16 here)."""
    import torch

    from surgeon.adapters import EagerBranch, kinds

    options = {"alpha": 3, "decompose_both": False, "decompose_factor": -1, "init": "default", **options}
    model, args, compiled = compile_kind("lokr", ["*.down_proj"], **options)
    nodes = [n for n in compiled.module.graph.nodes if n.meta.get("surgeon_adapter")]
    assert nodes and not any(n.target is torch.ops.aten.kron.default for n in nodes)
    assert not any(tuple(getattr(n.meta.get("val"), "shape", ())) == (64, 128) for n in nodes)
    lokr = kinds()["lokr"]
    gen = torch.Generator().manual_seed(0)
    params = {name: torch.randn(shape, generator=gen, dtype=torch.float64) * 0.3
              for name, shape in lokr_shapes(options, 128, 64).items()}
    x, y = torch.randn(2, 3, 128, generator=gen, dtype=torch.float64), torch.zeros(2, 3, 64, dtype=torch.float64)
    got = lokr.forward(EagerBranch((128, 64)), x, y, params, options)
    torch.testing.assert_close(got, x @ lokr.delta_weight(params, options).T, rtol=1e-12, atol=1e-12)
