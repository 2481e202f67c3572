"""The pipeline's numeric check: its tolerance follows the dtype the graph computes in."""
from __future__ import annotations

import torch
from torch import nn

import surgeon
from surgeon.pipeline import TOLERANCE, compare


def test_fp32_outputs_of_fp16_weights_get_the_fp16_tolerance():
    before = [torch.ones(4, dtype=torch.float32)]
    off = [before[0] * (1 + 1e-3)]
    assert not compare(before, off, "close")[0]                               # an fp32 model: 1e-3 is a change
    ok, check = compare(before, off, "close", {torch.float16})
    assert ok and check == "rel err 1.0e-03"
    ok, why = compare(before, [before[0] * (1 + 1e-2)], "close", {torch.float16})
    assert not ok and why == (f"relative error 0.01 exceeds {TOLERANCE[torch.float16]:g} for torch.float32 "
                              f"outputs of torch.float16 weights")
    assert not compare(before, off, "close", {torch.float32, torch.float64})[0]   # never tighter than the output's


class Upcast(nn.Module):
    """fp16 layers, logits cast to fp32 at the end (as some language models do)."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(64, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x))).float()


def test_merging_in_an_fp16_model_with_fp32_outputs_passes_its_check():
    """Before: the merge's fp16 rounding was judged against fp32's 1e-5 and the pass was refused."""
    torch.manual_seed(0)
    model = Upcast().half().eval()
    x = torch.randn(8, 64).half()
    spec = {"adapters": [{"name": "a", "type": "lora", "targets": ["proj", "head"], "rank": 4}], "pipeline": ["insert"]}
    compiled = surgeon.compile(model, (x,), spec)
    with torch.no_grad():
        for p in compiled.module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2)
    compiled.apply(["merge"])
    row = compiled.report.rows[-1]
    assert row.name == "merge" and row.check.startswith("rel err")
    assert 1e-5 < float(row.check.split()[-1]) <= TOLERANCE[torch.float16]
