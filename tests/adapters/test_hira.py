"""HiRA: y + (W ⊙ B A) x, a Hadamard update of the base weight; exact merge (W' = W ⊙ (1 + BA)) and
unmerge (W' / (1 + BA)), PEFT import and export on LLaMA (GQA) and GPT-2 (Conv1D)."""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from surgeon.adapter_io import save_peft_dir
from surgeon.adapters import kinds
from tests.adapters.helpers import (KW, NAME, assert_dropout_in_training_only, assert_identity_insert, assert_merge,
                                    assert_param_count, assert_round_trip, assert_trains, compile_kind, peft_export,
                                    peft_parity)
from tests.conftest import hf_gpt2, hf_llama
from tests.passes.helpers import logits

# hf_llama: 2 layers, k_proj 64 -> 32 (GQA), down_proj 128 -> 64
LLAMA_FANS = 2 * ((64 + 32) + (128 + 64))
# hf_gpt2: 2 layers, c_attn 32 -> 96, mlp.c_proj 128 -> 32
GPT2_FANS = 2 * ((32 + 96) + (128 + 32))


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_hira_lifecycle(init, tmp_path):
    model, args, compiled = compile_kind("hira", ["*.k_proj", "*.down_proj"], rank=4, init=init)
    assert_identity_insert(compiled, model, args)      # B = 0: W ⊙ 0
    assert_param_count(compiled, 4 * LLAMA_FANS)
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)                       # W' = W ⊙ (1 + BA); unmerge divides it back out


def test_conv1d_sites(tmp_path):
    model, args, compiled = compile_kind("hira", ["*.c_attn", "*.mlp.c_proj"], factory=hf_gpt2, rank=3)
    assert_identity_insert(compiled, model, args)
    assert_param_count(compiled, 3 * GPT2_FANS)
    assert_trains(compiled, args)
    assert_round_trip(compiled, model, args, tmp_path)
    assert_merge(compiled, args)


def test_random_init_changes_the_function():
    model, args, compiled = compile_kind("hira", ["*.q_proj"], rank=2, init="random")
    assert compiled.report.rows[-1].check == "changes function"
    assert not torch.allclose(logits(compiled.module, args), model(*args, **KW).logits)


def test_delta_is_peft_s_hadamard_update():
    """Surgeon's delta is W ⊙ (PEFT's get_delta_weight), PEFT's merge; undo recovers W from W'."""
    peft = pytest.importorskip("peft")
    from peft.tuners.hira.layer import Linear

    hira = kinds()["hira"]
    base = torch.nn.Linear(24, 20)
    layer = Linear(base, "default", peft.HiraConfig(r=5, init_weights=False), r=5)
    params = {"hira_A": layer.hira_A["default"].detach(), "hira_B": layer.hira_B["default"].detach()}
    opts = {"rank": 5, "init": "default", "dropout": 0.0}
    W = base.weight.detach().double()
    delta = hira.delta_weight(params, opts, W)
    torch.testing.assert_close(delta, W * layer.get_delta_weight("default").double(), rtol=1e-6, atol=1e-7)
    merged = W + delta
    torch.testing.assert_close(merged + hira.undo_delta(params, opts, merged), W, rtol=1e-12, atol=1e-12)


def test_unmerge_refused_where_the_merge_zeroed_an_entry():
    hira = kinds()["hira"]
    params = {"hira_A": torch.tensor([[1.0, 2.0]]), "hira_B": torch.tensor([[-1.0], [0.5]])}   # BA[0, 0] = -1
    with pytest.raises(ValueError, match="1 \\+ B A is 0"):
        hira.undo_delta(params, {}, torch.ones(2, 2))


def test_dropout_acts_in_training_only():
    _, args, compiled = compile_kind("hira", ["*.q_proj", "*.up_proj"], rank=4, dropout=0.5)
    assert_dropout_in_training_only(compiled, args)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_peft_parity(init, tmp_path):
    """A randomized PEFT HiRA checkpoint (with dropout) imports with PEFT's outputs, before and after merge."""
    peft = pytest.importorskip("peft")
    config = peft.HiraConfig(target_modules=["q_proj", "k_proj", "down_proj"], r=6, hira_dropout=0.1,
                             init_weights=init)
    compiled = peft_parity(config, tmp_path)
    state = compiled.adapters[NAME]
    assert state.spec.options["rank"] == 6 and state.spec.options["dropout"] == 0.1
    assert {s.options["rank"] for s in state.sites} == {6} and len(state.sites) == 6


def test_per_module_ranks_come_from_the_tensors(tmp_path):
    """PEFT 0.21's HiRA dispatch builds every module with r, ignoring rank_pattern: the import takes each
    module's rank from its tensors (what PEFT ran), so parity holds; a mixed-rank export is refused."""
    peft = pytest.importorskip("peft")
    config = peft.HiraConfig(target_modules=["q_proj", "down_proj"], r=4, rank_pattern={"down_proj": 2})
    compiled = peft_parity(config, tmp_path / "in")
    wrapped = peft.PeftModel.from_pretrained(hf_llama()[0], tmp_path / "in")
    peft_ranks = {name.rsplit(".", 1)[0]: m.hira_A["default"].shape[0] for name, m in wrapped.named_modules()
                  if hasattr(m, "hira_A") and "default" in m.hira_A}
    ours = {s.path: s.options["rank"] for s in compiled.adapters[NAME].sites}
    assert sorted(ours.values()) == sorted(peft_ranks.values())
    mixed = {"a.q": {"hira_A": torch.zeros(4, 8), "hira_B": torch.zeros(8, 4)},
             "a.v": {"hira_A": torch.zeros(2, 8), "hira_B": torch.zeros(8, 2)}}
    with pytest.raises(surgeon.SpecError, match="ignores rank_pattern"):
        save_peft_dir(tmp_path / "out", {"rank": 4, "init": "default", "dropout": 0.0}, mixed, set(), kind="hira")


def test_peft_parity_on_gpt2_conv1d(tmp_path):
    peft = pytest.importorskip("peft")
    peft_parity(peft.HiraConfig(target_modules=["c_attn", "c_fc"], r=4, fan_in_fan_out=True), tmp_path,
                factory=hf_gpt2)


def test_peft_export(tmp_path):
    pytest.importorskip("peft")
    model, args, compiled = compile_kind("hira", ["*.q_proj", "*.k_proj", "*.up_proj"], rank=5)
    peft_export(compiled, model, args, tmp_path)


def test_peft_export_of_conv1d(tmp_path):
    """GPT-2's Conv1D sites go out with fan_in_fan_out, and PEFT loads them with surgeon's outputs."""
    peft = pytest.importorskip("peft")
    model, args = hf_gpt2()
    spec = {"adapters": [{"name": NAME, "type": "hira", "targets": ["*.c_attn", "*.mlp.c_proj"], "rank": 4}],
            "pipeline": ["insert"]}
    compiled = surgeon.compile(model, args, spec, KW)
    peft_export(compiled, model, args, tmp_path / "plain")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "plain")
    assert loaded.peft_config["default"].fan_in_fan_out

