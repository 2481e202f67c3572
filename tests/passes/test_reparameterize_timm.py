"""fold-bn + reparameterize against timm's own `reparameterize_model`, one model per timm family.

Each case builds a timm model with random weights and non-trivial BN statistics (no hub), runs
timm's reparameterize_model on a copy and surgeon's ["fold-bn", "reparameterize"] on the model,
and checks (issue 18): surgeon's graph holds no more conv and no more batch_norm ops than the
captured graph of timm's result; outputs equal the eager original within 1e-5 (fp32, relative to
its largest output); every batch_norm left in surgeon's graph is named in a report rejection, with
the reason; the user's model is untouched. Timing against timm: benchmarks/bench_timm_reparameterize.py.
"""
from __future__ import annotations

import copy

import pytest
import torch

import surgeon
from tests.conftest import assert_untouched, snapshot
from tests.passes.rep_models import REP, rel_err
from tests.timm_models import FAMILIES, create, import_timm


def _counts(gm) -> dict[str, int]:
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    return {"conv": sum("aten.conv" in t for t in targets), "batch_norm": sum("batch_norm" in t for t in targets)}


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


@pytest.mark.parametrize("name", list(FAMILIES))
def test_timm_family_reparameterizes_to_no_more_convs_or_batch_norms_than_timm(name):
    timm = import_timm()
    from timm.utils.model import reparameterize_model

    model, x = create(timm, name)
    saved = snapshot(model)
    timms = reparameterize_model(copy.deepcopy(model)).eval()
    theirs = _counts(surgeon.compile(timms, (x,), {"pipeline": []}).module)
    compiled = surgeon.compile(model, (x,), REP)
    ours = _counts(compiled.module)

    assert ours["conv"] <= theirs["conv"] and ours["batch_norm"] <= theirs["batch_norm"], (theirs, ours)
    fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for inp in (x, fresh):
            assert rel_err(model(inp), compiled.module(inp)) < 1e-5
    rows = {r.name: r for r in compiled.report.rows}
    assert rows["fold-bn"].matches > 0, "fold-bn folded nothing"
    rejected = " ".join(where + " " + why for r in rows.values() for where, why in r.rejections)
    left = [_module_path(n) for n in compiled.module.graph.nodes if "batch_norm" in str(n.target)]
    unexplained = [path for path in left if path not in rejected]
    assert not unexplained, f"batch_norms left with no rejection naming them: {unexplained}"
    assert_untouched(model, saved)
