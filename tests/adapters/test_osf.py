"""OSF: W's top effective_rank singular directions frozen, the low ones (U, S, V) trained, y + x (U S V - U_0 S_0
V_0)^T with gradients projected off the high subspace; init and gradients equal PEFT's on the same weight,
exact merge and unmerge, PEFT import (frozen parts rebuilt from the weight) and export."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.adapters import EagerBranch, kinds
from tests.adapters.helpers import (KW, NAME, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, peft_export, peft_parity,
                                    randomized_peft_checkpoint)
from tests.passes.helpers import logits

OSF = kinds()["osf"]
OPTS = {"effective_rank": None, "init": "default"}


def test_osf_lifecycle(tmp_path):
    # effective_rank 0.75: k_proj (64 -> 32) keeps 24 and trains 8, down_proj (128 -> 64) keeps 48 and trains 16
    model, args, compiled = compile_kind("osf", ["*.k_proj", "*.down_proj"], effective_rank=0.75)
    assert_identity_insert(compiled, model, args)   # both low products are the same ops on the same values
    assert_param_count(compiled, 2 * (8 * (32 + 64 + 1) + 16 * (64 + 128 + 1)))
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def _peft_layer(base, **config):
    peft = pytest.importorskip("peft")
    from peft.tuners.osf.layer import Linear

    return Linear(base, "default", peft.OSFConfig(**config), effective_rank=config.get("effective_rank"))


@pytest.mark.parametrize("shape", [(24, 20), (20, 24)])   # out > in (U_h stored by PEFT) and out < in (V_h)
def test_init_delta_and_gradients_match_peft(shape):
    """The frozen and trained parts are PEFT's from the same weight; the delta is PEFT's get_delta_weight, and
    the gradients of U and V are PEFT's hook-projected ones."""
    out_features, in_features = shape
    base = torch.nn.Linear(in_features, out_features)
    layer = _peft_layer(base, effective_rank=7)
    opts = {**OPTS, "effective_rank": 7}
    fresh = OSF.init(opts, in_features, out_features, torch.float32, torch.Generator().manual_seed(0),
                     base.weight.detach())
    trained = layer.osf_svd_params["default"]
    for ours, theirs in (("osf_U", "U_low"), ("osf_S", "S_low"), ("osf_V", "V_low")):
        assert torch.equal(fresh[ours], trained[theirs].detach())
        assert torch.equal(fresh[ours[:5] + "0"], getattr(layer, f"_osf_{theirs}_init")["default"])
    held = {**layer._osf_U_high, **{"V": t for t in layer._osf_V_high.values()}}
    assert len(held) == 1   # PEFT keeps the one high factor it cannot recover; both are ours
    if out_features > in_features:
        assert torch.equal(fresh["osf_U_high"], layer._osf_U_high["default"])
    else:
        assert torch.equal(fresh["osf_V_high"], layer._osf_V_high["default"])

    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in trained.values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    params = {**fresh, **{ours: trained[theirs].detach().clone().requires_grad_()
                          for ours, theirs in (("osf_U", "U_low"), ("osf_S", "S_low"), ("osf_V", "V_low"))}}
    torch.testing.assert_close(OSF.delta_weight(params, opts, base.weight.detach()),
                               layer.get_delta_weight("default").detach(), rtol=1e-5, atol=1e-6)

    x = torch.randn(5, in_features, generator=gen)
    pull = torch.randn(5, out_features, generator=gen)
    with torch.no_grad():
        y = base(x)
    ours = OSF.forward(EagerBranch((in_features, out_features)), x, y, params, opts)
    (ours * pull).sum().backward()
    (layer(x) * pull).sum().backward()
    torch.testing.assert_close(ours, layer(x), rtol=1e-5, atol=1e-6)
    for name, theirs in (("osf_U", "U_low"), ("osf_V", "V_low"), ("osf_S", "S_low")):   # PEFT sums 2m terms in
        torch.testing.assert_close(params[name].grad, trained[theirs].grad, rtol=1e-4, atol=1e-5)   # one GEMM
    # the projected gradients have no part along the frozen high directions
    U_high, V_high = fresh["osf_U_high"], fresh["osf_V_high"]
    assert (U_high.T @ params["osf_U"].grad).abs().max() < 1e-5
    assert (params["osf_V"].grad @ V_high.T).abs().max() < 1e-5


def test_random_init_changes_the_function():
    model, args, compiled = compile_kind("osf", ["*.q_proj"], effective_rank=16, init="random")
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)


def test_an_effective_rank_that_leaves_nothing_to_train_is_refused():
    with pytest.raises(surgeon.PassError, match="leave at least one to train"):
        compile_kind("osf", ["*.k_proj"], effective_rank=32)   # k_proj: min(64, 32) = 32


@pytest.mark.parametrize("options", [{"effective_rank": 0.5, "rank_pattern": {"k_proj": 20}}, {}])
def test_peft_parity(tmp_path, options):
    """A randomized PEFT OSF checkpoint (U, S, V only) imports with PEFT's outputs before and after merge: the
    frozen parts are rebuilt from the base weights as PEFT rebuilds them; it exports back (rank_pattern)."""
    peft = pytest.importorskip("peft")
    config = peft.OSFConfig(target_modules=["q_proj", "k_proj", "down_proj"], **options)
    compiled = peft_parity(config, tmp_path / "in", scale=0.05)
    ranks = sorted(s.options["effective_rank"] for s in compiled.adapters[NAME].sites)
    assert ranks == ([20, 20, 32, 32, 32, 32] if options else [16, 16, 32, 32, 32, 32])
    if not options:
        return
    model, args, _ = randomized_peft_checkpoint(config, tmp_path / "again", scale=0.05)
    again = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "again")}]}, KW)
    peft_export(again, model, args, tmp_path / "out")


def test_peft_export(tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("osf", ["*.q_proj", "*.k_proj", "*.up_proj"], effective_rank=10)
    peft_export(compiled, model, args, tmp_path)


def test_a_malformed_checkpoint_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    model, args, _ = randomized_peft_checkpoint(peft.OSFConfig(target_modules=["q_proj"]), tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v[:-1] if k.endswith("S_low") else v for k, v in tensors.items()},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(surgeon.SpecError, match="needs osf_svd_params U_low"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)
