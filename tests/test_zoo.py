"""The zoo: architectures no one here wrote, each through the four steps a user takes.

For every family: capture (the compiled module equals the eager model), an identity LoRA insert
(bit-exact), a randomized PEFT LoRA checkpoint imported with `from_peft` (equal to PEFT's output) and
`merge` (equal to PEFT's merge_and_unload). Models are built from small configs with random weights.
README's "Architectures" table is this list; a family that fails a step is listed there with why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import surgeon
from tests.conftest import hf_bert, hf_gpt2, hf_llama, peft_lora_checkpoint, small_cnn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
T = transformers


def _ids(vocab: int = 96, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(0))


def _hf(config_cls, model_cls, **config) -> Callable:
    def build():
        torch.manual_seed(0)
        return getattr(T, model_cls)(getattr(T, config_cls)(**config)).eval()
    return build


def _encdec(ids: torch.Tensor) -> tuple[tuple, dict]:
    return (ids,), {"decoder_input_ids": ids[:, :5]}


@dataclass
class Case:
    family: str
    build: Callable
    inputs: Callable                     # () -> (args, kwargs)
    targets: list[str]                   # PEFT target_modules (module names)
    peft_options: dict = field(default_factory=dict)
    globs: list[str] | None = None       # surgeon targets; default: "**.<name>" for each PEFT target


_DEC = {"use_cache": False}
CASES = [
    Case("decoder: LLaMA (GQA)", lambda: hf_llama()[0], lambda: (hf_llama()[1], _DEC), ["q_proj", "v_proj", "down_proj"]),
    Case("decoder: GPT-2 (Conv1D)", lambda: hf_gpt2()[0], lambda: (hf_gpt2()[1], _DEC), ["c_attn", "c_fc"],
         {"fan_in_fan_out": True}),
    Case("decoder: Mistral", _hf("MistralConfig", "MistralForCausalLM", vocab_size=96, hidden_size=32,
                                 intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
         lambda: ((_ids(),), _DEC), ["q_proj", "v_proj", "up_proj"]),
    Case("decoder: Qwen2", _hf("Qwen2Config", "Qwen2ForCausalLM", vocab_size=96, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
         lambda: ((_ids(),), _DEC), ["q_proj", "k_proj", "o_proj"]),
    Case("decoder: Falcon (x @ W.T)", _hf("FalconConfig", "FalconForCausalLM", vocab_size=96, hidden_size=32,
                                          num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False,
                                          multi_query=True, bias=False),
         lambda: ((_ids(),), _DEC), ["query_key_value", "dense_h_to_4h"]),
    Case("MoE: Mixtral (attention)", _hf("MixtralConfig", "MixtralForCausalLM", vocab_size=96, hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
         lambda: ((_ids(),), _DEC), ["q_proj", "v_proj"]),
    Case("MoE: Switch Transformers", _hf("SwitchTransformersConfig", "SwitchTransformersModel", vocab_size=96,
                                         d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
                                         num_experts=4, expert_capacity=8),
         lambda: _encdec(_ids()), ["q", "v"]),
    Case("state space: Mamba", _hf("MambaConfig", "MambaModel", vocab_size=96, hidden_size=32, state_size=8,
                                   num_hidden_layers=2, expand=2, conv_kernel=4),
         lambda: ((_ids(),), _DEC), ["in_proj", "x_proj"]),   # PEFT refuses out_proj on Mamba
    Case("encoder: BERT", lambda: hf_bert()[0], lambda: (hf_bert()[1], hf_bert()[2]), ["query", "value"]),
    Case("encoder: ALBERT (shared layer)", _hf("AlbertConfig", "AlbertModel", vocab_size=96, embedding_size=16,
                                               hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                               intermediate_size=64),
         lambda: ((_ids(),), {}), ["query", "value"]),
    Case("encoder: Longformer (value branch)", _hf("LongformerConfig", "LongformerModel", vocab_size=96,
                                                   hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                   intermediate_size=64, attention_window=[4, 4],
                                                   max_position_embeddings=64),
         lambda: ((_ids(shape=(2, 16)),), {}), ["query", "value"]),
    Case("encoder-decoder: T5", _hf("T5Config", "T5Model", vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                    num_decoder_layers=2, num_heads=2),
         lambda: _encdec(_ids()), ["q", "v", "wi"]),
    Case("encoder-decoder: LongT5", _hf("LongT5Config", "LongT5Model", vocab_size=96, d_model=32, d_kv=8, d_ff=64,
                                        num_layers=2, num_decoder_layers=2, num_heads=2, local_radius=4),
         lambda: _encdec(_ids(shape=(2, 16))), ["q", "v"]),
    Case("encoder-decoder: LED (value branch)", _hf("LEDConfig", "LEDModel", vocab_size=96, d_model=32,
                                                    encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                                    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                                    attention_window=[4], max_encoder_position_embeddings=64,
                                                    max_decoder_position_embeddings=64),
         lambda: _encdec(_ids(shape=(2, 16))), ["q_proj", "v_proj"]),
    Case("encoder-decoder: BART", _hf("BartConfig", "BartModel", vocab_size=96, d_model=32, encoder_layers=1,
                                      decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                                      encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64),
         lambda: _encdec(_ids()), ["q_proj", "v_proj", "fc1"]),
    Case("vision: ViT", _hf("ViTConfig", "ViTModel", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, image_size=32, patch_size=8),
         lambda: ((torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),), {}), ["q_proj", "fc1"]),
    Case("vision: SigLIP tower", _hf("SiglipVisionConfig", "SiglipVisionModel", hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8),
         lambda: ((torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),), {}), ["q_proj", "v_proj"]),
    Case("audio: WavLM", _hf("WavLMConfig", "WavLMModel", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8),
                             num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2),
         lambda: ((torch.randn(2, 800, generator=torch.Generator().manual_seed(0)),), {}),
         ["intermediate_dense", "output_dense"]),
    Case("CNN: conv-BN residual (hand-written)", lambda: small_cnn()[0], lambda: (small_cnn()[1], {}),
         ["stem.0", "block1.0", "head"], globs=["stem.0", "block1.0", "head"]),
]


def _main(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


def _run(module, args, kwargs) -> torch.Tensor:
    if isinstance(module, torch.fx.GraphModule):   # the compiled module: tensor inputs only (the rest is baked)
        kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        return _main(module(*args, **kwargs))


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=[c.family for c in CASES])
def test_capture_insert_peft_parity_and_merge(case: Case, tmp_path):
    model = case.build()
    args, kwargs = case.inputs()
    eager = _run(model, args, kwargs)

    # capture (equal to eager up to fp32 rounding) + identity insert (bit-exact against the capture)
    globs = case.globs or [f"**.{t}" for t in case.targets]
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": globs, "rank": 2}], "pipeline": ["insert"]}
    compiled = surgeon.compile(model, args, spec, kwargs)
    assert compiled.adapters["a"].sites, "the targets select sites"
    assert [r.check for r in compiled.report.rows if r.name == "insert"] == ["exact"]
    _close(_run(compiled.module, args, kwargs), eager)

    # a trained PEFT checkpoint imports with PEFT's outputs, and merges as PEFT does
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=case.targets, **case.peft_options)
    wrapped = peft_lora_checkpoint(model, config, tmp_path)
    want = _run(wrapped, args, kwargs)
    assert not torch.allclose(want, eager, atol=1e-4), "the adapter changes the output"
    imported = surgeon.compile(model, args, {"adapters": [{"name": "p", "from_peft": str(tmp_path)}]}, kwargs)
    peft_sites = sum(1 for n, _ in wrapped.named_modules() if n.endswith(".lora_A"))
    assert len(imported.adapters["p"].sites) == peft_sites
    _close(_run(imported.module, args, kwargs), want)
    imported.apply(["merge"])
    _close(_run(imported.module, args, kwargs), _run(wrapped.merge_and_unload(), args, kwargs))
