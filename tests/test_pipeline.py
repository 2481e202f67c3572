"""The pipeline's numeric check: its tolerance follows the dtype the graph computes in."""
from __future__ import annotations

import pytest
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


# ---- hostile numbers: a non-finite output never passes a check (issue 14)

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("mode", ["exact", "close"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_a_non_finite_output_where_the_reference_is_finite_fails_every_mode(mode, bad):
    before = [torch.zeros(2, 3), torch.ones(4)]
    after = [torch.zeros(2, 3), torch.tensor([bad, 1.0, bad, 1.0])]
    ok, why = compare(before, after, mode)
    assert not ok and why == "output 1 (torch.float32[4]) has 2 non-finite values where the reference is finite"


def test_the_issue_example_nan_against_ones_is_refused():
    ok, why = compare([torch.ones(4)], [torch.tensor([NAN, 1, 1, 1])], "close")
    assert not ok and "output 0" in why and "1 non-finite value " in why


def test_nan_where_the_reference_has_nan_is_no_new_failure_but_never_hides_a_change():
    before = [torch.tensor([NAN, 1.0, 2.0, INF])]
    assert compare(before, [before[0].clone()], "close") == (True, "rel err 0.0e+00")
    assert compare(before, [before[0].clone()], "exact") == (True, "exact")
    ok, why = compare(before, [torch.tensor([NAN, 1.0, 2.0 * (1 + 1e-6), INF])], "close")
    assert ok and abs(float(why.removeprefix("rel err ")) - 1e-6) < 1e-7   # over the finite positions only
    ok, why = compare(before, [torch.tensor([NAN, 1.5, 2.0, INF])], "close")   # NaN once swallowed this
    assert not ok and why.startswith("relative error 0.25 exceeds")
    ok, why = compare(before, [torch.tensor([1.0, 1.0, 2.0, INF])], "close")
    assert not ok and why == "output 0 (torch.float32[4]) changed 1 of the reference's non-finite values"
    ok, why = compare(before, [torch.tensor([NAN, 1.0, 2.0, -INF])], "exact")
    assert not ok and why == "output 0 (torch.float32[4]) changed 1 of the reference's non-finite values"


# ---- silent no-ops are errors (issue 14)

class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def two_specs(pipeline):
    return {"adapters": [{"name": "demo", "type": "lora", "targets": ["a"], "rank": 2},
                         {"name": "other", "type": "lora", "targets": ["b"], "rank": 2}], "pipeline": pipeline}


@pytest.mark.parametrize("pipeline,message", [
    (["merge"], "pass 'merge': no inserted adapter to merge (adapters: demo=declared, other=declared)"),
    (["insert", "unmerge"], "pass 'unmerge': no merged adapter to unmerge (adapters: demo=inserted, "
                            "other=inserted) (after passes: insert)"),
    (["remove"], "pass 'remove': no inserted adapter to remove (adapters: demo=declared, other=declared)"),
    (["insert", "merge", "remove"], "pass 'remove': no inserted adapter to remove (adapters: demo=merged, "
                                    "other=merged) (after passes: insert, merge)"),
    (["insert", {"merge": {"adapters": ["demo"]}}, {"merge": {"adapters": ["demo", "other"]}}],
     "pass 'merge': adapter 'demo' is merged, not inserted: nothing to merge (adapters: demo=merged, "
     "other=inserted) (after passes: insert, merge)"),
    (["activate"], "pass 'activate': no inserted or inactive adapter to activate (adapters: demo=declared, "
                   "other=declared)"),
    (["insert", {"merge": {"adapters": ["other"]}}, {"activate": {"adapters": ["other"]}}],
     "pass 'activate': adapter 'other' is merged, not inserted or inactive: nothing to activate (adapters: "
     "demo=inserted, other=merged) (after passes: insert, merge)"),
])
def test_a_pass_with_nothing_to_act_on_is_an_error(pipeline, message):
    with pytest.raises(surgeon.PassError) as info:
        surgeon.compile(Two(), (torch.randn(2, 8),), two_specs(pipeline))
    assert str(info.value) == message


def test_activating_what_is_already_active_is_not_a_no_op_error():
    compiled = surgeon.compile(Two(), (torch.randn(2, 8),), two_specs(["insert"]))
    compiled.set_active("demo", "other")          # already so: the state asked for holds
    compiled.set_active("demo").set_active("demo")
    assert compiled.adapters["other"].status == "inactive" and compiled.report.rows[-1].notes == ["active: demo"]
