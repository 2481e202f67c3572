"""LoRA's `init: lora_ga` (LoRA-GA): factors from the SVD of the loss gradient of W on the compile's example
inputs, the base keeping the residual.

Checked against PEFT 0.21's own preprocess_loraga + get_peft_model on hf_llama with the same batch and the
same loss (next-token cross-entropy, labels = input_ids, float32): A, B and the residual base weights for
each direction and scale. PEFT's randomized SVD is exact here (q = 4r reaches min(out, in)); its component
signs are random, so the parity runs pin them with surgeon's convention (a wrapper around torch.svd_lowrank
that fixes each component's sign), and a second run without the wrapper compares A and B up to those signs.
Then the lifecycle and the refusals (PEFT export and import, a model without logits)."""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from surgeon.graph import get_tensor
from tests.adapters.helpers import KW, NAME, assert_close, assert_merge, assert_trains, spec
from tests.conftest import assert_untouched, hf_bert, hf_llama, snapshot
from tests.passes.helpers import logits

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")   # PEFT's gradient hook on frozen inputs
TARGETS = ["*.q_proj", "*.down_proj"]   # hf_llama: q_proj 64 -> 64, down_proj 128 -> 64
RANK, ALPHA = 16, 32   # 4r = 64 = min(out, in): PEFT's svd_lowrank spans the whole range


def _model():
    model, _ = hf_llama(layers=1)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))   # 80 tokens > 2r
    return model, (ids,)


def _pinned_svd_lowrank(matrix, q=6, niter=2, M=None):
    """torch.svd_lowrank's q leading components, exact and with surgeon's signs (PEFT's draws pinned)."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    sign = U[:, :q].gather(0, U[:, :q].abs().argmax(dim=0, keepdim=True)).sign()
    return U[:, :q] * sign, S[:q], Vh[:q].T * sign


def _peft_lora_ga(model, args, direction="ArB2r", scale="stable", targets=("q_proj", "down_proj")):
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    wrapped = copy.deepcopy(model)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(targets), init_lora_weights="lora_ga",
                             lora_ga_config=LoraGAConfig(direction=direction, scale=scale))
    ids = args[0]
    preprocess_loraga(wrapped, config, lambda: wrapped(input_ids=ids, labels=ids, **KW).loss.backward())
    return peft.get_peft_model(wrapped, config).eval()


def _compile(model, args, **options):
    return surgeon.compile(model, args, spec("lora", TARGETS, rank=RANK, alpha=ALPHA, init="lora_ga", **options), KW)


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("A2rBr", "weight_svd"), ("ArBr", "gd_scale")])
def test_factors_and_residual_equal_peft(monkeypatch, direction, scale):
    model, args = _model()
    before = snapshot(model)
    compiled = _compile(model, args, lora_ga_direction=direction, lora_ga_scale=scale)
    assert_untouched(model, before)
    monkeypatch.setattr(torch, "svd_lowrank", _pinned_svd_lowrank)
    wrapped = _peft_lora_ga(model, args, direction, scale)
    sites = compiled.adapters[NAME].sites
    assert len(sites) == 2
    for site in sites:
        layer = wrapped.base_model.model.get_submodule(site.path)
        for ours, theirs in (("lora_A", layer.lora_A["default"].weight), ("lora_B", layer.lora_B["default"].weight)):
            torch.testing.assert_close(get_tensor(compiled.module, site.params[ours]), theirs.detach(),
                                       rtol=1e-4, atol=1e-4, msg=f"{site.path} {ours}")
        torch.testing.assert_close(get_tensor(compiled.module, site.weight), layer.base_layer.weight.detach(),
                                   rtol=1e-4, atol=1e-4, msg=f"{site.path} residual")
    assert_close(logits(compiled.module, args), logits(model, args))   # residual + s B A == W up to rounding
    assert_close(logits(wrapped, args), logits(model, args))


def test_unpinned_peft_equals_up_to_component_signs():
    model, args = _model()
    compiled = _compile(model, args)
    wrapped = _peft_lora_ga(model, args)
    for site in compiled.adapters[NAME].sites:
        layer = wrapped.base_model.model.get_submodule(site.path)
        A, B = (get_tensor(compiled.module, site.params[p]) for p in ("lora_A", "lora_B"))
        A_peft, B_peft = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        row_signs = (A * A_peft).sum(1).sign()[:, None]
        col_signs = (B * B_peft).sum(0).sign()[None, :]
        torch.testing.assert_close(A * row_signs, A_peft, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(B * col_signs, B_peft, rtol=1e-4, atol=1e-4)


def test_the_gradient_is_peft_s():
    from peft.tuners.lora.loraga import preprocess_loraga
    from surgeon.grad_calibration import weight_gradients

    model, args = _model()
    wrapped = copy.deepcopy(model)
    config = peft.LoraConfig(r=RANK, target_modules=["q_proj"], init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig())
    preprocess_loraga(wrapped, config, lambda: wrapped(input_ids=args[0], labels=args[0], **KW).loss.backward())
    compiled = surgeon.compile(model, args, spec("lora", ["*.q_proj"], rank=2), KW)
    sites = compiled.adapters[NAME].sites
    grads = weight_gradients(compiled.module, [(compiled.ctx.example_args, compiled.ctx.example_kwargs)],
                             {s.path: (s.weight, False, 1) for s in sites})
    for site in sites:
        theirs = wrapped.get_submodule(site.path)._peft_loraga_grad
        torch.testing.assert_close(grads[site.path], theirs, rtol=1e-4, atol=1e-6)


def test_lifecycle_round_trip_and_refused_peft_formats(tmp_path):
    model, args = _model()
    compiled = _compile(model, args, lora_ga_direction="A2rBr")
    assert compiled.adapters[NAME].param_count == RANK * ((64 + 64) + (128 + 64))
    assert_trains(compiled, args)
    for site in compiled.adapters[NAME].sites:
        get_tensor(compiled.module, site.params["lora_B"]).data.add_(0.01)
    expected = logits(compiled.module, args)
    compiled.save_adapter(NAME, tmp_path / "saved")
    again = surgeon.compile(model, args, {"adapters": [{"name": "again", "from_dir": str(tmp_path / "saved")}]}, KW)
    assert torch.equal(logits(again.module, args), expected)   # the residual recomputed from W and the same inputs
    with pytest.raises(surgeon.SpecError, match="PEFT loads a lora_ga checkpoint onto the unchanged W"):
        compiled.save_adapter(NAME, tmp_path / "peft", format="peft")
    assert_merge(compiled, args)


def test_peft_lora_ga_checkpoints_are_refused_with_the_reason(tmp_path):
    model, args = _model()
    wrapped = _peft_lora_ga(model, args, targets=("q_proj",))
    wrapped.save_pretrained(tmp_path / "ga")
    with pytest.raises(surgeon.SpecError, match="path_initial_model_for_weight_conversion"):
        surgeon.compile(model, args, {"adapters": [{"name": "x", "from_peft": str(tmp_path / "ga")}]}, KW)


def test_refusals_name_the_reason():
    model, args = _model()
    with pytest.raises(surgeon.SpecError, match="lora_ga_direction"):
        _compile(model, args, lora_ga_direction="sideways")
    with pytest.raises(surgeon.SpecError, match="rank"):   # 2r components of a 64 x 64 gradient
        surgeon.compile(model, args, spec("lora", ["*.q_proj"], rank=40, init="lora_ga"), KW)
    bert, bert_args, bert_kwargs = hf_bert()
    with pytest.raises(surgeon.SpecError, match="logits"):   # BertModel outputs hidden states
        surgeon.compile(bert, bert_args, spec("lora", ["*.query"], rank=2, init="lora_ga"), bert_kwargs)
    compiled = _compile(model, args)
    with pytest.raises(surgeon.SurgeonError, match="rewrote the base weight"):
        compiled.module(*args, adapter_names=[NAME, NAME])


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr", "random"])
def test_directions_split_the_gradient_s_leading_components(direction):
    from surgeon.adapters.lora_ga import gradient_svd, lora_ga_factors

    gen = torch.Generator().manual_seed(0)
    weight, grad = torch.randn(24, 32, generator=gen), torch.randn(24, 32, generator=gen)
    U, S, Vh = gradient_svd(grad, 6)
    torch.testing.assert_close(U.T @ U, torch.eye(6), rtol=0, atol=1e-5)
    assert (U.gather(0, U.abs().argmax(0, keepdim=True)) > 0).all() and (S[:-1] >= S[1:]).all()
    opts = {"lora_ga_direction": direction, "lora_ga_scale": "unit", "lora_ga_gamma": 16}
    A, B = lora_ga_factors(weight, grad, 3, 2.0, opts)
    rows = [int((Vh @ a).abs().argmax()) for a in A]   # which component each row of A is
    cols = [int((U.T @ b).abs().argmax()) for b in B.T]
    expected = {"ArB2r": ([0, 1, 2], [3, 4, 5]), "A2rBr": ([3, 4, 5], [0, 1, 2]), "ArBr": ([1, 3, 5], [0, 2, 4])}
    if direction == "random":
        assert rows == cols and len(set(rows)) == 3
    else:
        assert (rows, cols) == expected[direction]
    torch.testing.assert_close(A, Vh[rows])
    torch.testing.assert_close(B, U[:, cols] * S[cols])
    stable = lora_ga_factors(weight, grad, 3, 2.0, {**opts, "lora_ga_scale": "stable"})[1]
    torch.testing.assert_close(stable, B * 24 ** 0.25 / 4)
