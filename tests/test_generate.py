"""generate: greedy token-for-token parity with transformers + peft over the KV-cache graphs.

Each case imports PEFT adapters with random weights (`from_peft`) into a compile of a tiny
LLaMA (grouped-query heads), GPT-2 or Qwen2 and generates for a batch of prompts of different
lengths (left padding); transformers' own `generate` on the PEFT model is the reference. The
states: LoRA unmerged then merged (the merge forwarded to built graphs), merged before the first
generate (replayed), two adapters switched with set_active, DoRA, a quantized adapter (against
PEFT with its dequantized weights), and the lowered graph (Triton's interpreter).
"""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from tests.conftest import hf_gpt2, hf_llama, peft_lora_checkpoint

peft = pytest.importorskip("peft")
KW = {"use_cache": False}
NEW = 6
# compiles here skip the capture's second-shape check (tests/test_capture.py has it): the cache path is
# checked against the compiled module when its graphs are built, and the tokens against transformers

def hf_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=112, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg).eval()
    return model, (torch.randint(0, 112, (2, 8), generator=torch.Generator().manual_seed(seed)),)


MODELS = {
    "llama": (hf_llama, dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    "gpt2": (hf_gpt2, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "qwen2": (hf_qwen2, dict(target_modules=["q_proj", "k_proj", "up_proj"])),
}


def prompts(vocab: int, lengths=(3, 6, 4), seed: int = 3, pad: int = 0):
    """A left-padded batch: rows of `lengths` real tokens (never the pad id)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = torch.randint(1, vocab, (length,), generator=gen)
        mask[row, width - length:] = 1
    return ids, mask


def reference(model, ids, mask, **kwargs):
    """transformers' own greedy generate."""
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kwargs)


def ours(compiled, ids, mask, **kwargs):
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, **kwargs)
    assert compiled.generator.mode == "cache", compiled.generator.notes
    return out


def peft_dir(model, options, path, seed: int, scale: float = 0.3, **extra):
    """A PEFT LoRA (or DoRA) folder with random weights; the PEFT model itself."""
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **options, **extra)
    return peft_lora_checkpoint(model, config, path, scale=scale, seed=seed)


def imported(tmp_path, *pipeline) -> dict:
    """A spec importing the PEFT folder tmp_path/a as adapter 'a' (then `pipeline`, if given)."""
    spec = {"adapters": [{"name": "a", "from_peft": str(tmp_path / "a")}]}
    return {**spec, "pipeline": list(pipeline)} if pipeline else spec


def compile_(model, args, spec):
    return surgeon.compile(model, args, spec, KW, verify=False)


def setup(case, tmp_path, seed: int = 7, **extra):
    factory, options = MODELS[case]
    model, args = factory()
    wrapped = peft_dir(model, options, tmp_path / "a", seed, **extra)
    ids, mask = prompts(model.config.vocab_size)
    return model, args, wrapped, ids, mask


@pytest.mark.parametrize("case", MODELS)
def test_lora_unmerged_then_merged_matches_peft(case, tmp_path):
    model, args, wrapped, ids, mask = setup(case, tmp_path)
    expected = reference(wrapped, ids, mask)
    assert not torch.equal(expected, reference(model, ids, mask)), "the adapter should change the tokens"
    compiled = compile_(model, args, imported(tmp_path))
    assert torch.equal(ours(compiled, ids, mask), expected)
    prefill = compiled.generator.graphs["prefill"].gm
    weight = next(n for n, _ in prefill.named_parameters() if n.endswith("lora_A"))
    assert prefill.get_parameter(weight) is compiled.module.get_parameter(weight)   # shared, not copied
    compiled.apply(["merge"])   # forwarded to the built graphs
    assert compiled.generator.graphs is not None
    assert torch.equal(ours(compiled, ids, mask), expected)
    assert not any("lora_A" in n for n, _ in prefill.named_parameters())


@pytest.mark.parametrize("case", MODELS)
def test_two_adapters_switched_with_set_active(case, tmp_path):
    model, args, wrapped, ids, mask = setup(case, tmp_path)
    peft_dir(model, MODELS[case][1], tmp_path / "b", seed=11)
    spec = {"adapters": [{"name": "a", "from_peft": str(tmp_path / "a")},
                         {"name": "b", "from_peft": str(tmp_path / "b")}]}
    compiled = compile_(model, args, spec)
    both = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a", adapter_name="a").eval()
    both.load_adapter(tmp_path / "b", adapter_name="b")
    compiled.set_active("b")   # before the first generate: replayed on the graphs it builds
    both.set_adapter("b")
    expected_b = reference(both, ids, mask)
    assert torch.equal(ours(compiled, ids, mask), expected_b)
    compiled.set_active("a")   # after: forwarded to them
    both.set_adapter("a")
    expected_a = reference(both, ids, mask)
    assert not torch.equal(expected_a, expected_b)
    assert torch.equal(ours(compiled, ids, mask), expected_a)


@pytest.mark.parametrize("case", MODELS)
def test_dora_matches_peft(case, tmp_path):
    model, args, wrapped, ids, mask = setup(case, tmp_path, use_dora=True)
    expected = reference(wrapped, ids, mask)
    compiled = compile_(model, args, imported(tmp_path))
    assert compiled.adapters["a"].spec.type == "dora"
    assert torch.equal(ours(compiled, ids, mask), expected)


@pytest.mark.parametrize("case", MODELS)
def test_quantized_adapter_matches_peft_with_its_dequantized_weights(case, tmp_path):
    from surgeon.adapter_io import save_peft_dir
    from surgeon.quantized_io import load_quantized_adapter, save_quantized_adapter

    model, args, wrapped, ids, mask = setup(case, tmp_path)
    compiled = compile_(model, args, imported(tmp_path, "insert", {"quantize-adapters": {"bits": 4}}))
    save_quantized_adapter(compiled, "a", tmp_path / "q")
    decoded = load_quantized_adapter(tmp_path / "q").weights   # path -> param -> dequantized tensor
    state = compiled.adapters["a"]
    save_peft_dir(tmp_path / "dq", state.spec.options, decoded, {s.path for s in state.sites if s.op == "addmm"},
                  kind="lora")
    dequantized = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "dq").eval()
    expected = reference(dequantized, ids, mask)
    assert torch.equal(ours(compiled, ids, mask), expected)


def test_merged_before_the_first_generate_is_replayed(tmp_path):
    model, args, wrapped, ids, mask = setup("llama", tmp_path)
    compiled = compile_(model, args, imported(tmp_path, "insert", "merge"))
    assert torch.equal(ours(compiled, ids, mask), reference(wrapped.merge_and_unload(), ids, mask))
    assert [type(p).__name__ for p in compiled.applied] == ["Insert", "Merge"]


def test_lowered_graph_through_triton_interpreter(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SURGEON_TUNE_CACHE", str(tmp_path / "tuning.json"))
    model, args = hf_gpt2()
    wrapped = peft_dir(model, dict(target_modules=["c_attn"], fan_in_fan_out=True), tmp_path / "a", seed=7)
    ids, mask = prompts(model.config.vocab_size, lengths=(2, 4))
    compiled = compile_(model, args, imported(tmp_path, "insert", "fuse", {"lower": {"elementwise": False}}))
    from surgeon.kernels import registry

    assert registry.backend("cpu") == "triton-interpreter"
    got = ours(compiled, ids, mask)
    decode = compiled.generator.graphs["decode"].gm
    assert any("surgeon.lora_linear" in str(n.target) for n in decode.graph.nodes)
    assert torch.equal(got, reference(wrapped, ids, mask))


def test_eos_pads_finished_rows_and_stops_like_transformers(tmp_path):
    model, args = hf_llama()
    ids, mask = prompts(model.config.vocab_size)
    free = reference(model, ids, mask)
    eos = int(free[0, ids.shape[1] + 1])   # a token the first row makes second: it stops there
    expected = reference(model, ids, mask, eos_token_id=eos)
    compiled = compile_(model, args, {"pipeline": []})
    got = ours(compiled, ids, mask, eos_token_id=eos)
    assert torch.equal(got, expected)
    assert (got[0, ids.shape[1] + 2:] == 0).all()


def test_module_generate_batch_of_one_and_copies(tmp_path):
    model, args = hf_llama()
    compiled = compile_(model, args, {"pipeline": []})
    one = torch.tensor([[5, 9, 3]])
    got = compiled.module.generate(one, max_new_tokens=4)
    assert torch.equal(got, model.generate(one, max_new_tokens=4, do_sample=False, pad_token_id=0))
    assert torch.equal(compiled.module.generate(input_ids=one[:, :1], max_new_tokens=3),
                       model.generate(one[:, :1], max_new_tokens=3, do_sample=False, pad_token_id=0))
    clone = copy.deepcopy(compiled.module)
    assert clone.meta["surgeon_generator"].model is model   # the original is shared, never copied
    assert torch.equal(clone.generate(one, max_new_tokens=4), got)


def test_a_required_attention_mask_input(tmp_path):
    model, args = hf_llama()
    kwargs = {"attention_mask": torch.ones_like(args[0]), "use_cache": False}
    compiled = surgeon.compile(model, args, {"pipeline": []}, kwargs, verify=False)
    ids, mask = prompts(model.config.vocab_size)
    expected = reference(model, ids, mask)
    assert torch.equal(ours(compiled, ids, mask), expected)
    assert torch.equal(compiled.generate(ids, attention_mask=mask, max_new_tokens=NEW, use_cache=False), expected)


def test_mistral_with_a_sliding_window_shorter_than_the_sequence(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=4)).eval()
    wrapped = peft_dir(model, dict(target_modules=["q_proj", "v_proj"]), tmp_path / "a", seed=7)
    ids, mask = prompts(100)
    compiled = compile_(model, (torch.randint(0, 100, (2, 8)),), imported(tmp_path))
    assert torch.equal(ours(compiled, ids, mask), reference(wrapped, ids, mask))


def test_a_dtype_move_of_the_module_rebuilds_the_graphs_in_that_dtype():
    model, args = hf_llama()
    compiled = compile_(model, args, {"adapters": [{"name": "a", "type": "lora", "targets": ["*.q_proj"], "rank": 2}]})
    ids, mask = prompts(model.config.vocab_size)
    ours(compiled, ids, mask)
    compiled.module.to(torch.float64)   # surgeon.portable moves the module; the generator follows it
    got = ours(compiled, ids, mask)
    assert compiled.generator.graphs["decode"].gm.get_parameter("lm_head.weight").dtype == torch.float64
    assert torch.equal(got, compiled.generate(ids, attention_mask=mask, max_new_tokens=NEW, use_cache=False))
