"""reparameterize: multi-branch blocks collapse to one op each, equal to the original eager model.

Every model here is a plain nn.Module (tests/passes/rep_models.py); the passes find the
structure in the captured graph. Each case shows the ops before and after, checks outputs
against the ORIGINAL eager model on the example and on a fresh input (relative error < 1e-5,
fp32), and reads what folded (notes) and what did not, with why (rejections), from the report.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

import surgeon
from tests.conftest import assert_untouched, snapshot
from tests.passes.rep_models import (REP, ACBlock, EfficientViTTail, InplaceMobileOneBlock, InplaceRepVGGBlock,
                                     AttentionBias, LeViTTail, LinearHead, MobileOneBlock, MobileOneStage, NegatedBranches, RepMixer,
                                     RepNet, RepNeXtMixer, RepVGGBlock, StdConv, assert_matches_eager, build, op_names, op_nodes)


def _inputs(*shape):
    gen = torch.Generator().manual_seed(11)
    return torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)


def _collapse(model, x, fresh, pipeline=REP):
    saved = snapshot(model)
    compiled = surgeon.compile(model, (x,), pipeline)
    assert_matches_eager(model, compiled.module, x, fresh)
    assert_untouched(model, saved)
    return compiled, compiled.report.rows[-1]


GRID = [(stride, groups, bias, identity) for stride in (1, 2) for groups in (1, 2) for bias in (False, True)
        for identity in (True, False) if not (identity and stride == 2)]


@pytest.mark.parametrize("stride,groups,bias,identity", GRID)
def test_repvgg_block_collapses_to_one_conv(stride, groups, bias, identity):
    model = build(RepVGGBlock, 8, 8, stride, groups, bias, identity)
    x, fresh = _inputs(2, 8, 9, 9)
    compiled, row = _collapse(model, x, fresh)
    before = ["conv2d", "batch_norm", "conv2d", "batch_norm", "add"] + (["batch_norm", "add"] if identity else [])
    assert op_names(surgeon.capture(model, (x,))) == before + ["relu"]
    assert op_names(compiled.module) == ["conv2d", "relu"]
    (conv,) = op_nodes(compiled.module, "conv2d")
    weight = compiled.module.get_parameter(conv.args[1].target)
    assert tuple(weight.shape) == (8, 8 // groups, 3, 3) and conv.args[3:] == ([stride] * 2, [1, 1], [1, 1], groups)
    assert row.matches == 1 and not row.rejections
    assert row.notes == ["parallel: " + " + ".join(
        [f"conv2d 3x3{extra} (dense.0)", f"conv2d 1x1{extra} (one_by_one.0)"]
        + (["batch_norm identity (identity)"] if identity else [])) + " -> conv2d 3x3 (<root>)"
        for extra in ["".join([f" stride ({stride}, {stride})" if stride > 1 else "",
                               f" groups {groups}" if groups > 1 else ""])]]


def test_reparameterize_alone_also_folds_the_branch_batch_norms():
    model = build(RepVGGBlock, 8, 8)
    x, fresh = _inputs(2, 8, 6, 6)
    compiled, row = _collapse(model, x, fresh, {"pipeline": ["reparameterize"]})
    assert op_names(compiled.module) == ["conv2d", "relu"]
    assert [n.split(":")[0] for n in row.notes] == ["fold-bn", "fold-bn", "parallel"]


def test_acnet_block_asymmetric_kernels_centre_into_the_square_one():
    model = build(ACBlock, 6, 8)
    x, fresh = _inputs(2, 6, 7, 9)
    compiled, row = _collapse(model, x, fresh)
    assert op_names(compiled.module) == ["conv2d", "relu"]
    assert row.notes == ["parallel: conv2d 3x3 (square.0) + conv2d 1x3 (horizontal.0) + conv2d 3x1 (vertical.0)"
                         " -> conv2d 3x3 (<root>)"]


@pytest.mark.parametrize("kernel,groups", [(3, 8), (1, 1)])    # depthwise half, pointwise half
def test_mobileone_block_with_k_branches_collapses(kernel, groups):
    model = build(MobileOneBlock, 8, 8, kernel, 1, groups, k=4)
    x, fresh = _inputs(2, 8, 6, 6)
    compiled, row = _collapse(model, x, fresh)
    assert op_names(compiled.module) == ["conv2d", "relu"]
    (conv,) = op_nodes(compiled.module, "conv2d")
    assert conv.args[6] == groups and compiled.module.get_parameter(conv.args[1].target).shape[2:] == (kernel,) * 2
    parallel = row.notes[0]
    assert parallel.count("conv2d") == 4 + (kernel > 1) + 1 and "batch_norm identity (identity)" in parallel


def test_repnext_mixer_serial_multiscale_and_nested_branches_collapse_to_one_depthwise_conv():
    model = build(RepNeXtMixer, 4)
    x, fresh = _inputs(2, 4, 9, 9)
    compiled, row = _collapse(model, x, fresh)
    assert op_names(compiled.module) == ["conv2d"]
    (conv,) = op_nodes(compiled.module, "conv2d")
    assert compiled.module.get_parameter(conv.args[1].target).shape == (4, 1, 7, 7) and conv.args[4] == [3, 3]
    kinds = Counter(note.split(":")[0] for note in row.notes)
    assert kinds == {"parallel": 3, "serial": 3, "fold-bn": 1}
    assert any(n.startswith("serial: conv2d 1x1 groups 4 (expand) -> conv2d 5x5 groups 4") for n in row.notes)
    assert any(n.startswith("serial: conv2d 3x3 groups 4 (before_project.0) -> conv2d 1x1") for n in row.notes)
    assert any("identity (x) + batch_norm identity (identity)" in n for n in row.notes)
    assert not row.rejections


def test_small_network_has_one_conv_per_block_and_no_batch_norm():
    model = build(RepNet)
    x, fresh = _inputs(2, 3, 16, 16)
    compiled, row = _collapse(model, x, fresh)
    gm = compiled.module
    convs = Counter(".".join(n.meta["surgeon_path"].split(".")[:2]) for n in op_nodes(gm, "conv2d"))
    assert convs == {f"blocks.{i}": 1 for i in range(len(model.blocks))}
    assert [n.meta["surgeon_path"] for n in op_nodes(gm, "linear")] == ["head"]
    assert not op_nodes(gm, "batch_norm") and not op_nodes(gm, "add")
    params = [r.params for r in compiled.report.rows]
    assert params[-1][1] < params[1][1] < params[0][0]
    assert all(r.check.startswith("rel err") for r in compiled.report.rows)
    # the head: the bottleneck pair is composed because the host linear absorbs it, then both BNs fold
    assert "serial: linear 16->4 (head.down) -> linear 4->10 (head.up) => linear 16->10 (head)" in row.notes
    assert "parallel: linear 16->10 (head.fc) + linear 16->10 (head) -> linear (head)" in row.notes
    # left as they are: only the ReLUs between a depthwise and a pointwise conv
    assert all("nonlinearity (aten.relu.default)" in why for _, why in row.rejections) and row.rejections


class LinearBranches(nn.Module):
    """fc_a(x) + fc_b(x) + x [+ BN1d(x)]: parallel linears with bare and BN identities."""

    def __init__(self, features: int, with_norm: bool):
        super().__init__()
        self.fc_a, self.fc_b = nn.Linear(features, features), nn.Linear(features, features, bias=False)
        self.norm = nn.BatchNorm1d(features) if with_norm else None

    def forward(self, x):
        y = self.fc_a(x) + self.fc_b(x) + x
        return y + self.norm(x) if self.norm is not None else y


@pytest.mark.parametrize("shape,with_norm", [((4, 16), True), ((2, 5, 16), False)])
def test_parallel_linears_with_identity_merge_into_one_linear(shape, with_norm):
    model = build(LinearBranches, 16, with_norm)
    x, fresh = _inputs(*shape)
    compiled, row = _collapse(model, x, fresh)
    assert op_names(compiled.module) == ["linear"] and row.matches == 1
    assert row.notes[0].startswith("parallel: linear 16->16 (fc_a) + linear 16->16 (fc_b) + identity (x)")


def test_serial_linears_compose_and_a_standalone_bottleneck_is_kept():
    shrink = build(lambda: nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8)))
    x, fresh = _inputs(4, 16)
    compiled, row = _collapse(shrink, x, fresh)
    assert op_names(compiled.module) == ["linear"]
    assert row.notes == ["serial: linear 16->32 (0) -> linear 32->8 (1) => linear 16->8 (<root>)"]

    bottleneck = build(lambda: nn.Sequential(nn.Linear(16, 2, bias=False), nn.Linear(2, 16)))
    compiled, row = _collapse(bottleneck, x, fresh)
    assert op_names(compiled.module) == ["linear", "linear"] and row.matches == 0
    assert "more parameters than the pair" in row.rejections[0][1]


def test_bottleneck_without_activation_folds_into_its_host_linear():
    model = build(LinearHead, 16, 10)
    x, fresh = _inputs(4, 16)
    compiled, row = _collapse(model, x, fresh)
    assert op_names(compiled.module) == ["linear"]
    assert [n.split(":")[0] for n in row.notes] == ["serial", "parallel", "fold-bn", "fold-bn"]


class TwoBranches(nn.Module):
    """a(x) + b(x), optionally also returning a(x)."""

    def __init__(self, a: nn.Module, b: nn.Module, leak: bool = False):
        super().__init__()
        self.a, self.b, self.leak = a, b, leak

    def forward(self, x):
        y = self.a(x)
        return (y + self.b(x), y) if self.leak else y + self.b(x)


def _conv(kernel, stride=1, padding=0, dilation=1, groups=1):
    return nn.Conv2d(8, 8, kernel, stride, padding, dilation, groups)


@pytest.mark.parametrize("a,b,leak,reason", [
    (_conv(5), _conv(3, stride=2, padding=1), False, "mismatched stride (1, 1) vs (2, 2)"),
    (_conv(3, padding=1), _conv(3, padding=1, groups=2), False, "mismatched groups 1 vs 2"),
    (_conv(3, padding=1), _conv(3, padding=2, dilation=2), False, "mismatched dilation (1, 1) vs (2, 2)"),
    (_conv(3, padding=1), _conv(1), True, "branch conv2d 3x3 (a) is used elsewhere too (add, output)"),
])
def test_branches_that_cannot_merge_are_refused_with_the_reason(a, b, leak, reason):
    model = build(TwoBranches, a, b, leak)
    x, fresh = _inputs(2, 8, 8, 8)
    compiled, row = _collapse(model, x, fresh)
    assert op_names(compiled.module) == ["conv2d", "conv2d", "add"] and row.matches == 0
    assert len(row.rejections) == 1 and reason in row.rejections[0][1]


def test_dilated_multiscale_branches_merge_when_padding_aligns():
    a = _conv(3, padding=2, dilation=2)
    b = nn.Sequential(_conv(5, padding=4, dilation=2), nn.BatchNorm2d(8))
    model = build(TwoBranches, a, b)
    x, fresh = _inputs(2, 8, 11, 11)
    compiled, _ = _collapse(model, x, fresh)
    (conv,) = op_nodes(compiled.module, "conv2d")
    assert conv.args[4:6] == ([4, 4], [2, 2])


def test_nonlinearity_between_serial_convs_is_refused():
    model = build(lambda: nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)))
    x, fresh = _inputs(2, 8, 6, 6)
    compiled, row = _collapse(model, x, fresh)
    assert op_names(compiled.module) == ["conv2d", "relu", "conv2d"]
    assert row.rejections == [("serial @ 2", "a nonlinearity (aten.relu.default) between conv2d 1x1 (0) and "
                                             "conv2d 3x3 (2): they do not compose")]


def test_batch_norm_in_training_mode_is_refused_as_branch_and_as_fold():
    model = build(RepVGGBlock, 8, 8)
    model.identity = nn.BatchNorm2d(8, track_running_stats=False)
    model.dense[1] = nn.BatchNorm2d(8, track_running_stats=False)
    x, fresh = _inputs(2, 8, 6, 6)
    compiled = surgeon.compile(model, (x,), REP)
    row = compiled.report.rows[-1]
    assert op_names(compiled.module).count("batch_norm") == 2 and len(op_nodes(compiled.module, "conv2d")) == 2
    reasons = dict(row.rejections)
    assert "training mode" in reasons["fold-bn @ dense.1"]
    assert "batch_norm identity (identity) is a batch_norm in training mode" in reasons["parallel @ "]


def test_graph_from_the_fx_front_end_collapses_the_same():
    from surgeon.capture import _capture_fx
    from surgeon.modes import evaluating
    from surgeon.passes.fold_bn import FoldBn
    from surgeon.passes.reparameterize import Reparameterize
    from surgeon.pipeline import Context, run_pipeline
    from surgeon.spec import load_spec

    model = build(RepNet)
    x, fresh = _inputs(2, 3, 16, 16)
    with evaluating(model):
        gm = _capture_fx(model, (x,), {}, {})      # Python adds, torch.relu, no meta["val"]
    assert "add" in op_names(gm) and not any("val" in n.meta for n in gm.graph.nodes)
    ctx = Context(load_spec({"pipeline": []}), (x,), {}, {}, torch.Generator())
    rows = run_pipeline(gm, [FoldBn(), Reparameterize()], ctx)
    assert [r.matches for r in rows] == [22, 17]
    assert len(op_nodes(gm, "conv2d")) == len(model.blocks) and not op_nodes(gm, "batch_norm")
    assert_matches_eager(model, gm, x, fresh)


def test_inserted_adapters_are_left_to_their_own_passes():
    from tests.conftest import lora_spec

    model = build(lambda: nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16)))
    x, _ = _inputs(4, 16)
    spec = lora_spec(["0"], rank=2, alpha=2, pipeline=["insert", "reparameterize"])   # scale 1: a plain add
    compiled = surgeon.compile(model, (x,), spec)
    row = compiled.report.rows[-1]
    assert op_names(compiled.module) == ["linear", "linear", "linear", "add", "batch_norm"]
    assert row.matches == 0 and compiled.adapters["chat"].status == "inserted"


# ---------------------------------------------------------------- timm's families, written as timm computes them
# (issue 18) expected counts are what timm's reparameterize_model leaves of each block (see the classes'
# docstrings): no more convs, no more BatchNorms, and no more linears than that.

TIMM = [
    pytest.param(InplaceRepVGGBlock, (8, 8), (2, 8, 6, 6), 1, 0, id="repvgg-identity-bn-added-in-place"),
    pytest.param(InplaceRepVGGBlock, (8, 8, 1, 2), (2, 8, 6, 6), 1, 0, id="repvgg-grouped"),
    pytest.param(InplaceMobileOneBlock, (8, 8, 3, 1, 8), (2, 8, 6, 6), 1, 0, id="mobileone-depthwise"),
    pytest.param(InplaceMobileOneBlock, (8, 8, 3, 2, 8), (2, 8, 6, 6), 1, 0, id="mobileone-stride2-no-identity"),
    pytest.param(InplaceMobileOneBlock, (8, 8, 1), (2, 8, 6, 6), 1, 0, id="mobileone-pointwise-no-scale"),
    pytest.param(InplaceMobileOneBlock, (8, 16, 1), (2, 8, 6, 6), 1, 0, id="mobileone-0-plus-branches"),
    pytest.param(MobileOneStage, (8, 16), (2, 8, 8, 8), 4, 0, id="mobileone-stage"),
    pytest.param(LeViTTail, (), (2, 5, 16), 0, 4, id="levit-linear-norm-and-heads"),
    pytest.param(EfficientViTTail, (), (2, 3, 8, 8), 3, 1, id="efficientvit-flat-bn-and-head"),
]


@pytest.mark.parametrize("factory,args,shape,convs,linears", TIMM)
def test_timm_families_keep_no_more_convs_or_batch_norms_than_timms_reparameterize(factory, args, shape, convs,
                                                                                     linears):
    model = build(factory, *args)
    x, fresh = _inputs(*shape)
    compiled, row = _collapse(model, x, fresh)          # outputs equal the eager model within 1e-5
    gm = compiled.module
    counts = {op: len(op_nodes(gm, op)) for op in ("conv2d", "batch_norm", "linear", "add_")}
    assert counts == {"conv2d": convs, "batch_norm": 0, "linear": linears, "add_": 0}


def test_repmixer_difference_of_branches_merges_into_one_conv():
    """FastViT: mixer(x) - norm(x) is a sum whose second term enters negated; before subtractions were
    sums, fold-bn deferred the lone norm BN to reparameterize, which did not see it nor report it."""
    model = build(RepMixer, 8)
    x, fresh = _inputs(2, 8, 6, 6)
    captured = op_names(surgeon.capture(model, (x,)))
    assert captured.count("batch_norm") == 4 and captured.count("conv2d") == 2 and "sub" in captured
    compiled, row = _collapse(model, x, fresh)
    assert op_names(compiled.module) == ["conv2d", "mul", "add"]
    assert row.matches == 1 and not row.rejections
    assert row.notes == ["parallel: conv2d 3x3 groups 8 (mixer_kxk.0) + conv2d 1x1 groups 8 (mixer_scale.0) + "
                         "batch_norm identity (mixer_identity) + -batch_norm identity (norm) -> conv2d 3x3 (<root>)"]


def test_negated_branches_merge_with_their_signs_and_the_rest_is_subtracted():
    model = build(NegatedBranches, 4)
    x, fresh = _inputs(2, 4, 5, 5)
    assert op_names(surgeon.capture(model, (x,))) == ["conv2d", "batch_norm", "neg", "batch_norm", "sub", "relu",
                                                      "conv2d", "sub"]
    compiled, row = _collapse(model, x, fresh)
    assert sorted(op_names(compiled.module)) == ["conv2d", "conv2d", "relu", "sub"]
    assert row.matches == 1 and row.notes == [
        "parallel: -conv2d 3x3 (a.0) + -batch_norm identity (bn) -> conv2d 3x3 (<root>)"]


def test_attention_bias_gather_of_parameters_is_computed_once():
    model = build(AttentionBias)
    x, fresh = _inputs(2, 2, 9, 9)
    assert op_names(surgeon.capture(model, (x,))) == ["index", "add", "softmax", "view", "mul"]
    compiled, row = _collapse(model, x, fresh)
    gm = compiled.module
    assert op_names(gm) == ["add", "softmax", "view", "mul"]        # the view of gamma is free: kept
    assert row.matches == 1 and not row.rejections
    assert row.notes == ["constant: index (index) of parameters only -> a precomputed 2x9x9 tensor (<root>)"]
    names = dict(gm.named_parameters())
    assert "biases" not in names and not names["precomputed"].requires_grad
    assert names["gamma"].requires_grad


def test_weight_standardized_conv_becomes_a_plain_conv_and_takes_its_batch_norm():
    """BiT: the conv weight is computed from the parameter; once computed, the BN folds into the conv."""
    model = build(StdConv, 4, 6)
    x, fresh = _inputs(2, 4, 5, 5)
    captured = op_names(surgeon.capture(model, (x,)))
    assert captured.count("conv2d") == 1 and "batch_norm" in captured and "var" in captured
    compiled, row = _collapse(model, x, fresh)
    assert op_names(compiled.module) == ["conv2d", "relu"]
    assert row.notes[0].startswith("constant: div (div) of parameters only -> a precomputed 6x4x3x3 tensor")
    assert row.notes[1].startswith("fold-bn: ")


def test_mobileone_in_place_sum_is_one_parallel_merge():
    model = build(InplaceMobileOneBlock, 8, 8, 3, 1, 8, k=3)
    x, fresh = _inputs(2, 8, 6, 6)
    captured = op_names(surgeon.capture(model, (x,)))
    assert captured.count("add_") == 3 and captured.count("batch_norm") == 5
    compiled, row = _collapse(model, x, fresh)
    assert op_names(compiled.module) == ["conv2d", "relu"]
    assert row.matches == 1 and not row.rejections
    assert row.notes == ["parallel: conv2d 1x1 groups 8 (conv_scale.0) + conv2d 3x3 groups 8 (conv_kxk.0.0) + "
                         "conv2d 3x3 groups 8 (conv_kxk.1.0) + conv2d 3x3 groups 8 (conv_kxk.2.0) + "
                         "batch_norm identity (identity) -> conv2d 3x3 (<root>)"]


class DifferentInputs(nn.Module):
    """conv_a(x) + conv_b(relu(x)): branches, but none on a shared input."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.a(x) + self.b(torch.relu(x))


class SharedInPlace(nn.Module):
    """y = conv_a(x); z = 2 y; y += conv_b(x): the in-place add writes into a tensor z also reads."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.a(x)
        z = y * 2
        y += self.b(x)
        return y, z


@pytest.mark.parametrize("factory,ops,reason", [
    (DifferentInputs, ["conv2d", "relu", "conv2d", "add"],
     "no branches merge (a conv2d / linear merges with the other branches on its own input): "
     "conv2d 3x3 (a) on x; conv2d 1x1 (b) on relu"),
    (SharedInPlace, ["conv2d", "mul", "conv2d", "add_"],
     "in-place add into conv2d, which mul also read(s): merging its branches would change what they see"),
])
def test_a_sum_of_branches_that_merges_nothing_is_reported_with_the_reason(factory, ops, reason):
    model = build(factory)
    x, fresh = _inputs(2, 4, 6, 6)
    compiled, row = _collapse(model, x, fresh)
    assert op_names(compiled.module) == ops and row.matches == 0
    assert len(row.rejections) == 1 and row.rejections[0][1].startswith(reason)
