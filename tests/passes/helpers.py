"""Shared helpers for pass tests: op counts by target and outputs on the example inputs."""
from __future__ import annotations

from collections import Counter

import torch


def op_counts(gm) -> Counter:
    """How many call_function nodes of each target (short name, e.g. 'linear', 'add')."""
    return Counter(str(n.target).replace("aten.", "").split(".")[0] for n in gm.graph.nodes
                   if n.op == "call_function")


def adapter_nodes(gm, name=None) -> list:
    return [n for n in gm.graph.nodes if n.meta.get("surgeon_adapter") and
            (name is None or n.meta["surgeon_adapter"] == name)]


def logits(module, args) -> torch.Tensor:
    with torch.no_grad():
        out = module(*args)
    return out.logits if hasattr(out, "logits") else out
