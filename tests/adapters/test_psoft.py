"""PSOFT: y + s B (R - I) A x with A, B frozen from the base weight's SVD and R = diag(b) Cayley(Q) diag(a);
init equal to PEFT's on the same weight, exact merge and unmerge, PEFT import (A, B rebuilt from the weight)
and export."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.adapters import kinds
from surgeon.graph import get_tensor
from tests.adapters.helpers import (assert_merge_checkpoint_matches, KW, NAME, assert_dropout_in_training_only, assert_identity_insert, assert_merge,
                                    assert_param_count, assert_round_trip, assert_trains, compile_kind, peft_export,
                                    peft_parity, randomized_peft_checkpoint)
from tests.passes.helpers import logits

PSOFT = kinds()["psoft"]
DEFAULTS = {name: option.default for name, option in PSOFT.options.items()}


def _peft_layer(base, **config):
    """PEFT's PSOFT layer on `base` (an nn.Linear), its trained tensors moved off their init."""
    peft = pytest.importorskip("peft")
    from peft.tuners.psoft.layer import Linear

    layer = Linear(base, "default", peft.PsoftConfig(**config))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in layer.psoft_R["default"].parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return layer


def _params(layer) -> dict:
    """The PEFT layer's tensors under surgeon's names."""
    A, B = layer._get_psoft_ab_cache_buffers("default")
    R = layer.psoft_R["default"]
    params = {"psoft_A": A, "psoft_B": B, "psoft_R": R.weight.detach()}
    params.update({f"psoft_vector_{s}": getattr(R, f"vector_{s}").detach() for s in ("a", "b")
                   if getattr(R, f"vector_{s}") is not None})
    return params


def test_psoft_lifecycle(tmp_path):
    model, args, compiled = compile_kind("psoft", ["*.k_proj", "*.down_proj"], rank=4)
    assert_identity_insert(compiled, model, args)      # Q = 0, vectors 1: R = I, the branch adds exact zeros
    assert_param_count(compiled, 4 * (6 + 4 + 4))      # 2 layers x 2 sites: r(r-1)/2 + 2r; A, B frozen
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


@pytest.mark.parametrize("config", [
    {"ab_svd_init": "psoft_init"},
    {"ab_svd_init": "pissa_init", "psoft_alpha": 8},
    {"psoft_svd": "lowrank", "psoft_svd_lowrank_niter": 3, "random_seed": 5, "psoft_mag_a": False},
    {"psoft_orth": False, "psoft_mag_b": False},
    {"use_cayley_neumann": True, "num_cayley_neumann_terms": 4, "cayley_neumann_eps": 0.3},
])
def test_init_and_delta_match_peft(config):
    """A and B are PEFT's, bit for bit, from the same weight; the delta is PEFT's get_delta_weight."""
    base = torch.nn.Linear(24, 20)
    layer = _peft_layer(base, r=5, **config)
    keys = {"ab_svd_init": "ab_init", "psoft_svd": "svd", "psoft_svd_lowrank_niter": "lowrank_niter",
            "random_seed": "seed", "psoft_alpha": "alpha", "psoft_orth": "orth", "psoft_mag_a": "mag_a",
            "psoft_mag_b": "mag_b"}
    opts = {**DEFAULTS, "rank": 5, **{keys.get(k, k): v for k, v in config.items()}}
    opts["ab_init"] = opts["ab_init"].removesuffix("_init")
    fresh = PSOFT.init(opts, 24, 20, torch.float32, torch.Generator().manual_seed(0), base.weight.detach())
    params = _params(layer)
    assert torch.equal(fresh["psoft_A"], params["psoft_A"]) and torch.equal(fresh["psoft_B"], params["psoft_B"])
    assert {n: t.shape for n, t in fresh.items()} == {n: t.shape for n, t in params.items()}
    delta = PSOFT.delta_weight(params, opts, base.weight.detach())
    assert delta.abs().max() > 1e-2
    torch.testing.assert_close(delta, layer.get_delta_weight("default").detach(), rtol=1e-5, atol=1e-6)


def test_rotation_is_orthogonal_without_vectors():
    """With orth and no vectors R is a rotation: B (R - I) A moves W's principal subspace, not its scale."""
    opts = {**DEFAULTS, "rank": 6, "mag_a": False, "mag_b": False}
    weight = torch.randn(16, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = PSOFT.init(opts, 12, 16, torch.float64, torch.Generator().manual_seed(1), weight)
    params["psoft_R"] = torch.randn(params["psoft_R"].shape, generator=torch.Generator().manual_seed(2),
                                    dtype=torch.float64)
    merged = weight + PSOFT.delta_weight(params, opts, weight)
    torch.testing.assert_close(torch.linalg.svdvals(merged), torch.linalg.svdvals(weight))


def test_random_init_changes_the_function():
    model, args, compiled = compile_kind("psoft", ["*.q_proj"], rank=3, init="random")
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)


def test_dropout_acts_in_training_only():
    _, args, compiled = compile_kind("psoft", ["*.q_proj", "*.up_proj"], rank=4, dropout=0.5)
    assert_dropout_in_training_only(compiled, args)


@pytest.mark.parametrize("options", [
    {"r": 4},
    {"r": 3, "psoft_orth": False, "psoft_mag_a": False, "ab_svd_init": "pissa_init", "psoft_dropout": 0.1},
    {"r": 4, "use_cayley_neumann": True, "cayley_neumann_eps": 0.5, "psoft_svd": "lowrank", "random_seed": 2},
])
def test_peft_parity(tmp_path, options):
    """A randomized PEFT PSOFT checkpoint (R and vectors only) imports with PEFT's outputs before and after
    merge: A and B are rebuilt from the base weights as PEFT rebuilds them. It exports back."""
    peft = pytest.importorskip("peft")
    config = peft.PsoftConfig(target_modules=["q_proj", "k_proj", "down_proj"], **options)
    compiled = peft_parity(config, tmp_path / "in")
    state = compiled.adapters[NAME]
    assert state.spec.options["rank"] == options["r"]
    if len(options) > 1:
        return
    model, args, _ = randomized_peft_checkpoint(config, tmp_path / "again")
    again = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "again")}]}, KW)
    site = again.adapters[NAME].sites[0]
    weight = dict(model.named_parameters())[f"{site.path}.weight"]
    opts = {**DEFAULTS, **site.options}
    fresh = PSOFT.init(opts, weight.shape[1], weight.shape[0], torch.float32, None, weight.detach())
    assert torch.equal(get_tensor(again.module, site.params["psoft_A"]), fresh["psoft_A"])
    peft_export(again, model, args, tmp_path / "out")


def test_peft_export(tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("psoft", ["*.q_proj", "*.k_proj", "*.up_proj"], rank=5, alpha=10,
                                         mag_a=False)
    peft_export(compiled, model, args, tmp_path)


def test_merge_checkpoint_rebuilds_the_factors_from_the_checkpoint(tmp_path):
    """merge-checkpoint of a PEFT PSOFT folder takes A and B from the base checkpoint's weights, and writes
    what the merge pass writes in memory."""
    peft = pytest.importorskip("peft")
    config = peft.PsoftConfig(target_modules=["q_proj", "down_proj"], r=4)
    assert_merge_checkpoint_matches(config, tmp_path)


def test_a_malformed_checkpoint_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    model, args, _ = randomized_peft_checkpoint(peft.PsoftConfig(target_modules=["q_proj"], r=4), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("vector_a")}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(surgeon.SpecError, match="psoft_mag_a=True"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)


def test_rank_above_min_in_out_is_refused():
    with pytest.raises(surgeon.SpecError, match="at most min"):
        compile_kind("psoft", ["*.k_proj"], rank=40)   # k_proj: 64 -> 32
