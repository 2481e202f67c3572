"""Channel spaces for the coupled-group analysis: a union-find over index spaces.

A *space* is a set of N channel indices that one permutation acts on. Every axis of every
tensor the graph reads (parameters and buffers) starts as its own space; the transfer rules in
rules.py join spaces that must be permuted together, and record what limits them:

- `unit`: the permutation moves contiguous blocks of this many indices (a head of head_dim
  channels); indices inside a block never move, so rotary pairs stay where they are;
- `parts`: the space is a concatenation of sub-spaces (a fused q|k|v projection split into
  three, a torch.cat of channels): its permutation is the direct sum of the parts' ones;
- ties: the coarse blocks of one space (the n_rep query heads that share a key/value head)
  move exactly as the units of another (the key/value heads) - grouped-query attention;
- poison reasons (an op with no rule, the graph output, a gather by index...) make a space
  ineligible; residual reasons mark a space that a residual add ties to another producer.

An axis of a tensor is described by a Label: which space it carries, the block size one axis
index stands for (`unit`), and `rep`, the number of consecutive axis indices that are copies of
one block (k/v heads expanded for grouped-query attention). A Fixed (FIXED, or one that names
its origin) marks an axis whose positions must not move; BCAST an axis the values are constant
along (size 1, or expanded).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Label:
    space: int
    unit: int = 1
    rep: int = 1


@dataclass(frozen=True)
class Fixed:
    """Positions that never move (batch, sequence, head_dim, spatial ...); `origin` says what fixed
    them when it is worth naming (a graph input, an op without a transfer rule)."""

    origin: str = ""


FIXED = Fixed()
BCAST = "bcast"       # size 1 or expanded copies: constant along the axis


@dataclass
class Space:
    size: int
    parent: int
    unit: int = 1
    parts: list[int] | None = None
    members: list[tuple[str, int, int, int]] = field(default_factory=list)   # (target, axis, start, stop)
    poison: list[str] = field(default_factory=list)
    residual: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Tie:
    """Blocks of `coarse` indices of `fine` move as the `unit`-blocks of `other` (GQA)."""

    fine: int
    coarse: int
    other: int
    unit: int
    where: str


class Spaces:
    """The union-find of channel spaces, with units, parts, ties and reasons."""

    def __init__(self) -> None:
        self.spaces: list[Space] = []
        self.ties: list[Tie] = []

    def new(self, size: int, member: tuple[str, int, int, int] | None = None) -> int:
        """A fresh space of `size` indices (optionally the axis of a tensor it stands for)."""
        index = len(self.spaces)
        self.spaces.append(Space(size, index, members=[member] if member else []))
        return index

    def find(self, index: int) -> int:
        root = index
        while self.spaces[root].parent != root:
            root = self.spaces[root].parent
        while self.spaces[index].parent != root:
            self.spaces[index].parent, index = root, self.spaces[index].parent
        return root

    def root(self, index: int) -> Space:
        return self.spaces[self.find(index)]

    def size(self, index: int) -> int:
        return self.spaces[index].size

    def poison(self, index: int, reason: str) -> None:
        reasons = self.root(index).poison
        if reason not in reasons:
            reasons.append(reason)

    def mark_residual(self, index: int, reason: str) -> None:
        reasons = self.root(index).residual
        if reason not in reasons:
            reasons.append(reason)

    def require_unit(self, index: int, unit: int) -> None:
        """The space moves in blocks of (a multiple of) `unit` indices."""
        space = self.root(index)
        space.unit = math.lcm(space.unit, unit)
        if space.size % space.unit:
            self.poison(index, f"blocks of {space.unit} do not tile {space.size} channels")

    def union(self, a: int, b: int, why: str) -> None:
        """Spaces a and b carry one permutation (both must have the same size)."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        A, B = self.spaces[ra], self.spaces[rb]
        if A.size != B.size:
            self.poison(ra, f"{why}: {A.size} channels joined with {B.size}")
            self.poison(rb, f"{why}: {B.size} channels joined with {A.size}")
            return
        if A.parts is not None or B.parts is not None:
            self._union_parts(ra, rb, why)
            ra, rb = self.find(ra), self.find(rb)
            if ra == rb:
                return
            A, B = self.spaces[ra], self.spaces[rb]
        B.parent = ra
        A.unit = math.lcm(A.unit, B.unit)
        A.parts = A.parts if A.parts is not None else B.parts
        A.members += B.members
        A.poison += [r for r in B.poison if r not in A.poison]
        A.residual += [r for r in B.residual if r not in A.residual]
        if A.size % A.unit:
            self.poison(ra, f"{why}: blocks of {A.unit} do not tile {A.size} channels")

    def _union_parts(self, ra: int, rb: int, why: str) -> None:
        cuts = self._cuts(ra) | self._cuts(rb)
        for cut in sorted(cuts):
            self.split_at(ra, cut)
            self.split_at(rb, cut)
        left, right = self.leaves(ra), self.leaves(rb)
        if [n for _, _, n in left] != [n for _, _, n in right]:
            self.poison(ra, f"{why}: could not align the parts of two concatenated spaces")
            return
        for (x, _, _), (y, _, _) in zip(left, right):
            if (x, y) != (ra, rb):
                self.union(x, y, why)

    def _cuts(self, index: int) -> set[int]:
        return {start for _, start, _ in self.leaves(index)} - {0}

    def leaves(self, index: int, depth: int = 0) -> list[tuple[int, int, int]]:
        """(leaf space, start, length) covering the space, in order."""
        space = self.root(index)
        if space.parts is None or depth > 32:
            return [(self.find(index), 0, space.size)]
        out, offset = [], 0
        for part in space.parts:
            for leaf, start, length in self.leaves(part, depth + 1):
                out.append((leaf, offset + start, length))
            offset += self.root(part).size
        return out

    def split_at(self, index: int, cut: int, depth: int = 0) -> None:
        """Give the space a part boundary at index `cut` (0 < cut < size)."""
        space = self.root(index)
        if not 0 < cut < space.size or depth > 32:
            return
        if space.parts is None:
            space.parts = [self.new(cut), self.new(space.size - cut)]
            return
        offset = 0
        for part in space.parts:
            size = self.root(part).size
            if offset < cut < offset + size:
                self.split_at(part, cut - offset, depth + 1)
            offset += size

    def range_space(self, index: int, start: int, stop: int) -> int:
        """A space standing for indices [start, stop) of `index` (an existing part or a concat)."""
        if start == 0 and stop == self.size(index):
            return index
        self.split_at(index, start)
        self.split_at(index, stop)
        inside = [leaf for leaf, s, n in self.leaves(index) if s >= start and s + n <= stop]
        return inside[0] if len(inside) == 1 else self.concat(inside)

    def concat(self, parts: list[int]) -> int:
        """A new space that is the concatenation of `parts`."""
        index = self.new(sum(self.root(p).size for p in parts))
        self.spaces[index].parts = list(parts)
        return index

    def tie(self, fine: int, coarse: int, other: int, unit: int, where: str) -> None:
        self.ties.append(Tie(fine, coarse, other, unit, where))
