"""remove: adapters detached without merging; the base graph and weights come back exactly."""
from __future__ import annotations

import torch

import surgeon
from tests.conftest import hf_llama, lora_spec, randomize_adapters
from tests.passes.helpers import adapter_nodes, logits, op_counts

KW = {"use_cache": False}


def test_remove_restores_the_base_exactly():
    model, args = hf_llama()
    base = surgeon.compile(model, args, {"adapters": []}, KW).module
    compiled = surgeon.compile(model, args, lora_spec(["*_proj"], rank=4), KW)
    randomize_adapters(compiled.module)
    assert not torch.equal(logits(compiled.module, args), logits(model, args))
    compiled.apply(["remove"])
    assert op_counts(compiled.module) == op_counts(base) and adapter_nodes(compiled.module) == []
    assert torch.equal(logits(compiled.module, args), logits(model, args))
    assert compiled.report.rows[-1].matches == 14 and compiled.adapters["chat"].status == "removed"
    assert sum(p.numel() for p in compiled.module.parameters()) == sum(p.numel() for p in model.parameters())


def test_two_input_side_adapters_on_one_op_come_off_oldest_first():
    """Two rotations stacked on the input of the same ops (b reads a's output): removing a puts b on the op's own
    input, and removing b then restores the base exactly."""
    model, args = hf_llama()
    spec = {"adapters": [{"name": name, "type": "oft", "targets": ["*.q_proj"], "block_size": 4}
                         for name in ("a", "b")]}
    compiled = surgeon.compile(model, args, spec, KW)
    only_b = surgeon.compile(model, args, {"adapters": spec["adapters"][1:]}, KW)
    randomize_adapters(compiled.module)
    only_b.module.load_state_dict(compiled.module.state_dict(), strict=False)
    assert not torch.equal(logits(compiled.module, args), logits(only_b.module, args))
    compiled.apply([{"remove": {"adapters": ["a"]}}])
    assert op_counts(compiled.module) == op_counts(only_b.module)
    assert torch.equal(logits(compiled.module, args), logits(only_b.module, args))
    compiled.apply([{"remove": {"adapters": ["b"]}}])
    assert adapter_nodes(compiled.module) == [] and torch.equal(logits(compiled.module, args), logits(model, args))
