"""LoRA's `init: eva` (EVA): A = the leading principal directions of each site's inputs over the compile's
example inputs, B = 0, the base left alone; `eva_rho` > 1 redistributes the ranks by explained variance.

Checked against PEFT 0.21's own get_peft_model + initialize_lora_eva_weights on the same model and a
single-batch dataloader holding the example input: A (signs included), the redistributed ranks and alphas
(PEFT's rank_pattern / alpha_pattern) and whitening. PEFT's incremental PCA takes a randomized low-rank SVD
per batch; with it swapped for the exact SVD (its own option, `lowrank=False`) A agrees to rounding, and
with PEFT's default it agrees to that SVD's error. Then the lifecycle (exact identity insert, trains,
merges, round trip), PEFT export and import with output parity, and the refusals."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import surgeon
from surgeon.adapters.eva import eva_components, eva_site_options, explained_ratios
from surgeon.graph import get_tensor
from tests.adapters.helpers import (KW, NAME, assert_identity_insert, assert_merge, assert_param_count, assert_trains,
                                    spec)
from tests.conftest import assert_untouched, hf_gpt2, hf_llama, snapshot
from tests.passes.helpers import logits

peft = pytest.importorskip("peft")
TARGETS = ["*.q_proj", "*.o_proj", "*.down_proj"]   # hf_llama: q_proj, o_proj 64 -> 64, down_proj 128 -> 64
RANK, ALPHA = 4, 8


@pytest.fixture
def exact_peft_svd(monkeypatch):
    """PEFT's EVA with its incremental PCA's exact SVD (lowrank=False) in place of the randomized one."""
    import peft.tuners.lora.eva as peft_eva
    from peft.utils.incremental_pca import IncrementalPCA

    monkeypatch.setattr(peft_eva, "IncrementalPCA", lambda **kw: IncrementalPCA(**{**kw, "lowrank": False}))


def _peft_eva(model, args, targets=("q_proj", "o_proj", "down_proj"), **eva):
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(targets), init_lora_weights="eva",
                             eva_config=EvaConfig(**eva))
    wrapped = peft.get_peft_model(copy.deepcopy(model), config)
    initialize_lora_eva_weights(wrapped, [{"input_ids": args[0], **KW}], show_progress_bar=False)
    return wrapped.eval()


def _compile(model, args, targets=TARGETS, **options):
    return surgeon.compile(model, args, spec("lora", targets, rank=RANK, alpha=ALPHA, init="eva", **options), KW)


def _assert_factors_equal(compiled, wrapped):
    sites = compiled.adapters[NAME].sites
    assert sites
    for site in sites:
        layer = wrapped.base_model.model.get_submodule(site.path)
        torch.testing.assert_close(get_tensor(compiled.module, site.params["lora_A"]),
                                   layer.lora_A["default"].weight.detach(), rtol=1e-4, atol=1e-5)
        assert torch.equal(get_tensor(compiled.module, site.params["lora_B"]), layer.lora_B["default"].weight)
        assert torch.equal(get_tensor(compiled.module, site.weight), layer.base_layer.weight)   # W left alone
    return sites


def test_a_equals_peft_with_the_exact_svd_and_insert_is_the_identity(exact_peft_svd):
    model, args = hf_llama(layers=1)
    before = snapshot(model)
    compiled = _compile(model, args, eva_rho=1.0)
    assert_untouched(model, before)
    assert_identity_insert(compiled, model, args)   # B = 0: bit for bit
    sites = _assert_factors_equal(compiled, _peft_eva(model, args, rho=1.0))
    assert len(sites) == 3 and all(s.options["rank"] == RANK for s in sites)


def test_a_agrees_with_peft_default_randomized_svd_to_its_error():
    model, args = hf_llama(layers=1)
    compiled = _compile(model, args, eva_rho=1.0)
    wrapped = _peft_eva(model, args, rho=1.0)
    for site in compiled.adapters[NAME].sites:   # PEFT's randomized SVD (q = 2r, 4 iterations) is off by ~1e-2
        ours = get_tensor(compiled.module, site.params["lora_A"])
        theirs = wrapped.base_model.model.get_submodule(site.path).lora_A["default"].weight.detach()
        assert torch.all(torch.nn.functional.cosine_similarity(ours, theirs) > 0.95), site.path   # signs too


@pytest.mark.parametrize("adjust", [True, False])
def test_rho_redistributes_ranks_as_peft_rank_pattern(exact_peft_svd, adjust):
    model, args = hf_llama(layers=1)
    compiled = _compile(model, args, eva_rho=2.0, eva_adjust_alpha=adjust)
    wrapped = _peft_eva(model, args, rho=2.0, adjust_scaling_factors=adjust)
    config = wrapped.peft_config["default"]
    sites = _assert_factors_equal(compiled, wrapped)
    ranks = {s.path: s.options["rank"] for s in sites if s.options["rank"] != RANK}
    assert ranks and ranks == config.rank_pattern   # the redistribution moved rank, as PEFT's did
    assert sum(s.options["rank"] for s in sites) == RANK * len(sites)
    alphas = {s.path: s.options["alpha"] for s in sites if s.options["alpha"] != ALPHA}
    assert alphas == {p: pytest.approx(a) for p, a in config.alpha_pattern.items()}
    assert bool(alphas) == adjust
    assert_param_count(compiled, sum(s.options["rank"] * (s.in_features + s.out_features) for s in sites))
    assert torch.equal(logits(compiled.module, args), logits(model, args))


def test_gpt2_conv1d_sites_equal_peft(exact_peft_svd):
    model, args = hf_gpt2()
    compiled = _compile(model, args, ["*.c_attn", "*.c_proj"], eva_rho=1.0)
    _assert_factors_equal(compiled, _peft_eva(model, args, targets=("c_attn", "c_proj"), rho=1.0))


def test_whitening_divides_by_the_root_of_the_singular_values(exact_peft_svd):
    model, args = hf_llama(layers=1)
    plain = _compile(model, args, eva_rho=1.0)
    whitened = _compile(model, args, eva_rho=1.0, eva_whiten=True)
    wrapped = _peft_eva(model, args, rho=1.0, whiten=True)
    for site, other in zip(plain.adapters[NAME].sites, whitened.adapters[NAME].sites):
        A, W = (get_tensor(c.module, s.params["lora_A"]) for c, s in ((plain, site), (whitened, other)))
        ratio = A.norm(dim=1) / W.norm(dim=1)   # sqrt(S_k), decreasing with k
        assert torch.all(ratio[:-1] >= ratio[1:])
        torch.testing.assert_close(W * ratio[:, None], A)
        # PEFT's singular values count the single batch once per pass (two, converging at once): 2^(1/4)
        theirs = wrapped.base_model.model.get_submodule(site.path).lora_A["default"].weight.detach()
        torch.testing.assert_close(theirs * 2 ** 0.25, W, rtol=1e-4, atol=1e-6)


def test_components_are_the_pca_of_the_rows_with_peft_signs():
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(50, 12, generator=gen, dtype=torch.float64) * torch.linspace(3, 0.5, 12, dtype=torch.float64)
    centered = rows - rows.mean(0)
    _, S, Vh = torch.linalg.svd(centered, full_matrices=False)
    A = eva_components(centered.T @ centered, 5)
    torch.testing.assert_close(A.double().abs(), Vh[:5].abs(), rtol=1e-5, atol=1e-6)
    assert torch.all(A.gather(1, A.abs().argmax(1, keepdim=True)) > 0)   # each row's largest entry positive
    torch.testing.assert_close(explained_ratios(centered.T @ centered, 5), S[:5] ** 2 / (S ** 2).sum())


def test_lifecycle_round_trip_and_peft_export_import(tmp_path):
    model, args = hf_llama(layers=1)
    compiled = _compile(model, args)   # eva_rho 2 (PEFT's default): per-site ranks and alphas
    sites = compiled.adapters[NAME].sites
    assert {s.options["rank"] for s in sites} != {RANK}
    assert_trains(compiled, args)
    for site in sites:
        get_tensor(compiled.module, site.params["lora_B"]).data.add_(0.05)
    expected = logits(compiled.module, args)
    compiled.save_adapter(NAME, tmp_path / "saved")
    other_args = (torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(9)),)   # no recalibration
    again = surgeon.compile(model, other_args, {"adapters": [{"name": "x", "from_dir": str(tmp_path / "saved")}]}, KW)
    assert torch.equal(logits(again.module, args), expected)
    compiled.save_adapter(NAME, tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and "eva_config" not in config   # the factors apply on the plain W
    assert config["rank_pattern"] == {s.path: s.options["rank"] for s in sites if s.options["rank"] != RANK}
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(loaded, args), expected, rtol=1e-5, atol=1e-5)
    assert_merge(compiled, args)


def test_peft_eva_checkpoint_imports_with_parity(tmp_path):
    model, args = hf_llama(layers=1)
    wrapped = _peft_eva(model, args, rho=2.0)
    torch.manual_seed(0)
    for name, param in wrapped.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.1)
    wrapped.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "eva"
    imported = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)
    assert imported.adapters[NAME].spec.options["init"] == "default"   # W left alone, A read from the checkpoint
    expected = logits(wrapped, args)
    torch.testing.assert_close(logits(imported.module, args), expected, rtol=1e-5, atol=1e-5)
    imported.apply(["merge"])
    torch.testing.assert_close(logits(imported.module, args), logits(wrapped.merge_and_unload(), args),
                               rtol=1e-5, atol=1e-5)


def test_refusals_name_the_reason():
    model, args = hf_llama(layers=1)
    with pytest.raises(surgeon.SpecError, match=r"eva_rho.*\[1, inf\]"):
        _compile(model, args, eva_rho=0.5)
    short = (args[0][:1, :3],)   # 3 calibration rows for 4 components
    with pytest.raises(surgeon.SpecError, match="needs 4 components .* give 3 rows"):
        _compile(model, short, eva_rho=1.0)
    # site "a" has 4 directions of ratio 1/4 each, "b" 8 of 1/8: with rank 2 each and eva_rho 4 the budget of
    # 4 all goes to "a"
    scatters = {"a": (torch.diag(torch.tensor([1.0] * 4 + [0.0] * 4)), 16), "b": (torch.eye(8), 16)}
    with pytest.raises(surgeon.SurgeonError, match=r"gives sites \['b'\] rank 0"):
        eva_site_options(scatters, {"a": 2, "b": 2}, {"a": 2, "b": 2}, {"eva_rho": 4.0})
    assert eva_site_options({"a": scatters["a"], "c": (torch.diag(torch.tensor([4.0, 1, 1, 1, 1, 0, 0, 0])), 16)},
                            {"a": 2, "c": 2}, {"a": 2, "c": 4}, {"eva_rho": 2.0}) == \
        {"a": {"rank": 3, "alpha": 3.0}, "c": {"rank": 1, "alpha": 2.0}}   # c: 1/2, then 1/8; a: 1/4 each
    from surgeon.adapters.lora import LORA
    assert LORA.param_refusal({"init": "eva"}) == "EVA needs one SVD per expert, which surgeon does not do"
