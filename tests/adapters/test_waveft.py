"""WaveFT: dW = scaling * IDWT2 of a sparse coefficient matrix at PEFT's seeded positions; exact merge and
unmerge, PEFT import (positions redrawn from random_loc_seed) and export, on linear and Conv1D sites."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.adapters import kinds
from tests.adapters.helpers import (assert_merge_checkpoint_matches, KW, NAME, assert_identity_insert, assert_merge, assert_param_count,
                                    assert_round_trip, assert_trains, compile_kind, peft_export, peft_parity,
                                    randomized_peft_checkpoint)
from tests.conftest import hf_gpt2
from tests.passes.helpers import logits


def test_waveft_lifecycle(tmp_path):
    model, args, compiled = compile_kind("waveft", ["*.q_proj", "*.down_proj"], frequencies=40, scaling=30.0)
    assert_identity_insert(compiled, model, args)      # spectrum = 0: dW = 0
    assert_param_count(compiled, 4 * 40)                # only the coefficients; the positions are derived
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_conv1d_sites(tmp_path):
    # hf_gpt2: c_attn 32 -> 96, mlp.c_proj 128 -> 32; dW is out x in on a Conv1D site too
    model, args, compiled = compile_kind("waveft", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2,
                                         frequencies=25, scaling=20.0, wavelet="db2")
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 4 * 25)
    assert_trains(compiled, args)
    assert_merge(compiled, args)


@pytest.mark.parametrize("wavelet", ["db1", "db2", "db3", "db10"])
@pytest.mark.parametrize("dims", [(24, 20), (23, 19), (7, 30)])
def test_positions_and_delta_are_peft_s(wavelet, dims):
    """The positions are PEFT's waveft_indices (randperm from random_loc_seed) and dW its get_delta_weight,
    for even and odd sizes and filters of length 2 to 20."""
    peft = pytest.importorskip("peft")
    from peft.tuners.waveft.layer import WaveFTLinear

    from surgeon.adapters.waveft import layout, wavelet_delta

    fan_in, fan_out = dims
    config = peft.WaveFTConfig(n_frequency=37, scaling=3.0, random_loc_seed=2024, init_weights=False,
                               wavelet_family=wavelet)
    layer = WaveFTLinear(torch.nn.Linear(fan_in, fan_out), "default", config, n_frequency=37)
    spectrum = layer.waveft_spectrum["default"].detach()
    want = layer.get_delta_weight("default").detach()
    assert torch.equal(layout(2024, 37, fan_out, fan_in, wavelet, True).positions, layer.waveft_indices["default"])
    torch.testing.assert_close(wavelet_delta(spectrum, 2024, fan_out, fan_in, 3.0, wavelet, True), want,
                               rtol=1e-5, atol=1e-7)
    opts = {"frequencies": 37, "scaling": 3.0, "wavelet": wavelet, "idwt": True, "frequency_seed": 2024}
    exact = kinds()["waveft"].delta_weight({"waveft_spectrum": spectrum}, opts, torch.zeros(fan_out, fan_in).double())
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, want.double(), rtol=1e-5, atol=1e-7)


def test_without_idwt_the_coefficients_are_the_delta():
    peft = pytest.importorskip("peft")
    from peft.tuners.waveft.layer import WaveFTLinear

    from surgeon.adapters.waveft import wavelet_delta

    config = peft.WaveFTConfig(n_frequency=50, scaling=2.0, init_weights=False, use_idwt=False)
    layer = WaveFTLinear(torch.nn.Linear(16, 12), "default", config, n_frequency=50)
    spectrum = layer.waveft_spectrum["default"].detach()
    got = wavelet_delta(spectrum, 777, 12, 16, 2.0, "db1", False)
    assert torch.equal(got, layer.get_delta_weight("default").detach()) and (got != 0).sum() == 50


def test_filters_are_pywavelets_daubechies():
    """The filters built from the spectral factorization are PEFT's tabulated ones (PyWavelets')."""
    pytest.importorskip("peft")
    from peft.tuners.waveft.wavelet import Wavelet

    from surgeon.adapters.waveft import DAUBECHIES, reconstruction_filters

    for name in DAUBECHIES:
        lo, hi = reconstruction_filters(name)
        torch.testing.assert_close(lo, torch.tensor(Wavelet(name).rec_lo, dtype=torch.float64), rtol=0, atol=1e-11)
        torch.testing.assert_close(hi, torch.tensor(Wavelet(name).rec_hi, dtype=torch.float64), rtol=0, atol=1e-11)


def test_normal_init_changes_the_function():
    model, args, compiled = compile_kind("waveft", ["*.q_proj"], frequencies=16, init="normal", scaling=200.0)
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)


def test_symlets_and_coiflets_are_refused():
    with pytest.raises(surgeon.SpecError, match="symlet / coiflet filters are tables"):
        compile_kind("waveft", ["*.q_proj"], frequencies=16, wavelet="sym4")
    from surgeon.adapters.waveft import wavelet_refusal

    assert "unknown wavelet 'db99'" in wavelet_refusal("db99") and not wavelet_refusal("db10")


def test_too_many_frequencies_are_refused():
    model, args = hf_gpt2()
    spec = {"adapters": [{"name": NAME, "type": "waveft", "targets": ["*.c_attn"], "frequencies": 32 * 96 + 1}]}
    with pytest.raises(Exception, match="frequencies 3073 exceeds the 96 x 32"):
        surgeon.compile(model, args, spec, KW)


def test_peft_parity(tmp_path):
    """A randomized PEFT WaveFT checkpoint (db2, per-module n, another seed) imports with PEFT's outputs before
    and after merge."""
    peft = pytest.importorskip("peft")
    config = peft.WaveFTConfig(target_modules=["q_proj", "k_proj", "down_proj"], n_frequency=30,
                               n_frequency_pattern={"down_proj": 50}, scaling=40.0, random_loc_seed=31,
                               wavelet_family="db2")
    compiled = peft_parity(config, tmp_path)
    state = compiled.adapters[NAME]
    assert state.spec.options["frequency_seed"] == 31 and state.spec.options["wavelet"] == "db2"
    assert {s.path.rsplit(".", 1)[-1]: s.options["frequencies"] for s in state.sites} == \
        {"q_proj": 30, "k_proj": 30, "down_proj": 50}


def test_peft_parity_proportional_and_without_idwt(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.WaveFTConfig(target_modules=["v_proj", "up_proj"], n_frequency=40, scaling=30.0,
                               proportional_parameters=True, use_idwt=False)
    compiled = peft_parity(config, tmp_path)
    counts = {s.path.rsplit(".", 1)[-1]: s.options["frequencies"] for s in compiled.adapters[NAME].sites}
    assert counts["up_proj"] > counts["v_proj"]   # n follows in * out


def test_peft_parity_on_gpt2_conv1d(tmp_path):
    peft = pytest.importorskip("peft")
    peft_parity(peft.WaveFTConfig(target_modules=["c_attn", "c_fc"], n_frequency=20, scaling=25.0), tmp_path,
                factory=hf_gpt2)


def test_peft_export(tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("waveft", ["*.q_proj", "*.up_proj"], frequencies=24, scaling=50.0,
                                         frequency_seed=5, wavelet="db3")
    peft_export(compiled, model, args, tmp_path)


def test_imported_pattern_exports_back(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.WaveFTConfig(target_modules=["q_proj", "o_proj"], n_frequency=20,
                               n_frequency_pattern={"layers.1.self_attn.o_proj": 33}, scaling=60.0)
    model, args, _ = randomized_peft_checkpoint(config, tmp_path / "in")
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path / "in")}]}, KW)
    peft_export(compiled, model, args, tmp_path / "out")


def test_unsupported_peft_wavelet_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.WaveFTConfig(target_modules=["q_proj"], n_frequency=10, wavelet_family="coif1")
    model, args, _ = randomized_peft_checkpoint(config, tmp_path)
    with pytest.raises(surgeon.SpecError, match="wavelet_family 'coif1'.*symlet / coiflet"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)


def test_malformed_spectrum_is_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    model, args, _ = randomized_peft_checkpoint(peft.WaveFTConfig(target_modules=["q_proj"], n_frequency=10),
                                                tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v.reshape(2, 5) for k, v in tensors.items()}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(surgeon.SpecError, match="needs a 1-D waveft_spectrum, got \\[2, 5\\]"):
        surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]}, KW)


def test_merge_checkpoint_on_disk_equals_the_in_memory_merge(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.WaveFTConfig(target_modules=["q_proj", "down_proj"], n_frequency=30, wavelet_family="db2")
    assert_merge_checkpoint_matches(config, tmp_path)
