"""P-tuning: virtual tokens from PEFT's MLP prompt encoder, in front of the input embeddings.

Against PEFT's PromptEncoderConfig (MLP) on HF LLaMA (GQA), its encoder holding surgeon's tensors:
logits of PEFT's shape (n + v positions) and greedy generate (see surgeon.adapters.virtual_tokens); the lifecycle (the table and the encoder
train, merge refused, safetensors round trip); PEFT export (the encoder's output, which PEFT loads as
the prompt) and import (a P_TUNING checkpoint is a prompt_tuning adapter); LSTM refused.
"""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from surgeon.errors import SpecError, SurgeonError
from tests.adapters.helpers import KW, NAME, assert_param_count, assert_round_trip, assert_trains, spec
from tests.conftest import hf_llama as _hf_llama
from tests.passes.helpers import logits

V, H = 3, 16
peft = pytest.importorskip("peft")


def hf_llama():
    """tests.conftest's LLaMA (GQA) with one layer: the rewrite is the same, the captures are quicker."""
    return _hf_llama(layers=1)


def _compile(**options):
    model, args = hf_llama()
    return model, args, surgeon.compile(model, args, spec("p_tuning", ["model.embed_tokens"], num_virtual_tokens=V,
                                                          encoder_hidden_size=H, **options), KW)


def _peft_like(model, compiled):
    """PEFT's P-tuning model (trainable: its encoder runs) holding the compiled adapter's tensors."""
    wrapped = peft.get_peft_model(copy.deepcopy(model), peft.PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=V, encoder_hidden_size=H)).eval()
    encoder = wrapped.prompt_encoder["default"]
    ours = {n.rpartition(".")[2]: p for n, p in compiled.module.named_parameters() if f"adapter_{NAME}" in n}
    with torch.no_grad():
        encoder.embedding.weight.copy_(ours["prompt_embedding"])
        for index in (0, 2, 4):
            encoder.mlp_head[index].weight.copy_(ours[f"mlp_{index}_weight"])
            encoder.mlp_head[index].bias.copy_(ours[f"mlp_{index}_bias"])
    return wrapped


def test_matches_peft_and_exports(tmp_path):
    model, args, compiled = _compile()
    wrapped = _peft_like(model, compiled)
    ids = args[0]
    with torch.no_grad():
        want, got = wrapped(input_ids=ids).logits, compiled.module(ids).logits
    assert got.shape == want.shape == (ids.shape[0], ids.shape[1] + V, want.shape[-1])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    first = wrapped.generate(input_ids=ids, max_new_tokens=1, do_sample=False)
    assert torch.equal(compiled.generate(ids, max_new_tokens=1, do_sample=False), first)
    assert torch.equal(compiled.generate(ids, max_new_tokens=3, do_sample=False),
                       wrapped.generate(input_ids=ids, max_new_tokens=3, do_sample=False, use_cache=False))
    # export: PEFT loads the encoder's output as its prompt; the import is a prompt_tuning adapter
    compiled.save_adapter(NAME, tmp_path / "export", format="peft")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "export")).eval()
    assert torch.allclose(logits(again, args), got, atol=1e-5, rtol=1e-4)
    imported = surgeon.compile(model, args, {"adapters": [{"name": "back", "from_peft": str(tmp_path / "export")}]},
                               KW)
    assert imported.adapters["back"].spec.type == "prompt_tuning"
    assert torch.allclose(logits(imported.module, args), got, atol=1e-5, rtol=1e-4)


def test_lifecycle(tmp_path):
    model, args, compiled = _compile()
    assert_param_count(compiled, V * 64 + (64 * H + H) + (H * H + H) + (H * 64 + 64))
    assert_trains(compiled, args)
    with pytest.raises(SpecError, match="virtual tokens in front of the input sequence"):
        compiled.apply(["merge"])
    assert_round_trip(compiled, model, args, tmp_path)


def test_lstm_is_refused():
    with pytest.raises(SurgeonError, match="encoder 'lstm'"):
        _compile(encoder="lstm")
