"""The compiled module as a drop-in for its model: any batch and length, the original call signature,
what a tokenizer returns, and one clear error for a call the graph cannot take (surgeon.inputs,
surgeon.verify). Before dynamic shapes and binding, every row here failed: another length raised
`shape '[2, 8, -1, 16]' is invalid`, another batch `The size of tensor a (2) must match ...`, and
`attention_mask=` or `use_cache=False` by name a TypeError."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import surgeon
from surgeon.models import tiny_llama
from tests.conftest import hf_bert, hf_gpt2, hf_llama, randomize_adapters, small_cnn

KW = {"use_cache": False}


def lora(*targets, **extra):
    return {"adapters": [{"name": "a", "type": "lora", "targets": list(targets), "rank": 2}], **extra}


def logits(out):
    return getattr(out, "logits", getattr(out, "last_hidden_state", out))


def ids(batch: int, length: int, vocab: int = 96, seed: int = 5) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=0, pad_token_id=0)
    return T5ForConditionalGeneration(cfg).eval(), (ids(2, 7, seed=0),), {"decoder_input_ids": ids(2, 5, seed=1),
                                                                          "use_cache": False}


@pytest.mark.parametrize("factory,targets,kwargs", [
    (lambda: tiny_llama(seed=0), ["*.q_proj"], None),
    (hf_llama, ["*.q_proj", "*.down_proj"], KW),
    (hf_gpt2, ["*.c_attn"], KW),
])
@pytest.mark.parametrize("shape", [(2, 8), (2, 5), (1, 8), (3, 13)])
def test_any_batch_and_length_matches_eager(factory, targets, kwargs, shape):
    model, (example,) = factory()
    compiled = surgeon.compile(model, (example,), lora(*targets), kwargs)
    randomize_adapters(compiled.module)
    merged = surgeon.compile(model, (example,), lora(*targets), kwargs)
    merged.module.load_state_dict(compiled.module.state_dict())
    merged.apply(["merge"])
    x = ids(*shape, vocab=model.config.vocab_size if hasattr(model, "config") else 256)
    with torch.no_grad():
        unmerged_out, merged_out = logits(compiled.module(x)), logits(merged.module(x))
    assert unmerged_out.shape[:2] == shape
    torch.testing.assert_close(merged_out, unmerged_out, rtol=1e-4, atol=1e-5)   # the adapter is in both
    with torch.no_grad():
        base = logits(surgeon.compile(model, (example,), {"adapters": [], "pipeline": []}, kwargs).module(x))
        eager = logits(model(x, **(kwargs or {})))
    torch.testing.assert_close(base, eager, rtol=0, atol=0)


def test_the_report_names_both_verified_shapes():
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, lora("*.q_proj"), KW)
    notes = " ".join(compiled.report.rows[0].notes)
    assert "verified on the example (input_ids [2, 8], attention_mask [2, 8]) and a second shape (input_ids [3, 7], " \
           "attention_mask [3, 7])" in notes
    assert "checked at size 1 too: input_ids[0], input_ids[1], attention_mask[0], attention_mask[1] accept 1" in notes


def test_the_original_call_signature_by_position_and_name():
    model, (x,) = hf_llama()
    compiled = surgeon.compile(model, (x,), lora("*.q_proj"), KW)
    mask = torch.ones_like(x)
    mask[0, :3] = 0                                   # left padding
    with torch.no_grad():
        want = model(input_ids=x, attention_mask=mask, use_cache=False).logits
        for got in (compiled.module(input_ids=x, attention_mask=mask, use_cache=False),
                    compiled.module(x, mask), compiled.module(x, attention_mask=mask, use_cache=False,
                                                          return_dict=None, labels=None)):
            torch.testing.assert_close(got.logits, want, rtol=0, atol=0)
        torch.testing.assert_close(compiled.module(input_ids=x).logits, model(x, use_cache=False).logits,
                                   rtol=0, atol=0)


def test_a_baked_keyword_is_accepted_when_equal_and_refused_naming_it_when_not():
    model, (x,) = hf_llama()
    compiled = surgeon.compile(model, (x,), lora("*.q_proj"), KW)
    compiled.module(x, use_cache=False)
    with pytest.raises(surgeon.InputError, match=r"use_cache=True differs from the value baked .*use_cache=False"):
        compiled.module(x, use_cache=True)
    with pytest.raises(surgeon.InputError, match=r"output_attentions=True was not given at capture.*example_kwargs"):
        compiled.module(x, output_attentions=True)
    with pytest.raises(surgeon.InputError, match=r"'position_ids' was not part of the example.*example_kwargs"):
        compiled.module(x, position_ids=torch.arange(8).expand(2, 8))
    tiny, (t,) = tiny_llama(seed=0)                  # a forward without **kwargs: Python's own refusal
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):   # InputError is a TypeError too
        surgeon.compile(tiny, (t,), lora("*.q_proj")).module(t, bogus=1)


@pytest.mark.parametrize("factory,kwargs,extra", [
    (hf_llama, KW, {}),
    (hf_bert, None, {"token_type_ids": True}),
    (hf_t5, None, {"decoder": True}),
])
def test_what_a_tokenizer_returns_can_be_splatted_in(factory, kwargs, extra):
    made = factory()
    model, args = made[0], made[1]
    kwargs = made[2] if len(made) > 2 else kwargs
    if factory is hf_bert:
        kwargs = {}                                   # compiled from ids alone: the mask is added as optional
    compiled = surgeon.compile(model, args, {"adapters": []}, kwargs)
    batch = {"input_ids": ids(3, 6), "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 1, 1, 1, 1, 1]])}
    if extra.get("token_type_ids"):
        batch["token_type_ids"] = torch.tensor([[0, 0, 0, 1, 1, 1]] * 3)
    if extra.get("decoder"):
        batch["decoder_input_ids"] = ids(3, 4, seed=9)
    with torch.no_grad():
        want = logits(model(**batch, **({"use_cache": False} if factory is not hf_bert else {})))
        got = logits(compiled.module(**batch))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_call_outside_what_the_graph_takes_is_one_error_naming_the_input(capfd):
    model, args, kwargs = hf_bert()                   # max_position_embeddings=32 limits the length
    compiled = surgeon.compile(model, args, {"adapters": []}, kwargs)
    with pytest.raises(surgeon.InputError, match=r"'input_ids' has shape \(2, 40\), but the graph accepts .*32 for "
                                                 r"dimension 1 .*the model limits it"):
        compiled.module(ids(2, 40), torch.ones(2, 40, dtype=torch.long))
    with pytest.raises(surgeon.InputError, match=r"attention_mask\[1\] is 9 but input_ids\[1\] is 10"):
        compiled.module(ids(2, 10), torch.ones(2, 9, dtype=torch.long))
    assert capfd.readouterr().err == ""               # torch.fx printed the generated code on every error


def test_static_shapes_on_request_and_the_error_says_how_to_vary():
    model, args = small_cnn()
    compiled = surgeon.compile(model, args, {"adapters": [], "static_shapes": True})
    assert compiled.module.meta["surgeon_inputs"].static
    with pytest.raises(surgeon.InputError, match=r"dimension 0 was captured static at 2.*static_shapes"):
        compiled.module(torch.randn(3, 3, 8, 8))
    dynamic = surgeon.compile(model, args, {"adapters": []})
    x = torch.randn(3, 3, 6, 10)
    with torch.no_grad():
        torch.testing.assert_close(dynamic.module(x), model(x), rtol=0, atol=0)
    with pytest.raises(surgeon.InputError, match=r"dimension 1 was captured static at 3.*the model fixes it"):
        dynamic.module(torch.randn(2, 1, 8, 8))      # the stem conv takes 3 channels
    with pytest.raises(surgeon.SpecError, match="static_shapes: must be true or false"):
        surgeon.load_spec({"adapters": [], "static_shapes": "yes"})


def test_a_batch_of_one_example_still_compiles_for_any_batch():
    model, (x,) = hf_llama()
    compiled = surgeon.compile(model, (x[:1],), lora("*.q_proj"), KW)
    with torch.no_grad():
        torch.testing.assert_close(compiled.module(ids(4, 6, vocab=128)).logits,
                                   model(ids(4, 6, vocab=128), use_cache=False).logits, rtol=0, atol=0)


def test_a_pass_that_bakes_a_size_is_caught_at_compile_time(monkeypatch):
    """The second shape is what catches it: a pass writing the example's batch into a reshape passes
    a check on the example alone."""
    from surgeon.passes.insert import Insert

    run = Insert.run

    def baking(self, gm, ctx):   # writes the example's batch (2) where the graph reads the batch size
        result = run(self, gm, ctx)
        for node in gm.graph.nodes:
            shape = node.args[1] if node.target is torch.ops.aten.view.default else None
            if isinstance(shape, (list, tuple)) and isinstance(shape[0], torch.fx.Node):
                node.args = (node.args[0], [2, *shape[1:]])
                break
        else:
            raise AssertionError("no view reads a symbolic batch size")
        return result

    monkeypatch.setattr(Insert, "run", baking)
    model, args = hf_llama()
    with pytest.raises(surgeon.PassError, match=r"pass 'insert': the graph after it fails to run on the checked "
                                                r"inputs \(\[\[2, 8\], \[2, 8\]\], \[\[3, 7\], \[3, 7\]\]\)"):
        surgeon.compile(model, args, lora("*.q_proj"), KW)


def test_config_and_properties_are_carried_and_state_dict_keys_are_the_models():
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, lora("*.q_proj"), KW)
    module = compiled.module
    assert module.config is model.config and module.generation_config is model.generation_config
    assert module.device == torch.device("cpu") and module.dtype == torch.float32
    base = {k for k in module.state_dict() if ".adapter_a." not in k}
    assert base <= set(model.state_dict())
    assert {k for k in model.state_dict() if "rotary_emb" not in k} <= base | {"lm_head.weight"}


def test_no_fx_traceback_is_printed_when_a_call_fails():
    code = ("import torch, surgeon; from tests.conftest import hf_llama; m, a = hf_llama(); "
            "c = surgeon.compile(m, a, {'adapters': []}, {'use_cache': False}); "
            "import contextlib\ntry: c.module(torch.zeros(2, 4, 3, dtype=torch.long))\n"
            "except surgeon.InputError as e: print('refused:', e)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "refused:" in done.stdout and "input 'input_ids' has 3 dimensions" in done.stdout
    assert "Call using an FX-traced Module" not in done.stderr and "eval_with_key" not in done.stderr
