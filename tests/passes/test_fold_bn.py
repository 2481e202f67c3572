"""fold-bn: before / after structure, equality with the original eager model, match counts, refusals."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import surgeon
from surgeon.graph import lint
from surgeon.passes.fold_bn import FoldBn
from surgeon.pipeline import Context
from surgeon.spec import load_spec
from tests.conftest import assert_untouched, snapshot
from tests.passes.rep_models import (FlatConvNorm, LinearNorm, NormLinear, assert_matches_eager, build, conv_bn,
                                     op_names)

FOLD = {"pipeline": ["fold-bn"]}


def _inputs(*shape):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)


def _fold(model, x):
    before = op_names(surgeon.capture(model, (x,)))
    compiled = surgeon.compile(model, (x,), FOLD)
    return before, compiled, compiled.report.rows[-1]


@pytest.mark.parametrize("groups,bias", [(1, False), (1, True), (2, True), (8, False)])   # 8: depthwise
def test_conv_then_bn_folds_into_the_conv(groups, bias):
    model = build(lambda: nn.Sequential(conv_bn(8, 8, 3, 1, 1, groups, bias), nn.ReLU(), conv_bn(8, 16, 1)))
    x, fresh = _inputs(2, 8, 7, 7)
    saved = snapshot(model)
    before, compiled, row = _fold(model, x)
    assert before == ["conv2d", "batch_norm", "relu", "conv2d", "batch_norm"]
    assert op_names(compiled.module) == ["conv2d", "relu", "conv2d"]
    assert row.matches == 2 and not row.rejections
    assert_matches_eager(model, compiled.module, x, fresh)
    assert_untouched(model, saved)
    folded = compiled.module.get_parameter("0.0.weight")
    assert folded.data_ptr() != model[0][0].weight.data_ptr(), "folded weights are new tensors"
    assert not any("running" in name for name, _ in compiled.module.named_buffers()), "BN buffers dropped"


def test_linear_then_bn1d_and_bn1d_then_linear_fold():
    model = build(lambda: nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(),
                                        nn.BatchNorm1d(5), nn.Linear(5, 3)))
    x, fresh = _inputs(4, 6)
    before, compiled, row = _fold(model, x)
    assert before == ["linear", "batch_norm", "relu", "batch_norm", "linear"]
    assert op_names(compiled.module) == ["linear", "relu", "linear"]
    assert row.matches == 2 and row.notes == ["linear 6->5 (0) <- batch_norm (1)",
                                              "batch_norm (3) -> linear 5->3 (4)"]
    assert_matches_eager(model, compiled.module, x, fresh)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_bn_then_unpadded_conv_folds_into_the_conv(groups):
    model = build(lambda: nn.Sequential(nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, stride=2, groups=groups)))
    x, fresh = _inputs(2, 8, 9, 9)
    before, compiled, row = _fold(model, x)
    assert (before, op_names(compiled.module)) == (["batch_norm", "conv2d"], ["conv2d"])
    assert row.matches == 1
    assert_matches_eager(model, compiled.module, x, fresh)


def test_bn_then_padded_conv_is_refused_unless_the_shift_is_zero():
    model = build(lambda: nn.Sequential(nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, padding=1)))
    x, fresh = _inputs(2, 8, 6, 6)
    _, compiled, row = _fold(model, x)
    assert op_names(compiled.module) == ["batch_norm", "conv2d"] and row.matches == 0
    assert len(row.rejections) == 1 and "zero padding after a BatchNorm" in row.rejections[0][1]

    unshifted = build(lambda: nn.Sequential(nn.BatchNorm2d(8, affine=False), nn.Conv2d(8, 4, 3, padding=1)))
    unshifted[0].running_mean.zero_()          # BN(x) = x / sqrt(var + eps): zero maps to zero
    _, compiled, row = _fold(unshifted, x)
    assert op_names(compiled.module) == ["conv2d"] and row.matches == 1
    assert_matches_eager(unshifted, compiled.module, x, fresh)


class SharedConvOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.norm(y), y


def test_bn_whose_input_has_other_users_is_refused():
    model = build(SharedConvOutput)
    x, fresh = _inputs(2, 4, 5, 5)
    _, compiled, row = _fold(model, x)
    assert op_names(compiled.module) == ["conv2d", "batch_norm"] and row.matches == 0
    assert row.rejections == [("fold-bn @ norm", "the BN's input conv2d (conv2d 3x3 (conv)) has other users (output)")]
    assert_matches_eager(model, compiled.module, x, fresh)


def test_bn_in_training_mode_is_refused():
    model = build(lambda: nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)))
    x, _ = _inputs(3, 4, 5, 5)
    _, compiled, row = _fold(model, x)
    assert op_names(compiled.module) == ["conv2d", "batch_norm"]
    assert "training mode" in row.rejections[0][1]


class LinearOverSequence(nn.Module):
    """linear on (N, L, C) then BatchNorm1d(L): the BN scales dim 1 (positions), not the features."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm = nn.Linear(6, 5), nn.BatchNorm1d(5)

    def forward(self, x):
        return self.norm(self.fc(x))


def test_bn_over_a_non_feature_dim_is_refused_also_without_captured_shapes():
    model = build(LinearOverSequence)
    x, _ = _inputs(2, 5, 6)
    gm = surgeon.capture(model, (x,))
    for node in gm.graph.nodes:          # as after a pass that made nodes without meta["val"]
        node.meta.pop("val", None)
    ctx = Context(load_spec({"pipeline": []}), (x,), {}, {}, torch.Generator())
    result = FoldBn().run(gm, ctx)
    assert result.matches == 0 and "acts on the last dim" in result.rejections[0][1]
    assert op_names(gm) == ["linear", "batch_norm"]


# ---------------------------------------------------------------- through reshapes and eval dropouts (issue 18)

@pytest.mark.parametrize("drop_shapes", [False, True])
def test_levit_bn1d_over_flattened_tokens_folds_into_the_linear(drop_shapes):
    model = build(LinearNorm, 6, 8)                       # bn(linear(x).flatten(0, 1)).reshape_as(linear(x))
    x, fresh = _inputs(2, 5, 6)
    gm = surgeon.capture(model, (x,))
    assert op_names(gm) == ["linear", "flatten", "batch_norm", "reshape_as"]
    if drop_shapes:                      # as after a pass that made nodes without meta["val"]
        for node in gm.graph.nodes:
            node.meta.pop("val", None)
    ctx = Context(load_spec({"pipeline": []}), (x,), {}, {}, torch.Generator())
    result = FoldBn().run(gm, ctx)
    assert op_names(gm) == ["linear", "flatten", "reshape_as"] and not result.rejections
    assert result.notes == ["linear 6->8 (linear) <- batch_norm (bn) through flatten"]
    lint(gm)                             # what the pass manager does after each pass: recompiles the module
    assert_matches_eager(model, gm, x, fresh)


def test_bn1d_on_a_conv_output_flattened_over_space_folds_into_the_conv():
    model = build(FlatConvNorm, 8, 8, 3, 1, 8)            # bn(conv(x).flatten(2)).view_as(conv(x))
    x, fresh = _inputs(2, 8, 5, 5)
    before, compiled, row = _fold(model, x)
    assert before == ["conv2d", "flatten", "batch_norm", "view_as"]
    assert op_names(compiled.module) == ["conv2d", "flatten", "view_as"]
    assert row.notes == ["conv2d 3x3 groups 8 (conv) <- batch_norm (bn) through flatten"]
    assert_matches_eager(model, compiled.module, x, fresh)


def test_bn1d_dropout_linear_head_folds_the_bn_into_the_linear():
    model = build(NormLinear, 8, 5)
    x, fresh = _inputs(4, 8)
    before, compiled, row = _fold(model, x)
    assert before == ["batch_norm", "dropout", "linear"]
    assert op_names(compiled.module) == ["dropout", "linear"]
    assert row.notes == ["batch_norm (bn) -> linear 8->5 (linear) through dropout"]
    assert_matches_eager(model, compiled.module, x, fresh)


class ReshapedAcrossFeatures(nn.Module):
    """linear (N, L, 8) then a BN over a reshape that does not keep the 8 features as its channels."""

    def __init__(self, shape):
        super().__init__()
        self.fc, self.norm, self.shape = nn.Linear(6, 8), nn.BatchNorm1d(shape[1]), shape

    def forward(self, x):
        y = self.fc(x)
        return self.norm(y.reshape(self.shape)).reshape_as(y)


@pytest.mark.parametrize("shape", [(-1, 4), (2, 40)])     # features split in two / tokens and features merged
def test_a_reshape_that_moves_values_across_channels_is_refused(shape):
    model = build(ReshapedAcrossFeatures, shape)
    x, fresh = _inputs(2, 5, 6)
    _, compiled, row = _fold(model, x)
    assert op_names(compiled.module) == ["linear", "reshape", "batch_norm", "reshape_as"] and row.matches == 0
    assert len(row.rejections) == 1
    assert "does not keep the op's features as the BN's channels" in row.rejections[0][1]
    assert_matches_eager(model, compiled.module, x, fresh)


def test_a_batch_norm_with_no_op_next_to_it_is_reported():
    model = build(lambda: nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)))
    x, _ = _inputs(2, 4, 6, 6)
    _, compiled, row = _fold(model, x)
    assert op_names(compiled.module) == ["conv2d", "relu", "batch_norm"] and row.matches == 0
    assert row.rejections == [("fold-bn @ 2", "no conv2d / linear next to it (through reshapes and eval dropouts): "
                                             "it reads relu (relu), its output goes to output (output)")]
