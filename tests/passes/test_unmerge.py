"""unmerge: merge then unmerge gives back the base weights (fp rounding) and the adapter branch."""
from __future__ import annotations

import torch

import surgeon
from tests.conftest import hf_llama, lora_spec, randomize_adapters
from tests.passes.helpers import adapter_nodes, logits, op_counts

KW = {"use_cache": False}


def test_merge_unmerge_round_trip():
    model, args = hf_llama()
    compiled = surgeon.compile(model, args, lora_spec(["*.q_proj", "*.down_proj"], rank=4), KW)
    randomize_adapters(compiled.module)
    unmerged_ops = op_counts(compiled.module)
    unmerged = logits(compiled.module, args)
    compiled.apply(["merge", "unmerge"])
    assert op_counts(compiled.module) == unmerged_ops
    assert len(adapter_nodes(compiled.module)) == 4 * 5
    for name, p in model.named_parameters():
        torch.testing.assert_close(compiled.module.get_parameter(name), p, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(compiled.module, args), unmerged, rtol=1e-5, atol=1e-5)
    assert compiled.report.rows[-1].matches == 4 and compiled.adapters["chat"].status == "inserted"
