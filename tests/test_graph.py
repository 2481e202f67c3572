"""surgeon/graph.py's node ordering: out-of-order nodes are pulled up; a cycle is an error, not a hang."""
from __future__ import annotations

import operator

import pytest
import torch.fx as fx

from surgeon.graph import sort_topologically


def chain_graph():
    graph = fx.Graph()
    x = graph.placeholder("x")
    a = graph.call_function(operator.add, (x, 1))
    b = graph.call_function(operator.mul, (a, 2))
    graph.output(b)
    return graph, x, a, b


def test_a_node_defined_after_its_user_is_pulled_up():
    graph, x, a, b = chain_graph()
    b.prepend(graph.call_function(operator.neg, (x,)))     # fine where it is
    late = graph.call_function(operator.sub, (x, 3))
    b.append(late)                                         # defined after b ...
    b.args = (a, late)                                     # ... which now reads it
    assert sort_topologically(graph)
    names = [n.name for n in graph.nodes]
    assert names.index(late.name) < names.index(b.name) and names[0] == "x" and names[-1] == "output"
    graph.lint()
    assert not sort_topologically(graph)                   # already ordered: nothing moves


def test_a_cycle_is_an_error_naming_a_node_on_it():
    graph, x, a, b = chain_graph()
    a.args = (b, 1)                                        # a reads b, b reads a
    with pytest.raises(ValueError, match="the graph has a cycle through '(add|mul)'"):
        sort_topologically(graph)
