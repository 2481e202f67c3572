"""The reshape rule of the coupled-group analysis: view / reshape into and out of heads.

The input and output shapes are cut into chunks of equal products (size-1 axes aside). A chunk
that keeps one axis keeps its label. A chunk that splits a channel axis of N into (h, d) is a
reshape into heads: the h axis moves in blocks of d channels (the space's unit becomes a
multiple of d) and the d axis is FIXED - positions inside a head never move, which is what keeps
rotary pairs and head_dim intact. A chunk that merges (h, d) back, h a channel axis in blocks of
d and d any axis whose positions never move, is the channel axis again; merging h with an
expanded (BCAST) axis of r copies gives the repeated heads of grouped-query attention (rep r).
Anything else that mixes a channel axis with other axes makes the channel space ineligible.
"""
from __future__ import annotations

import math

from .space import BCAST, FIXED, Fixed, Label


def chunks(ins: tuple[int, ...], outs: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair up runs of input and output axes (size-1 axes left out) whose sizes multiply equally."""
    a = [i for i, n in enumerate(ins) if n != 1]
    b = [j for j, n in enumerate(outs) if n != 1]
    pairs, p, q = [], 0, 0
    while p < len(a) and q < len(b):
        ci, co = [a[p]], [b[q]]
        pi, po = ins[a[p]], outs[b[q]]
        p, q = p + 1, q + 1
        while pi != po:
            if pi < po and p < len(a):
                ci.append(a[p])
                pi, p = pi * ins[a[p]], p + 1
            elif po < pi and q < len(b):
                co.append(b[q])
                po, q = po * outs[b[q]], q + 1
            else:
                return None
        pairs.append((ci, co))
    return pairs if p == len(a) and q == len(b) else None


def reshape(flow, node):
    labels, ins = flow.labels(node.args[0]), flow.shape(node.args[0])
    outs = flow.shape(node)
    out: list = [BCAST] * len(outs)
    pairs = chunks(ins, outs)
    if pairs is None:
        return flow.default(node)
    for ci, co in pairs:
        pieces = [labels[i] for i in ci]
        if len(ci) == 1:
            result = _split(flow, node, pieces[0], [outs[j] for j in co])
        elif len(co) == 1:
            result = [_merge(flow, node, pieces, [ins[i] for i in ci])]
        else:
            result = _mixed(flow, node, pieces, len(co))
        for j, label in zip(co, result):
            out[j] = label
    return tuple(out)


def _plain(labels) -> object | None:
    """FIXED or BCAST when every label is that, else None."""
    if all(isinstance(label, Fixed) for label in labels):
        return labels[0]
    return BCAST if all(label is BCAST for label in labels) else None


def _split(flow, node, label, sizes: list[int]) -> list:
    if not isinstance(label, Label):
        return [label] * len(sizes)
    inner = math.prod(sizes[1:])
    if label.rep != 1:
        flow.poison(label, node, f"reshape splits repeated heads into {sizes}")
        return [FIXED] * len(sizes)
    flow.spaces.require_unit(label.space, label.unit * inner)
    return [Label(label.space, label.unit * inner)] + [FIXED] * (len(sizes) - 1)


# merging (h, d) where h moves in blocks of d and d never moves gives back the channel axis
def _merge(flow, node, labels: list, sizes: list[int]):
    plain = _plain(labels)
    if plain is not None:
        return plain
    head, rest, inner = labels[0], labels[1:], math.prod(sizes[1:])
    if isinstance(head, Label) and head.rep == 1:
        if all(isinstance(label, Fixed) for label in rest) and inner == head.unit:
            return Label(head.space, 1)
        if all(label is BCAST for label in rest):
            return Label(head.space, head.unit, inner)
    for label in labels:
        flow.poison(label, node, f"reshape merges axes of sizes {sizes} around a channel axis")
    return FIXED


def _mixed(flow, node, labels: list, count: int) -> list:
    plain = _plain(labels)
    if plain is None:
        for label in labels:
            flow.poison(label, node, "reshape regroups a channel axis with other axes")
        plain = FIXED
    return [plain] * count
