"""FourierFT: dW = scaling * Re(ifft2(F)) of a sparse spectrum at PEFT's seeded frequency positions;
exact merge, PEFT import (positions redrawn from random_loc_seed) and export."""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from surgeon.adapters import kinds
from tests.adapters.helpers import (KW, NAME, assert_close, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, peft_export, peft_parity)
from tests.conftest import hf_gpt2, hf_llama, randomize_adapters
from tests.passes.helpers import logits


def test_fourierft_lifecycle(tmp_path):
    model, args, compiled = compile_kind("fourierft", ["*.q_proj", "*.down_proj"], frequencies=40, scaling=30.0)
    assert_identity_insert(compiled, model, args)      # spectrum = 0: dW = 0
    assert_param_count(compiled, 4 * 40)                # only the spectrum; the positions are derived
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_conv1d_sites_merge(tmp_path):
    model, args, compiled = compile_kind("fourierft", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2,
                                         frequencies=25, scaling=20.0)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 4 * 25)
    assert_merge(compiled, args)


def test_positions_and_delta_are_peft_s():
    """Surgeon's positions are PEFT's (randperm from random_loc_seed) and its dW PEFT's get_delta_weight."""
    peft = pytest.importorskip("peft")
    from peft.tuners.fourierft.layer import FourierFTLinear

    fourierft = kinds()["fourierft"]
    config = peft.FourierFTConfig(n_frequency=37, scaling=12.0, random_loc_seed=2024, init_weights=False)
    layer = FourierFTLinear(torch.nn.Linear(24, 20), "default", config, n_frequency=37)
    spectrum = layer.fourierft_spectrum["default"].detach()
    opts = {"frequencies": 37, "scaling": 12.0, "frequency_seed": 2024, "init": "zeros"}
    weight = torch.zeros(20, 24)
    delta = fourierft.delta_weight({"fourierft_spectrum": spectrum}, opts, weight)
    torch.testing.assert_close(delta.float(), layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
    from surgeon.adapters.fourierft import fourier_delta, support

    assert torch.equal(support(2024, 37, 20, 24), layer.indices["default"])
    assert torch.equal(fourier_delta(spectrum, 2024, 20, 24, 12.0), layer.get_delta_weight("default"))


def test_normal_init_changes_the_function():
    model, args, compiled = compile_kind("fourierft", ["*.q_proj"], frequencies=16, init="normal")
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)


def test_too_many_frequencies_are_refused():
    model, args = hf_gpt2()
    spec = {"adapters": [{"name": NAME, "type": "fourierft", "targets": ["*.c_attn"], "frequencies": 32 * 96 + 1}]}
    with pytest.raises(Exception, match="frequencies 3073 exceeds the 96 x 32"):
        surgeon.compile(model, args, spec, KW)


def test_peft_parity(tmp_path):
    """PEFT's FourierFT (its default random init, a per-module n_frequency, another seed) imports with
    PEFT's outputs before and after merge."""
    peft = pytest.importorskip("peft")
    config = peft.FourierFTConfig(target_modules=["q_proj", "k_proj", "down_proj"], n_frequency=30,
                                  n_frequency_pattern={"down_proj": 50}, scaling=40.0, random_loc_seed=31)
    compiled = peft_parity(config, tmp_path)
    state = compiled.adapters[NAME]
    assert state.spec.options["frequency_seed"] == 31 and state.spec.options["scaling"] == 40.0
    assert {s.path.rsplit(".", 1)[-1]: s.options["frequencies"] for s in state.sites} == \
        {"q_proj": 30, "k_proj": 30, "down_proj": 50}


def test_peft_parity_on_gpt2_conv1d(tmp_path):
    peft = pytest.importorskip("peft")
    peft_parity(peft.FourierFTConfig(target_modules=["c_attn", "c_fc"], n_frequency=20, scaling=25.0), tmp_path,
                factory=hf_gpt2)


def test_peft_export(tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("fourierft", ["*.q_proj", "*.up_proj"], frequencies=24, scaling=50.0,
                                         frequency_seed=5)
    peft_export(compiled, model, args, tmp_path)


def test_imported_pattern_exports_back_to_peft(tmp_path):
    """Per-module frequency counts go back out as n_frequency_pattern keys PEFT matches."""
    peft = pytest.importorskip("peft")
    config = peft.FourierFTConfig(target_modules=["q_proj", "o_proj"], n_frequency=20,
                                  n_frequency_pattern={"layers.1.self_attn.o_proj": 33}, scaling=60.0)
    model, args = hf_llama()
    wrapped = peft.get_peft_model(copy.deepcopy(model), config).eval()
    wrapped.save_pretrained(tmp_path / "in")
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "in")}]}, KW)
    randomize_adapters(compiled.module, seed=9)
    expected = logits(compiled.module, args)
    compiled.save_adapter(NAME, tmp_path / "out", format="peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "out").eval()
    layer = loaded.base_model.model.model.layers[1].self_attn.o_proj
    assert layer.fourierft_spectrum["default"].numel() == 33
    assert_close(logits(loaded, args), expected)
