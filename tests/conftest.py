"""Models for the tests, built from configs with random weights (no hub)."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

logging.getLogger("transformers").setLevel(logging.ERROR)


def snapshot(model: nn.Module) -> dict:
    """Everything about the user's model a compile must leave alone."""
    return {k: (v.detach().clone(), v.requires_grad) for k, v in model.state_dict(keep_vars=True).items()} | {
        "__training__": [m.training for m in model.modules()]}


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        if key == "__training__":
            assert after[key] == value
        else:
            assert torch.equal(after[key][0], value[0]), f"{key} was modified"
            assert after[key][1] == value[1], f"{key}.requires_grad was modified"


def hf_llama(layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    return model, (torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(seed)),)


def hf_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    return model, (torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(seed)),)


def hf_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    model = BertModel(cfg).eval()
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(seed))
    return model, (ids,), {"attention_mask": torch.ones(2, 8, dtype=torch.long)}


class SmallCNN(nn.Module):
    """Conv-BN-ReLU stem, two residual blocks, pooled linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.block2 = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block1(x))
        x = torch.relu(x + self.block2(x))
        return self.head(x.mean((2, 3)))


def small_cnn(seed: int = 0):
    torch.manual_seed(seed)
    model = SmallCNN()
    with torch.no_grad():  # non-trivial running statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval(), (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed)),)


@pytest.fixture(autouse=True)
def process_state_is_restored():
    """A test (or the code it runs) must leave autograd on and the default dtype as it found them:
    a leak here makes later tests pass or fail by the order they run in."""
    dtype = torch.get_default_dtype()
    yield
    leaked = [what for what, bad in (("autograd disabled", not torch.is_grad_enabled()),
                                     (f"default dtype {torch.get_default_dtype()}", torch.get_default_dtype() != dtype))
              if bad]
    torch.set_grad_enabled(True)
    torch.set_default_dtype(dtype)
    assert not leaked, f"the test left {' and '.join(leaked)} for the tests after it"


@pytest.fixture
def llama():
    return hf_llama()


@pytest.fixture
def gpt2():
    return hf_gpt2()


def lora_spec(targets, rank=4, alpha=8, pipeline=("insert",), name="chat", **extra):
    return {"adapters": [{"name": name, "type": "lora", "targets": list(targets), "rank": rank, "alpha": alpha,
                          **extra}], "pipeline": list(pipeline)}


def randomize_adapters(module: nn.Module, seed: int = 1) -> None:
    """Give every trainable (adapter) parameter non-zero values, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def peft_lora_checkpoint(model: nn.Module, config, tmp_path, scale: float = 0.2, seed: int = 7) -> nn.Module:
    """`model` (a copy) wrapped by PEFT with `config`, its LoRA factors set to seeded noise (as training
    would leave them), saved to `tmp_path`; returns the PEFT model in eval mode."""
    import peft

    wrapped = peft.get_peft_model(copy.deepcopy(model), config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    wrapped.save_pretrained(tmp_path)
    return wrapped


__all__ = ["snapshot", "assert_untouched", "hf_llama", "hf_gpt2", "hf_bert", "small_cnn", "lora_spec",
           "randomize_adapters", "peft_lora_checkpoint", "copy"]
