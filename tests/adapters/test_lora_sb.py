"""LoRA-XS's `init: lora_sb` (LoRA-SB): B, R, A from the SVD of one full fine-tuning step of W.

Not in PEFT: checked against the definition, with the gradient taken directly by torch.autograd on the
eager Hugging Face model (labels = input_ids, its own loss): s B R A equals the rank-r SVD of -lr G
(and of -lr sign(G)), the insert applies exactly that to the function, B and A stay frozen while R
trains, and the lifecycle (merge, round trip) holds."""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from surgeon.graph import get_tensor
from tests.adapters.helpers import KW, NAME, assert_merge, assert_trains, spec
from tests.conftest import hf_gpt2, hf_llama
from tests.passes.helpers import logits

RANK, ALPHA, LR = 4, 8, 0.5
TARGETS = ["*.q_proj", "*.down_proj"]


def _eager_gradients(model, args, paths, transposed=False):
    model.zero_grad()
    with torch.enable_grad():
        model(input_ids=args[0], labels=args[0], **KW).loss.backward()
    out = {}
    for path in paths:
        grad = model.get_submodule(path).weight.grad.detach().clone()
        out[path] = grad.t() if transposed else grad
    model.zero_grad()
    return out


def _factors(compiled, site):
    return (get_tensor(compiled.module, site.params[p]).detach().double() for p in ("lora_B", "lora_R", "lora_A"))


def _rank_r(matrix, rank):
    U, S, Vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


@pytest.mark.parametrize("update", ["gradient", "sign"])
def test_b_r_a_is_the_rank_r_svd_of_the_first_step(update):
    model, args = hf_llama(layers=1)
    compiled = surgeon.compile(model, args, spec("lora-xs", TARGETS, rank=RANK, alpha=ALPHA, init="lora_sb",
                                                 lora_sb_lr=LR, lora_sb_update=update), KW)
    sites = compiled.adapters[NAME].sites
    grads = _eager_gradients(model, args, [s.path for s in sites])
    for site in sites:
        B, R, A = _factors(compiled, site)
        step = -LR * (grads[site.path] if update == "gradient" else grads[site.path].sign())
        scale = _rank_r(step, RANK).abs().max().item()   # float32 SVD against float64
        torch.testing.assert_close(ALPHA / RANK * B @ R @ A, _rank_r(step, RANK), rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(B.T @ B, torch.eye(RANK, dtype=B.dtype), rtol=0, atol=1e-5)   # orthonormal bases
        torch.testing.assert_close(get_tensor(compiled.module, site.weight), model.get_submodule(site.path).weight)
    # the insert applies the step: the compiled model is the eager one with W + rank-r(step)
    stepped = copy.deepcopy(model)
    with torch.no_grad():
        for site in sites:
            step = -LR * (grads[site.path] if update == "gradient" else grads[site.path].sign())
            stepped.get_submodule(site.path).weight.add_(_rank_r(step, RANK).float())
    torch.testing.assert_close(logits(compiled.module, args), logits(stepped, args), rtol=1e-4, atol=1e-5)
    assert (logits(compiled.module, args) - logits(model, args)).abs().max() > 1e-3   # the step changes it


def test_gpt2_conv1d_gradient_is_transposed():
    model, args = hf_gpt2()
    compiled = surgeon.compile(model, args, spec("lora-xs", ["*.c_attn"], rank=RANK, alpha=ALPHA, init="lora_sb",
                                                 lora_sb_lr=LR), KW)
    sites = compiled.adapters[NAME].sites
    grads = _eager_gradients(model, args, [s.path for s in sites], transposed=True)   # Conv1D: in x out
    for site in sites:
        B, R, A = _factors(compiled, site)
        assert B.shape == (96, RANK) and A.shape == (RANK, 32)
        torch.testing.assert_close(ALPHA / RANK * B @ R @ A, _rank_r(-LR * grads[site.path], RANK),
                                   rtol=1e-4, atol=1e-6)


def test_only_r_trains_and_the_lifecycle_holds(tmp_path):
    model, args = hf_llama(layers=1)
    compiled = surgeon.compile(model, args, spec("lora-xs", TARGETS, rank=RANK, alpha=ALPHA, init="lora_sb",
                                                 lora_sb_lr=LR), KW)
    state = compiled.adapters[NAME]
    assert state.param_count == 2 * RANK * RANK
    before = {(s.path, p): get_tensor(compiled.module, s.params[p]).detach().clone()
              for s in state.sites for p in ("lora_A", "lora_B", "lora_R")}
    assert_trains(compiled, args)   # only R requires grad (asserted there), and the loss falls
    for (path, name), value in before.items():
        site = next(s for s in state.sites if s.path == path)
        now = get_tensor(compiled.module, site.params[name])
        assert torch.equal(now, value) == (name != "lora_R"), (path, name)
    expected = logits(compiled.module, args)
    compiled.save_adapter(NAME, tmp_path / "saved")
    again = surgeon.compile(model, args, {"adapters": [{"name": "again", "from_dir": str(tmp_path / "saved")}]}, KW)
    assert torch.equal(logits(again.module, args), expected)
    assert_merge(compiled, args)


def test_refusals():
    model, args = hf_llama(layers=1)
    with pytest.raises(surgeon.SpecError, match="lora_sb_update"):
        surgeon.compile(model, args, spec("lora-xs", TARGETS, init="lora_sb", lora_sb_update="momentum"), KW)
    from surgeon.adapters.lora_sb import lora_sb_factors
    with pytest.raises(surgeon.SpecError, match="only a compile with example inputs"):
        lora_sb_factors(None, torch.randn(8, 8), 2, 1.0, {"lora_sb_update": "gradient", "lora_sb_lr": 1.0})
