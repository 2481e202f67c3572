"""Issue 19: LoRA's `init: olora` and `init: orthogonal`, with PEFT 0.21 parity.

OLoRA: the reduced QR W = Q R gives B = Q[:, :r], A = R[:r], and the base keeps W - s B A (as
PiSSA's residual), so insert is the identity up to rounding ("close"). Orthogonal: A's columns and
B's rows lie in the two halves (rows 0, 2, .. and 1, 3, ..) of a random r x r orthogonal matrix, so
B A = 0 only up to rounding and the base is left alone: also "close", never bit for bit.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import surgeon
from surgeon.graph import get_tensor
from tests.adapters.helpers import (KW, NAME, assert_close, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, spec)
from tests.conftest import assert_untouched, hf_llama, peft_lora_checkpoint, randomize_adapters, small_cnn, snapshot
from tests.passes.helpers import logits

peft = pytest.importorskip("peft")
TARGETS = ["*.q_proj", "*.v_proj"]
RANK, ALPHA, SCALE = 4, 8, 2.0   # s = alpha / r
TOL = dict(rtol=1e-5, atol=1e-5)
INITS = ["olora", "orthogonal"]


def _factors(compiled) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{site path: (base weight, A, B)} as float64, in graph (insertion) order."""
    return {s.path: tuple(get_tensor(compiled.module, t).detach().double()
                          for t in (s.weight, s.params["lora_A"], s.params["lora_B"]))
            for s in compiled.adapters[NAME].sites}


def _original(model, path: str) -> torch.Tensor:
    return model.get_submodule(path).weight.detach().double()


def _peft_model(model, init: str):
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    return peft.get_peft_model(copy.deepcopy(model), config).eval()


def test_olora_factors_are_the_qr_of_w_and_the_base_keeps_the_residual(tmp_path):
    model, args, compiled = compile_kind("lora", TARGETS, rank=RANK, alpha=ALPHA, init="olora")
    before = snapshot(model)
    assert_identity_insert(compiled, model, args, exact=False)   # W - s B A + s B A == W up to rounding
    sites = _factors(compiled)
    assert len(sites) == 4   # q_proj and v_proj (64 -> 32) of both layers
    for path, (residual, A, B) in sites.items():
        W = _original(model, path)
        assert A.shape == (RANK, W.shape[1]) and B.shape == (W.shape[0], RANK)
        # B: r orthonormal columns; A: upper trapezoidal; together the first r columns of W's QR
        torch.testing.assert_close(B.T @ B, torch.eye(RANK, dtype=torch.float64), **TOL)
        assert torch.count_nonzero(A.tril(-1)) == 0, path
        torch.testing.assert_close(B @ A[:, :RANK], W[:, :RANK], **TOL)   # W[:, :r] = Q_r R[:r, :r]
        torch.testing.assert_close(A, B.T @ W, **TOL)                      # R[:r] = Q_r^T W
        torch.testing.assert_close(residual, W - SCALE * B @ A, **TOL)
        assert not torch.allclose(residual, W, atol=1e-3)   # the base really holds the residual, not W
    assert_param_count(compiled, 2 * RANK * (64 + 64) + 2 * RANK * (64 + 32))
    assert_trains(compiled, args)
    assert_untouched(model, before)                        # the residual is a new tensor
    assert_round_trip(compiled, model, args, tmp_path)     # a from_dir load recomputes the same residual


def test_orthogonal_factors_multiply_to_zero_and_the_base_is_untouched():
    model, args, compiled = compile_kind("lora", TARGETS, rank=RANK, alpha=ALPHA, init="orthogonal")
    assert_identity_insert(compiled, model, args, exact=False)   # "close": B A is 0 only up to rounding
    for path, (base, A, B) in _factors(compiled).items():
        assert torch.equal(base, _original(model, path)), path   # no base rewrite, as in PEFT
        # rank r/2 each (singular values below 1e-5 of the largest are fp32 rounding of zeros)
        assert torch.linalg.matrix_rank(A, rtol=1e-5) == RANK // 2 == torch.linalg.matrix_rank(B, rtol=1e-5)
        # A's column space and B's row space are orthogonal complements in R^r, so B A = 0
        P_A, P_B = A @ torch.linalg.pinv(A, rtol=1e-5), torch.linalg.pinv(B, rtol=1e-5) @ B
        torch.testing.assert_close(P_A + P_B, torch.eye(RANK, dtype=torch.float64), **TOL)
        product = B.float() @ A.float()   # as the graph computes it, in fp32
        assert product.abs().max() < 1e-6 and product.abs().max() > 0, path   # ~1e-8: why the check is "close"
        assert A.abs().max() > 1e-2 and B.abs().max() > 1e-2   # both factors are nonzero (unlike B = 0)
    assert_trains(compiled, args)


def test_orthogonal_refuses_an_odd_rank():
    model, args = hf_llama()
    with pytest.raises(surgeon.SpecError, match="orthogonal needs an even rank .* got rank 3"):
        surgeon.compile(model, args, spec("lora", TARGETS, rank=3, init="orthogonal"), KW)


@pytest.mark.parametrize("init", INITS)
def test_peft_parity_of_factors_base_weights_outputs_and_merge(init):
    model, args, compiled = compile_kind("lora", TARGETS, rank=RANK, alpha=ALPHA, init=init)
    wrapped = _peft_model(model, init)
    sites = _factors(compiled)
    layers = {path: wrapped.base_model.model.get_submodule(path) for path in sites}
    if init == "orthogonal":
        # PEFT draws from the global RNG, after each nn.Linear's own init draws; its orthogonal_init run
        # again from surgeon's seed (the spec's seed, 0), site by site in surgeon's order, makes the same draws
        with torch.random.fork_rng():
            torch.manual_seed(compiled.ctx.spec.seed)
            for layer in layers.values():
                layer.orthogonal_init("default")
    for path, (base, A, B) in sites.items():
        layer = layers[path]
        torch.testing.assert_close(A, layer.lora_A["default"].weight.detach().double(), **TOL)
        torch.testing.assert_close(B, layer.lora_B["default"].weight.detach().double(), **TOL)
        torch.testing.assert_close(base, layer.base_layer.weight.detach().double(), **TOL)
        assert layer.scaling["default"] == SCALE
    assert_close(logits(compiled.module, args), logits(wrapped, args))   # at init
    # the same trained factors on both sides: same outputs, before and after merge
    randomize_adapters(compiled.module, seed=3)
    with torch.no_grad():
        for site in compiled.adapters[NAME].sites:
            for p in ("lora_A", "lora_B"):
                getattr(layers[site.path], p)["default"].weight.copy_(get_tensor(compiled.module, site.params[p]))
    expected = logits(wrapped, args)
    assert not torch.allclose(expected, logits(model, args), atol=1e-3)
    assert_close(logits(compiled.module, args), expected)
    compiled.apply(["merge"])
    merged_peft = wrapped.merge_and_unload()
    assert_close(logits(compiled.module, args), logits(merged_peft, args))
    for site in compiled.adapters[NAME].sites:
        torch.testing.assert_close(get_tensor(compiled.module, site.weight).detach().double(),
                                   merged_peft.get_submodule(site.path).weight.detach().double(), **TOL)


@pytest.mark.parametrize("init", INITS)
def test_peft_checkpoints_import_and_export_with_their_init(init, tmp_path):
    """A trained PEFT olora adapter holds A and B for the residual base W - s B0 A0, which PEFT rebuilds
    from W on load: surgeon imports it with init olora (the residual recomputed) and exports
    init_lora_weights "olora" (with True, PEFT loads it onto W instead of the residual)."""
    model, args = hf_llama()
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    wrapped = peft_lora_checkpoint(model, config, tmp_path / "peft", scale=0.05, seed=5)
    want = logits(wrapped, args)
    assert not torch.allclose(want, logits(model, args), atol=1e-3)
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "peft")}]}, KW)
    assert compiled.adapters[NAME].spec.options["init"] == ("olora" if init == "olora" else "default")
    assert_close(logits(compiled.module, args), want)
    compiled.save_adapter(NAME, tmp_path / "out", format="peft")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "out").eval()
    assert_close(logits(reloaded, args), want)


@pytest.mark.parametrize("init", INITS)
def test_merge_is_the_original_weight_plus_the_trained_delta(init):
    model, args, compiled = compile_kind("lora", TARGETS, rank=RANK, alpha=ALPHA, init=init)
    initial = _factors(compiled)
    randomize_adapters(compiled.module, seed=2)
    trained = _factors(compiled)
    compiled.apply(["merge"])
    merged = {s.path: get_tensor(compiled.module, s.weight).detach().double() for s in compiled.adapters[NAME].sites}
    for path, (_, A0, B0) in initial.items():
        W, (_, A, B) = _original(model, path), trained[path]
        # the base held W - s B0 A0 (olora) or W (orthogonal, B0 A0 ~ 0): either way W + s (B A - B0 A0)
        torch.testing.assert_close(merged[path], W + SCALE * (B @ A - B0 @ A0), **TOL)
        assert not torch.allclose(merged[path], W, atol=1e-3)   # the trained delta is really there
    compiled.apply(["unmerge"])
    assert_merge(compiled, args)   # merged output == unmerged output (fp32 tolerance), and back


@pytest.mark.parametrize("init", INITS)
def test_olora_and_orthogonal_on_a_plain_conv_insert_close_and_merge(init):
    model, args = small_cnn()
    compiled = surgeon.compile(model, args, spec("lora", ["stem.0", "block1.0"], rank=2, alpha=4, init=init))
    row = compiled.report.rows[-1]
    assert row.matches == 2 and row.check.startswith("rel err"), row.check
    assert_close(logits(compiled.module, args), logits(model, args))
    randomize_adapters(compiled.module)
    before = logits(compiled.module, args)
    compiled.apply(["merge"])
    assert_close(logits(compiled.module, args), before)


class _Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4)

    def forward(self, x):
        return self.depthwise(x)


@pytest.mark.parametrize("init", INITS)
def test_grouped_convs_are_refused_with_the_reason(init):
    model, args = _Depthwise().eval(), (torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(0)),)
    with pytest.raises(surgeon.SpecError, match=f"groups=4.*the {init} init makes a dense out x r B"):
        surgeon.compile(model, args, spec("lora", ["depthwise"], rank=4, init=init))


def test_a_bad_init_is_refused_naming_the_option_and_the_choices():
    model, args = hf_llama()
    with pytest.raises(surgeon.SpecError) as error:
        surgeon.compile(model, args, spec("lora", TARGETS, init="bogus"), KW)
    message = str(error.value)
    assert "init" in message and "bogus" in message
    assert "must be one of ['default', 'gaussian', 'pissa', 'olora', 'orthogonal', 'loftq', 'corda', 'eva', 'lora_ga']" in message


@pytest.mark.parametrize("init", INITS)
def test_expert_parameters_are_refused_with_the_reason(init):
    from tests.adapters.test_moe_experts import EXPERTS, mixtral

    model, args = mixtral()
    with pytest.raises(surgeon.SpecError, match=f"the {init} init makes one rank-r pair for a 2-D weight"):
        surgeon.compile(model, args, spec("lora", EXPERTS, rank=2, init=init), KW)
