"""fuse's report: a refusal is listed only while it is true of the final regions.

partition's first round records why a candidate was not fused; its later rounds (and the first
round's regrouping) can still fuse that candidate's nodes: a row group refused for a broadcast is
grouped again without its mean, and a later round, with its neighbours contracted, makes the mean
a row kernel of its own. The report (the returned list, `surgeon show`, the log) must then not
list the refusal; one whose nodes were only partly fused names those left, "(still unfused: ...)";
a refused merge "region + user" stays listed while the user is outside that region. Only partition
runs here: no kernel, no interpreter.
"""
from __future__ import annotations

import logging

from torch import nn

import surgeon
from surgeon.passes.fuse import partition
from tests.passes.test_fuse_fuzz import (B, T, MiddleMean, ReadEachOther, RowOfItsOwn, assert_no_stale_refusal,
                                         tame)


class TwoMeans(nn.Module):
    def forward(self, x, b):                         # x [B, T, H], b [B, 1, H]
        return x * 2.0 - (b * 0.5).mean(-1, keepdim=True) + (x * 3.0).mean(1, keepdim=True)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def partition_logged(module: nn.Module, *args, static: bool = False) -> tuple[list, list, list[str]]:
    """(regions as node-name lists, rejections, the "not fused" log lines) of the captured module."""
    gm = surgeon.compile(module.eval(), args, {"adapters": [], "pipeline": [], "static_shapes": static}).module
    logger, lines = logging.getLogger("surgeon.fuse"), Lines()
    level = logger.level
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    try:
        regions, rejections = partition(gm)
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    assert_no_stale_refusal(gm, regions, rejections)
    assert lines.lines == [f"not fused: {where}: {why}" for where, why in rejections]    # the log is the list
    return sorted([n.name for n in r.nodes] for r in regions), rejections, lines.lines


def test_regression_a_refusal_a_later_round_made_false_is_not_reported():
    """The row group mul, mean, mul, sub has no row kernel (b is [B, 1, H] against [B, T, H]) and
    is grouped again without the mean; a later round groups b * 0.5 and the mean as a row kernel.
    Before: ('row group at ', '... a row kernel reads and writes only rows ...; grouped again
    without mean') was still listed, and logged, though every node it named was fused."""
    regions, rejections, lines = partition_logged(RowOfItsOwn(), tame(B, T, 8), tame(B, 1, 8, seed=1))
    assert regions == [["mul", "sub"], ["mul_1", "mean"]]
    assert rejections == [] and lines == []


def test_a_refusal_partly_made_false_names_the_nodes_it_still_leaves_out():
    """Two reductions leave the row group: the last-dim mean of b * 0.5 is a row kernel later, the
    mean over T has no rule and stays eager: the refusal is kept for it alone. Static shapes: with T
    symbolic, the broadcast check cannot prove T != 1, so the first row group refuses mean_1 alone and
    there is nothing partly fused to report (the final regions are the same either way)."""
    regions, rejections, _ = partition_logged(TwoMeans(), tame(B, T, 8), tame(B, 1, 8, seed=1), static=True)
    assert regions == [["mul", "sub", "add"], ["mul_1", "mean"]]
    assert [where for where, _ in rejections] == ["row group at  (still unfused: mean_1)"]
    assert "a mean over other dims than the last" in rejections[0][1]


def test_a_node_kept_out_of_a_group_that_then_joins_one_is_not_reported():
    """add could not join {mul, mean, div, tanh} (mul -> clamp -> add); the group was split at its
    mean and add joined div: its refusal ('starts a new group') is gone, the mean's is kept."""
    regions, rejections, _ = partition_logged(MiddleMean(), tame(B, T, 8))
    assert regions == [["div", "add"], ["mul", "tanh"]]
    assert [where for where, _ in rejections] == ["row group at "]
    assert "grouped again without mean" in rejections[0][1]


def test_a_refusal_whose_nodes_stay_unfused_is_kept():
    """The group left out for a cycle groups with nothing later: its reason stays as it was."""
    regions, rejections, _ = partition_logged(ReadEachOther(), tame(B, T, 8), tame(B, T, 8, seed=1))
    assert regions == [["mul", "mul_1", "exp"]]
    assert [where for where, _ in rejections] == ["elementwise@#2"] and "cycle" in rejections[0][1]
