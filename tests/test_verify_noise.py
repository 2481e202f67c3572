"""The 'exact' check is bit-exact, yet blind to trainability flags (issue 18, cause 5).

Cause: `aten.linear` on a 3-D input that cannot be viewed as 2-D (a transposed one, as attention
that runs `F.multi_head_attention_forward` feeds its projections: SigLIP's pooling head, WavLM)
goes through `aten.matmul`, which folds the input into one `mm` when the weight requires grad and
runs a `bmm` when it does not (`should_fold` in ATen's LinearAlgebra.cpp). The two round
differently. `insert` freezes every base weight, so an untouched linear with bit-identical inputs
gave a different last bit and an exact insert was refused ("max abs diff 5.36e-07"). The check now
runs every graph with its parameters' flags off (they choose a kernel, not a function), so an
exact pass stays bit-exact and a change of one ulp still fails.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import transformers
from torch import nn

import surgeon
from surgeon.errors import PassError
from surgeon.pipeline import PassResult, run_outputs, run_pipeline


class TransposedHead(nn.Module):
    """A projection the adapter targets, then a linear on a sequence-first (transposed) input."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.head = nn.Linear(64, 64), nn.Linear(64, 128)

    def forward(self, x):
        return self.head(self.q_proj(x).transpose(0, 1))


def lora(targets: list[str]) -> dict:
    return {"adapters": [{"name": "a", "type": "lora", "targets": targets, "rank": 4}], "pipeline": ["insert"]}


def test_the_cause_a_frozen_weight_changes_the_rounding_of_a_transposed_linear():
    """The premise of the fix, so a torch that stops doing this shows up here first."""
    torch.manual_seed(0)
    x, weight = torch.randn(2, 16, 64).transpose(0, 1), torch.randn(128, 64)   # x: [16, 2, 64], not foldable
    with torch.no_grad():
        trainable = nn.functional.linear(x, weight.clone().requires_grad_(True))
        frozen = nn.functional.linear(x, weight)
    assert not torch.equal(frozen, trainable)
    assert torch.allclose(frozen, trainable, rtol=1e-5, atol=1e-5)


def test_insert_is_exact_when_it_freezes_a_weight_read_through_a_transposed_input():
    torch.manual_seed(0)
    model = TransposedHead().eval()
    compiled = surgeon.compile(model, (torch.randn(2, 16, 64),), lora(["q_proj"]))
    assert compiled.report.rows[-1].check == "exact"
    flags = {name: p.requires_grad for name, p in compiled.module.named_parameters()}
    assert flags == {"q_proj.weight": False, "q_proj.bias": False, "head.weight": False, "head.bias": False,
                     "q_proj.adapter_a.lora_A": True, "q_proj.adapter_a.lora_B": True}   # the check restores them


def test_siglip_vision_tower_insert_is_exact():
    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, image_size=32, patch_size=8)
    model = transformers.SiglipVisionModel(config).eval()
    compiled = surgeon.compile(model, (torch.randn(2, 3, 32, 32),), lora(["**.q_proj"]))
    assert compiled.report.rows[-1].check == "exact"


def test_wavlm_insert_is_exact():
    torch.manual_seed(0)
    config = transformers.WavLMConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, conv_dim=(32, 32), conv_stride=(5, 2),
                                      conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                      num_conv_pos_embedding_groups=4, num_buckets=32, max_bucket_distance=64)
    model = transformers.WavLMModel(config).eval()
    compiled = surgeon.compile(model, (torch.randn(2, 4000),), lora(["**.feed_forward.intermediate_dense"]))
    assert compiled.report.rows[-1].check == "exact"


@dataclass(frozen=True)
class Nudge:
    """A pass that claims to be exact but changes a parameter: its first value to `value`, or else
    every value by one ulp (one value one ulp up can round away in the output's own last bit)."""

    target: str
    value: float | None = None
    name: ClassVar[str] = "nudge"
    check: ClassVar[str] = "exact"

    def run(self, gm, ctx) -> PassResult:
        module, _, leaf = self.target.rpartition(".")
        owner = gm.get_submodule(module)
        old = getattr(owner, leaf)
        new = old.detach().clone()
        if self.value is None:
            new = torch.nextafter(new, torch.full_like(new, float("inf")))
        else:
            new.view(-1)[0] = self.value
        setattr(owner, leaf, nn.Parameter(new, requires_grad=old.requires_grad))
        return PassResult(matches=1)


def inserted():
    """TransposedHead with a LoRA on q_proj, inserted unchecked (so these tests run with or without the fix)."""
    torch.manual_seed(0)
    return surgeon.compile(TransposedHead().eval(), (torch.randn(2, 16, 64),), lora(["q_proj"]), verify=False)


@pytest.mark.parametrize("target, value", [("head.weight", None), ("q_proj.weight", None),
                                           ("q_proj.adapter_a.lora_B", 1e-3)])
def test_a_real_change_still_fails_the_exact_check(target, value):
    """A frozen base weight one ulp up (the transposed head's, or the adapted linear's), or a LoRA
    whose B is no longer zero, is no rounding noise."""
    compiled = inserted()
    with pytest.raises(PassError, match="expected exact equality"):
        run_pipeline(compiled.module, [Nudge(target, value)], compiled.ctx)


def test_run_outputs_restores_the_flags_when_the_graph_raises():
    compiled = inserted()
    flags = {name: p.requires_grad for name, p in compiled.module.named_parameters()}
    compiled.ctx.more_examples.append(((torch.randn(2, 16, 63),), {}))   # a width the graph cannot take
    with pytest.raises(Exception):
        run_outputs(compiled.module, compiled.ctx)
    assert {name: p.requires_grad for name, p in compiled.module.named_parameters()} == flags
