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
from surgeon.graph import module_path
from tests.conftest import assert_untouched, snapshot
from tests.passes.rep_models import REP, rel_err
from tests.timm_models import FAMILIES, counts, create, import_timm


@pytest.mark.parametrize("name", list(FAMILIES))
def test_timm_family_reparameterizes_to_no_more_convs_or_batch_norms_than_timm(name):
    timm = import_timm()
    from timm.utils.model import reparameterize_model

    model, x = create(timm, name)
    saved = snapshot(model)
    timms = reparameterize_model(copy.deepcopy(model)).eval()
    theirs = counts(surgeon.compile(timms, (x,), {"pipeline": []}).module)
    compiled = surgeon.compile(model, (x,), REP)
    ours = counts(compiled.module)

    assert ours["conv"] <= theirs["conv"] and ours["batch_norm"] <= theirs["batch_norm"], (theirs, ours)
    fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for inp in (x, fresh):
            assert rel_err(model(inp), compiled.module(inp)) < 1e-5
    rows = {r.name: r for r in compiled.report.rows}
    assert rows["fold-bn"].matches > 0, "fold-bn folded nothing"
    # a BN left is named by a rejection: as its place ("fold-bn @ path") or inside a reason ("... (path)")
    places = {where.split(" @ ", 1)[1] for r in rows.values() for where, _ in r.rejections}
    reasons = " ".join(why for r in rows.values() for _, why in r.rejections)
    left = [module_path(n) or "<root>" for n in compiled.module.graph.nodes if "batch_norm" in str(n.target)]
    unexplained = [path for path in left if path not in places and f"({path})" not in reasons]
    assert not unexplained, f"batch_norms left with no rejection naming them: {unexplained}"
    assert_untouched(model, saved)
