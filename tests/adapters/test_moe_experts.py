"""LoRA on fused MoE experts: 3-D parameters (transformers 5 stores each layer's experts as one
E x out x in tensor, read by grouped_mm / bmm, never by a linear).

The site is the parameter itself, targeted by its name (`*.experts.gate_up_proj`): every read of
W becomes W + s * D with D[e] = B_e A_e, in PEFT's `target_parameters` layout (A: (r E) x in,
expert-major rows; B: out x (r E), rank-major columns). Before this, such targets selected
nothing ("select no linear/addmm/conv2d op").
"""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from tests.adapters.helpers import KW, NAME, assert_close, spec
from tests.conftest import hf_llama, peft_lora_checkpoint, randomize_adapters
from tests.passes.helpers import adapter_nodes, logits

EXPERTS = ["*.experts.gate_up_proj", "*.experts.down_proj"]
PEFT_EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64)
    return MixtralForCausalLM(cfg).eval(), (torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0)),)


def qwen2_moe(seed: int = 0):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                         shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    return Qwen2MoeForCausalLM(cfg).eval(), (torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0)),)


def gpt_oss(seed: int = 0):
    """GPT-OSS: experts stored E x in x out (`is_transposed`), with biases and attention sinks."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    cfg = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                       head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():   # transformers leaves biases and sinks at zero: make them matter
        for name, param in model.named_parameters():
            if "bias" in name or "sinks" in name:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model, (torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0)),)


def peft_checkpoint(model, tmp_path, target_modules=(), **options):
    """A PEFT LoRA on the experts' parameters with random factors, saved; returns (peft model, folder)."""
    from peft import LoraConfig

    config = LoraConfig(r=2, lora_alpha=4, target_modules=list(target_modules), target_parameters=PEFT_EXPERTS,
                        **options)
    return peft_lora_checkpoint(model, config, tmp_path / "peft", scale=0.3, seed=1), tmp_path / "peft"


def peft_trainable(model, target_modules=()) -> int:
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=list(target_modules),
                                                           target_parameters=PEFT_EXPERTS))
    return sum(p.numel() for p in peft.parameters() if p.requires_grad)


def test_identity_insert_on_mixtral_experts_is_exact_with_peft_param_count():
    model, args = mixtral()
    compiled = surgeon.compile(model, args, spec("lora", EXPERTS, rank=2), KW)
    row = compiled.report.rows[-1]
    assert (row.matches, row.check) == (4, "exact")   # 2 layers x (gate_up_proj, down_proj)
    assert torch.equal(logits(compiled.module, args), logits(model, args))
    state = compiled.adapters[NAME]
    assert [s.path for s in state.sites][:2] == ["model.layers.0.mlp.experts.gate_up_proj",
                                                 "model.layers.0.mlp.experts.down_proj"]
    # PEFT's expert layout: A (r * E) x in, B out x (r * E); gate_up_proj is E x 2I x H
    gate_up = compiled.module.get_parameter("model.layers.0.mlp.experts.adapter_ad.gate_up_proj.lora_A")
    assert list(gate_up.shape) == [2 * 4, 32]
    assert state.param_count == peft_trainable(model) == 2 * (2 * 4 * (32 + 96) + 2 * 4 * (48 + 32))
    assert sum(p.numel() for p in compiled.module.parameters() if p.requires_grad) == state.param_count
    # the weight read itself is adapted: W + s * bmm(B, A) feeds the experts' grouped matmul
    bmms = [n for n in adapter_nodes(compiled.module, NAME) if n.target is torch.ops.aten.bmm.default]
    assert len(bmms) == 4


def test_peft_target_parameters_import_matches_peft_before_and_after_merge(tmp_path):
    model, args = mixtral()
    peft, folder = peft_checkpoint(model, tmp_path)
    with torch.no_grad():
        want = peft(*args, **KW).logits
    compiled = surgeon.compile(model, args, {"adapters": [{"name": "p", "from_peft": str(folder)}]}, KW)
    got = logits(compiled.module, args)
    assert not torch.allclose(want, logits(model, args), atol=1e-3)   # the adapter changes the function
    assert (got - want).abs().max() <= 1e-5
    assert compiled.adapters["p"].param_count == peft_trainable(model)
    compiled.apply(["merge"])
    assert adapter_nodes(compiled.module) == []
    merged = peft.merge_and_unload()
    for layer in range(2):
        for param in ("gate_up_proj", "down_proj"):
            target = f"model.layers.{layer}.mlp.experts.{param}"
            # each expert's delta lands on its own slice, as PEFT's merge writes it (fp64 sum vs fp32)
            assert torch.allclose(compiled.module.get_parameter(target), merged.get_parameter(target),
                                  atol=1e-6, rtol=0)
    assert (logits(compiled.module, args) - want).abs().max() <= 1e-5
    compiled.apply(["unmerge"])
    assert (logits(compiled.module, args) - want).abs().max() <= 1e-5


def test_merge_adds_each_experts_delta_to_its_slice():
    model, args = mixtral()
    compiled = surgeon.compile(model, args, spec("lora", ["*.layers.0.mlp.experts.down_proj"], rank=2, alpha=6), KW)
    randomize_adapters(compiled.module)
    before = logits(compiled.module, args)
    home = "model.layers.0.mlp.experts.adapter_ad.down_proj"
    A = compiled.module.get_parameter(f"{home}.lora_A").detach().clone()   # (2 * 4) x 48
    B = compiled.module.get_parameter(f"{home}.lora_B").detach().clone()   # 32 x (2 * 4)
    compiled.apply(["merge"])
    merged = compiled.module.get_parameter("model.layers.0.mlp.experts.down_proj")
    for e in range(4):   # expert e: A's rows e*r .. e*r + r - 1, B's columns e, E + e
        delta = 3.0 * B[:, e::4] @ A[2 * e:2 * e + 2]
        assert torch.allclose(merged[e], model.model.layers[0].mlp.experts.down_proj[e] + delta, atol=1e-6)
    assert_close(logits(compiled.module, args), before)


def test_export_to_peft_loads_in_peft(tmp_path):
    from peft import PeftModel

    model, args = mixtral()
    compiled = surgeon.compile(model, args, spec("lora", EXPERTS, rank=2, alpha=4), KW)
    randomize_adapters(compiled.module)
    want = logits(compiled.module, args)
    compiled.save_adapter(NAME, tmp_path / "out", format="peft")
    peft = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "out").eval()
    with torch.no_grad():
        assert (peft(*args, **KW).logits - want).abs().max() <= 1e-5


def test_qwen2_moe_experts_and_attention_from_one_peft_checkpoint(tmp_path):
    model, args = qwen2_moe()
    peft, folder = peft_checkpoint(model, tmp_path, target_modules=["q_proj", "shared_expert.down_proj"])
    with torch.no_grad():
        want = peft(*args, **KW).logits
    compiled = surgeon.compile(model, args, {"adapters": [{"name": "p", "from_peft": str(folder)}]}, KW)
    assert len(compiled.adapters["p"].sites) == 8   # per layer: q_proj, shared down_proj, 2 expert parameters
    assert (logits(compiled.module, args) - want).abs().max() <= 1e-5
    assert compiled.adapters["p"].param_count == peft_trainable(model, ["q_proj", "shared_expert.down_proj"])
    compiled.apply(["merge"])
    assert (logits(compiled.module, args) - want).abs().max() <= 1e-5


def test_targets_without_the_3d_parameter_are_a_clear_spec_error():
    model, args = mixtral()
    # the experts module holds no linear: the message says to name its 3-D parameters
    with pytest.raises(surgeon.SpecError, match=r"nor 3-D parameter .*'\*\.experts\.gate_up_proj'"):
        surgeon.compile(model, args, spec("lora", ["*.experts"], rank=2), KW)
    with pytest.raises(surgeon.SpecError, match="matches no module"):
        surgeon.compile(model, args, spec("lora", ["*.experts.up_proj"], rank=2), KW)
    llama, llama_args = hf_llama()
    with pytest.raises(surgeon.SpecError, match="matches no module"):
        surgeon.compile(llama, llama_args, spec("lora", EXPERTS, rank=2), KW)


def test_dropout_on_expert_parameters_is_refused_with_the_reason():
    model, args = mixtral()
    with pytest.raises(surgeon.SpecError, match="dropout .* does not factor out"):
        surgeon.compile(model, args, spec("lora", EXPERTS, rank=2, dropout=0.1), KW)


def test_transposed_experts_gpt_oss_match_peft_before_and_after_merge_and_export(tmp_path):
    """Issue 18: GPT-OSS stores experts E x in x out. Before, the import was refused by shape (A was
    expected (r E) x out); the delta is now transposed per expert, as PEFT's is."""
    from peft import PeftModel

    model, args = gpt_oss()
    assert model.model.layers[0].mlp.experts.is_transposed and \
        tuple(model.model.layers[0].mlp.experts.gate_up_proj.shape) == (4, 32, 96)
    peft, folder = peft_checkpoint(model, tmp_path)
    with torch.no_grad():
        want = peft(*args, **KW).logits
    compiled = surgeon.compile(model, args, {"adapters": [{"name": "p", "from_peft": str(folder)}]}, KW)
    assert not torch.allclose(want, logits(model, args), atol=1e-3)
    assert (logits(compiled.module, args) - want).abs().max() <= 1e-5
    assert compiled.adapters["p"].param_count == peft_trainable(model)
    compiled.save_adapter("p", tmp_path / "again", format="peft")
    reloaded = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "again").eval()
    with torch.no_grad():
        assert (reloaded(*args, **KW).logits - want).abs().max() <= 1e-5
    compiled.apply(["merge"])
    merged = peft.merge_and_unload()
    for param in ("gate_up_proj", "down_proj"):
        target = f"model.layers.1.mlp.experts.{param}"
        assert torch.allclose(compiled.module.get_parameter(target), merged.get_parameter(target), atol=1e-6, rtol=0)
    assert (logits(compiled.module, args) - want).abs().max() <= 1e-5
