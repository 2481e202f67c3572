"""fold-bn: before / after structure, equality with the original eager model, match counts, refusals."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import surgeon
from surgeon.passes.fold_bn import FoldBn
from surgeon.pipeline import Context
from surgeon.spec import load_spec
from tests.conftest import assert_untouched, snapshot
from tests.passes.rep_models import assert_matches_eager, build, conv_bn, op_names

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
