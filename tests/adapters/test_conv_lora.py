"""LoRA on aten.conv2d sites: structure, exact identity insert, merge, grouped-conv refusal, PEFT parity.

On a conv site A is a conv with the site's kernel, stride, padding and dilation (in -> r) and B a
1x1 conv (r -> out); the merged weight is W + s (B A).view(out, in, kh, kw).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import surgeon
from tests.adapters.helpers import NAME, assert_close, spec
from tests.conftest import randomize_adapters, small_cnn
from tests.passes.helpers import adapter_nodes, logits

CONVS = ["stem.0", "block1.0", "block1.3", "block2.0"]
aten = torch.ops.aten


def test_conv_lora_structure_identity_and_merge():
    model, args = small_cnn()
    compiled = surgeon.compile(model, args, spec("lora", CONVS + ["head"], rank=2, alpha=4))
    row = compiled.report.rows[-1]
    assert (row.matches, row.check) == (5, "exact")
    assert torch.equal(logits(compiled.module, args), logits(model, args))
    convs = [n for n in adapter_nodes(compiled.module, NAME) if n.target is aten.conv2d.default]
    assert len(convs) == 2 * len(CONVS)   # A (site kernel) and B (1x1) per conv site
    stem_a = next(n for n in convs if n.meta["surgeon_path"] == "stem.0" and n.args[1].meta["val"].shape[-1] == 3)
    assert list(stem_a.args[1].meta["val"].shape) == [2, 3, 3, 3] and stem_a.args[4] == [1, 1]   # padding 1
    # A: r x (in * kh * kw), B: out x r for every conv; the head is a plain linear site
    expected = 2 * (27 + 8) + 2 * 2 * (72 + 8) + 2 * (8 + 8) + 2 * (8 + 10)
    assert compiled.adapters[NAME].param_count == expected
    assert sum(p.numel() for p in compiled.module.parameters() if p.requires_grad) == expected
    randomize_adapters(compiled.module)
    before = logits(compiled.module, args)
    stem = compiled.module.get_parameter("stem.0.adapter_ad.lora_A").detach().clone()
    compiled.apply(["merge"])
    assert adapter_nodes(compiled.module) == []
    merged = compiled.module.get_parameter("stem.0.weight")
    delta = 2.0 * (compiled.adapters[NAME].sites[0].merged["lora_B"] @ stem).view(8, 3, 3, 3)
    assert torch.allclose(merged, model.stem[0].weight + delta, atol=1e-6)
    assert_close(logits(compiled.module, args), before)
    compiled.apply(["unmerge"])
    assert_close(logits(compiled.module, args), before)


class Strided(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(4, 6, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2))
        self.depthwise = nn.Conv2d(6, 6, 3, groups=6)

    def forward(self, x):
        return self.depthwise(self.down(x))


def test_strided_dilated_conv_and_grouped_refusal():
    model, args = Strided().eval(), (torch.randn(1, 4, 11, 12, generator=torch.Generator().manual_seed(0)),)
    compiled = surgeon.compile(model, args, spec("lora", ["down", "depthwise"], rank=3))
    assert compiled.report.rows[-1].matches == 1
    assert [p for p, _ in compiled.report.rows[-1].rejections] == [f"{NAME} @ depthwise"]
    assert "groups=6" in compiled.report.rows[-1].rejections[0][1]
    randomize_adapters(compiled.module)
    before = logits(compiled.module, args)
    compiled.apply(["merge"])
    assert_close(logits(compiled.module, args), before)
    with pytest.raises(surgeon.SpecError, match="groups=6"):
        surgeon.compile(model, args, spec("lora", ["depthwise"]))


def test_kind_without_conv_support_is_rejected_with_reason():
    model, args = small_cnn()
    compiled = surgeon.compile(model, args, spec("dora", ["stem.0", "head"], rank=2))
    assert compiled.report.rows[-1].matches == 1
    assert compiled.report.rows[-1].rejections == [
        (f"{NAME} @ stem.0", "a 'dora' adapter does not attach to conv2d (it supports linear, addmm)")]


def test_peft_parity_conv_lora(tmp_path):
    peft = pytest.importorskip("peft")
    model, args = small_cnn()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=CONVS + ["head"], rank_pattern={"block2.0": 2})
    wrapped = peft.get_peft_model(copy.deepcopy(model), config).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    wrapped.save_pretrained(tmp_path)
    expected = logits(wrapped, args)
    assert not torch.allclose(expected, logits(model, args), atol=1e-3)
    compiled = surgeon.compile(model, args, {"adapters": [{"name": NAME, "from_peft": str(tmp_path)}]})
    assert {s.path: s.options["rank"] for s in compiled.adapters[NAME].sites}["block2.0"] == 2
    assert_close(logits(compiled.module, args), expected)
    compiled.apply(["merge"])
    assert_close(logits(compiled.module, args), logits(wrapped.merge_and_unload(), args))
