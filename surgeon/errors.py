"""The error hierarchy: every failure surgeon reports is a SurgeonError that names what and where."""
from __future__ import annotations


class SurgeonError(Exception):
    """Base class of every error surgeon raises on purpose."""


class SpecError(SurgeonError, ValueError):
    """The spec is malformed: names the key (and the file line where known) and what is wrong."""

    def __init__(self, key: str, message: str, line: int | None = None, source: str | None = None):
        self.key, self.line, self.source = key, line, source
        where = key
        if source:
            where = f"{source}:{line}: {key}" if line else f"{source}: {key}"
        elif line:
            where = f"line {line}: {key}"
        super().__init__(f"spec {where}: {message}")


class CaptureError(SurgeonError):
    """Neither front end could capture the model; says which failed, why, and what to try."""


class PassError(SurgeonError):
    """A pass failed: names the pass, the rule and the node, and the passes that ran before."""

    def __init__(self, pass_name: str, message: str, rule: str | None = None, node: str | None = None,
                 before: list[str] | None = None):
        self.pass_name, self.rule, self.node = pass_name, rule, node
        parts = [f"pass '{pass_name}'"]
        if rule:
            parts.append(f"rule '{rule}'")
        if node:
            parts.append(f"node '{node}'")
        tail = f" (after passes: {', '.join(before)})" if before else ""
        super().__init__(f"{', '.join(parts)}: {message}{tail}")


class KernelError(SurgeonError, RuntimeError):
    """A generated kernel could not be built, chosen or launched: names the op and the shape bucket."""


class InputError(SurgeonError, TypeError, ValueError):
    """A call of a compiled module the captured graph cannot take: names the argument, what was captured
    (a baked value, a static size, a size's range) and how to compile for it."""
