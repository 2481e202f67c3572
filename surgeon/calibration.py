"""Statistics of what flows into adapter sites, gathered by running the captured graph on calibration inputs.

Data-driven inits (CorDA, EVA) need, per site, a statistic of the site's input activations, which a
weight alone cannot give. `input_covariances` runs the graph once per example (the compile's example
inputs: `ctx.examples`), in eval mode and without gradients, through an fx.Interpreter that watches
the input node of each site, and accumulates per site, as PEFT's CorDA preprocessing does per forward
call:

    X = the input as rows (leading dims flattened), in float32, divided by |max(X)|
    C += X^T X,  calls += 1,  and at the end C /= calls

(PEFT's hook takes the input of a batch-1 call as rows; surgeon flattens any batch, so the two
agree at batch 1.) Nothing is kept of the activations themselves: memory is one in x in matrix per
site, and the graph and its parameters are left as they were.

`input_scatters` (EVA) runs the graph the same way and keeps, per site, the rows as they are (every
call's and every example's rows pooled, float64), their sum and their count, giving the scatter
matrix of the centered rows, sum_i (x_i - mean)(x_i - mean)^T: its eigenvectors are the right-singular
vectors of the centered rows (a PCA of the site's inputs) and its eigenvalues their squared singular
values.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx

from .errors import SurgeonError
from .modes import evaluating
from .pipeline import frozen, placed


def _as_rows(value: torch.Tensor) -> torch.Tensor:
    return value.detach().reshape(-1, value.shape[-1]).float()


class _Watcher(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watched: dict[fx.Node, list[str]], sums: dict, calls: dict,
                 centered: bool = False):
        super().__init__(gm)
        self.watched, self.sums, self.calls, self.centered = watched, sums, calls, centered

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        for key in self.watched.get(n, ()):
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                raise SurgeonError(f"calibration: the input of site '{key}' is no floating-point tensor")
            rows = _as_rows(out)
            if self.centered:   # EVA: raw rows, float64 sums (X^T X, the row sum) and the row count
                rows = rows.double()
                if not torch.isfinite(rows).all():
                    raise SurgeonError(f"calibration: the input of site '{key}' is not finite on a calibration "
                                       "example; pass other example inputs")
                gram, total = self.sums.get(key, (0, 0))
                self.sums[key] = (gram + rows.T @ rows, total + rows.sum(0))
                self.calls[key] = self.calls.get(key, 0) + rows.shape[0]
                continue
            peak = rows.max().abs()
            if not torch.isfinite(rows).all() or peak == 0:
                raise SurgeonError(f"calibration: the input of site '{key}' is all zeros or not finite on a "
                                   "calibration example; pass other example inputs")
            rows = rows / peak
            self.sums[key] = self.sums.get(key, 0) + rows.T @ rows
            self.calls[key] = self.calls.get(key, 0) + 1
        return out


def input_covariances(gm: fx.GraphModule, examples: list[tuple[tuple, dict]],
                      inputs: dict[str, list[fx.Node]]) -> dict[str, torch.Tensor]:
    """{key: in x in covariance (float32)} of the nodes `inputs[key]` over the examples (see the module doc):
    a site whose module runs several times per forward has one input node per call, each counted as a call."""
    sums, calls = _watch(gm, examples, inputs, centered=False)
    return {key: sums[key] / calls[key] for key in inputs}


def input_scatters(gm: fx.GraphModule, examples: list[tuple[tuple, dict]],
                   inputs: dict[str, list[fx.Node]]) -> dict[str, tuple[torch.Tensor, int]]:
    """{key: (in x in scatter matrix of the centered rows (float64), the row count)} of the nodes `inputs[key]`
    over the examples, every call's rows pooled (see the module doc)."""
    sums, rows = _watch(gm, examples, inputs, centered=True)
    return {key: (sums[key][0] - torch.outer(sums[key][1], sums[key][1]) / rows[key], rows[key]) for key in inputs}


def _watch(gm, examples, inputs, centered):
    watched: dict[fx.Node, list[str]] = {}
    for key, nodes in inputs.items():
        for node in nodes:
            watched.setdefault(node, []).append(key)
    sums: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    signature = inspect.signature(gm.forward)
    with torch.no_grad(), evaluating(gm), frozen(gm):
        for example in examples:
            args, kwargs = placed(gm, example)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            _Watcher(gm, watched, sums, calls, centered).run(*bound.args)
    missing = [key for key in inputs if key not in sums]
    if missing:
        raise SurgeonError(f"calibration: sites {missing} were not reached by the calibration examples")
    return sums, calls
