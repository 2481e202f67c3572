"""surgeon.grad_calibration: the next-token loss gradient of chosen weights on the example inputs.

Checked against torch.autograd on the eager Hugging Face models (their own loss with labels = input_ids):
a Llama's linear weights and GPT-2's Conv1D (transposed to out x in), a `labels` keyword with ignored
positions, the averaging over calls, the graph and its flags left alone, and the refusal of an output
that is no logits."""
from __future__ import annotations

import pytest
import torch

import surgeon
from surgeon.errors import SurgeonError
from surgeon.grad_calibration import next_token_loss, weight_gradients
from tests.adapters.helpers import KW, NAME, spec
from tests.conftest import hf_gpt2, hf_llama


def _compiled(model, args, targets):
    return surgeon.compile(model, args, spec("lora", targets, rank=2), KW)


def _eager(model, paths, **inputs):
    model.zero_grad()
    with torch.enable_grad():
        model(**inputs, **KW).loss.backward()
    grads = {p: model.get_submodule(p).weight.grad.detach().clone() for p in paths}
    model.zero_grad()
    return grads


def test_llama_linear_gradients_equal_autograd_and_leave_the_graph_alone():
    model, args = hf_llama(layers=1)
    compiled = _compiled(model, args, ["*.q_proj", "*.up_proj"])
    gm, sites = compiled.module, compiled.adapters[NAME].sites
    flags = {n: p.requires_grad for n, p in gm.named_parameters()}
    values = {n: p.detach().clone() for n, p in gm.named_parameters()}
    grads = weight_gradients(gm, [(compiled.ctx.example_args, compiled.ctx.example_kwargs)],
                             {s.path: (s.weight, False, 1) for s in sites})
    eager = _eager(model, [s.path for s in sites], input_ids=args[0], labels=args[0])
    for site in sites:
        assert grads[site.path].dtype == torch.float32
        torch.testing.assert_close(grads[site.path], eager[site.path], rtol=1e-4, atol=1e-7)
    assert {n: p.requires_grad for n, p in gm.named_parameters()} == flags
    assert all(torch.equal(p, values[n]) and p.grad is None for n, p in gm.named_parameters())
    halved = weight_gradients(gm, [(compiled.ctx.example_args, compiled.ctx.example_kwargs)] * 2,
                              {s.path: (s.weight, False, 2) for s in sites})   # 2 examples, "2 calls": / 4
    for site in sites:
        torch.testing.assert_close(halved[site.path], eager[site.path] / 2, rtol=1e-4, atol=1e-7)


def test_gpt2_conv1d_gradient_is_out_x_in():
    model, args = hf_gpt2()
    compiled = _compiled(model, args, ["*.c_fc"])
    sites = compiled.adapters[NAME].sites
    grads = weight_gradients(compiled.module, [(compiled.ctx.example_args, compiled.ctx.example_kwargs)],
                             {s.path: (s.weight, True, 1) for s in sites})
    eager = _eager(model, [s.path for s in sites], input_ids=args[0], labels=args[0])
    for site in sites:
        assert grads[site.path].shape == (128, 32)   # c_fc: 32 -> 128, stored 32 x 128
        torch.testing.assert_close(grads[site.path], eager[site.path].t(), rtol=1e-4, atol=1e-7)


def test_labels_keyword_with_ignored_positions():
    model, args = hf_llama(layers=1)
    labels = args[0].clone()
    labels[:, :4] = -100
    logits = torch.randn(2, 8, 128, requires_grad=True)
    ours = next_token_loss({"logits": logits}, {"input_ids": args[0], "labels": labels})
    theirs = model.loss_function(logits=logits, labels=labels, vocab_size=128)
    torch.testing.assert_close(ours, theirs)


def test_an_output_without_logits_is_refused():
    with pytest.raises(SurgeonError, match="logits"):
        next_token_loss({"last_hidden_state": torch.randn(2, 8, 32)}, {"input_ids": torch.zeros(2, 8).long()})
    with pytest.raises(SurgeonError, match="logits"):   # a classifier's scores: no per-position vocabulary
        next_token_loss(torch.randn(2, 3), {"input_ids": torch.zeros(2, 8).long()})
    with pytest.raises(SurgeonError, match="beyond the 4 logits"):
        next_token_loss(torch.randn(2, 8, 4), {"input_ids": torch.full((2, 8), 7)})
