"""Patterns as data, rules as (pattern, builder), rule sets that compose with `+`.

A Pattern names canonical ops by short name, a module-path glob, and which captures must be
parameters. Matching a node gives a Match whose captures are named by the op's signature
(e.g. linear -> x, weight, bias), so a builder reads `m["weight"]`, never `node.args[1]`.
A builder returns a node (the replacement), True (rewrote in place), or a string: the reason
the rule does not apply, which goes into the report.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from .graph import module_path

aten = torch.ops.aten

_CONV_ARGS = ("x", "weight", "bias", "stride", "padding", "dilation", "groups")

# op short name -> (aten overload, argument names in order)
SIGNATURES: dict[str, tuple[Any, tuple[str, ...]]] = {
    "linear": (aten.linear.default, ("x", "weight", "bias")),
    "addmm": (aten.addmm.default, ("bias", "x", "weight")),
    "add": (aten.add.Tensor, ("x", "other", "alpha")),
    "conv2d": (aten.conv2d.default, _CONV_ARGS),
    # the other convs, and the string-padding overloads (`padding="same"` / "valid") export writes
    "conv1d": (aten.conv1d.default, _CONV_ARGS),
    "conv3d": (aten.conv3d.default, _CONV_ARGS),
    "conv1d.padding": (aten.conv1d.padding, _CONV_ARGS),
    "conv2d.padding": (aten.conv2d.padding, _CONV_ARGS),
    "conv3d.padding": (aten.conv3d.padding, _CONV_ARGS),
    "batch_norm": (aten.batch_norm.default, ("x", "weight", "bias", "running_mean", "running_var",
                                             "training", "momentum", "eps", "cudnn_enabled")),
    "sdpa": (aten.scaled_dot_product_attention.default, ("query", "key", "value", "attn_mask", "dropout_p",
                                                         "is_causal", "scale", "enable_gqa")),
}
_BY_TARGET = {target: name for name, (target, _) in SIGNATURES.items()}
# the conv ops adapters can sit on (rules.SIGNATURES names), every dimensionality and padding overload
CONV_OPS = ("conv1d", "conv2d", "conv3d", "conv1d.padding", "conv2d.padding", "conv3d.padding")


@dataclass(frozen=True)
class Pattern:
    """Match a call of one of `ops` inside a module whose path matches `path`."""

    ops: tuple[str, ...]
    path: str = "*"
    params: tuple[str, ...] = ("weight",)   # captures that must be get_attr nodes

    def match(self, node: fx.Node) -> "Match | None":
        if node.op != "call_function" or _BY_TARGET.get(node.target) not in self.ops:
            return None
        op = _BY_TARGET[node.target]
        names = SIGNATURES[op][1]
        captures = dict(zip(names, node.args))
        captures.update({k: v for k, v in node.kwargs.items() if k in names})
        for name in names:
            captures.setdefault(name, None)
        if any(not (isinstance(captures[p], fx.Node) and captures[p].op == "get_attr") for p in self.params):
            return None
        path = module_path(node)
        if not path_matches(path, self.path):
            return None
        return Match(node, op, path, captures)

    def __str__(self) -> str:
        return f"{'|'.join(self.ops)} @ {self.path}"


def path_matches(path: str, glob: str) -> bool:
    """Glob over dotted module paths; `*.q_proj` also matches a top-level `q_proj`."""
    return fnmatch.fnmatchcase(path, glob) or (glob.startswith("*.") and fnmatch.fnmatchcase(path, glob[2:]))


@dataclass
class Match:
    node: fx.Node
    op: str
    path: str
    captures: dict[str, Any]

    def __getitem__(self, name: str) -> Any:
        return self.captures[name]


Builder = Callable[[Match], "fx.Node | bool | str | None"]


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: Pattern
    builder: Builder


@dataclass(frozen=True)
class RuleSet:
    rules: tuple[Rule, ...]

    def __add__(self, other: "RuleSet") -> "RuleSet":
        return RuleSet(self.rules + other.rules)


@dataclass
class RewriteResult:
    matches: list[tuple[str, str]] = field(default_factory=list)      # (rule, node path)
    rejections: list[tuple[str, str]] = field(default_factory=list)   # (where, reason)


def find(gm: fx.GraphModule, pattern: Pattern) -> list[Match]:
    """All matches of `pattern` in graph order."""
    return [m for node in gm.graph.nodes if (m := pattern.match(node)) is not None]


def rewrite(gm: fx.GraphModule, rules: RuleSet | Iterable[Rule]) -> RewriteResult:
    """Apply each rule to each node it matches (graph order, nodes as they are when reached;
    erased nodes are skipped); collect matches and reasons."""
    from .errors import PassError

    result = RewriteResult()
    for rule in (rules.rules if isinstance(rules, RuleSet) else tuple(rules)):
        for node in list(gm.graph.nodes):
            # matched lazily: an earlier builder may have erased or rewired this node
            if getattr(node, "_erased", False) or (match := rule.pattern.match(node)) is None:
                continue
            try:
                outcome = rule.builder(match)
            except PassError:
                raise
            except Exception as error:
                raise PassError("?", f"{type(error).__name__}: {error}", rule=rule.name,
                                node=f"{match.node.name} ({match.path})") from error
            if isinstance(outcome, str):
                result.rejections.append((f"{rule.name} @ {match.path}", outcome))
            elif outcome is not None and outcome is not False:
                result.matches.append((rule.name, match.path))
    return result
